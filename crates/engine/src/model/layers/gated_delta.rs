//! Gated DeltaNet (linear attention): causal depthwise conv1d with carried state + SiLU,
//! L2-normalised q/k, q scaled by dk^-0.5, beta = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias),
//! the delta rule over an f32 state S `[dk, dv]` per value head, gated RMSNorm × SiLU(z).
//!
//! Multi-token steps use the chunked form of the delta rule, single-token steps the recurrent
//! form (the backend's two kernels; they agree up to f32 rounding).

use super::fuse_rows;
use crate::backend::{Backend, DeltaGates, DeltaHeads, Segment, scratch};
use crate::cache::ModelCache;
use crate::config::LinearSpec;
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

pub struct GatedDeltaNet {
    layer: usize,
    spec: LinearSpec,
    /// in_proj_qkv `[conv_dim, hidden]` (channels [q | k | v], head-major) | in_proj_z
    /// `[nv·dv, hidden]` | in_proj_b `[nv, hidden]` | in_proj_a `[nv, hidden]`, fused into one
    /// product.
    in_proj: Weight,
    /// Conv weights by tap, `[kernel, conv_dim]` (stored `[conv_dim, 1, kernel]`): a step's
    /// rows are then convolved a whole row at a time.
    conv_taps: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `-exp(A_log)`, `[nv]`.
    neg_a: Vec<f32>,
    /// Plain (not zero-centred) weight of the gated norm, `[dv]`.
    norm: Vec<f32>,
    eps: f32,
    /// `[hidden, nv·dv]`.
    out_proj: Weight,
}

impl GatedDeltaNet {
    /// Loads a Qwen3.5 layer (`in_proj_qkv/z/b/a`) or a Qwen3-Next one (`in_proj_qkvz/ba`,
    /// grouped per key head), regrouping the latter into the flat [q | k | v] order.
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        layer: usize,
        spec: &LinearSpec,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        let (nk, nv, dk, dv, kern) = (
            spec.key_heads,
            spec.value_heads,
            spec.key_dim,
            spec.value_dim,
            spec.conv_kernel,
        );
        let conv_dim = spec.conv_dim();
        let name = |s: &str| format!("{prefix}.{s}");
        let (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) = if store
            .contains(&name("in_proj_qkvz.weight"))
        {
            let qkvz = store.matrix(&name("in_proj_qkvz.weight"), conv_dim + nv * dv, hidden)?;
            let ba = store.matrix(&name("in_proj_ba.weight"), 2 * nv, hidden)?;
            let r = nv / nk;
            let group = 2 * dk + 2 * r * dv;
            let rows = |from: usize, n: usize| -> Vec<usize> {
                (0..nk)
                    .flat_map(|g| g * group + from..g * group + from + n)
                    .collect()
            };
            let mut qkv_order = rows(0, dk);
            qkv_order.extend(rows(dk, dk));
            qkv_order.extend(rows(2 * dk, r * dv));
            let z_order = rows(2 * dk + r * dv, r * dv);
            let b_order: Vec<usize> = (0..nk).flat_map(|g| g * 2 * r..g * 2 * r + r).collect();
            let a_order: Vec<usize> = (0..nk)
                .flat_map(|g| g * 2 * r + r..g * 2 * r + 2 * r)
                .collect();
            (
                qkvz.gather_rows(&qkv_order),
                qkvz.gather_rows(&z_order),
                ba.gather_rows(&b_order),
                ba.gather_rows(&a_order),
            )
        } else {
            (
                store.matrix(&name("in_proj_qkv.weight"), conv_dim, hidden)?,
                store.matrix(&name("in_proj_z.weight"), nv * dv, hidden)?,
                store.matrix(&name("in_proj_b.weight"), nv, hidden)?,
                store.matrix(&name("in_proj_a.weight"), nv, hidden)?,
            )
        };
        let a_log = store.f32_tensor(&name("A_log"), &[nv])?;
        Ok(GatedDeltaNet {
            layer,
            spec: spec.clone(),
            in_proj: fuse_rows(
                &name("in_proj"),
                vec![in_proj_qkv, in_proj_z, in_proj_b, in_proj_a],
            )?,
            conv_taps: {
                let conv = store.f32_tensor(&name("conv1d.weight"), &[conv_dim, 1, kern])?;
                let mut taps = vec![0.0; kern * conv_dim];
                for (c, w) in conv.chunks_exact(kern).enumerate() {
                    for (tap, v) in w.iter().enumerate() {
                        taps[tap * conv_dim + c] = *v;
                    }
                }
                taps
            },
            dt_bias: store.f32_tensor(&name("dt_bias"), &[nv])?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            norm: store.f32_tensor(&name("norm.weight"), &[dv])?,
            eps,
            out_proj: store.matrix(&name("out_proj.weight"), hidden, nv * dv)?,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.in_proj.bytes() + self.out_proj.bytes()
    }

    pub fn quantize_int8(&mut self) {
        self.in_proj = self.in_proj.quantize_int8();
        self.out_proj = self.out_proj.quantize_int8();
    }

    /// x `[t, hidden]` (normed) → out `[t, hidden]`; updates each sequence's conv and
    /// recurrent state.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &[f32],
        segments: &[Segment],
        cache: &mut ModelCache,
        out: &mut [f32],
    ) -> Result<()> {
        let s = &self.spec;
        let (nv, dv) = (s.value_heads, s.value_dim);
        let conv_dim = s.conv_dim();
        let t = x.len() / self.in_proj.cols;
        let width = self.in_proj.rows;
        // Per token: conv channels [q | k | v] (conv_dim), then z (nv·dv), b (nv), a (nv).
        let mut projected = scratch::for_overwrite::<f32>(t * width); // [t, width]
        b.matmul(x, &self.in_proj, &mut projected);
        let (z_at, b_at) = (conv_dim, conv_dim + nv * dv);
        let gates = DeltaGates {
            neg_a: &self.neg_a,
            dt_bias: &self.dt_bias,
        };

        let mut core = scratch::for_overwrite::<f32>(t * nv * dv); // [t, nv, dv]
        for seg in segments {
            let (conv_state, recurrent) = cache.linear_state(self.layer, seg.seq)?;
            let rows = &projected[seg.offset * width..(seg.offset + seg.len) * width];
            let mut qkv = scratch::for_overwrite::<f32>(seg.len * conv_dim); // [len, conv_dim]
            b.causal_conv(rows, width, &self.conv_taps, conv_state, &mut qkv);
            let mut beta = scratch::for_overwrite::<f32>(seg.len * nv); // [len, nv]
            let mut g = scratch::for_overwrite::<f32>(seg.len * nv);
            b.delta_inputs(s, &mut qkv, rows, width, b_at, gates, &mut beta, &mut g);
            let heads = DeltaHeads {
                spec: s,
                qkv: &qkv,
                beta: &beta,
                g: &g,
                len: seg.len,
                z: &rows[z_at..],
                z_stride: width,
                norm: &self.norm,
                eps: self.eps,
            };
            let seg_core = &mut core[seg.offset * nv * dv..(seg.offset + seg.len) * nv * dv];
            if seg.len == 1 {
                b.delta_rule_recurrent(&heads, recurrent, seg_core);
            } else {
                b.delta_rule_chunked(&heads, recurrent, seg_core);
            }
        }
        b.matmul(&core, &self.out_proj, out);
        Ok(())
    }
}
