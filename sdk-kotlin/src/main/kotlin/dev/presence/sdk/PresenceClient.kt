package dev.presence.sdk

import dev.presence.v1.Activity
import dev.presence.v1.AddContactsRequest
import dev.presence.v1.DisconnectRequest
import dev.presence.v1.GetPresenceRequest
import dev.presence.v1.ListContactsRequest
import dev.presence.v1.Presence
import dev.presence.v1.RemoveContactsRequest
import dev.presence.v1.SetStatusRequest
import dev.presence.v1.UserStatus
import java.io.Closeable
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.CoroutineName
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Job
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancelAndJoin
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableSharedFlow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asSharedFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import kotlinx.coroutines.withTimeoutOrNull

/**
 * The presence service for one signed-in user on one device.
 *
 * [connect] opens the device's session (the user shows online to their contacts) and starts
 * watching the contacts, whose presence then lives in [contacts] and streams through [changes].
 * Both reconnect by themselves with exponential backoff and jitter; [connectionState] and
 * [watchState] show what they are doing. Tell the client about the app's lifecycle with
 * [onForeground] / [onBackground] and about connectivity with [onNetworkAvailable]; end with
 * [logout] (contacts see the user offline at once) or [close] (offline after the server's grace
 * period).
 *
 * Every coroutine of the client runs in a child of [scope]: cancelling [scope] stops everything
 * and releases the connection, like [close]. No global scope, no thread of its own besides gRPC's
 * transport.
 *
 * Thread-safe; all calls may come from any thread.
 */
public class PresenceClient(
    private val config: PresenceConfig,
    scope: CoroutineScope,
) : Closeable {
    private val job = SupervisorJob(scope.coroutineContext[Job])
    private val scope = CoroutineScope(scope.coroutineContext + job + CoroutineName("presence"))
    private val connection = Connection(config)

    private val desired = MutableStateFlow(Desired(Activity.ACTIVITY_ACTIVE))
    private val _connectionState = MutableStateFlow<ConnectionState>(ConnectionState.Idle)
    private val _watchState = MutableStateFlow<WatchState>(WatchState.Idle)
    private val _contacts = MutableStateFlow<Map<String, Presence>>(emptyMap())
    private val _changes = MutableSharedFlow<ContactChange>(extraBufferCapacity = config.changesBuffer)

    /** Serializes [connect], [logout] and [close], which start and stop the jobs below. */
    private val lifecycle = Mutex()
    private var session: Session? = null
    private var sessionJob: Job? = null
    private var watchJob: Job? = null
    @Volatile
    private var ended = false

    init {
        // However the client ends (close, logout, or the app cancelling its scope), the connection
        // goes and the states say so.
        job.invokeOnCompletion {
            connection.shutdown()
            _connectionState.update { if (it is ConnectionState.Closed) it else ConnectionState.Closed(null) }
            _watchState.update { if (it is WatchState.Stopped) it else WatchState.Stopped(null) }
        }
    }

    /** The device session: `Idle → Connecting → Connected ⇄ Reconnecting → Closed`. */
    public val connectionState: StateFlow<ConnectionState> = _connectionState.asStateFlow()

    /** The contacts watch: `Idle → Syncing → Live ⇄ Reconnecting → Stopped`. */
    public val watchState: StateFlow<WatchState> = _watchState.asStateFlow()

    /**
     * The latest presence of every contact, by user id. Never goes back to an older version, also
     * across reconnects. Updated before the matching [changes] emission.
     */
    public val contacts: StateFlow<Map<String, Presence>> = _contacts.asStateFlow()

    /**
     * Every change of [contacts] as it happens, snapshot entries included, each at most once. Hot:
     * a collector sees the changes from the moment it subscribes. A collector that falls
     * [PresenceConfig.changesBuffer] changes behind makes the watch wait for it.
     */
    public val changes: Flow<ContactChange> = _changes.asSharedFlow()

    /**
     * Opens the device's session and starts watching the contacts. Returns once the server has
     * answered the open; later losses are retried in the background. Calling it again while
     * connected does nothing.
     *
     * @param status the user-level status to set on open; [UserStatus.USER_STATUS_UNSPECIFIED] (the
     *   default) keeps the user's current one.
     * @throws PresenceException if the first open fails (nothing keeps running then): a refused
     *   token, an unreachable server, ...
     * @throws IllegalStateException after [logout] or [close], also if they come while connecting.
     */
    public suspend fun connect(status: UserStatus = UserStatus.USER_STATUS_UNSPECIFIED, customMessage: String = "") {
        val opened = CompletableDeferred<Unit>()
        lifecycle.withLock {
            check(!ended) { "this client was logged out or closed; create a new one" }
            if (sessionJob?.isActive == true) return
            if (status != UserStatus.USER_STATUS_UNSPECIFIED) {
                desired.update { it.copy(status = status, customMessage = customMessage) }
            }
            val newSession = Session(connection, config, desired, _connectionState)
            session = newSession
            sessionJob = scope.launch(CoroutineName("presence-session")) { newSession.run(opened) }.apply {
                // Closed before the open was answered: connect() must not wait forever.
                invokeOnCompletion { opened.completeExceptionally(IllegalStateException("the client was closed")) }
            }
        }
        opened.await()
        lifecycle.withLock {
            if (!ended && watchJob?.isActive != true) {
                val watch = ContactsWatch(connection, config, _contacts, _changes, _watchState)
                watchJob = scope.launch(CoroutineName("presence-watch")) { watch.run() }
            }
        }
    }

    /** The app came to the foreground: this device reports ACTIVE (contacts see ONLINE). */
    public fun onForeground() {
        desired.update { it.copy(activity = Activity.ACTIVITY_ACTIVE) }
    }

    /**
     * The app went to the background: this device reports IDLE (contacts see IDLE unless another
     * device of the user is active). The session stays open while the process may run.
     */
    public fun onBackground() {
        desired.update { it.copy(activity = Activity.ACTIVITY_IDLE) }
    }

    /** The network is back: reconnect now instead of waiting out the current backoff delay. */
    public fun onNetworkAvailable() {
        connection.wake()
    }

    /**
     * Sets the user's status and custom message for all their devices, and remembers it so that a
     * re-opened session re-applies it.
     *
     * @return the user's own presence after the change.
     */
    public suspend fun setStatus(status: UserStatus, customMessage: String = ""): Presence {
        val response = connection.unary { headers ->
            connection.presence.withDeadline().setStatus(
                SetStatusRequest.newBuilder().setStatus(status).setCustomMessage(customMessage).build(),
                headers,
            )
        }
        desired.update { it.copy(status = status, customMessage = customMessage) }
        return response.presence
    }

    /** The presence of [userIds], in order; users the caller may not see come back OFFLINE with version 0. */
    public suspend fun getPresence(userIds: List<String>): List<Presence> = connection.unary { headers ->
        connection.presence.withDeadline()
            .getPresence(GetPresenceRequest.newBuilder().addAllUserIds(userIds).build(), headers)
            .presencesList
    }

    /** The contacts of [userId] (empty: the caller's own; others' need the admin scope). Sorted. */
    public suspend fun listContacts(userId: String = ""): List<String> = connection.unary { headers ->
        connection.contacts.withDeadline()
            .listContacts(ListContactsRequest.newBuilder().setUserId(userId).build(), headers)
            .contactIdsList
    }

    /** Links [userId] with each of [contactIds], both ways. Admin scope only. @return how many links were new. */
    public suspend fun addContacts(userId: String, contactIds: List<String>): Int = connection.unary { headers ->
        connection.contacts.withDeadline()
            .addContacts(AddContactsRequest.newBuilder().setUserId(userId).addAllContactIds(contactIds).build(), headers)
            .added
    }

    /** Removes the links, both ways. Admin scope only. @return how many links existed. */
    public suspend fun removeContacts(userId: String, contactIds: List<String>): Int = connection.unary { headers ->
        connection.contacts.withDeadline()
            .removeContacts(RemoveContactsRequest.newBuilder().setUserId(userId).addAllContactIds(contactIds).build(), headers)
            .removed
    }

    /**
     * Logs this device out: contacts see the user OFFLINE (reason LOGOUT) at once, unless another
     * device of theirs is online. The session is stopped first, and the server has handled every
     * beat already sent before the Disconnect goes out, so no beat in flight can bring the
     * session back. The client is finished afterwards.
     *
     * @throws PresenceException if the Disconnect call fails; the session is stopped anyway, and
     *   the server ends it after its grace period.
     */
    public suspend fun logout() {
        lifecycle.withLock {
            if (ended) return
            ended = true
            watchJob?.cancelAndJoin()
            session?.stop()
            sessionJob?.let { running ->
                // Stopping waits for the server to end the stream; never longer than a request.
                withTimeoutOrNull(config.requestTimeout * 2) { running.join() } ?: running.cancelAndJoin()
            }
        }
        try {
            connection.unary { headers ->
                connection.presence.withDeadline()
                    .disconnect(DisconnectRequest.newBuilder().setDeviceId(config.deviceId).build(), headers)
            }
        } finally {
            job.cancel()
        }
    }

    /**
     * Stops the session and the watch and releases the connection without logging out: the server
     * ends the session after its grace period. Same as cancelling the scope the client was given.
     */
    override fun close() {
        ended = true
        job.cancel()
    }

    private fun <S : io.grpc.kotlin.AbstractCoroutineStub<S>> S.withDeadline(): S =
        withDeadlineAfter(config.requestTimeout.inWholeMilliseconds, TimeUnit.MILLISECONDS)
}
