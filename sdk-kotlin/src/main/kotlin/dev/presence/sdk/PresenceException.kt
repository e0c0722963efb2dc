package dev.presence.sdk

import io.grpc.Status
import io.grpc.StatusException
import io.grpc.StatusRuntimeException
import kotlinx.coroutines.TimeoutCancellationException

/**
 * Every failure the SDK reports, typed by what the app should do about it, and carrying the
 * gRPC [code] it came from. The server's own message is kept in [message]; transport causes are
 * kept in [cause] for logging.
 *
 * The SDK retries [retryable] failures of its session and watch by itself; unary calls are not
 * retried (except once after a token refresh, see [TokenProvider]).
 */
public sealed class PresenceException(
    public val code: Status.Code,
    message: String,
    cause: Throwable? = null,
) : Exception(message, cause) {
    /** Whether trying again later may succeed. */
    public open val retryable: Boolean get() = false

    /** The token is missing, malformed or expired, and a refreshed one did not help. */
    public class Unauthenticated(message: String, cause: Throwable? = null) :
        PresenceException(Status.Code.UNAUTHENTICATED, message, cause)

    /** The caller may not do this (for example contact management without the admin scope). */
    public class PermissionDenied(message: String, cause: Throwable? = null) :
        PresenceException(Status.Code.PERMISSION_DENIED, message, cause)

    /** The request was refused as invalid (an empty device id, a too long custom message, ...). */
    public class InvalidArgument(message: String, cause: Throwable? = null) :
        PresenceException(Status.Code.INVALID_ARGUMENT, message, cause)

    /** A limit was hit (too many beats, contacts, ...): slow down. */
    public class ResourceExhausted(message: String, cause: Throwable? = null) :
        PresenceException(Status.Code.RESOURCE_EXHAUSTED, message, cause) {
        override val retryable: Boolean get() = true
    }

    /** The server could not be reached, went away, or did not answer in time. */
    public class Unavailable(message: String, cause: Throwable? = null, code: Status.Code = Status.Code.UNAVAILABLE) :
        PresenceException(code, message, cause) {
        override val retryable: Boolean get() = true
    }

    /**
     * Any other gRPC status. [retryable] only for a server-side failure (`INTERNAL`, `DATA_LOSS`);
     * not for `FAILED_PRECONDITION`, which the server sends when this device's session was taken
     * over by another connection with the same device id.
     */
    public class Other(code: Status.Code, message: String, cause: Throwable? = null) :
        PresenceException(code, message, cause) {
        override val retryable: Boolean
            get() = code == Status.Code.INTERNAL || code == Status.Code.DATA_LOSS
    }

    override fun toString(): String = "${javaClass.simpleName}($code: $message)"

    internal companion object {
        /** The one mapping from whatever a gRPC call throws to the SDK's errors. */
        fun from(error: Throwable): PresenceException {
            val status = when (error) {
                is PresenceException -> return error
                is StatusException -> error.status
                is StatusRuntimeException -> error.status
                is TimeoutCancellationException ->
                    return Unavailable("no answer in time", error, Status.Code.DEADLINE_EXCEEDED)
                else -> Status.fromThrowable(error)
            }
            val message = status.description ?: status.code.name.lowercase()
            return when (status.code) {
                Status.Code.UNAUTHENTICATED -> Unauthenticated(message, error)
                Status.Code.PERMISSION_DENIED -> PermissionDenied(message, error)
                Status.Code.INVALID_ARGUMENT, Status.Code.OUT_OF_RANGE -> InvalidArgument(message, error)
                Status.Code.RESOURCE_EXHAUSTED -> ResourceExhausted(message, error)
                Status.Code.UNAVAILABLE, Status.Code.DEADLINE_EXCEEDED, Status.Code.ABORTED,
                Status.Code.CANCELLED, Status.Code.UNKNOWN -> Unavailable(message, error, status.code)
                else -> Other(status.code, message, error)
            }
        }
    }
}
