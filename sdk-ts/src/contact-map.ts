import type { PresenceError } from "./errors.js";
import type { Presence } from "./presence.js";

/**
 * One thing a watch reports. Order on a fresh watch: a `presence` per watched
 * user (the snapshot), `synced`, then `presence` and `removed` as things
 * change. After a reconnect: a `presence` for each user that changed
 * meanwhile, then `synced` with `resumed: true`.
 */
export type WatchUpdate =
  /** A contact's presence, newer than anything delivered for them before: never a duplicate, never older. */
  | { type: "presence"; presence: Presence }
  /** A contact was removed: forget them. */
  | { type: "removed"; userId: string }
  /** Everything the server knows has been delivered; live changes follow. */
  | { type: "synced"; watched: number; resumed: boolean };

/**
 * The state of a watch's connection:
 * - `connecting`: the first stream is being opened, or its snapshot is on the way;
 * - `connected`: the snapshot (or the catch-up after a reconnect) is in, changes arrive live;
 * - `reconnecting`: the stream broke; presence held may be stale until `connected` again;
 * - `closed`: `close()` was called, or an error retrying cannot fix (see `error`).
 */
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "closed";

/** What the sources of a watch (its own stream, or another tab's) feed in. */
export type SourceEvent =
  | { type: "presence"; presence: Presence }
  | { type: "removed"; userId: string }
  | { type: "synced"; watched: number };

/**
 * The latest presence per contact, and the filter between the server (or the
 * tab that holds the stream) and the app: drops any presence not newer than
 * what it holds, so reconnects and tab hand-overs never repeat or reorder a
 * change. Pure: no I/O, no timers.
 */
export class ContactMap {
  readonly contacts = new Map<string, Presence>();
  private syncedOnce = false;
  private lastWatched = 0;

  /** The update to hand to the app for `event`, if it says anything new. */
  apply(event: SourceEvent): WatchUpdate | undefined {
    switch (event.type) {
      case "presence": {
        const { presence } = event;
        const held = this.contacts.get(presence.userId);
        if (presence.userId === "" || (held !== undefined && presence.version <= held.version)) return undefined;
        this.contacts.set(presence.userId, presence);
        return event;
      }
      case "removed":
        return this.contacts.delete(event.userId) ? event : undefined;
      case "synced": {
        const resumed = this.syncedOnce;
        this.syncedOnce = true;
        this.lastWatched = event.watched;
        return { type: "synced", watched: event.watched, resumed };
      }
    }
  }

  /** Whether a snapshot was ever completed: `synced` has been delivered. */
  get synced(): boolean {
    return this.syncedOnce;
  }

  get watched(): number {
    return this.lastWatched;
  }

  /** `known_versions` for a (re)connecting stream: what the app already holds. */
  knownVersions(): Record<string, bigint> {
    const known: Record<string, bigint> = {};
    for (const [userId, presence] of this.contacts) known[userId] = presence.version;
    return known;
  }
}

/** A state change and, for `closed` by an error or `reconnecting`, why. */
export interface StateChange {
  state: ConnectionState;
  error: PresenceError | undefined;
  /** Failed attempts since the stream last worked (0 unless `reconnecting`). */
  attempt: number;
}
