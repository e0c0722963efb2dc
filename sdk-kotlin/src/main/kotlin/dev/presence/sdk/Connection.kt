package dev.presence.sdk

import dev.presence.v1.ContactsServiceGrpcKt.ContactsServiceCoroutineStub
import dev.presence.v1.PresenceServiceGrpcKt.PresenceServiceCoroutineStub
import io.grpc.ManagedChannel
import io.grpc.Metadata
import io.grpc.okhttp.OkHttpChannelBuilder
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicReference
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.Deferred

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

    /** Completed, and replaced, by [wake]: what backoff waits listen to. */
    private val wakeUp = AtomicReference(CompletableDeferred<Unit>())

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

    /** Fires when [wake] is called: the network came back, retry now. */
    val wakeSignal: Deferred<Unit> get() = wakeUp.get()

    fun wake() {
        wakeUp.getAndSet(CompletableDeferred()).complete(Unit)
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
