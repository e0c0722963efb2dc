package dev.presence.sdk

import dev.presence.v1.PresenceEvent

/**
 * What the contacts watch has delivered, kept across the streams it reconnects through: the filter
 * between the server and the app. No I/O, so its rules are tested without a server.
 *
 * Presence versions only grow per user, so a presence whose version is not above the one held is
 * a duplicate (a resumed stream repeating itself) or out of date, and is dropped.
 */
internal class Delivered {
    /** The version last delivered per user: what the app holds, sent as `known_versions` on resume. */
    private val versions = HashMap<String, Long>()

    /** Whether the current server stream's snapshot is still in progress. */
    private var awaitingSnapshot = false

    /** A result of [filter]: a change for the app, and/or news about the snapshot. */
    sealed class Outcome {
        data class Change(val change: ContactChange) : Outcome()
        data class SnapshotComplete(val watched: Int) : Outcome()
    }

    fun newStream() {
        awaitingSnapshot = true
    }

    fun knownVersions(): Map<String, Long> = HashMap(versions)

    fun filter(event: PresenceEvent): Outcome? = when (event.eventCase) {
        PresenceEvent.EventCase.PRESENCE -> {
            val presence = event.presence
            val held = versions[presence.userId]
            if (presence.userId.isEmpty() || (held != null && java.lang.Long.compareUnsigned(presence.version, held) <= 0)) {
                null
            } else {
                versions[presence.userId] = presence.version
                Outcome.Change(ContactChange.Updated(presence))
            }
        }
        PresenceEvent.EventCase.SNAPSHOT_COMPLETE ->
            if (awaitingSnapshot) {
                awaitingSnapshot = false
                Outcome.SnapshotComplete(event.snapshotComplete.watched)
            } else {
                null
            }
        // Only news if the app holds that user: a resumed stream repeating a removal stays quiet.
        PresenceEvent.EventCase.CONTACT_REMOVED ->
            versions.remove(event.contactRemoved.userId)?.let { Outcome.Change(ContactChange.Removed(event.contactRemoved.userId)) }
        // An event kind newer than this SDK.
        else -> null
    }
}
