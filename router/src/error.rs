//! The router's one error type, mapped to `tonic::Status` here.

use sluice_runtime::RuntimeError;
use tonic::{Code, Status};

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
    #[error("the caller went away")]
    Cancelled,
    #[error("internal: {0}")]
    Internal(String),
}

impl RouterError {
    /// The `outcome` label of `sluice_requests_total` for a request that ended in this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument { .. } => "invalid",
            RouterError::Overloaded(_) => "overloaded",
            RouterError::NoWorker(_) | RouterError::WorkerFailed { .. } => "unavailable",
            RouterError::DeadlineExceeded(_) => "deadline",
            RouterError::Cancelled => "cancelled",
            RouterError::Runtime(e) => match e.code() {
                Code::InvalidArgument => "invalid",
                Code::ResourceExhausted => "overloaded",
                Code::Unavailable => "unavailable",
                Code::DeadlineExceeded => "deadline",
                _ => "error",
            },
            RouterError::Internal(_) => "error",
        }
    }

    /// The status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            RouterError::InvalidArgument { .. } => Code::InvalidArgument,
            RouterError::Overloaded(_) => Code::ResourceExhausted,
            RouterError::NoWorker(_) | RouterError::WorkerFailed { .. } => Code::Unavailable,
            RouterError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RouterError::Cancelled => Code::Cancelled,
            RouterError::Runtime(e) => e.code(),
            RouterError::Internal(_) => Code::Internal,
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        RouterError::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        match e {
            RouterError::Runtime(r) => r.into(),
            e => Status::new(e.code(), e.to_string()),
        }
    }
}
