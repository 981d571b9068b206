//! The Qwen3.5 / Qwen3-Next model: `qwen35.rs` reads top-down; its layers live in `layers/`.
//! `mock.rs` is a stand-in that only takes the time, for testing the serving path.

mod expert_shard;
pub mod layers;
mod mock;
mod qwen35;

pub use expert_shard::{ExpertShard, shard_range};
pub use layers::moe::{ExpertExecutor, ExpertGroup, ExpertResidency};
pub use mock::{MockModel, MockTiming};
pub(crate) use qwen35::fingerprint;
pub use qwen35::{LogitsMode, Model, SeqChunk};

use crate::backend::Segment;
use crate::cache::{CacheConfig, ModelCache};
use crate::config::ModelSpec;
use crate::error::{EngineError, Result};

/// What a worker needs of a model: a cache of the right shape and a forward step. The
/// Qwen3.5 [`Model`] computes; the [`MockModel`] only takes the time.
pub trait LanguageModel: Send + Sync {
    fn spec(&self) -> &ModelSpec;
    /// Identifies the architecture and weight dtype: two workers may exchange cache snapshots
    /// only when their fingerprints match.
    fn fingerprint(&self) -> u64;
    fn new_cache(&self, config: CacheConfig) -> Result<ModelCache>;
    /// Runs one step over a packed batch and writes logits `[rows, vocab]` (rows per `mode`)
    /// into `logits`, reusing its allocation. Every chunk's tokens are appended to its
    /// sequence's cache.
    fn forward_into(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
        logits: &mut Vec<f32>,
    ) -> Result<()>;

    /// As `forward_into`, returning new logits.
    fn forward(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(cache, batch, mode, &mut logits)?;
        Ok(logits)
    }
}

/// Checks a batch (tokens in range, each sequence once) and reserves its cache blocks; fills
/// `segments` with each chunk's place in the packed activations.
pub(crate) fn plan_batch(
    spec: &ModelSpec,
    cache: &mut ModelCache,
    batch: &[SeqChunk<'_>],
    segments: &mut Vec<Segment>,
) -> Result<()> {
    let mut offset = 0;
    segments.clear();
    segments.reserve(batch.len());
    for chunk in batch {
        if chunk.tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&id) = chunk.tokens.iter().find(|&&id| id as usize >= spec.vocab) {
            return Err(EngineError::TokenOutOfRange {
                id,
                vocab: spec.vocab,
            });
        }
        // A scan, not a set: batches are small and a step should not allocate.
        if segments.iter().any(|s| s.seq == chunk.seq) {
            return Err(EngineError::InvalidArgument {
                field: "batch",
                message: format!("sequence {} appears twice in one step", chunk.seq),
            });
        }
        let start_pos = cache.seq_len(chunk.seq)?;
        segments.push(Segment {
            seq: chunk.seq,
            offset,
            len: chunk.tokens.len(),
            start_pos,
        });
        offset += chunk.tokens.len();
    }
    for seg in segments.iter() {
        cache.reserve(seg.seq, seg.start_pos + seg.len)?;
    }
    Ok(())
}
