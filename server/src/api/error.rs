//! The API's errors and their one mapping to gRPC status codes. Messages are
//! for clients: lowercase, no final period, no internal causes.

use tonic::{Code, Status};

use crate::domain::TransitionError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// The stream lost what it was serving (its session was taken over or
    /// ended): the client is to open a new one.
    #[error("{0}")]
    Aborted(String),
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let code = match &error {
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Aborted(_) => Code::Aborted,
        };
        Status::new(code, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::Transition(e @ TransitionError::TooManySessions(_)) => {
                ApiError::ResourceExhausted(e.to_string())
            }
            StoreError::Transition(e @ TransitionError::SessionReplaced) => {
                ApiError::FailedPrecondition(e.to_string())
            }
            // The node restores the user and retries: never reaches a client
            // unless the hot store forgets the user again meanwhile.
            StoreError::Transition(TransitionError::Forgotten) => {
                ApiError::Unavailable("the user's status is being restored, retry shortly".into())
            }
            e @ StoreError::TooManyContacts(_) => ApiError::ResourceExhausted(e.to_string()),
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "backend unavailable");
                ApiError::Unavailable("a backend is unavailable, retry shortly".into())
            }
        }
    }
}
