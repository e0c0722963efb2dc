// A server restart in the middle of a browser's watch: the page resumes from
// the versions it holds, losing and repeating nothing. The server runs on a
// Redis Cluster (PRESENCE_TEST_REDIS_CLUSTER), which keeps contacts and
// presence across the restart, as production does.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { Browser } from "playwright-core";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createPresenceClient } from "../../src/index.js";
import { type ServerProcess, addContacts, mintToken, startServer, uniqueUser } from "../harness.js";
import { type PageServer, launchBrowser, servePages } from "./browser.js";
import { call, pageSees } from "./pages.js";

const redis = process.env.PRESENCE_TEST_REDIS_CLUSTER;
let server: ServerProcess;
let pages: PageServer;
let browser: Browser;

before(async () => {
  if (!redis) return;
  [server, pages, browser] = await Promise.all([startServer(["--redis-cluster", redis]), servePages(), launchBrowser()]);
});
after(async () => {
  await Promise.allSettled([browser?.close(), pages?.close(), server?.stop()]);
});

test("a server restart mid-watch resumes without a lost or duplicated change", { skip: !redis && "PRESENCE_TEST_REDIS_CLUSTER is not set" }, async (t) => {
  const grace = uniqueUser("grace");
  const heidi = uniqueUser("heidi");
  await addContacts(server.baseUrl, grace, [heidi]);
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(pages.origin);
  await call(page, "open", { baseUrl: server.baseUrl, token: mintToken(grace) });
  await call(page, "synced");
  const heidiClient = createPresenceClient({
    baseUrl: server.baseUrl,
    token: mintToken(heidi),
    transport: (options) => createGrpcTransport(options),
    backoff: { maxMs: 300 },
  });
  try {
    for (const message of ["before 1", "before 2"]) {
      await heidiClient.setStatus("busy", message);
      await pageSees(page, message, 2000, "message", heidi);
    }
    await server.restart();
    await heidiClient.setStatus("busy", "after 1");
    await pageSees(page, "after 1", 5000, "message", heidi);
    await heidiClient.setStatus("busy", "after 2");
    await pageSees(page, "after 2", 2000, "message", heidi);

    const seen = (await call(page, "seen")).filter((entry) => entry.userId === heidi);
    const versions = seen.map((entry) => BigInt(entry.version));
    assert.ok(
      versions.every((version, i) => i === 0 || version > versions[i - 1]!),
      `versions strictly increase: ${versions.join(", ")}`,
    );
    const messages = seen.map((entry) => entry.message).filter((message) => message !== "");
    assert.deepEqual(
      messages.filter((message) => /^(before|after) \d$/.test(message)),
      ["before 1", "before 2", "after 1", "after 2"],
      "every change exactly once, in order",
    );
    const states = await call(page, "states");
    t.diagnostic(`page states: ${states.join(" → ")}; heidi as seen: ${seen.map((entry) => `${entry.status} "${entry.message}" v${entry.version}`).join(", ")}`);
    assert.ok(states.includes("reconnecting"), `the page showed the outage: ${states.join(" → ")}`);
    assert.equal(states.at(-1), "connected");
  } finally {
    await heidiClient.close();
    await context.close();
  }
});
