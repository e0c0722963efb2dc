package dev.presence.sdk

import dev.presence.v1.ContactsServiceGrpcKt.ContactsServiceCoroutineStub
import dev.presence.v1.PresenceServiceGrpcKt.PresenceServiceCoroutineStub
import io.grpc.ManagedChannel
import io.grpc.Metadata
import io.grpc.okhttp.OkHttpChannelBuilder
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.flow.update

/**
 * The channel, its stubs, and the bearer token: what every call needs. One per client; the
 * channel multiplexes the session, the watch and unary calls over one HTTP/2 connection.
 */
internal class Connection(private val config: PresenceConfig) {
    val channel: ManagedChannel = OkHttpChannelBuilder.forTarget(config.target).apply {
        when (val security = config.transportSecurity) {
            TransportSecurity.PlatformTrust -> useTransportSecurity()
            is TransportSecurity.Custom -> useTransportSecurity().sslSocketFactory(security.socketFactory)
            TransportSecurity.Plaintext -> usePlaintext()
        }
        keepAliveTime(config.keepAliveInterval.inWholeMilliseconds, TimeUnit.MILLISECONDS)
        // Pings only while the session or the watch is open: an idle app must not keep the radio awake.
        keepAliveWithoutCalls(false)
    }.build()

    val presence = PresenceServiceCoroutineStub(channel)
    val contacts = ContactsServiceCoroutineStub(channel)

    /** Set after a refused token, so the next [headers] asks the provider for a fresh one. */
    @Volatile
    private var refreshToken = false

    /**
     * How many times [wake] was called. A counter rather than an event, so that a wake arriving
     * while a reconnect attempt is under way still cuts the backoff after that attempt short.
     */
    private val wakeups = MutableStateFlow(0L)

    /** The `authorization` header for the next call. */
    suspend fun headers(): Metadata {
        val force = refreshToken
        val token = try {
            config.tokenProvider.token(force)
        } catch (e: CancellationException) {
            throw e
        } catch (e: Exception) {
            throw PresenceException.Unavailable("the token provider failed: $e", e)
        }
        if (force) refreshToken = false
        return Metadata().apply { put(AUTHORIZATION, "Bearer $token") }
    }

    /** The server refused the token: the next [headers] forces a refresh. */
    fun tokenRefused() {
        refreshToken = true
    }

    /** The wake count now: pass it to [awaitWake] to wait for the next one. */
    val wakeCount: Long get() = wakeups.value

    /** Returns once [wake] was called after the count was [since]. */
    suspend fun awaitWake(since: Long) {
        wakeups.first { it != since }
    }

    /** The network came back: retry now. */
    fun wake() {
        wakeups.update { it + 1 }
        // gRPC keeps its own backoff for failed connection attempts; skip it too.
        channel.resetConnectBackoff()
    }

    /**
     * Runs [call] with fresh headers; after an `UNAUTHENTICATED` answer it refreshes the token and
     * tries once more. Every failure comes out as a [PresenceException].
     */
    suspend fun <T> unary(call: suspend (Metadata) -> T): T {
        var refreshed = false
        while (true) {
            try {
                return call(headers())
            } catch (e: CancellationException) {
                throw e
            } catch (e: Exception) {
                val error = PresenceException.from(e)
                if (error !is PresenceException.Unauthenticated || refreshed) throw error
                tokenRefused()
                refreshed = true
            }
        }
    }

    fun shutdown() {
        channel.shutdownNow()
    }

    private companion object {
        val AUTHORIZATION: Metadata.Key<String> = Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)
    }
}
