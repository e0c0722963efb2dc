// The public API of the Presence web SDK; nothing else is exported.
export { Code } from "@connectrpc/connect";
export { createPresenceClient } from "./client.js";
export type { PresenceClient, PresenceClientOptions, HistoryOptions } from "./client.js";
export type { TokenProvider } from "./auth.js";
export type { BackoffOptions } from "./backoff.js";
export type { ConnectionState, StateChange, WatchUpdate } from "./contact-map.js";
export { PresenceError } from "./errors.js";
export type { IdleOptions } from "./idle.js";
export type { Activity, HistoryEntry, OfflineReason, Presence, UserStatus, VisibleStatus } from "./presence.js";
export type { ContactWatch } from "./watch.js";
