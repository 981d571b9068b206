//! SwiGLU MLP (`down(silu(gate x) · up x)`), used for dense layers, shared experts and experts.

use super::fuse_rows;
use crate::backend::cpu::{self, scratch};
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

pub struct Mlp {
    /// `[2·inter, hidden]`: gate rows then up rows, so one product gives both.
    gate_up: Weight,
    /// `[hidden, inter]`.
    down: Weight,
    inter: usize,
}

impl Mlp {
    pub fn new(gate_up: Weight, down: Weight) -> Self {
        let inter = gate_up.rows / 2;
        Mlp {
            gate_up,
            down,
            inter,
        }
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

    /// x `[t, hidden]` → out `[t, hidden]` (overwritten), using the whole thread pool.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        self.forward_with(x, out, cpu::matmul)
    }

    /// As `forward`, on the calling thread only.
    pub fn forward_serial(&self, x: &[f32], out: &mut [f32]) {
        self.forward_with(x, out, cpu::matmul_serial)
    }

    fn forward_with(&self, x: &[f32], out: &mut [f32], matmul: fn(&[f32], &Weight, &mut [f32])) {
        let t = x.len() / self.gate_up.cols;
        let mut gate_up = scratch::for_overwrite::<f32>(t * 2 * self.inter); // [t, 2·inter]
        matmul(x, &self.gate_up, &mut gate_up);
        let mut act = scratch::for_overwrite::<f32>(t * self.inter); // [t, inter]
        cpu::swiglu(&gate_up, self.inter, &mut act);
        matmul(&act, &self.down, out);
    }
}
