//! The Qwen3.5 / Qwen3-Next model: `qwen35.rs` reads top-down; its layers live in `layers/`.

mod expert_shard;
pub mod layers;
mod qwen35;

pub use expert_shard::{ExpertShard, shard_range};
pub use layers::Segment;
pub use layers::moe::{ExpertExecutor, ExpertGroup, ExpertResidency};
pub use qwen35::{LogitsMode, Model, SeqChunk};
