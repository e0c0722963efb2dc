package dev.presence.sdk

import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.Base64
import java.util.UUID
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.TimeUnit
import javax.crypto.Mac
import javax.crypto.spec.SecretKeySpec
import kotlin.concurrent.thread
import kotlin.time.Duration
import kotlin.time.Duration.Companion.seconds
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.withTimeout

/** The secret `presence-server --dev` verifies tokens with. */
private const val DEV_SECRET = "presence-development-secret-never-use-in-production"

/** HS256 tokens as the server expects them (test-only: apps get theirs from their backend). */
object Tokens {
    fun mint(user: String, admin: Boolean = false, ttlSeconds: Long = 3600, secret: String = DEV_SECRET): String {
        val now = System.currentTimeMillis() / 1000
        val scope = if (admin) ""","scope":"presence.admin"""" else ""
        val header = base64("""{"alg":"HS256","typ":"JWT"}""".toByteArray())
        val claims = base64("""{"sub":"$user","iat":$now,"exp":${now + ttlSeconds}$scope}""".toByteArray())
        val mac = Mac.getInstance("HmacSHA256").apply { init(SecretKeySpec(secret.toByteArray(), "HmacSHA256")) }
        return "$header.$claims.${base64(mac.doFinal("$header.$claims".toByteArray()))}"
    }

    private fun base64(bytes: ByteArray) = Base64.getUrlEncoder().withoutPadding().encodeToString(bytes)
}

/** Ids no other run (or test) shares, so tests never see each other's users. */
fun uniqueId(prefix: String): String = "$prefix-${UUID.randomUUID().toString().take(8)}"

fun freePort(): Int = ServerSocket(0).use { it.localPort }

/**
 * A real presence-server process with short timers: beats every 500 ms, lease 2 s, grace 1 s.
 * The binary comes from the system property `presence.server.bin`, else the environment's
 * `PRESENCE_SERVER_BIN`, else `../target/debug/presence-server` (a `cargo build` of the workspace).
 */
class TestServer(
    private val extraArgs: List<String> = emptyList(),
    val port: Int = freePort(),
) : AutoCloseable {
    private var process: Process? = null
    private val log: File = Files.createTempFile("presence-server-", ".log").toFile()

    val target: String get() = "127.0.0.1:$port"

    fun start(): TestServer = apply {
        val binary = System.getProperty("presence.server.bin")?.takeIf { it.isNotBlank() }
            ?: System.getenv("PRESENCE_SERVER_BIN")?.takeIf { it.isNotBlank() }
            // Surefire runs in sdk-kotlin/; cargo builds into the workspace's target/.
            ?: File("../target/debug/presence-server").absolutePath
        check(File(binary).canExecute()) { "presence-server not found at $binary (build it, or set PRESENCE_SERVER_BIN)" }
        val command = listOf(
            binary, "--dev", "--listen", target,
            "--heartbeat-interval", "500ms", "--lease", "$LEASE_MS" + "ms", "--grace", "$GRACE_MS" + "ms",
            "--sweep-interval", "100ms",
        ) + extraArgs
        process = ProcessBuilder(command)
            .redirectErrorStream(true)
            .redirectOutput(ProcessBuilder.Redirect.appendTo(log))
            .start()
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20)
        while (System.nanoTime() < deadline) {
            check(process!!.isAlive) { "presence-server exited: ${log.readText()}" }
            try {
                Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 200) }
                return@apply
            } catch (_: java.io.IOException) {
                Thread.sleep(50)
            }
        }
        error("presence-server did not listen on $target: ${log.readText()}")
    }

    /** Stops the server as an orchestrator would (SIGTERM), waiting for it to exit. */
    fun stop() {
        process?.let {
            it.destroy()
            if (!it.waitFor(15, TimeUnit.SECONDS)) it.destroyForcibly().waitFor()
        }
        process = null
    }

    override fun close() = stop()

    companion object {
        const val LEASE_MS = 2000L
        const val GRACE_MS = 1000L
    }
}

/**
 * A TCP proxy in front of the server, to cut connections at the socket ([cut]), refuse new ones
 * ([accepting]), and optionally terminate TLS (with ALPN h2) the way a load balancer would.
 */
class TcpProxy(
    private val upstreamPort: Int,
    private val serverSocket: ServerSocket = ServerSocket(0),
) : AutoCloseable {
    private val sockets = CopyOnWriteArrayList<Socket>()

    /**
     * While true, open connections stay open but carry nothing, in either direction: a network
     * that drops packets silently, which neither side's OS reports.
     */
    @Volatile
    var frozen: Boolean = false

    /** While false, new connections are closed at once (the network is down). */
    @Volatile
    var accepting: Boolean = true

    val port: Int get() = serverSocket.localPort

    init {
        thread(isDaemon = true, name = "proxy-accept-$port") {
            while (!serverSocket.isClosed) {
                val client = try {
                    serverSocket.accept()
                } catch (_: java.io.IOException) {
                    break
                }
                if (!accepting) {
                    client.close()
                    continue
                }
                thread(isDaemon = true) { serve(client) }
            }
        }
    }

    private fun serve(client: Socket) {
        val upstream = try {
            Socket("127.0.0.1", upstreamPort)
        } catch (_: java.io.IOException) {
            client.close()
            return
        }
        sockets += client
        sockets += upstream
        for ((from, to) in listOf(client to upstream, upstream to client)) {
            thread(isDaemon = true) {
                try {
                    val input = from.getInputStream()
                    val output = to.getOutputStream()
                    val buffer = ByteArray(16 * 1024)
                    while (true) {
                        val read = input.read(buffer)
                        if (read < 0) break
                        while (frozen && !from.isClosed) Thread.sleep(10)
                        output.write(buffer, 0, read)
                    }
                } catch (_: java.io.IOException) {
                } finally {
                    from.close()
                    to.close()
                }
            }
        }
    }

    /** Closes every open connection in both directions, as a dropped network would. */
    fun cut() {
        sockets.forEach { runCatching { it.close() } }
        sockets.clear()
    }

    override fun close() {
        serverSocket.close()
        cut()
    }
}

/** Waits for the first value matching [predicate], failing the test after [timeout]. */
suspend fun <T> Flow<T>.await(timeout: Duration = 5.seconds, predicate: (T) -> Boolean): T =
    withTimeout(timeout) { first(predicate) }
