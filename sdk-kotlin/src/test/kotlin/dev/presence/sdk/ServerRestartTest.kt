package dev.presence.sdk

import dev.presence.v1.Presence
import dev.presence.v1.UserStatus
import java.util.Collections
import kotlin.time.Duration.Companion.seconds
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancel
import kotlinx.coroutines.delay
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.Test

/**
 * A server restart mid-watch, on the Redis Cluster backend (which keeps contacts and presence while
 * the node is down; the embedded backends would forget them). Needs `PRESENCE_TEST_REDIS_CLUSTER`
 * (seed URLs, comma-separated); `scripts/test.sh` starts a cluster when it is unset.
 */
class ServerRestartTest {
    @Test
    fun `a server restart mid-watch resumes with no lost and no duplicated change`() = runBlocking {
        val redis = System.getenv("PRESENCE_TEST_REDIS_CLUSTER")
        assumeTrue(!redis.isNullOrBlank(), "PRESENCE_TEST_REDIS_CLUSTER is not set")
        val app = CoroutineScope(coroutineContext + SupervisorJob(coroutineContext[kotlinx.coroutines.Job]))
        val server = TestServer(listOf("--redis-cluster", redis!!, "--node-id", uniqueId("node"))).start()
        val network = TcpProxy(server.port)
        try {
            val alice = uniqueId("alice")
            val bob = uniqueId("bob")
            fun client(user: String, target: String, admin: Boolean = false) = PresenceClient(
                PresenceConfig.Builder().target(target).deviceId(uniqueId("phone"))
                    .tokenProvider { Tokens.mint(user, admin) }
                    .transportSecurity(TransportSecurity.Plaintext).build(),
                app,
            )
            client("admin", server.target, admin = true).use { it.addContacts(alice, listOf(bob)) }
            // Alice goes through a proxy, so that the test decides when her watch may come back.
            val aliceApp = client(alice, "127.0.0.1:${network.port}")
            val bobApp = client(bob, server.target)
            val seen = Collections.synchronizedList(mutableListOf<Presence>())
            app.launch {
                aliceApp.changes.collect { if (it is ContactChange.Updated && it.presence.userId == bob) seen += it.presence }
            }
            aliceApp.connect()
            bobApp.connect()
            val one = bobApp.setStatus(UserStatus.USER_STATUS_BUSY, "one").version
            aliceApp.contacts.await(3.seconds) { it[bob]?.version == one }

            // The server restarts while Alice cannot reach it; Bob comes back and changes his status.
            network.accepting = false
            server.stop()
            network.cut()
            bobApp.connectionState.await(3.seconds) { it is ConnectionState.Reconnecting }
            server.start()
            bobApp.onNetworkAvailable()
            bobApp.connectionState.await(10.seconds) { it is ConnectionState.Connected }
            val two = bobApp.setStatus(UserStatus.USER_STATUS_BUSY, "two").version

            // Alice's watch resumes from the versions she holds and gets the change she missed.
            network.accepting = true
            aliceApp.onNetworkAvailable()
            aliceApp.watchState.await(10.seconds) { it is WatchState.Live }
            aliceApp.contacts.await(3.seconds) { it[bob]?.customMessage == "two" }
            val three = bobApp.setStatus(UserStatus.USER_STATUS_ONLINE, "three").version
            aliceApp.contacts.await(3.seconds) { it[bob]?.version == three }
            // `contacts` is updated just before `changes` emits: let the collector catch up.
            withTimeout(1.seconds) { while (seen.none { it.version == three }) delay(10) }

            val versions = seen.map { it.version }
            assertEquals(versions.sorted().distinct(), versions, "strictly increasing, no duplicate: $versions")
            assertTrue(one in versions && three in versions, "no change lost: $versions, expected $one and $three")
            assertTrue(seen.any { it.customMessage == "two" && it.version >= two }, "the missed change arrived: $seen")
            // What Alice holds is what the server says now.
            val current = bobApp.getPresence(listOf(bob)).single()
            val held = aliceApp.contacts.value.getValue(bob)
            assertEquals(listOf(current.version, current.status, current.customMessage), listOf(held.version, held.status, held.customMessage))
        } finally {
            app.cancel()
            network.close()
            server.stop()
        }
    }
}
