//! The layers of a Qwen3.5 decoder block, each loading its own weights and running on a packed
//! batch of sequence segments.

pub mod attention;
pub mod gated_delta;
pub mod mlp;
pub mod moe;
pub mod norm;

use crate::error::{EngineError, Result};
use crate::tensor::Weight;

/// Stacks projections that read the same input into one matrix, so a step runs one product
/// (one pass over the activations, one dispatch) instead of several.
pub(crate) fn fuse_rows(name: &str, parts: Vec<Weight>) -> Result<Weight> {
    Weight::concat_rows(&parts).ok_or_else(|| EngineError::TensorDType {
        name: name.to_string(),
        actual: "projections of mixed dtypes".into(),
        expected: "one dtype for the projections of a layer",
    })
}
