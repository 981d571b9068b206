//! The layers of a Qwen3.5 decoder block, each loading its own weights and running on a packed
//! batch of sequence segments.

pub mod attention;
pub mod gated_delta;
pub mod mlp;
pub mod moe;
pub mod norm;

use crate::cache::SeqId;

/// One sequence's tokens inside a packed batch.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub seq: SeqId,
    /// Index of its first token in the packed `[tokens, hidden]` activations.
    pub offset: usize,
    pub len: usize,
    /// Position of its first token in the sequence (tokens already cached).
    pub start_pos: usize,
}
