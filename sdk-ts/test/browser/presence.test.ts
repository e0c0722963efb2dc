// The SDK in headless Chromium against a real presence-server. Pages are
// served from http://localhost:<port>, the server is http://127.0.0.1:<port>:
// every call is cross-origin.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { Browser, Page } from "playwright-core";
import { type ServerProcess, addContacts, mintToken, startServer, uniqueUser } from "../harness.js";
import { type PageServer, launchBrowser, servePages } from "./browser.js";
import { call, pageSees } from "./pages.js";

let server: ServerProcess;
let pages: PageServer;
let browser: Browser;

before(async () => {
  [server, pages, browser] = await Promise.all([startServer(), servePages(), launchBrowser()]);
});
after(async () => {
  await Promise.allSettled([browser?.close(), pages?.close(), server?.stop()]);
});

/** A page in its own browser context (its own tabs, storage and connections): one user's browser. */
async function openPage(userId: string, options: object = {}): Promise<Page> {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`page error (${userId}): ${error.message}`));
  await page.goto(pages.origin);
  await call(page, "open", { baseUrl: server.baseUrl, token: mintToken(userId), ...options });
  return page;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

test("a contact's page shows online, idle, busy, invisible and a closed tab within 2 s each", async (t) => {
  const alice = uniqueUser("alice");
  const bob = uniqueUser("bob");
  await addContacts(server.baseUrl, alice, [bob]);
  const bobPage = await openPage(bob);
  await call(bobPage, "synced");

  let started = Date.now();
  const alicePage = await openPage(alice, { idle: { idleAfterMs: 1000 } });
  let seenAt = await pageSees(bobPage, "online", 2000, "status", alice);
  t.diagnostic(`online after ${seenAt - started} ms`);

  // No input for a second: alice's idle detector reports the tab idle.
  started = Date.now();
  seenAt = await pageSees(bobPage, "idle", 1000 + 2000, "status", alice);
  t.diagnostic(`idle ${seenAt - started} ms after the last input (detector: 1000 ms)`);
  started = Date.now();
  await alicePage.mouse.move(10, 10);
  await alicePage.mouse.move(20, 20);
  seenAt = await pageSees(bobPage, "online", 2000, "status", alice);
  t.diagnostic(`active again after ${seenAt - started} ms`);

  // Change-to-page latency: the time from alice's call to bob's page
  // receiving the change, over several changes (one clock: same machine).
  const latencies: number[] = [];
  for (let i = 0; i < 9; i++) {
    const message = `in a meeting #${i}`;
    const madeAt = await call(alicePage, "setStatus", "busy", message);
    await pageSees(bobPage, message, 2000, "message", alice);
    const entry = (await call(bobPage, "seen")).find((seen) => seen.userId === alice && seen.message === message);
    assert.equal(entry?.status, "busy");
    latencies.push(entry!.at - madeAt);
  }
  const summary = `change-to-page latency: median ${median(latencies)} ms, max ${Math.max(...latencies)} ms over ${latencies.length} changes`;
  t.diagnostic(summary);
  console.log(summary);
  assert.ok(Math.max(...latencies) < 2000);

  started = Date.now();
  await call(alicePage, "setStatus", "invisible");
  seenAt = await pageSees(bobPage, "offline", 2000, "status", alice);
  t.diagnostic(`invisible seen as offline after ${seenAt - started} ms`);

  await call(alicePage, "setStatus", "online");
  await pageSees(bobPage, "online", 2000, "status", alice);
  // Closing the tab fires pagehide: the SDK's Disconnect (keepalive) logs
  // the session out at once instead of waiting for its lease (2 s here).
  started = Date.now();
  await alicePage.close({ runBeforeUnload: true });
  seenAt = await pageSees(bobPage, "offline", 2000, "status", alice);
  t.diagnostic(`closed tab seen as offline after ${seenAt - started} ms`);
  assert.equal(await call(bobPage, "offlineReason", alice), "logout");
  await alicePage.context().close();
  await bobPage.context().close();
});

test("seven tabs of one user on one origin share one watch stream and all keep working", async () => {
  const carol = uniqueUser("carol");
  const dave = uniqueUser("dave");
  await addContacts(server.baseUrl, carol, [dave]);
  const context = await browser.newContext();
  let watchRequests = 0;
  context.on("request", (request) => {
    if (request.url().endsWith("/presence.v1.PresenceService/WatchContacts")) watchRequests += 1;
  });
  const tabs: Page[] = [];
  for (let i = 0; i < 7; i++) {
    const tab = await context.newPage();
    await tab.goto(pages.origin);
    await call(tab, "open", { baseUrl: server.baseUrl, token: mintToken(carol) });
    tabs.push(tab);
  }
  await Promise.all(tabs.map((tab) => call(tab, "synced")));
  const davePage = await openPage(dave);
  await Promise.all(tabs.map((tab) => pageSees(tab, "online", 2000, "status", dave)));
  assert.equal(watchRequests, 1, "one stream for seven tabs");

  // Every tab can still make calls (no connection is starved by streams).
  await Promise.all(tabs.map((tab, i) => call(tab, "setStatus", "online", `tab ${i}`)));

  await call(davePage, "setStatus", "busy", "seven tabs");
  await Promise.all(tabs.map((tab) => pageSees(tab, "seven tabs", 2000, "message", dave)));

  // The tab holding the stream closes: another takes over and resumes.
  await tabs.shift()!.close();
  await call(davePage, "setStatus", "busy", "six tabs");
  await Promise.all(tabs.map((tab) => pageSees(tab, "six tabs", 3000, "message", dave)));
  assert.equal(watchRequests, 2, "the next tab took the stream over");
  await Promise.all([context.close(), davePage.context().close()]);
});

test("a bad token, a forbidden call and an oversized batch are typed errors in the browser", async () => {
  const erin = uniqueUser("erin");
  const context = await browser.newContext();
  const forged = await context.newPage();
  await forged.goto(pages.origin);
  await call(forged, "open", { baseUrl: server.baseUrl, token: "forged", session: false });
  assert.equal(await call(forged, "errorOf", "getPresence", erin), "Unauthenticated");
  assert.equal(await call(forged, "errorOf", "watch"), "Unauthenticated");
  await context.close();

  const page = await openPage(erin, { session: false });
  assert.equal(await call(page, "errorOf", "history", uniqueUser("stranger")), "PermissionDenied");
  assert.equal(await call(page, "errorOf", "getPresenceOversized"), "InvalidArgument");
  assert.equal(await call(page, "errorOf", "getPresence", erin), "ok");
  await page.context().close();
});

test("CORS: any origin by default, the listed origin with --cors-origins, and a refusal is a typed error", async () => {
  const frank = uniqueUser("frank");
  const [allowed, refused] = await Promise.all([
    startServer(["--cors-origins", pages.origin]),
    startServer(["--cors-origins", "http://elsewhere.example"]),
  ]);
  try {
    for (const [target, expected] of [
      [server, "ok"],
      [allowed, "ok"],
      [refused, "Unavailable"],
    ] as const) {
      const context = await browser.newContext();
      const page = await context.newPage();
      await page.goto(pages.origin);
      await call(page, "open", { baseUrl: target.baseUrl, token: mintToken(frank), session: false });
      assert.equal(await call(page, "errorOf", "getPresence", frank), expected, target.baseUrl);
      if (expected === "Unavailable") {
        // The watch does not hang silently: it says it is reconnecting.
        await pageSees(page, "reconnecting", 2000, "state");
      }
      await context.close();
    }
  } finally {
    await Promise.all([allowed.stop(), refused.stop()]);
  }
});
