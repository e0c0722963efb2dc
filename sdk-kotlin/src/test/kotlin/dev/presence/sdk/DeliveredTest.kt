package dev.presence.sdk

import dev.presence.v1.ContactRemoved
import dev.presence.v1.Presence
import dev.presence.v1.PresenceEvent
import dev.presence.v1.SnapshotComplete
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Test

/** The watch's filter between server and app: never a duplicate, never an older version. */
class DeliveredTest {
    private fun presence(user: String, version: Long) =
        PresenceEvent.newBuilder().setPresence(Presence.newBuilder().setUserId(user).setVersion(version)).build()

    private fun snapshotComplete(watched: Int) =
        PresenceEvent.newBuilder().setSnapshotComplete(SnapshotComplete.newBuilder().setWatched(watched)).build()

    private fun removed(user: String) =
        PresenceEvent.newBuilder().setContactRemoved(ContactRemoved.newBuilder().setUserId(user)).build()

    @Test
    fun `older and repeated versions are dropped, also across streams`() {
        val delivered = Delivered()
        delivered.newStream()
        assertEquals(ContactChange.Updated(presence("bob", 5).presence), (delivered.filter(presence("bob", 5)) as Delivered.Outcome.Change).change)
        assertNull(delivered.filter(presence("bob", 5)))
        assertNull(delivered.filter(presence("bob", 4)))
        assertEquals(Delivered.Outcome.SnapshotComplete(1), delivered.filter(snapshotComplete(1)))
        assertNull(delivered.filter(snapshotComplete(1)))

        // A resumed stream asks with what is held and repeats nothing the app already has.
        assertEquals(mapOf("bob" to 5L), delivered.knownVersions())
        delivered.newStream()
        assertNull(delivered.filter(presence("bob", 5)))
        assertEquals(7L, ((delivered.filter(presence("bob", 7)) as Delivered.Outcome.Change).change as ContactChange.Updated).presence.version)
        assertEquals(Delivered.Outcome.SnapshotComplete(1), delivered.filter(snapshotComplete(1)))
    }

    @Test
    fun `a removal is reported once, and only for a user the app holds`() {
        val delivered = Delivered()
        delivered.newStream()
        delivered.filter(presence("bob", 1))
        assertEquals(Delivered.Outcome.Change(ContactChange.Removed("bob")), delivered.filter(removed("bob")))
        assertNull(delivered.filter(removed("bob")))
        assertNull(delivered.filter(removed("carol")))
        assertEquals(emptyMap<String, Long>(), delivered.knownVersions())
    }
}
