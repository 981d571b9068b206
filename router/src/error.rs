//! The router's one error type, mapped to `tonic::Status` here.

use std::borrow::Cow;

use sluice_runtime::RuntimeError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        field: Cow<'static, str>,
        message: String,
    },
    /// Refused for load (never for the request itself): `retry_after` is when the queues
    /// should have room again, as estimated.
    #[error("overloaded, retry later: {message}")]
    Overloaded {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
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
            RouterError::Unauthenticated(_) => "unauthenticated",
            RouterError::Overloaded { .. } => "overloaded",
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
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::Overloaded { .. } => Code::ResourceExhausted,
            RouterError::NoWorker(_) | RouterError::WorkerFailed { .. } => Code::Unavailable,
            RouterError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RouterError::Cancelled => Code::Cancelled,
            RouterError::Runtime(e) => e.code(),
            RouterError::Internal(_) => Code::Internal,
        }
    }

    /// Seconds a refused client should wait before retrying, if this error says.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RouterError::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A refusal of the request field `field` (a name such as `messages[2].content`).
    pub fn invalid(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        RouterError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Whole seconds to wait, rounded up (a client retrying sooner would be refused again), at
/// least 1.
pub fn retry_after_secs(after: std::time::Duration) -> u64 {
    (after.as_secs_f64().ceil() as u64).max(1)
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        let retry_after = e.retry_after();
        let mut status = match e {
            RouterError::Runtime(r) => r.into(),
            e => Status::new(e.code(), e.to_string()),
        };
        // As HTTP's header, in whole seconds: gRPC clients read it from the trailers.
        if let Some(after) = retry_after
            && let Ok(value) = retry_after_secs(after).to_string().parse()
        {
            status.metadata_mut().insert("retry-after", value);
        }
        status
    }
}
