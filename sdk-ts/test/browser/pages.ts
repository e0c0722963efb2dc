// Typed access to the test page's harness (test/browser/page.ts) from Node.
import type { Page } from "playwright-core";

type Harness = HarnessApi;

export interface SeenEntry {
  userId: string;
  status: string;
  message: string;
  version: string;
  at: number;
}

interface HarnessApi {
  open(options: object): void;
  synced(): Promise<void>;
  status(userId: string): string | undefined;
  message(userId: string): string | undefined;
  offlineReason(userId: string): string | undefined;
  state(): string | undefined;
  seen(): SeenEntry[];
  states(): string[];
  setStatus(status: string, message?: string): Promise<number>;
  setActivity(activity: string): Promise<number>;
  errorOf(call: string, userId?: string): Promise<string>;
  close(): Promise<void>;
}

/** Calls `method` of the page's harness with `args` (JSON-serialisable). */
export function call<K extends keyof Harness>(page: Page, method: K, ...args: Parameters<Harness[K]>): Promise<Awaited<ReturnType<Harness[K]>>> {
  return page.evaluate(
    ([name, list]) => {
      const harness = (window as unknown as { harness: Record<string, (...a: unknown[]) => unknown> }).harness;
      return harness[name]!(...list);
    },
    [method, args] as [string, unknown[]],
  ) as Promise<Awaited<ReturnType<Harness[K]>>>;
}

/** Polls the page until `probe` (a harness call) returns `expected`; returns when it did (Date.now()). */
export async function pageSees<K extends keyof Harness>(
  page: Page,
  expected: unknown,
  timeoutMs: number,
  method: K,
  ...args: Parameters<Harness[K]>
): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await call(page, method, ...args);
    if (value === expected) return Date.now();
    if (Date.now() > deadline) throw new Error(`${String(method)}(${args.join(", ")}) is ${String(value)}, not ${String(expected)} after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
