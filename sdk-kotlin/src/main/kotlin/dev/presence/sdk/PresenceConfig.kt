package dev.presence.sdk

import dev.presence.v1.Platform
import java.io.InputStream
import java.security.KeyStore
import java.security.cert.CertificateFactory
import javax.net.ssl.SSLContext
import javax.net.ssl.SSLSocketFactory
import javax.net.ssl.TrustManagerFactory
import kotlin.time.Duration
import kotlin.time.Duration.Companion.seconds

/**
 * Supplies the bearer token (a JWT whose `sub` is the user) for every call.
 *
 * The SDK asks before each call and each (re)connect, so the provider should cache and return
 * quickly. When the server answers `UNAUTHENTICATED`, the SDK asks once more with
 * `forceRefresh = true` and retries; if that token is refused too, the call fails with
 * [PresenceException.Unauthenticated] and the session closes.
 * An exception thrown by the provider counts as a retryable [PresenceException.Unavailable]
 * (typically: no network to refresh with).
 */
public fun interface TokenProvider {
    public suspend fun token(forceRefresh: Boolean): String
}

/** How the connection to the server is secured. */
public sealed class TransportSecurity {
    /** TLS, trusting the platform's certificate authorities (Android's system store). The default. */
    public object PlatformTrust : TransportSecurity()

    /** TLS with the given socket factory, e.g. one trusting a private CA: see [trusting]. */
    public class Custom(public val socketFactory: SSLSocketFactory) : TransportSecurity()

    /** No encryption (h2c): for local development and tests only; tokens travel in clear. */
    public object Plaintext : TransportSecurity()

    public companion object {
        /**
         * TLS trusting only the X.509 certificates (PEM or DER) read from [caCertificates], such as a
         * private or test CA. The stream is read fully but not closed.
         */
        @JvmStatic
        public fun trusting(caCertificates: InputStream): Custom {
            val keyStore = KeyStore.getInstance(KeyStore.getDefaultType()).apply { load(null, null) }
            CertificateFactory.getInstance("X.509").generateCertificates(caCertificates)
                .forEachIndexed { index, certificate -> keyStore.setCertificateEntry("ca-$index", certificate) }
            val trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm()).apply { init(keyStore) }
            val context = SSLContext.getInstance("TLS").apply { init(null, trust.trustManagers, null) }
            return Custom(context.socketFactory)
        }
    }
}

/**
 * Everything a [PresenceClient] needs, immutable; made with [Builder] (or [newBuilder] to derive a
 * variant). Only [target], [deviceId] and [tokenProvider] are required.
 */
public class PresenceConfig private constructor(builder: Builder) {
    /** The server, as `host:port` (or any gRPC target URI). Required. */
    public val target: String = requireNotNull(builder.target) { "target is required" }

    /**
     * This device's id: stable across app restarts and reconnects of the same installation (for
     * example a UUID kept in preferences), 1 to 128 bytes. Required.
     */
    public val deviceId: String = requireNotNull(builder.deviceId) { "deviceId is required" }

    /** The bearer token source. Required. */
    public val tokenProvider: TokenProvider = requireNotNull(builder.tokenProvider) { "tokenProvider is required" }

    /** Shown to the user themself and to admins. Default: [Platform.PLATFORM_ANDROID]. */
    public val platform: Platform = builder.platform

    /** Default: [TransportSecurity.PlatformTrust]. */
    public val transportSecurity: TransportSecurity = builder.transportSecurity

    /** Between reconnect attempts of the session and the contacts watch. Default: [Backoff] (100 ms, x2, 10 s). */
    public val backoff: Backoff = builder.backoff

    /** Deadline of unary calls, and the longest wait for the server's answer to a session open. Default: 10 s. */
    public val requestTimeout: Duration = builder.requestTimeout

    /**
     * HTTP/2 ping interval while a stream is open, to notice a dead connection the OS does not
     * report (a phone switching networks). Default: 30 s; gRPC raises anything below 10 s to 10 s.
     */
    public val keepAliveInterval: Duration = builder.keepAliveInterval

    /**
     * How many contact changes [PresenceClient.changes] buffers for slow collectors before the
     * watch waits for them (the server then coalesces to the latest state per user). Default: 64.
     */
    public val changesBuffer: Int = builder.changesBuffer

    init {
        require(deviceId.isNotEmpty() && deviceId.toByteArray().size <= 128) { "deviceId must be 1 to 128 bytes" }
        require(requestTimeout.isPositive()) { "requestTimeout must be positive" }
        require(keepAliveInterval.isPositive()) { "keepAliveInterval must be positive" }
        require(changesBuffer >= 0) { "changesBuffer must not be negative" }
    }

    /** A builder holding this configuration's values. */
    public fun newBuilder(): Builder = Builder(this)

    public class Builder() {
        internal var target: String? = null
        internal var deviceId: String? = null
        internal var tokenProvider: TokenProvider? = null
        internal var platform: Platform = Platform.PLATFORM_ANDROID
        internal var transportSecurity: TransportSecurity = TransportSecurity.PlatformTrust
        internal var backoff: Backoff = Backoff()
        internal var requestTimeout: Duration = 10.seconds
        internal var keepAliveInterval: Duration = 30.seconds
        internal var changesBuffer: Int = 64

        internal constructor(config: PresenceConfig) : this() {
            target = config.target
            deviceId = config.deviceId
            tokenProvider = config.tokenProvider
            platform = config.platform
            transportSecurity = config.transportSecurity
            backoff = config.backoff
            requestTimeout = config.requestTimeout
            keepAliveInterval = config.keepAliveInterval
            changesBuffer = config.changesBuffer
        }

        /** See [PresenceConfig.target]. */
        public fun target(target: String): Builder = apply { this.target = target }

        /** See [PresenceConfig.deviceId]. */
        public fun deviceId(deviceId: String): Builder = apply { this.deviceId = deviceId }

        /** See [PresenceConfig.tokenProvider]. */
        public fun tokenProvider(provider: TokenProvider): Builder = apply { this.tokenProvider = provider }

        /** See [PresenceConfig.platform]. */
        public fun platform(platform: Platform): Builder = apply { this.platform = platform }

        /** See [PresenceConfig.transportSecurity]. */
        public fun transportSecurity(security: TransportSecurity): Builder = apply { this.transportSecurity = security }

        /** See [PresenceConfig.backoff]. */
        public fun backoff(backoff: Backoff): Builder = apply { this.backoff = backoff }

        /** See [PresenceConfig.requestTimeout]. */
        public fun requestTimeout(timeout: Duration): Builder = apply { this.requestTimeout = timeout }

        /** See [PresenceConfig.keepAliveInterval]. */
        public fun keepAliveInterval(interval: Duration): Builder = apply { this.keepAliveInterval = interval }

        /** See [PresenceConfig.changesBuffer]. */
        public fun changesBuffer(capacity: Int): Builder = apply { this.changesBuffer = capacity }

        /** @throws IllegalArgumentException if a required value is missing or a value is out of range. */
        public fun build(): PresenceConfig = PresenceConfig(this)
    }
}
