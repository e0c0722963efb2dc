package dev.presence.sdk

import dev.presence.v1.Activity
import dev.presence.v1.HeartbeatRequest
import kotlin.random.Random
import kotlin.time.Duration
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds
import kotlinx.coroutines.ExperimentalCoroutinesApi
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.test.advanceTimeBy
import kotlinx.coroutines.test.currentTime
import kotlinx.coroutines.test.runCurrent
import kotlinx.coroutines.test.runTest
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** The session's timing rules, in virtual time (no server). */
@OptIn(ExperimentalCoroutinesApi::class)
class SessionRulesTest {
    private class Sent(val at: Long, val request: HeartbeatRequest)

    @Test
    fun `beats go out at the server's interval`() = runTest {
        val desired = MutableStateFlow(Desired(Activity.ACTIVITY_ACTIVE))
        val sent = mutableListOf<Sent>()
        val beater = backgroundScope.launch {
            beat(desired, 500.milliseconds, testScheduler.timeSource) { sent += Sent(currentTime, it); true }
        }
        advanceTimeBy(2_100)
        assertEquals(listOf(500L, 1000L, 1500L, 2000L), sent.map { it.at })
        assertEquals(listOf(1L, 2L, 3L, 4L), sent.map { it.request.beat.seq })
        beater.cancel()
    }

    @Test
    fun `an activity change beats at once but quick flips coalesce`() = runTest {
        val desired = MutableStateFlow(Desired(Activity.ACTIVITY_ACTIVE))
        val sent = mutableListOf<Sent>()
        backgroundScope.launch {
            beat(desired, 10.seconds, testScheduler.timeSource) { sent += Sent(currentTime, it); true }
        }
        advanceTimeBy(1_000)
        desired.update { it.copy(activity = Activity.ACTIVITY_IDLE) }
        runCurrent()
        assertEquals(1_000L, sent.single().at)
        assertEquals(Activity.ACTIVITY_IDLE, sent.single().request.beat.activity)

        // Three flips within 100 ms: one beat, no earlier than 250 ms after the last, carrying the latest.
        desired.update { it.copy(activity = Activity.ACTIVITY_ACTIVE) }
        advanceTimeBy(50)
        desired.update { it.copy(activity = Activity.ACTIVITY_IDLE) }
        advanceTimeBy(50)
        desired.update { it.copy(activity = Activity.ACTIVITY_ACTIVE) }
        advanceTimeBy(500)
        assertEquals(listOf(1_000L, 1_250L), sent.map { it.at })
        assertEquals(Activity.ACTIVITY_ACTIVE, sent.last().request.beat.activity)
    }

    @Test
    fun `the beat loop ends when the stream is gone`() = runTest {
        val desired = MutableStateFlow(Desired(Activity.ACTIVITY_ACTIVE))
        var calls = 0
        beat(desired, 100.milliseconds, testScheduler.timeSource) { calls += 1; false }
        assertEquals(1, calls)
    }

    @Test
    fun `the server chooses the interval and lease, within sane bounds`() {
        assertEquals(5.seconds to 15.seconds, Session.timings(5_000, 15_000))
        assertEquals(Session.FALLBACK_HEARTBEAT_INTERVAL to Session.FALLBACK_HEARTBEAT_INTERVAL * 3, Session.timings(0, 0))
        assertEquals(3.seconds to 9.seconds, Session.timings(0, 9_000))
        assertEquals(Session.MIN_HEARTBEAT_INTERVAL to Session.MIN_HEARTBEAT_INTERVAL * 3, Session.timings(1, 0))
        assertEquals(5.seconds to 10.seconds, Session.timings(5_000, 1))
        assertEquals(Session.MAX_GO_AWAY_WAIT, Session.goAwayWait(-1))
    }

    @Test
    fun `backoff doubles from 100 ms up to 10 s with full jitter`() {
        val backoff = Backoff()
        assertEquals(Duration.ZERO, backoff.ceiling(0))
        assertEquals(100.milliseconds, backoff.ceiling(1))
        assertEquals(400.milliseconds, backoff.ceiling(3))
        assertEquals(10.seconds, backoff.ceiling(8))
        assertEquals(10.seconds, backoff.ceiling(Int.MAX_VALUE))
        val random = Random(42)
        val delays = List(200) { backoff.delay(10, random) }
        assertTrue(delays.all { it in Duration.ZERO..10.seconds })
        assertTrue(delays.max() - delays.min() > 5.seconds, "full jitter spreads delays over the whole range")
    }
}
