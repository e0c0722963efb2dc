package dev.presence.sdk

import dev.presence.v1.Activity
import dev.presence.v1.HeartbeatRequest
import dev.presence.v1.HeartbeatResponse
import dev.presence.v1.SessionBeat
import dev.presence.v1.SessionOpen
import dev.presence.v1.UserStatus
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.ExperimentalCoroutinesApi
import kotlinx.coroutines.async
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.channels.ChannelResult
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.consumeAsFlow
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.launch
import kotlinx.coroutines.selects.onTimeout
import kotlinx.coroutines.selects.select
import kotlinx.coroutines.withTimeoutOrNull
import kotlin.time.Duration
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds
import kotlin.time.TimeSource

/** The activity and status the session reports; the latest value wins. */
internal data class Desired(
    val activity: Activity,
    /** Re-sent on every re-open, so a server that lost the user's state gets it back. */
    val status: UserStatus = UserStatus.USER_STATUS_UNSPECIFIED,
    val customMessage: String = "",
)

/**
 * The device session: keeps the bidirectional `Heartbeat` stream open, beats at the server's
 * interval, sends activity changes at once, and re-opens after a broken stream or a server drain
 * with the device's current activity and status. Mirrors the Rust SDK's session task.
 *
 * It runs as one coroutine ([run]) in the client's scope; inside a stream, a child coroutine
 * beats while the parent reads the server's answers, so cancelling the client's scope ends both
 * and cancels the RPC.
 */
internal class Session(
    private val connection: Connection,
    private val config: PresenceConfig,
    private val desired: StateFlow<Desired>,
    private val state: MutableStateFlow<ConnectionState>,
) {
    /** Completed by [stop]: end the session gracefully (half-close, wait for the server's end). */
    private val stopRequest = CompletableDeferred<Unit>()

    /**
     * Asks [run] to end. A running stream is half-closed and drained rather than cancelled, so every
     * beat already sent has been handled by the server when [run] returns: a Disconnect sent after
     * that cannot be undone by a beat still in flight (the server re-opens a session on a beat
     * that arrives after its lease was released).
     */
    fun stop() {
        stopRequest.complete(Unit)
    }

    /**
     * Opens and keeps the session until [stop], or until an error retrying cannot fix. [opened]
     * gets the outcome of the first open: the session does not retry one that never opened, so
     * the app learns about a refused token or a wrong address at once.
     */
    suspend fun run(opened: CompletableDeferred<Unit>) {
        state.value = ConnectionState.Connecting
        // Failed attempts since the stream last worked; drives the backoff.
        var failures = 0
        // Whether a token refresh was tried since the session last opened.
        var refreshed = false
        val onOpened = {
            opened.complete(Unit)
            refreshed = false
        }
        while (!stopRequest.isCompleted) {
            val wakes = connection.wakeCount
            when (val end = runStream(onOpened)) {
                StreamEnd.Stopped -> break
                is StreamEnd.GoAway -> {
                    failures = 0
                    state.value = ConnectionState.Reconnecting(1, PresenceException.Unavailable("server draining: ${end.reason}"))
                    pause(end.wait, wakes)
                }
                is StreamEnd.Failed -> {
                    val error = end.error
                    if (error is PresenceException.Unauthenticated && !refreshed) {
                        // Try once more at once with a fresh token.
                        connection.tokenRefused()
                        refreshed = true
                        continue
                    }
                    if (!opened.isCompleted || !error.retryable) {
                        opened.completeExceptionally(error)
                        state.value = ConnectionState.Closed(error)
                        return
                    }
                    failures = if (end.healthy) 1 else failures + 1
                    state.value = ConnectionState.Reconnecting(failures, error)
                    pause(config.backoff.delay(failures), wakes)
                }
            }
        }
        opened.completeExceptionally(PresenceException.Unavailable("the session was stopped before it opened"))
        state.value = ConnectionState.Closed(null)
    }

    /**
     * Waits [duration], or less if the app asks to stop or reported the network back since the wake
     * count was [wakes] (during the attempt that just failed, too).
     */
    private suspend fun pause(duration: Duration, wakes: Long) {
        withTimeoutOrNull(duration) {
            coroutineScope {
                val woken = async { connection.awaitWake(wakes) }
                select<Unit> {
                    stopRequest.onAwait {}
                    woken.onAwait {}
                }
                woken.cancel()
            }
        }
        connection.channel.resetConnectBackoff()
    }

    private fun openRequest(desired: Desired): HeartbeatRequest {
        val open = SessionOpen.newBuilder()
            .setDeviceId(config.deviceId)
            .setPlatform(config.platform)
            .setActivity(desired.activity)
        if (desired.status != UserStatus.USER_STATUS_UNSPECIFIED) {
            open.setStatus(desired.status).setCustomMessage(desired.customMessage)
        }
        return HeartbeatRequest.newBuilder().setOpen(open).build()
    }

    /** One stream, from open to its end. */
    private suspend fun runStream(onOpened: () -> Unit): StreamEnd = coroutineScope {
        val headers = try {
            connection.headers()
        } catch (e: PresenceException) {
            return@coroutineScope StreamEnd.Failed(e, healthy = false)
        }
        val outbound = Channel<HeartbeatRequest>(OUTBOUND_CAPACITY)
        outbound.trySend(openRequest(desired.value))
        // One ack per beat, and beats are rate limited: this stays small.
        val inbound = Channel<HeartbeatResponse>(Channel.UNLIMITED)
        val call = launch {
            try {
                connection.presence.heartbeat(outbound.consumeAsFlow(), headers).collect { inbound.send(it) }
                inbound.close()
            } catch (e: CancellationException) {
                throw e
            } catch (e: Exception) {
                inbound.close(e)
            }
        }
        try {
            converse(outbound, inbound, onOpened)
        } finally {
            call.cancel()
        }
    }

    private suspend fun converse(
        outbound: Channel<HeartbeatRequest>,
        inbound: Channel<HeartbeatResponse>,
        onOpened: () -> Unit,
    ): StreamEnd = coroutineScope {
        val first = withTimeoutOrNull(config.requestTimeout) { inbound.receiveCatching() }
            ?: return@coroutineScope StreamEnd.Failed(
                PresenceException.Unavailable("no answer to the session open", code = io.grpc.Status.Code.DEADLINE_EXCEEDED),
                healthy = false,
            )
        val opened = when (val response = first.getOrNull()?.responseCase) {
            HeartbeatResponse.ResponseCase.OPENED -> first.getOrThrow().opened
            HeartbeatResponse.ResponseCase.GO_AWAY -> {
                val goAway = first.getOrThrow().goAway
                return@coroutineScope StreamEnd.GoAway(goAwayWait(goAway.reconnectAfterMs), goAway.reason)
            }
            null -> return@coroutineScope StreamEnd.Failed(closedError(first), healthy = false)
            else -> return@coroutineScope StreamEnd.Failed(
                PresenceException.Other(io.grpc.Status.Code.INTERNAL, "first session response was $response, not opened"),
                healthy = false,
            )
        }
        val (interval, lease) = timings(opened.heartbeatIntervalMs, opened.leaseMs)
        state.value = ConnectionState.Connected(interval, lease)
        onOpened()

        // Returns once the channel is closed (the stream is over).
        val beater = launch { beat(desired, interval) { !outbound.trySend(it).isClosed } }
        try {
            readUntilEnd(outbound, inbound, lease, stopBeating = { beater.cancel() })
        } finally {
            beater.cancel()
        }
    }

    /** Reads the server's answers until the stream ends, the lease passes unanswered, or [stop]. */
    @OptIn(ExperimentalCoroutinesApi::class)
    private suspend fun readUntilEnd(
        outbound: Channel<HeartbeatRequest>,
        inbound: Channel<HeartbeatResponse>,
        lease: Duration,
        stopBeating: () -> Unit,
    ): StreamEnd {
        var healthy = false
        var lastHeard = TimeSource.Monotonic.markNow()
        // Set by a go-away: keep beating the draining node until then, so the lease stays fresh.
        var goAwayAt: TimeSource.Monotonic.ValueTimeMark? = null
        var goAwayReason = ""
        while (true) {
            val untilLeaseEnds = lease - lastHeard.elapsedNow()
            val untilGoAway = goAwayAt?.let { -it.elapsedNow() }
            val event = select<Event> {
                inbound.onReceiveCatching { Event.Received(it) }
                stopRequest.onAwait { Event.Stop }
                if (untilGoAway != null && untilGoAway < untilLeaseEnds) {
                    onTimeout(untilGoAway) { Event.GoAwayDue }
                } else {
                    onTimeout(untilLeaseEnds) { Event.LeaseExpired }
                }
            }
            when (event) {
                Event.Stop -> {
                    stopBeating()
                    outbound.close()
                    // The server answers the half-close by ending the stream once it has handled
                    // every beat before it.
                    withTimeoutOrNull(config.requestTimeout) {
                        while (inbound.receiveCatching().isSuccess) continue
                    }
                    return StreamEnd.Stopped
                }
                // Beats get acks; a lease without any answer means the server, or the path to it,
                // is gone, and the server has dropped the session by now anyway.
                Event.LeaseExpired ->
                    return StreamEnd.Failed(PresenceException.Unavailable("no answer from the server within the lease"), healthy)
                Event.GoAwayDue -> return StreamEnd.GoAway(Duration.ZERO, goAwayReason)
                is Event.Received -> {
                    lastHeard = TimeSource.Monotonic.markNow()
                    val response = event.result.getOrNull()
                    if (response == null) {
                        // A draining node closing first is expected: wait out the rest of its delay.
                        goAwayAt?.let { return StreamEnd.GoAway(maxOf(Duration.ZERO, -it.elapsedNow()), goAwayReason) }
                        return StreamEnd.Failed(closedError(event.result), healthy)
                    }
                    when (response.responseCase) {
                        HeartbeatResponse.ResponseCase.ACK -> healthy = true
                        HeartbeatResponse.ResponseCase.GO_AWAY -> if (goAwayAt == null) {
                            goAwayAt = TimeSource.Monotonic.markNow() + goAwayWait(response.goAway.reconnectAfterMs)
                            goAwayReason = response.goAway.reason
                        }
                        // A repeated `opened`, or a kind newer than this SDK: nothing to do.
                        else -> {}
                    }
                }
            }
        }
    }

    private fun closedError(result: ChannelResult<HeartbeatResponse>): PresenceException =
        result.exceptionOrNull()?.let(PresenceException::from)
            ?: PresenceException.Unavailable("server closed the session stream")

    private sealed class Event {
        class Received(val result: ChannelResult<HeartbeatResponse>) : Event()
        object Stop : Event()
        object LeaseExpired : Event()
        object GoAwayDue : Event()
    }

    private sealed class StreamEnd {
        /** [stop] was called. */
        object Stopped : StreamEnd()

        /** The server is draining: reconnect after [wait]. */
        class GoAway(val wait: Duration, val reason: String) : StreamEnd()

        /** The stream failed; [healthy] if it had worked (a beat was acked), which restarts the backoff. */
        class Failed(val error: PresenceException, val healthy: Boolean) : StreamEnd()
    }

    internal companion object {
        /** Beats waiting for HTTP/2; when full, a beat is skipped rather than queued (see [beat]). */
        const val OUTBOUND_CAPACITY = 4

        /** Four beats a second at most, under the server's default limit of five. */
        val MIN_BEAT_GAP = 250.milliseconds

        /** A bogus huge go-away delay must not park the session for days. */
        val MAX_GO_AWAY_WAIT = 30.seconds

        /** Floor for the server's interval, so a tiny value cannot spin the beat loop. */
        val MIN_HEARTBEAT_INTERVAL = 100.milliseconds

        /** Used only if the server's `opened` carries no interval nor lease. */
        val FALLBACK_HEARTBEAT_INTERVAL = 5.seconds

        fun goAwayWait(reconnectAfterMs: Int): Duration =
            minOf(reconnectAfterMs.toUInt().toLong().milliseconds, MAX_GO_AWAY_WAIT)

        /** The beat interval and lease from the server's `opened`, guarded against nonsense. */
        fun timings(heartbeatIntervalMs: Int, leaseMs: Int): Pair<Duration, Duration> {
            val intervalMs = heartbeatIntervalMs.toUInt().toLong()
            val leaseMsLong = leaseMs.toUInt().toLong()
            val interval = when {
                intervalMs > 0 -> intervalMs.milliseconds
                leaseMsLong > 0 -> leaseMsLong.milliseconds / 3
                else -> FALLBACK_HEARTBEAT_INTERVAL
            }.coerceAtLeast(MIN_HEARTBEAT_INTERVAL)
            val lease = if (leaseMsLong > 0) leaseMsLong.milliseconds else interval * 3
            // A lease shorter than two beats would declare a healthy stream dead between acks.
            return interval to lease.coerceAtLeast(interval * 2)
        }
    }
}

/**
 * Beats every [interval], and at once when the activity changes, but never closer together than
 * [Session.MIN_BEAT_GAP] (the server limits beats per second): quick flips coalesce into one beat
 * carrying the latest activity. [send] returns false once the stream is gone, which ends the loop.
 *
 * Every beat carries the full current activity, so a beat [send] skips because the transport is not
 * draining loses nothing; the lease check decides whether the stream is dead.
 */
internal suspend fun beat(
    desired: StateFlow<Desired>,
    interval: Duration,
    timeSource: TimeSource = TimeSource.Monotonic,
    send: (HeartbeatRequest) -> Boolean,
) {
    var seq = 0L
    var sent = desired.value.activity
    var lastBeat = timeSource.markNow()
    while (true) {
        val changed = withTimeoutOrNull(interval) { desired.first { it.activity != sent } }
        if (changed != null) {
            val wait = Session.MIN_BEAT_GAP - lastBeat.elapsedNow()
            if (wait.isPositive()) delay(wait)
        }
        sent = desired.value.activity
        lastBeat = timeSource.markNow()
        seq += 1
        val beat = SessionBeat.newBuilder().setSeq(seq).setActivity(sent).build()
        if (!send(HeartbeatRequest.newBuilder().setBeat(beat).build())) return
    }
}
