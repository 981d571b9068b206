//! The router's one error type, mapped to `tonic::Status` here.

use sluice_runtime::RuntimeError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("overloaded, retry later: {0}")]
    Overloaded(String),
    #[error("no {0} worker is available")]
    NoWorker(&'static str),
    #[error("{role} worker {worker} failed: {message}")]
    WorkerFailed {
        role: &'static str,
        worker: String,
        message: String,
    },
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("internal: {0}")]
    Internal(String),
}

impl RouterError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        RouterError::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        let message = e.to_string();
        match e {
            RouterError::InvalidArgument { .. } => Status::invalid_argument(message),
            RouterError::Overloaded(_) => Status::resource_exhausted(message),
            RouterError::NoWorker(_) | RouterError::WorkerFailed { .. } => {
                Status::unavailable(message)
            }
            RouterError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            RouterError::Runtime(r) => r.into(),
            RouterError::Internal(_) => Status::internal(message),
        }
    }
}
