//! SwiGLU MLP (`down(silu(gate x) · up x)`), used for dense layers, shared experts and experts.

use super::fuse_rows;
use crate::backend::{Backend, MlpWeights};
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

pub struct Mlp {
    /// `[2·inter, hidden]`: gate rows then up rows, so one product gives both.
    gate_up: Weight,
    /// `[hidden, inter]`.
    down: Weight,
}

impl Mlp {
    pub fn new(gate_up: Weight, down: Weight) -> Self {
        Mlp { gate_up, down }
    }

    /// Loads `{prefix}.gate_proj`, `{prefix}.up_proj`, `{prefix}.down_proj`.
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, inter: usize) -> Result<Self> {
        let gate = store.matrix(&format!("{prefix}.gate_proj.weight"), inter, hidden)?;
        let up = store.matrix(&format!("{prefix}.up_proj.weight"), inter, hidden)?;
        let down = store.matrix(&format!("{prefix}.down_proj.weight"), hidden, inter)?;
        let gate_up = fuse_rows(&format!("{prefix}.up_proj.weight"), vec![gate, up])?;
        Ok(Mlp::new(gate_up, down))
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    pub fn quantize_int8(&mut self) {
        self.gate_up = self.gate_up.quantize_int8();
        self.down = self.down.quantize_int8();
    }

    pub fn weights(&self) -> MlpWeights<'_> {
        MlpWeights {
            gate_up: &self.gate_up,
            down: &self.down,
        }
    }

    /// x `[t, hidden]` → out `[t, hidden]` (overwritten).
    pub fn forward<B: Backend>(&self, b: &B, x: &[f32], out: &mut [f32]) {
        b.mlp(self.weights(), x, out)
    }
}
