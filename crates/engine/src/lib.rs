//! Sluice's inference engine: Qwen3.5 / Qwen3-Next models from Hugging Face checkpoints on the
//! CPU, with paged KV cache, Gated DeltaNet state slots, batching, sampling and tokenisation.
//! No async runtime and no RPC here: the services build on this crate.

pub mod allocation_count;
pub mod backend;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod generation;
pub mod model;
pub mod prefill_plan;
pub mod sampler;
pub mod synth;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use backend::Device;
pub use cache::{
    CacheConfig, CacheLayout, CacheSnapshot, KV_BLOCK_TOKENS, ModelCache, SeqId, SeqLease,
};
pub use chat_template::{
    ChatMessage, ChatPrompt, ChatTemplate, MessageContent, TextPart, ToolCallTurn,
};
pub use config::{ModelFamily, ModelSpec};
pub use error::{EngineError, Result};
pub use generation::{FinishReason, GenerationOutput, GenerationRequest, generate};
pub use model::{
    ExpertExecutor, ExpertGroup, ExpertResidency, ExpertShard, LanguageModel, LogitsMode,
    MockModel, MockTiming, Model, SeqChunk, shard_range,
};
pub use prefill_plan::{DEFAULT_PREFILL_CHUNK, PrefillPlan};
pub use sampler::{MAX_LOGIT_BIAS, Sampled, Sampler, SamplingParams, TokenMask};
pub use synth::Preset;
pub use tensor::WeightFormat;
pub use tokenizer::{IncrementalDecoder, Tokenizer};
