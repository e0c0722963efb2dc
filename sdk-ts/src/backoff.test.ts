import assert from "node:assert/strict";
import { test } from "node:test";
import { Backoff } from "./backoff.js";

test("the backoff ceiling doubles from 100 ms and stops at 10 s", () => {
  const backoff = new Backoff();
  assert.deepEqual(
    [0, 1, 2, 3, 7, 8, 1000].map((attempt) => backoff.ceiling(attempt)),
    [0, 100, 200, 400, 6400, 10_000, 10_000],
  );
});

test("every delay lies between zero and its ceiling, spread out (full jitter)", () => {
  const backoff = new Backoff();
  const delays = Array.from({ length: 200 }, () => backoff.delay(10));
  assert.ok(delays.every((delay) => delay >= 0 && delay <= 10_000));
  assert.ok(Math.max(...delays) - Math.min(...delays) > 5_000);
});
