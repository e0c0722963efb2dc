package dev.presence.sdk

import dev.presence.v1.Presence
import dev.presence.v1.WatchContactsRequest
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.flow.MutableSharedFlow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.withTimeoutOrNull

/**
 * The contacts watch: a `WatchContacts` stream folded into [contacts] and [changes], resumed
 * after a break from the versions already held (`known_versions`), so the server sends only what
 * changed and [Delivered] drops anything already seen. Runs as one coroutine ([run]) in the
 * client's scope; a slow collector of [changes] slows the reading of the stream, and the server
 * then coalesces to the latest state per user, so no buffer grows without bound.
 */
internal class ContactsWatch(
    private val connection: Connection,
    private val config: PresenceConfig,
    private val contacts: MutableStateFlow<Map<String, Presence>>,
    private val changes: MutableSharedFlow<ContactChange>,
    private val state: MutableStateFlow<WatchState>,
) {
    private val delivered = Delivered()

    /** Watches until cancelled, or until an error retrying cannot fix (then [state] says which). */
    suspend fun run() {
        state.value = WatchState.Syncing
        var failures = 0
        var refreshed = false
        while (true) {
            val wakes = connection.wakeCount
            val error = try {
                watchOnce(onLive = { failures = 0; refreshed = false })
                PresenceException.Unavailable("server closed the watch stream")
            } catch (e: CancellationException) {
                throw e
            } catch (e: Exception) {
                PresenceException.from(e)
            }
            if (error is PresenceException.Unauthenticated && !refreshed) {
                connection.tokenRefused()
                refreshed = true
                continue
            }
            if (!error.retryable) {
                state.value = WatchState.Stopped(error)
                return
            }
            failures += 1
            state.value = WatchState.Reconnecting(failures, error)
            withTimeoutOrNull(config.backoff.delay(failures)) { connection.awaitWake(wakes) }
            connection.channel.resetConnectBackoff()
        }
    }

    private suspend fun watchOnce(onLive: () -> Unit) {
        val request = WatchContactsRequest.newBuilder().putAllKnownVersions(delivered.knownVersions()).build()
        val events = connection.presence.watchContacts(request, connection.headers())
        delivered.newStream()
        events.collect { event ->
            when (val outcome = delivered.filter(event)) {
                null -> {}
                is Delivered.Outcome.SnapshotComplete -> {
                    onLive()
                    state.value = WatchState.Live(outcome.watched)
                }
                is Delivered.Outcome.Change -> {
                    when (val change = outcome.change) {
                        is ContactChange.Updated -> contacts.update { it + (change.presence.userId to change.presence) }
                        is ContactChange.Removed -> contacts.update { it - change.userId }
                    }
                    changes.emit(outcome.change)
                }
            }
        }
    }
}
