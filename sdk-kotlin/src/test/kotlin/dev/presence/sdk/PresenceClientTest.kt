package dev.presence.sdk

import dev.presence.v1.OfflineReason
import dev.presence.v1.Presence
import dev.presence.v1.UserStatus
import dev.presence.v1.VisibleStatus
import io.grpc.Status
import java.util.Collections
import kotlin.time.Duration
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds
import kotlin.time.TimeSource
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancel
import kotlinx.coroutines.delay
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeoutOrNull
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertInstanceOf
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance

/**
 * The SDK's promises, tried against a real presence-server (embedded backends) with short timers:
 * beats every 500 ms, lease 2 s, grace 1 s.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class PresenceClientTest {
    private val server = TestServer()

    @BeforeAll
    fun startServer() {
        server.start()
    }

    @AfterAll
    fun stopServer() {
        server.stop()
    }

    /** Runs [body] with a scope standing for the app's (e.g. a ViewModel's), cancelled at the end. */
    private fun app(body: suspend CoroutineScope.(CoroutineScope) -> Unit) = runBlocking {
        val app = CoroutineScope(coroutineContext + SupervisorJob(coroutineContext[kotlinx.coroutines.Job]))
        try {
            body(app)
        } finally {
            app.cancel()
        }
    }

    private fun client(
        app: CoroutineScope,
        user: String,
        target: String = server.target,
        security: TransportSecurity = TransportSecurity.Plaintext,
        tokens: TokenProvider = TokenProvider { Tokens.mint(user) },
    ) = PresenceClient(
        PresenceConfig.Builder()
            .target(target)
            .deviceId(uniqueId("phone"))
            .tokenProvider(tokens)
            .transportSecurity(security)
            .build(),
        app,
    )

    private suspend fun link(app: CoroutineScope, user: String, vararg contacts: String) {
        client(app, "admin", tokens = { Tokens.mint("admin", admin = true) }).use {
            it.addContacts(user, contacts.toList())
        }
    }

    private fun Map<String, Presence>.status(user: String) = this[user]?.status

    /** When the session was Connected again after a Reconnecting, among the states recorded after index [after]. */
    private suspend fun reconnected(
        states: List<Pair<TimeSource.Monotonic.ValueTimeMark, ConnectionState>>,
        after: Int,
    ): TimeSource.Monotonic.ValueTimeMark {
        while (true) {
            val since = synchronized(states) { states.drop(after) }
            val lost = since.indexOfFirst { it.second is ConnectionState.Reconnecting }
            val back = since.drop(lost + 1).firstOrNull { it.second is ConnectionState.Connected }
            if (lost >= 0 && back != null) return back.first
            delay(5)
        }
    }

    @Test
    fun `two users see each other's changes within two seconds`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        val aliceApp = client(app, alice)
        val bobApp = client(app, bob)
        aliceApp.connect()
        bobApp.connect()
        aliceApp.contacts.await(2.seconds) { it.status(bob) == VisibleStatus.VISIBLE_STATUS_ONLINE }
        bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }

        bobApp.setStatus(UserStatus.USER_STATUS_BUSY, "in a meeting")
        aliceApp.contacts.await(2.seconds) {
            it.status(bob) == VisibleStatus.VISIBLE_STATUS_BUSY && it[bob]?.customMessage == "in a meeting"
        }
        aliceApp.setStatus(UserStatus.USER_STATUS_INVISIBLE)
        bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_OFFLINE }
    }

    @Test
    fun `background shows IDLE and foreground shows ONLINE`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        val aliceApp = client(app, alice)
        val bobApp = client(app, bob)
        aliceApp.connect()
        bobApp.connect()
        bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }

        aliceApp.onBackground()
        bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_IDLE }
        aliceApp.onForeground()
        bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }
    }

    @Test
    fun `a connection cut at the socket makes the user offline after the lease`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        TcpProxy(server.port).use { network ->
            val aliceApp = client(app, alice, target = "127.0.0.1:${network.port}")
            val bobApp = client(app, bob)
            aliceApp.connect()
            bobApp.connect()
            bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }

            network.accepting = false
            network.cut()
            val cutAt = TimeSource.Monotonic.markNow()
            aliceApp.connectionState.await(2.seconds) { it is ConnectionState.Reconnecting }
            val offline = bobApp.contacts.await((TestServer.LEASE_MS + TestServer.GRACE_MS + 1000).milliseconds) {
                it.status(alice) == VisibleStatus.VISIBLE_STATUS_OFFLINE
            }.getValue(alice)
            assertTrue(cutAt.elapsedNow() <= TestServer.LEASE_MS.milliseconds + 1.seconds, "offline after ${cutAt.elapsedNow()}")
            assertTrue(
                offline.offlineReason in setOf(OfflineReason.OFFLINE_REASON_CONNECTION_CLOSED, OfflineReason.OFFLINE_REASON_LEASE_EXPIRED),
                "reason ${offline.offlineReason}",
            )
            assertInstanceOf(ConnectionState.Reconnecting::class.java, aliceApp.connectionState.value)

            // The network comes back: the app says so, and the session re-opens at once.
            network.accepting = true
            aliceApp.onNetworkAvailable()
            bobApp.contacts.await(3.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }
        }
    }

    @Test
    fun `a silently dropped network is noticed within the lease on both sides`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        TcpProxy(server.port).use { network ->
            val aliceApp = client(app, alice, target = "127.0.0.1:${network.port}")
            val bobApp = client(app, bob)
            aliceApp.connect()
            bobApp.connect()
            bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }

            network.accepting = false
            network.frozen = true
            val offline = bobApp.contacts.await((TestServer.LEASE_MS + 1500).milliseconds) {
                it.status(alice) == VisibleStatus.VISIBLE_STATUS_OFFLINE
            }.getValue(alice)
            assertEquals(OfflineReason.OFFLINE_REASON_LEASE_EXPIRED, offline.offlineReason)
            // No ack within a lease: the SDK gives the stream up by itself.
            aliceApp.connectionState.await(1.seconds) { it is ConnectionState.Reconnecting }

            network.frozen = false
            network.cut()
            network.accepting = true
            aliceApp.onNetworkAvailable()
            bobApp.contacts.await(3.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }
        }
    }

    @Test
    fun `reconnecting within the grace period shows no offline to contacts`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        TcpProxy(server.port).use { network ->
            val aliceApp = client(app, alice, target = "127.0.0.1:${network.port}")
            val bobApp = client(app, bob)
            aliceApp.connect()
            bobApp.connect()
            bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }
            val seenByBob = Collections.synchronizedList(mutableListOf<Presence>())
            app.launch {
                bobApp.changes.collect { if (it is ContactChange.Updated && it.presence.userId == alice) seenByBob += it.presence }
            }

            // Every state with the moment it was set: an unconfined collector runs inside the
            // SDK's update, so a quick Reconnecting → Connected is neither missed nor late.
            val states = Collections.synchronizedList(mutableListOf<Pair<TimeSource.Monotonic.ValueTimeMark, ConnectionState>>())
            app.launch(Dispatchers.Unconfined) {
                aliceApp.connectionState.collect { states += TimeSource.Monotonic.markNow() to it }
            }
            val reconnectTimes = mutableListOf<Duration>()
            repeat(RECONNECT_SAMPLES) {
                val seen = states.size
                val cutAt = TimeSource.Monotonic.markNow()
                network.cut()
                val reconnectedAt = withTimeoutOrNull(TestServer.GRACE_MS.milliseconds) { reconnected(states, after = seen) } ?: error("iteration $it: ${states.drop(seen).map { s -> (s.first - cutAt) to s.second }}")
                reconnectTimes += reconnectedAt - cutAt
                // Past the next beat's ack: the stream counts as healthy again, so the next cut
                // restarts the backoff from its first step, as it would in the field.
                delay(700)
            }
            // Past the grace period of the last cut: a lost session would show by now.
            delay(TestServer.GRACE_MS.milliseconds + 500.milliseconds)

            assertEquals(emptyList<Presence>(), seenByBob.filter { it.status != VisibleStatus.VISIBLE_STATUS_ONLINE })
            assertEquals(VisibleStatus.VISIBLE_STATUS_ONLINE, bobApp.contacts.value.status(alice))
            val sorted = reconnectTimes.sorted()
            println("reconnect after a dropped connection: median ${sorted[sorted.size / 2]}, samples $reconnectTimes")
        }
    }

    @Test
    fun `logout while a beat is in flight ends offline`() = app { app ->
        val alice = uniqueId("alice")
        val bob = uniqueId("bob")
        link(app, alice, bob)
        val bobApp = client(app, bob)
        bobApp.connect()
        val seenByBob = Collections.synchronizedList(mutableListOf<Presence>())
        app.launch {
            bobApp.changes.collect { if (it is ContactChange.Updated && it.presence.userId == alice) seenByBob += it.presence }
        }
        repeat(3) {
            val aliceApp = client(app, alice)
            aliceApp.connect()
            bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_ONLINE }
            // The activity change goes out as a beat at once; logout follows before its ack.
            aliceApp.onBackground()
            aliceApp.logout()
            val offline = bobApp.contacts.await(2.seconds) { it.status(alice) == VisibleStatus.VISIBLE_STATUS_OFFLINE }
            assertEquals(OfflineReason.OFFLINE_REASON_LOGOUT, offline.getValue(alice).offlineReason)
            assertEquals(ConnectionState.Closed(null), aliceApp.connectionState.value)
        }
        // A beat that re-opened the session would show as ONLINE/IDLE again within a lease.
        delay((TestServer.LEASE_MS + TestServer.GRACE_MS).milliseconds)
        assertEquals(VisibleStatus.VISIBLE_STATUS_OFFLINE, seenByBob.last().status)
        assertEquals(VisibleStatus.VISIBLE_STATUS_OFFLINE, bobApp.getPresence(listOf(alice)).single().status)
    }

    @Test
    fun `a refused token and a forbidden call raise typed errors`() = app { app ->
        val alice = uniqueId("alice")
        val forged = client(app, alice, tokens = { Tokens.mint(alice, secret = "not-the-server-secret-but-long-enough") })
        val refused = runCatching { forged.connect() }.exceptionOrNull()
        assertInstanceOf(PresenceException.Unauthenticated::class.java, refused)
        assertEquals(Status.Code.UNAUTHENTICATED, (refused as PresenceException).code)
        assertEquals(ConnectionState.Closed(refused), forged.connectionState.value)

        val aliceApp = client(app, alice)
        val forbidden = runCatching { aliceApp.addContacts(alice, listOf(uniqueId("mallory"))) }.exceptionOrNull()
        assertInstanceOf(PresenceException.PermissionDenied::class.java, forbidden)
        assertEquals(Status.Code.PERMISSION_DENIED, (forbidden as PresenceException).code)

        val invalid = runCatching { aliceApp.setStatus(UserStatus.USER_STATUS_BUSY, "x".repeat(10_000)) }.exceptionOrNull()
        assertInstanceOf(PresenceException.InvalidArgument::class.java, invalid)
    }

    @Test
    fun `an expired token is refreshed through the provider`() = app { app ->
        val alice = uniqueId("alice")
        val refreshes = mutableListOf<Boolean>()
        val aliceApp = client(app, alice, tokens = { force ->
            refreshes += force
            if (force) Tokens.mint(alice) else Tokens.mint(alice, ttlSeconds = -600)
        })
        aliceApp.connect()
        assertInstanceOf(ConnectionState.Connected::class.java, aliceApp.connectionState.value)
        assertEquals(listOf(false, true), refreshes)
    }

    @Test
    fun `TLS with a custom CA`() = app { app ->
        val alice = uniqueId("alice")
        val tls = TlsFixture.create()
        TcpProxy(server.port, tls.serverSocket()).use { terminator ->
            val target = "localhost:${terminator.port}"
            val aliceApp = client(app, alice, target = target, security = TransportSecurity.trusting(tls.caPem.inputStream()))
            aliceApp.connect()
            assertInstanceOf(ConnectionState.Connected::class.java, aliceApp.connectionState.value)
            assertEquals(VisibleStatus.VISIBLE_STATUS_ONLINE, aliceApp.getPresence(listOf(alice)).single().status)

            // The platform's trust store does not know the test CA.
            val untrusting = client(app, uniqueId("eve"), target = target, security = TransportSecurity.PlatformTrust)
            val refused = runCatching { untrusting.connect() }.exceptionOrNull()
            assertInstanceOf(PresenceException.Unavailable::class.java, refused)
            assertEquals(Status.Code.UNAVAILABLE, (refused as PresenceException).code)
        }
    }

    @Test
    fun `cancelling the app's scope ends the client`() = app { app ->
        val alice = uniqueId("alice")
        val screen = CoroutineScope(app.coroutineContext + SupervisorJob(app.coroutineContext[kotlinx.coroutines.Job]))
        val aliceApp = client(screen, alice)
        aliceApp.connect()
        screen.cancel()
        aliceApp.connectionState.await(1.seconds) { it == ConnectionState.Closed(null) }
        assertEquals(WatchState.Stopped(null), aliceApp.watchState.value)
    }

    private companion object {
        const val RECONNECT_SAMPLES = 7
    }
}
