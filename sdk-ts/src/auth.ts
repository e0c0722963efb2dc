import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

/** A token, or a function returning a fresh one (called again when the server says the token is no longer valid). */
export type TokenProvider = string | (() => string | Promise<string>);

/**
 * Caches the token between calls and fetches a new one, once per rejection,
 * when the server answers UNAUTHENTICATED.
 */
export class Tokens {
  private current: Promise<string> | undefined;

  constructor(private readonly provider: TokenProvider) {}

  /** Whether a rejected token can be replaced by asking again. */
  get refreshable(): boolean {
    return typeof this.provider === "function";
  }

  get(): Promise<string> {
    return (this.current ??= this.remember(Promise.resolve(this.ask())));
  }

  /**
   * Forgets `rejected` so that the next `get` asks the provider again; a
   * token fetched meanwhile by another call is kept.
   */
  invalidate(rejected: string): void {
    if (!this.refreshable) return;
    const current = this.current ?? Promise.resolve(rejected);
    this.current = this.remember(current.then((token) => (token === rejected ? this.ask() : token)));
  }

  /** Forgets the current token: the next `get` asks the provider again. */
  refresh(): void {
    if (this.refreshable) this.current = undefined;
  }

  private ask(): string | Promise<string> {
    const provider = this.provider;
    return typeof provider === "function" ? provider() : provider;
  }

  /** Caches `token`, unless it fails: the next call then asks again. */
  private remember(token: Promise<string>): Promise<string> {
    token.catch(() => {
      if (this.current === token) this.current = undefined;
    });
    return token;
  }

  /**
   * Sets `authorization` on every call; a unary call rejected as
   * UNAUTHENTICATED is retried once with a fresh token. Streams handle the
   * refresh in their reconnect loop, where a retry belongs.
   */
  interceptor(): Interceptor {
    return (next) => async (request) => {
      const token = await this.get();
      request.header.set("authorization", `Bearer ${token}`);
      if (request.stream || !this.refreshable) return next(request);
      try {
        return await next(request);
      } catch (error) {
        if (ConnectError.from(error).code !== Code.Unauthenticated) throw error;
        this.invalidate(token);
        request.header.set("authorization", `Bearer ${await this.get()}`);
        return next(request);
      }
    };
  }
}
