//! RMSNorm. Qwen3.5 uses the zero-centred form `x̂·(1+w)` everywhere except the gated norm of
//! Gated DeltaNet, which is `x̂·w` (see `gated_delta.rs`).

use crate::backend::Backend;
use crate::error::Result;
use crate::weights::WeightStore;

pub struct RmsNorm {
    /// `[dim]`, zero-centred.
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(store: &WeightStore, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: store.f32_tensor(name, &[dim])?,
            eps,
        })
    }

    /// Normalises every `[dim]` row of `x` in place.
    pub fn forward<B: Backend>(&self, b: &B, x: &mut [f32]) {
        b.rms_norm(x, &self.weight, self.eps);
    }
}
