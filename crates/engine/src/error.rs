//! The engine's one error type. Every variant names the offending file, field, tensor or value.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed {path}: {message}")]
    MalformedJson { path: PathBuf, message: String },
    #[error(
        "unsupported model_type `{0}` (supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_5, \
         qwen3_5_text, qwen3_next)"
    )]
    UnknownModelType(String),
    #[error("config field `{field}`: {message}")]
    InvalidConfig { field: String, message: String },
    #[error("safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {actual}, expected {expected}")]
    TensorDType {
        name: String,
        actual: String,
        expected: &'static str,
    },
    #[error("token id {id} is out of range: the vocabulary has {vocab} ids")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("sampling parameter `{field}` = {value} is out of range: {allowed}")]
    InvalidSampling {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("KV cache is full: {needed} more blocks needed, {free} free")]
    CacheFull { needed: usize, free: usize },
    #[error("no free state slot: all {0} sequence slots are in use")]
    NoFreeSlot(usize),
    #[error("unknown sequence {0}")]
    UnknownSequence(crate::cache::SeqId),
    #[error("cache snapshot does not fit this model: {0}")]
    SnapshotMismatch(String),
    #[error("device `{device}` is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error("expert dispatch: {0}")]
    Experts(String),
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            message: message.into(),
        }
    }
}
