package dev.presence.sdk

import dev.presence.v1.Presence
import kotlin.time.Duration

/**
 * The device session, as [PresenceClient.connectionState] shows it:
 * `Idle → Connecting → Connected ⇄ Reconnecting → Closed`.
 */
public sealed class ConnectionState {
    /** [PresenceClient.connect] was not called yet. */
    public object Idle : ConnectionState() {
        override fun toString(): String = "Idle"
    }

    /** The first open is in progress. */
    public object Connecting : ConnectionState() {
        override fun toString(): String = "Connecting"
    }

    /** The session is open and beating at the [heartbeatInterval] the server chose. */
    public data class Connected(val heartbeatInterval: Duration, val lease: Duration) : ConnectionState()

    /**
     * The stream broke (or the server is draining) and the session is being re-opened for the same
     * device. The server keeps the session through its grace period, so contacts see nothing if
     * this ends quickly. [attempt] is 1 for the first attempt after the loss.
     */
    public data class Reconnecting(val attempt: Int, val cause: PresenceException) : ConnectionState()

    /**
     * The session ended: through [PresenceClient.logout] or [PresenceClient.close] ([error] is
     * null), or on an error retrying cannot fix, such as a refused token.
     */
    public data class Closed(val error: PresenceException?) : ConnectionState()
}

/** The contacts watch behind [PresenceClient.contacts], as [PresenceClient.watchState] shows it. */
public sealed class WatchState {
    /** Not started ([PresenceClient.connect] starts it). */
    public object Idle : WatchState() {
        override fun toString(): String = "Idle"
    }

    /** The first snapshot is on its way; [PresenceClient.contacts] may be incomplete. */
    public object Syncing : WatchState() {
        override fun toString(): String = "Syncing"
    }

    /** Every change up to now is in [PresenceClient.contacts]; live changes follow. */
    public data class Live(val watched: Int) : WatchState()

    /**
     * The stream broke; the SDK reconnects and asks only for what changed since the versions it
     * holds. [PresenceClient.contacts] may be stale until the next [Live].
     */
    public data class Reconnecting(val attempt: Int, val cause: PresenceException) : WatchState()

    /** Stopped: by logout or close ([error] null) or on an error retrying cannot fix. */
    public data class Stopped(val error: PresenceException?) : WatchState()
}

/** One change of the contacts map, as [PresenceClient.changes] emits it. */
public sealed class ContactChange {
    /** A contact's presence, newer than anything delivered for them before (snapshot entries included). */
    public data class Updated(val presence: Presence) : ContactChange()

    /** The user is no longer a contact and left the map. */
    public data class Removed(val userId: String) : ContactChange()
}
