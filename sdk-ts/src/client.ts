import { Code, type Client, type Interceptor, type Transport, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type TokenProvider, Tokens } from "./auth.js";
import { Backoff, type BackoffOptions } from "./backoff.js";
import { PresenceError, toPresenceError } from "./errors.js";
import { Platform, PresenceService } from "./gen/presence/v1/presence_pb.js";
import { type IdleOptions, detectIdleness } from "./idle.js";
import {
  type Activity,
  type HistoryEntry,
  type Presence,
  type UserStatus,
  activityToMessage,
  historyEntryFromMessage,
  presenceFromMessage,
  userStatusToMessage,
} from "./presence.js";
import { type ContactWatch, Watch } from "./watch.js";

/** Options of {@link createPresenceClient}. */
export interface PresenceClientOptions {
  /** The server's URL, e.g. `"https://presence.example.com"`. Required. */
  baseUrl: string;
  /**
   * The user's JWT, or a function returning one (may be async). A function is
   * called again whenever the server rejects the token as UNAUTHENTICATED.
   * Required.
   */
  token: TokenProvider;
  /**
   * Keep this device online: Touch at the interval the server asks for, from
   * creation until `close()`. `false` for a client that only reads (e.g. a
   * Node service). Default: `true`.
   */
  session?: boolean;
  /**
   * This session's device id, 1 to 128 bytes. Default: a random id per
   * client, so each tab is its own session and the user stays online until
   * their last tab closes.
   */
  deviceId?: string;
  /** Reported to the user's own devices only. Default: `"web"`. */
  platform?: "web" | "ios" | "android" | "desktop" | "service";
  /**
   * Report this tab idle when hidden or without input for a while, active on
   * the next input. `true` for the defaults of {@link IdleOptions}. Needs a
   * DOM. Default: `false` (the tab is active until you call `setActivity`).
   */
  idle?: boolean | IdleOptions;
  /**
   * On `pagehide`, end this session at once (best-effort Disconnect), so
   * contacts see the tab leave now rather than when its lease runs out; on
   * `pageshow` from the back/forward cache, start it again. Default: `true`
   * in browsers.
   */
  disconnectOnPagehide?: boolean;
  /**
   * Share one watch stream among the tabs of this origin (Web Locks pick the
   * tab holding it, BroadcastChannel carries its updates). Default: `true`
   * where the browser has both; each watch opens its own stream otherwise.
   */
  shareWatchAcrossTabs?: boolean;
  /** Delays between reconnects of the watch and retries of failed Touches. Default: see {@link BackoffOptions}. */
  backoff?: BackoffOptions;
  /**
   * The connect-es transport. Default: gRPC-web over `fetch`
   * (`@connectrpc/connect-web`). In Node, `createGrpcTransport` from
   * `@connectrpc/connect-node` speaks native gRPC over HTTP/2 instead. The
   * SDK adds the `authorization` header either way.
   */
  transport?: (options: { baseUrl: string; interceptors: Interceptor[] }) => Transport;
  /** Called when keeping the session alive fails (the SDK retries by itself). Default: none. */
  onSessionError?: (error: PresenceError) => void;
}

/** Options of {@link PresenceClient.history}. */
export interface HistoryOptions {
  /** Start of the window. Default: the start of the server's retention (24 h). */
  from?: Date;
  /** End of the window. Default: now. */
  to?: Date;
  /** Entries per page, 1 to 1000. Default: 100. */
  pageSize?: number;
}

/** The Presence client; see {@link createPresenceClient}. */
export interface PresenceClient {
  /** This session's device id. */
  readonly deviceId: string;
  /**
   * Watches the caller's contacts: a snapshot, then every change; see
   * {@link ContactWatch}. Tabs of one origin share a single stream.
   */
  watchContacts(): ContactWatch;
  /** Sets the status of all of the user's devices and the custom message (empty clears it). Resolves to the user's own presence. */
  setStatus(status: UserStatus, customMessage?: string): Promise<Presence>;
  /** Reports this device active or idle: sent at once, then with every heartbeat (failures go to `onSessionError`, and are retried). */
  setActivity(activity: Activity): Promise<void>;
  /** The presence of 1 to 100 users, in request order; users the caller may not see come back offline with version 0. */
  getPresence(userIds: string[]): Promise<Presence[]>;
  /** A user's status changes in a time window, oldest first, one page of entries per iteration. */
  history(userId: string, options?: HistoryOptions): AsyncIterable<HistoryEntry[]>;
  /** Stops heartbeats, watches and the idle detector, and ends this session (Disconnect). Nothing keeps running after. */
  close(): Promise<void>;
}

const platforms = {
  web: Platform.WEB,
  ios: Platform.IOS,
  android: Platform.ANDROID,
  desktop: Platform.DESKTOP,
  service: Platform.SERVICE,
} as const;

/**
 * Creates a client for one user. With the defaults it keeps this tab online
 * (Touch at the server's heartbeat interval) until `close()`.
 *
 * ```ts
 * const presence = createPresenceClient({ baseUrl, token: () => fetchToken() });
 * const contacts = presence.watchContacts();
 * contacts.onChange((all) => render([...all.values()]));
 * ```
 */
export function createPresenceClient(options: PresenceClientOptions): PresenceClient {
  return new PresenceClientImpl(options);
}

class PresenceClientImpl implements PresenceClient {
  readonly deviceId: string;
  private readonly tokens: Tokens;
  private readonly rpc: Client<typeof PresenceService>;
  private readonly backoff: Backoff;
  private readonly platform: Platform;
  private readonly watches = new Set<ContactWatch>();
  /** Undone by `close()`: listeners, timers, the idle detector. */
  private readonly cleanups: Array<() => void> = [];
  private activity: Activity = "active";
  private heartbeat: ReturnType<typeof setTimeout> | undefined;
  /** The Touch on its way, if any: `close()` lets it land before the Disconnect, which it would otherwise undo. */
  private touching: Promise<unknown> | undefined;
  /** Set from the first Touch until the session ends (Disconnect, close). */
  private sessionRunning = false;
  private closed = false;
  /** While the page unloads, requests go out with `keepalive` so they outlive it. */
  private unloading = false;

  constructor(private readonly options: PresenceClientOptions) {
    if (!options.baseUrl) throw new TypeError("createPresenceClient: baseUrl is required");
    if (options.token === undefined || options.token === "") throw new TypeError("createPresenceClient: token is required");
    this.deviceId = options.deviceId ?? randomDeviceId();
    this.platform = platforms[options.platform ?? "web"];
    this.tokens = new Tokens(options.token);
    this.backoff = new Backoff(options.backoff);
    const interceptors = [this.tokens.interceptor()];
    const transport =
      options.transport?.({ baseUrl: options.baseUrl, interceptors }) ??
      createGrpcWebTransport({
        baseUrl: options.baseUrl,
        interceptors,
        fetch: (input, init) => globalThis.fetch(input, this.unloading ? { ...init, keepalive: true } : init),
      });
    this.rpc = createClient(PresenceService, transport);

    if (options.session ?? true) this.startSession();
    if (options.idle) this.startIdleDetector(options.idle === true ? {} : options.idle);
    if ((options.disconnectOnPagehide ?? true) && typeof window !== "undefined" && options.session !== false) {
      this.listen(window, "pagehide", () => {
        this.unloading = true;
        void this.endSession();
      });
      this.listen(window, "pageshow", (event) => {
        this.unloading = false;
        if ((event as PageTransitionEvent).persisted && !this.closed) this.startSession();
      });
    }
  }

  watchContacts(): ContactWatch {
    if (this.closed) throw new PresenceError(Code.Canceled, "the client is closed");
    const locks = typeof navigator === "undefined" ? undefined : navigator.locks;
    const share =
      (this.options.shareWatchAcrossTabs ?? true) && locks !== undefined && typeof BroadcastChannel !== "undefined"
        ? { key: this.tokens.get().then((token) => `presence-watch ${this.options.baseUrl} ${tokenSubject(token)}`), locks }
        : undefined;
    const watch = new Watch({
      openStream: (knownVersions, signal) => this.rpc.watchContacts({ knownVersions }, { signal }),
      backoff: this.backoff,
      tokens: this.tokens,
      share,
    });
    this.watches.add(watch);
    watch.onStateChange(({ state }) => {
      if (state === "closed") this.watches.delete(watch);
    });
    return watch;
  }

  async setStatus(status: UserStatus, customMessage = ""): Promise<Presence> {
    const response = await this.call(() => this.rpc.setStatus({ status: userStatusToMessage(status), customMessage }));
    if (response.presence === undefined) throw new PresenceError(Code.Internal, "setStatus: the server sent no presence");
    return presenceFromMessage(response.presence);
  }

  async setActivity(activity: Activity): Promise<void> {
    activityToMessage(activity); // validates before anything changes
    this.activity = activity;
    if (this.sessionRunning) await this.touch();
  }

  async getPresence(userIds: string[]): Promise<Presence[]> {
    const response = await this.call(() => this.rpc.getPresence({ userIds }));
    return response.presences.map(presenceFromMessage);
  }

  async *history(userId: string, options: HistoryOptions = {}): AsyncIterable<HistoryEntry[]> {
    let pageToken = "";
    do {
      const response = await this.call(() =>
        this.rpc.getHistory({
          userId,
          fromUnixMs: BigInt(options.from?.getTime() ?? 0),
          toUnixMs: BigInt(options.to?.getTime() ?? 0),
          pageSize: options.pageSize ?? 0,
          pageToken,
        }),
      );
      if (response.entries.length > 0) yield response.entries.map(historyEntryFromMessage);
      pageToken = response.nextPageToken;
    } while (pageToken !== "");
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const watch of this.watches) watch.close();
    for (const cleanup of this.cleanups.splice(0)) cleanup();
    await this.touching?.catch(() => {});
    await this.endSession();
  }

  private async call<T>(request: () => Promise<T>): Promise<T> {
    try {
      return await request();
    } catch (error) {
      throw toPresenceError(error);
    }
  }

  private startSession(): void {
    this.sessionRunning = true;
    void this.touch();
  }

  /**
   * One heartbeat; schedules the next at the interval the server asked for,
   * or, after a failure, after a backoff delay (the session may have lapsed:
   * the next Touch reopens it).
   */
  private async touch(failures = 0): Promise<void> {
    clearTimeout(this.heartbeat);
    let nextInMs: number;
    try {
      const touching = this.call(() =>
        this.rpc.touch({ deviceId: this.deviceId, platform: this.platform, activity: activityToMessage(this.activity) }),
      );
      this.touching = touching;
      const response = await touching;
      // A floor, so that a zero from a misconfigured server cannot spin.
      nextInMs = Math.max(response.heartbeatIntervalMs, 100);
      failures = 0;
    } catch (error) {
      failures += 1;
      // Retry soon, then spread out (full jitter, at most `backoff.maxMs`,
      // 10 s by default: well within the default 30 s lease).
      nextInMs = Math.max(this.backoff.delay(failures), 50);
      this.options.onSessionError?.(toPresenceError(error));
    }
    if (!this.sessionRunning) return;
    clearTimeout(this.heartbeat);
    this.heartbeat = setTimeout(() => void this.touch(failures), nextInMs);
  }

  private async endSession(): Promise<void> {
    if (!this.sessionRunning) return;
    this.sessionRunning = false;
    clearTimeout(this.heartbeat);
    try {
      await this.rpc.disconnect({ deviceId: this.deviceId });
    } catch {
      // Best-effort: if it never arrives, the lease ends the session.
    }
  }

  private startIdleDetector(idle: IdleOptions): void {
    if (typeof window === "undefined" || typeof document === "undefined") return;
    const stop = detectIdleness(
      (activity) => void this.setActivity(activity).catch(() => {}),
      idle,
      { window, document },
    );
    this.cleanups.push(stop);
  }

  private listen(target: EventTarget, type: string, listener: (event: Event) => void): void {
    target.addEventListener(type, listener);
    this.cleanups.push(() => target.removeEventListener(type, listener));
  }
}

function randomDeviceId(): string {
  return `web-${crypto.randomUUID()}`;
}

/**
 * The `sub` claim of a JWT, to name the stream shared by one user's tabs; the
 * token itself if it is not a JWT. Read without verifying: the server does
 * that, and a wrong guess only means tabs do not share.
 */
function tokenSubject(token: string): string {
  try {
    const payload = token.split(".")[1] ?? "";
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const sub: unknown = JSON.parse(json).sub;
    return typeof sub === "string" ? sub : token;
  } catch {
    return token;
  }
}
