import assert from "node:assert/strict";
import { test } from "node:test";
import { eventually } from "../test/fake-server.js";
import { detectIdleness } from "./idle.js";
import type { Activity } from "./presence.js";

function fakePage() {
  const document = Object.assign(new EventTarget(), { hidden: false });
  return { window: new EventTarget(), document };
}

test("a page without input turns idle, and active again on the next input", async () => {
  const page = fakePage();
  const seen: Activity[] = [];
  const stop = detectIdleness((activity) => seen.push(activity), { idleAfterMs: 40 }, page);
  // Input keeps it active past the idle delay.
  for (let i = 0; i < 4; i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    page.window.dispatchEvent(new Event("pointermove"));
  }
  assert.deepEqual(seen, []);
  await eventually(() => seen.length === 1);
  assert.deepEqual(seen, ["idle"]);
  page.window.dispatchEvent(new Event("keydown"));
  assert.deepEqual(seen, ["idle", "active"]);
  stop();
});

test("a hidden page is idle at once, whatever the input", () => {
  const page = fakePage();
  const seen: Activity[] = [];
  const stop = detectIdleness((activity) => seen.push(activity), { idleAfterMs: 60_000 }, page);
  page.document.hidden = true;
  page.document.dispatchEvent(new Event("visibilitychange"));
  page.window.dispatchEvent(new Event("pointermove"));
  assert.deepEqual(seen, ["idle"]);
  page.document.hidden = false;
  page.document.dispatchEvent(new Event("visibilitychange"));
  assert.deepEqual(seen, ["idle", "active"]);
  stop();
});

test("a stopped detector reports nothing more", async () => {
  const page = fakePage();
  const seen: Activity[] = [];
  detectIdleness((activity) => seen.push(activity), { idleAfterMs: 10 }, page)();
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.deepEqual(seen, []);
});
