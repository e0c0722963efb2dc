// `make demo`'s board in a browser: it shows the demo users live, and its
// screenshot is the one in the README (docs/demo.png).
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { startDemo } from "../../demo/serve.js";
import { freePort, packageDir, serverBin } from "../harness.js";
import { launchBrowser } from "./browser.js";

test("the demo board shows the contacts live, and bob's change reaches alice's board", async () => {
  const demo = await startDemo({ serverBin, presencePort: await freePort(), pagePort: await freePort(), quiet: true });
  const browser = await launchBrowser();
  try {
    const bob = await (await browser.newContext()).newPage();
    await bob.goto(demo.url.replace("user=alice", "user=bob"));
    const alice = await (await browser.newContext({ viewport: { width: 960, height: 460 } })).newPage();
    await alice.goto(demo.url);
    await alice.locator(".connection.connected").waitFor({ timeout: 5000 });
    await alice.locator('.card[data-user="bob"] .dot.online').waitFor({ timeout: 2000 });
    await alice.locator('.card[data-user="carol"] .dot.busy').waitFor({ timeout: 2000 });
    assert.equal(await alice.locator(".card").count(), 5);

    await bob.locator("input").fill("shipping the web SDK");
    await bob.locator("input").dispatchEvent("change");
    await alice.getByText("shipping the web SDK").waitFor({ timeout: 2000 });
    await alice.screenshot({ path: join(packageDir, "docs/demo.png") });
  } finally {
    await browser.close();
    await demo.stop();
  }
});
