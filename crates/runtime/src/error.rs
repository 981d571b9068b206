//! The runtime's one error type, mapped to `tonic::Status` once, here.

use sluice_engine::EngineError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("membership: {0}")]
    Membership(String),
    #[error("malformed key `{key}`: {reason}")]
    MalformedKey { key: String, reason: &'static str },
    #[error("malformed worker record under `{key}`: {message}")]
    MalformedRecord { key: String, message: String },
    #[error("cache transfer refused: {0}")]
    TransferRefused(String),
    #[error("cache transfer corrupted: {0}")]
    TransferCorrupted(String),
    #[error("cache transfer `{0}` did not arrive in time")]
    TransferTimeout(String),
    #[error("worker {worker} is unavailable: {message}")]
    Unavailable { worker: String, message: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("gRPC: {0}")]
    Rpc(#[from] Status),
    #[error("cannot connect to {address}: {message}")]
    Connect { address: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("device: {0}")]
    Device(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The status code an engine error deserves: the caller's input, capacity, or our fault.
pub fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::TokenOutOfRange { .. }
        | EngineError::EmptyPrompt
        | EngineError::InvalidSampling { .. }
        | EngineError::InvalidArgument { .. }
        | EngineError::Tokenizer(_)
        | EngineError::ChatTemplate(_) => Code::InvalidArgument,
        EngineError::CacheFull { .. } | EngineError::NoFreeSlot(_) => Code::ResourceExhausted,
        EngineError::SnapshotMismatch(_) => Code::FailedPrecondition,
        EngineError::Experts(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// An engine error as the status a caller should see.
pub fn engine_status(e: &EngineError) -> Status {
    Status::new(engine_code(e), e.to_string())
}

impl RuntimeError {
    /// The status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            RuntimeError::Rpc(status) => status.code(),
            RuntimeError::Engine(inner) => engine_code(inner),
            RuntimeError::InvalidArgument { .. }
            | RuntimeError::MalformedKey { .. }
            | RuntimeError::MalformedRecord { .. } => Code::InvalidArgument,
            RuntimeError::TransferRefused(_) => Code::FailedPrecondition,
            RuntimeError::TransferCorrupted(_) => Code::DataLoss,
            RuntimeError::TransferTimeout(_) => Code::DeadlineExceeded,
            RuntimeError::Unavailable { .. }
            | RuntimeError::Connect { .. }
            | RuntimeError::Etcd(_)
            | RuntimeError::Membership(_) => Code::Unavailable,
            RuntimeError::Overloaded(_) => Code::ResourceExhausted,
            RuntimeError::Io(_) | RuntimeError::Device(_) | RuntimeError::Internal(_) => {
                Code::Internal
            }
        }
    }
}

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Status {
        match e {
            RuntimeError::Rpc(status) => status,
            e => Status::new(e.code(), e.to_string()),
        }
    }
}
