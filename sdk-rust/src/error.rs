//! The SDK's one error type, and the one place gRPC statuses are mapped to it.

use std::sync::Arc;

use tonic::Code;

/// Everything that can go wrong in the SDK.
///
/// `Clone`, so one failure can be both returned to a caller and kept in the
/// observable [`SessionState`](crate::SessionState).
///
/// Server errors arrive as gRPC statuses and are mapped once, by the
/// `From<tonic::Status>` impl; the variants named after a status code carry
/// the server's message. [`Error::is_retryable`] tells the
/// SDK's own reconnect loops (and callers) whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No token, or the token is invalid or expired (`UNAUTHENTICATED`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but may not do this, e.g. an admin-only call without
    /// the `presence.admin` scope (`PERMISSION_DENIED`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request was rejected as malformed: empty or oversized ids, a batch
    /// too large, a bad enum value (`INVALID_ARGUMENT`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A rate or connection limit was hit (`RESOURCE_EXHAUSTED`).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The server is draining, unreachable, or a backend it needs is down
    /// (`UNAVAILABLE`).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call did not complete within the request timeout
    /// (`DEADLINE_EXCEEDED`).
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The connection to an endpoint could not be set up.
    #[error("transport error: {}", causes(.0.as_ref()))]
    Transport(#[source] Arc<tonic::transport::Error>),
    /// The [`ClientConfig`](crate::ClientConfig) is unusable (no endpoint, a bad
    /// URL, a token that is not a valid header value, a missing device id).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server answered something the protocol does not allow, e.g. a
    /// heartbeat stream whose first response is not `opened`.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// [`set_activity`](crate::PresenceClient::set_activity) was called while no
    /// session runs on this handle.
    #[error("no session is running")]
    NoSession,
    /// [`start_session`](crate::PresenceClient::start_session) was called while
    /// a session already runs on this handle.
    #[error("a session is already running")]
    SessionAlreadyStarted,
    /// Any other gRPC status.
    #[error("{}: {message}", code_name(*.code))]
    Other {
        /// The status code.
        code: Code,
        /// The server's message.
        message: String,
    },
}

impl Error {
    /// The gRPC code this error corresponds to, for logging and metrics.
    /// Errors raised by the SDK itself map to the closest code.
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::InvalidArgument(_) | Self::Config(_) => Code::InvalidArgument,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) | Self::Transport(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Protocol(_) => Code::Internal,
            Self::NoSession | Self::SessionAlreadyStarted => Code::FailedPrecondition,
            Self::Other { code, .. } => *code,
        }
    }

    /// Whether the same call may succeed if tried again later (with backoff).
    ///
    /// True for connection trouble, draining servers, limits and timeouts, and
    /// for the codes transport failures surface as (`UNKNOWN`, `INTERNAL`,
    /// `CANCELLED`, `ABORTED`). False for anything that needs a different
    /// request or credentials: retrying an `UNAUTHENTICATED` forever would only
    /// hammer the server.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_)
            | Self::ResourceExhausted(_)
            | Self::DeadlineExceeded(_)
            | Self::Transport(_)
            | Self::Protocol(_) => true,
            Self::Other { code, .. } => matches!(
                code,
                Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted | Code::DataLoss
            ),
            Self::Unauthenticated(_)
            | Self::PermissionDenied(_)
            | Self::InvalidArgument(_)
            | Self::Config(_)
            | Self::NoSession
            | Self::SessionAlreadyStarted => false,
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(error: tonic::transport::Error) -> Self {
        Self::Transport(Arc::new(error))
    }
}

/// The causes below a transport error, joined: tonic's own message is only
/// "transport error", the useful part ("tcp connect error: connection
/// refused") is in its sources.
fn causes(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        return error.to_string();
    }
    parts.join(": ")
}

/// The code in words, lowercase like every message of this crate.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // An empty message would render as "unavailable: "; the code's own
        // description is more useful than nothing.
        let message = if status.message().is_empty() {
            status.code().description().to_owned()
        } else {
            status.message().to_owned()
        };
        match status.code() {
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::ResourceExhausted => Self::ResourceExhausted(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            code => Self::Other { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn each_documented_status_code_maps_to_its_variant() {
        assert!(matches!(
            Error::from(Status::unauthenticated("bad token")),
            Error::Unauthenticated(m) if m == "bad token"
        ));
        assert!(matches!(
            Error::from(Status::permission_denied("admin only")),
            Error::PermissionDenied(m) if m == "admin only"
        ));
        assert!(matches!(
            Error::from(Status::invalid_argument("batch too large")),
            Error::InvalidArgument(m) if m == "batch too large"
        ));
        assert!(matches!(
            Error::from(Status::resource_exhausted("too many sessions")),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            Error::from(Status::unavailable("draining")),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(Status::deadline_exceeded("slow")),
            Error::DeadlineExceeded(_)
        ));
        assert!(matches!(
            Error::from(Status::not_found("x")),
            Error::Other { code: Code::NotFound, message } if message == "x"
        ));
    }

    #[test]
    fn an_empty_status_message_falls_back_to_the_code_description() {
        let err = Error::from(Status::unavailable(""));
        assert_eq!(
            err.to_string(),
            format!("unavailable: {}", Code::Unavailable.description())
        );
    }

    #[test]
    fn messages_are_lowercase_without_a_final_period() {
        let errors = [
            Error::Unauthenticated("x".into()),
            Error::PermissionDenied("x".into()),
            Error::InvalidArgument("x".into()),
            Error::ResourceExhausted("x".into()),
            Error::Unavailable("x".into()),
            Error::DeadlineExceeded("x".into()),
            Error::Config("x".into()),
            Error::Protocol("x".into()),
            Error::NoSession,
            Error::SessionAlreadyStarted,
            Error::Other {
                code: Code::FailedPrecondition,
                message: "x".into(),
            },
        ];
        for err in errors {
            let text = err.to_string();
            assert_eq!(text, text.to_lowercase(), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(Error::from(Status::unavailable("draining")).is_retryable());
        assert!(Error::from(Status::resource_exhausted("rate")).is_retryable());
        assert!(Error::from(Status::internal("h2 reset")).is_retryable());
        assert!(Error::from(Status::unknown("service was not ready")).is_retryable());
        assert!(!Error::from(Status::unauthenticated("expired")).is_retryable());
        assert!(!Error::from(Status::permission_denied("admin only")).is_retryable());
        assert!(!Error::from(Status::invalid_argument("bad id")).is_retryable());
        assert!(!Error::from(Status::unimplemented("old server")).is_retryable());
    }

    #[test]
    fn the_code_round_trips_for_mapped_statuses() {
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::Internal,
        ] {
            assert_eq!(Error::from(Status::new(code, "m")).code(), code);
        }
    }
}
