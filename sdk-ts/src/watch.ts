import { Code } from "@connectrpc/connect";
import type { Tokens } from "./auth.js";
import { type Backoff, sleep } from "./backoff.js";
import { ContactMap, type ConnectionState, type SourceEvent, type StateChange, type WatchUpdate } from "./contact-map.js";
import { PresenceError, isRetryable, toPresenceError } from "./errors.js";
import type { PresenceEvent } from "./gen/presence/v1/presence_pb.js";
import { type Presence, presenceFromMessage } from "./presence.js";

/**
 * A live view of the caller's contacts, from {@link PresenceClient.watchContacts}.
 *
 * Use it as a map (`get`, `contacts`, `onChange`), as a callback stream
 * (`subscribe`), or as an async iterable of {@link WatchUpdate}s; all three
 * see the same updates. It reconnects by itself (exponential backoff with full
 * jitter) and resumes from the versions it holds, so no change is lost or
 * repeated. It stops on `close()` or on an error retrying cannot fix
 * (UNAUTHENTICATED after a token refresh, PERMISSION_DENIED,
 * INVALID_ARGUMENT): then `state` is `"closed"` and `error` says why.
 */
export interface ContactWatch extends AsyncIterable<WatchUpdate> {
  /** The connection state; see {@link ConnectionState}. */
  readonly state: ConnectionState;
  /** Why the watch is reconnecting or closed; undefined otherwise. */
  readonly error: PresenceError | undefined;
  /** The latest presence per contact. */
  readonly contacts: ReadonlyMap<string, Presence>;
  /** The latest presence of one contact; undefined if not (yet) known. */
  get(userId: string): Presence | undefined;
  /** Resolves once the first snapshot is in; rejects if the watch closes first. */
  synced(): Promise<void>;
  /** Calls `listener` with every update from now on; returns the unsubscribe function. */
  subscribe(listener: (update: WatchUpdate) => void): () => void;
  /** Calls `listener` with the contact map after every change of it; returns the unsubscribe function. */
  onChange(listener: (contacts: ReadonlyMap<string, Presence>) => void): () => void;
  /** Calls `listener` on every connection state change; returns the unsubscribe function. */
  onStateChange(listener: (change: StateChange) => void): () => void;
  /**
   * Iterates over updates from the moment of the call. A consumer slower than
   * the changes gets the latest update per contact (older ones are coalesced
   * away), never an ever-growing queue.
   */
  [Symbol.asyncIterator](): AsyncIterator<WatchUpdate>;
  /** Stops watching: closes the stream (or leaves the tabs sharing it). */
  close(): void;
}

/** How a watch reaches the server. */
export interface WatchDeps {
  openStream(knownVersions: Record<string, bigint>, signal: AbortSignal): AsyncIterable<PresenceEvent>;
  backoff: Backoff;
  tokens: Tokens;
  /**
   * Shares one stream among the tabs of an origin: the name of the lock and
   * channel (per server and user), and the browser's lock manager. Unset:
   * this watch opens its own stream.
   */
  share: { key: Promise<string>; locks: LockManager } | undefined;
}

/**
 * A state change as it crosses tabs: structured cloning turns an Error
 * subclass into a plain Error, so the error travels as its code and message.
 */
interface TabState {
  state: ConnectionState;
  attempt: number;
  error: { code: Code; message: string } | undefined;
}

/** Messages between the tabs sharing a stream. */
type TabMessage =
  | { type: "hello" }
  | { type: "event"; event: SourceEvent }
  | { type: "state"; change: TabState }
  | { type: "snapshot"; presences: Presence[]; synced: boolean; watched: number; change: TabState };

function toTab({ state, attempt, error }: StateChange): TabState {
  return { state, attempt, error: error && { code: error.code, message: error.message } };
}

function fromTab({ state, attempt, error }: TabState): StateChange {
  return { state, attempt, error: error && new PresenceError(error.code, error.message) };
}

export class Watch implements ContactWatch {
  private readonly map = new ContactMap();
  private change: StateChange = { state: "connecting", error: undefined, attempt: 0 };
  private readonly updateListeners = new Set<(update: WatchUpdate) => void>();
  private readonly changeListeners = new Set<(contacts: ReadonlyMap<string, Presence>) => void>();
  private readonly stateListeners = new Set<(change: StateChange) => void>();
  private readonly abort = new AbortController();
  /** Set while this tab holds the stream that other tabs follow. */
  private broadcast: ((message: TabMessage) => void) | undefined;

  constructor(private readonly deps: WatchDeps) {
    if (deps.share === undefined) {
      void this.runStream();
    } else {
      void this.shareAcrossTabs(deps.share);
    }
  }

  get state(): ConnectionState {
    return this.change.state;
  }

  get error(): PresenceError | undefined {
    return this.change.error;
  }

  get contacts(): ReadonlyMap<string, Presence> {
    return this.map.contacts;
  }

  get(userId: string): Presence | undefined {
    return this.map.contacts.get(userId);
  }

  synced(): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.map.synced) resolve();
        else if (this.state === "closed") reject(this.error ?? new PresenceError(Code.Canceled, "watch closed"));
        else return;
        unsubscribeState();
        unsubscribeUpdates();
      };
      const unsubscribeState = this.onStateChange(check);
      const unsubscribeUpdates = this.subscribe(check);
      check();
    });
  }

  subscribe(listener: (update: WatchUpdate) => void): () => void {
    this.updateListeners.add(listener);
    return () => this.updateListeners.delete(listener);
  }

  onChange(listener: (contacts: ReadonlyMap<string, Presence>) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  onStateChange(listener: (change: StateChange) => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  [Symbol.asyncIterator](): AsyncIterator<WatchUpdate> {
    // Keyed per contact, so a newer update replaces a pending older one.
    const pending = new Map<string, WatchUpdate>();
    let wake: (() => void) | undefined;
    const unsubscribeUpdates = this.subscribe((update) => {
      const key = update.type === "synced" ? "" : update.type === "presence" ? update.presence.userId : update.userId;
      pending.delete(key);
      pending.set(key, update);
      wake?.();
    });
    const unsubscribeState = this.onStateChange(() => wake?.());
    const finish = (): IteratorResult<WatchUpdate> => {
      unsubscribeUpdates();
      unsubscribeState();
      return { value: undefined, done: true };
    };
    return {
      next: async () => {
        for (;;) {
          const oldest = pending.entries().next();
          if (!oldest.done) {
            pending.delete(oldest.value[0]);
            return { value: oldest.value[1], done: false };
          }
          if (this.state === "closed") {
            finish();
            if (this.error !== undefined) throw this.error;
            return { value: undefined, done: true };
          }
          await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
        }
      },
      return: async () => finish(),
    };
  }

  close(): void {
    if (this.state === "closed") return;
    this.abort.abort();
    this.setState({ state: "closed", error: undefined, attempt: 0 });
  }

  /** Feeds an event from the stream or from the leading tab to the app. */
  private feed(event: SourceEvent): void {
    const update = this.map.apply(event);
    if (update === undefined) return;
    this.broadcast?.({ type: "event", event });
    notify(this.updateListeners, update);
    if (update.type !== "synced") notify(this.changeListeners, this.map.contacts);
  }

  private setState(change: StateChange): void {
    if (this.change.state === "closed") return;
    this.change = change;
    // A closing tab leaves; the others take over rather than close with it.
    if (change.state !== "closed") this.broadcast?.({ type: "state", change: toTab(change) });
    notify(this.stateListeners, change);
  }

  /**
   * Runs the stream until closed: reconnects with backoff after any
   * retryable failure, asking only for what changed since the versions held.
   */
  private async runStream(): Promise<void> {
    const { backoff, tokens } = this.deps;
    const signal = this.abort.signal;
    let failures = 0;
    // One token refresh per run of failures: a fresh token rejected again is final.
    let refreshedToken = false;
    if (this.map.synced) this.setState({ state: "reconnecting", error: undefined, attempt: 0 });
    while (!signal.aborted) {
      if (failures > 0) await sleep(backoff.delay(failures), signal);
      if (signal.aborted) return;
      // Only the first snapshot_complete of a stream ends its snapshot.
      let awaitingSnapshot = true;
      try {
        for await (const { event } of this.deps.openStream(this.map.knownVersions(), signal)) {
          switch (event.case) {
            case "presence":
              this.feed({ type: "presence", presence: presenceFromMessage(event.value) });
              break;
            case "contactRemoved":
              this.feed({ type: "removed", userId: event.value.userId });
              break;
            case "snapshotComplete":
              if (!awaitingSnapshot) break;
              awaitingSnapshot = false;
              failures = 0;
              refreshedToken = false;
              this.feed({ type: "synced", watched: event.value.watched });
              this.setState({ state: "connected", error: undefined, attempt: 0 });
              break;
          }
        }
        throw new PresenceError(Code.Unavailable, "server closed the watch stream");
      } catch (thrown) {
        if (signal.aborted) return;
        const error = toPresenceError(thrown);
        if (error.code === Code.Unauthenticated && tokens.refreshable && !refreshedToken) {
          refreshedToken = true;
          tokens.refresh();
        } else if (!isRetryable(error)) {
          this.setState({ state: "closed", error, attempt: 0 });
          this.abort.abort();
          return;
        }
        failures += 1;
        this.setState({ state: "reconnecting", error, attempt: failures });
      }
    }
  }

  /**
   * One stream per origin: the tab holding the Web Lock runs it and
   * broadcasts every update; the others follow over a BroadcastChannel. When
   * the leading tab closes, the browser hands the lock to the next tab, which
   * resumes the stream from the versions it followed, so the hand-over loses
   * and repeats nothing. (A browser allows six HTTP/1.1 connections per
   * origin; a stream per tab would stall the seventh tab.)
   */
  private async shareAcrossTabs(share: { key: Promise<string>; locks: LockManager }): Promise<void> {
    const signal = this.abort.signal;
    // Without a token there is no user to share with: the stream's own
    // retries report the token failure.
    const key = await share.key.catch(() => undefined);
    if (signal.aborted) return;
    if (key === undefined) return this.runStream();
    const channel = new BroadcastChannel(key);
    signal.addEventListener("abort", () => {
      this.broadcast = undefined;
      channel.close();
    });
    let leading = false;
    channel.onmessage = ({ data }: MessageEvent<TabMessage>) => {
      if (leading) {
        if (data.type === "hello") {
          channel.postMessage({
            type: "snapshot",
            presences: [...this.map.contacts.values()],
            synced: this.map.synced,
            watched: this.map.watched,
            change: toTab(this.change),
          } satisfies TabMessage);
        }
        return;
      }
      switch (data.type) {
        case "event":
          this.feed(data.event);
          break;
        case "state":
          this.setState(fromTab(data.change));
          break;
        case "snapshot":
          for (const presence of data.presences) this.feed({ type: "presence", presence });
          if (data.synced && !this.map.synced) this.feed({ type: "synced", watched: data.watched });
          this.setState(fromTab(data.change));
          break;
      }
    };
    channel.postMessage({ type: "hello" } satisfies TabMessage);
    try {
      await share.locks.request(key, { signal }, async () => {
        leading = true;
        this.broadcast = (message) => channel.postMessage(message);
        await this.runStream();
      });
    } catch {
      // Aborted while waiting for the lock: this tab closed as a follower.
    }
  }
}

/**
 * Calls every listener with `value`. A listener that throws must not break
 * the stream loop (it would read as a broken stream) nor starve the other
 * listeners: its error is rethrown on its own, where the app's error
 * reporting sees it.
 */
function notify<T>(listeners: Set<(value: T) => void>, value: T): void {
  for (const listener of [...listeners]) {
    try {
      listener(value);
    } catch (error) {
      queueMicrotask(() => {
        throw error;
      });
    }
  }
}
