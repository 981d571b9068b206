//! The Qwen3.5 / Qwen3-Next model: `qwen35.rs` reads top-down; its layers live in `layers/`.

pub mod layers;
mod qwen35;

pub use layers::Segment;
pub use qwen35::{LogitsMode, Model, SeqChunk};
