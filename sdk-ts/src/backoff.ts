/**
 * How long to wait between reconnect attempts: attempt `n` (from 1) waits a
 * uniformly random time between zero and `min(maxMs, initialMs * factor^(n-1))`
 * ("full jitter"), so the clients of a restarted server spread out instead of
 * reconnecting in lockstep. The same rule as the Rust SDK.
 */
export interface BackoffOptions {
  /** The ceiling of the first attempt's delay. Default: 100 ms. */
  initialMs?: number;
  /** The ceiling no delay exceeds. Default: 10 000 ms. */
  maxMs?: number;
  /** How much the ceiling grows with each failed attempt (at least 1). Default: 2. */
  factor?: number;
}

export class Backoff {
  private readonly initialMs: number;
  private readonly maxMs: number;
  private readonly factor: number;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 100;
    this.maxMs = options.maxMs ?? 10_000;
    this.factor = Math.max(1, options.factor ?? 2);
  }

  /** The largest delay attempt `attempt` may wait; attempt 0 waits nothing. */
  ceiling(attempt: number): number {
    if (attempt <= 0) return 0;
    const grown = this.initialMs * this.factor ** Math.min(attempt - 1, 64);
    return Math.min(this.maxMs, Number.isFinite(grown) ? grown : this.maxMs);
  }

  /** A random delay for `attempt`, uniform in `[0, ceiling(attempt)]`. */
  delay(attempt: number): number {
    return Math.random() * this.ceiling(attempt);
  }
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}
