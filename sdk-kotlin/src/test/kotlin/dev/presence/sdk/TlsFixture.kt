package dev.presence.sdk

import java.io.File
import java.net.ServerSocket
import java.nio.file.Files
import java.security.KeyStore
import javax.net.ssl.KeyManagerFactory
import javax.net.ssl.SSLContext
import javax.net.ssl.SSLServerSocket

/**
 * A certificate authority and server certificate for `localhost`, made at test time with the
 * JDK's keytool: a self-signed certificate, which is its own CA. [caPem] is what an app would
 * bundle to trust a private CA.
 */
class TlsFixture private constructor(private val keyStore: File, val caPem: ByteArray) {
    /** A TLS server socket offering HTTP/2 through ALPN, as gRPC requires. */
    fun serverSocket(): ServerSocket {
        val keys = KeyStore.getInstance("PKCS12").apply { keyStore.inputStream().use { load(it, PASSWORD) } }
        val keyManagers = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm())
            .apply { init(keys, PASSWORD) }.keyManagers
        val context = SSLContext.getInstance("TLS").apply { init(keyManagers, null, null) }
        val socket = context.serverSocketFactory.createServerSocket(0) as SSLServerSocket
        socket.sslParameters = socket.sslParameters.apply { applicationProtocols = arrayOf("h2") }
        return socket
    }

    companion object {
        private val PASSWORD = "changeit".toCharArray()

        fun create(): TlsFixture {
            val dir = Files.createTempDirectory("presence-tls").toFile()
            val keyStore = File(dir, "server.p12")
            val pem = File(dir, "ca.pem")
            keytool(
                "-genkeypair", "-alias", "server", "-keyalg", "EC", "-groupname", "secp256r1",
                "-dname", "CN=localhost", "-ext", "san=dns:localhost,ip:127.0.0.1", "-validity", "2",
                "-keystore", keyStore.path, "-storetype", "PKCS12", "-storepass", String(PASSWORD),
            )
            keytool("-exportcert", "-rfc", "-alias", "server", "-keystore", keyStore.path,
                "-storepass", String(PASSWORD), "-file", pem.path)
            return TlsFixture(keyStore, pem.readBytes())
        }

        private fun keytool(vararg args: String) {
            val keytool = File(System.getProperty("java.home"), "bin/keytool").path
            val process = ProcessBuilder(listOf(keytool) + args).redirectErrorStream(true).start()
            val output = process.inputStream.bufferedReader().readText()
            check(process.waitFor() == 0) { "keytool failed: $output" }
        }
    }
}
