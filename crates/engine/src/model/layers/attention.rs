//! Gated full attention: q_proj yields [q | gate] per head, zero-centred q/k RMSNorm, partial
//! NeoX RoPE on the first `rotary_dim` dims, GQA over the paged KV cache, causal softmax in f32,
//! output × sigmoid(gate).

use super::fuse_rows;
use crate::backend::{AttentionParams, Backend, Segment, scratch};
use crate::cache::ModelCache;
use crate::config::AttentionSpec;
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

pub struct Attention {
    layer: usize,
    spec: AttentionSpec,
    /// q_proj | k_proj | v_proj fused into one `[(2·heads + 2·kv_heads) · head_dim, hidden]`
    /// product; q_proj rows hold [q | gate] per head.
    qkv_proj: Weight,
    /// `[hidden, heads · head_dim]`.
    o_proj: Weight,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    eps: f32,
    /// `[rotary_dim / 2]`: θ^(-2i/rotary_dim).
    inv_freq: Vec<f32>,
}

impl Attention {
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        layer: usize,
        spec: &AttentionSpec,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        let (h, kv, d) = (spec.heads, spec.kv_heads, spec.head_dim);
        let rot = spec.rotary_dim;
        let inv_freq = (0..rot / 2)
            .map(|i| (1.0 / spec.rope_theta.powf((2 * i) as f64 / rot as f64)) as f32)
            .collect();
        Ok(Attention {
            layer,
            spec: spec.clone(),
            qkv_proj: fuse_rows(
                &format!("{prefix}.q_proj.weight"),
                vec![
                    store.matrix(&format!("{prefix}.q_proj.weight"), 2 * h * d, hidden)?,
                    store.matrix(&format!("{prefix}.k_proj.weight"), kv * d, hidden)?,
                    store.matrix(&format!("{prefix}.v_proj.weight"), kv * d, hidden)?,
                ],
            )?,
            o_proj: store.matrix(&format!("{prefix}.o_proj.weight"), hidden, h * d)?,
            q_norm: store.f32_tensor(&format!("{prefix}.q_norm.weight"), &[d])?,
            k_norm: store.f32_tensor(&format!("{prefix}.k_norm.weight"), &[d])?,
            eps,
            inv_freq,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.qkv_proj.bytes() + self.o_proj.bytes()
    }

    pub fn quantize_int8(&mut self) {
        self.qkv_proj = self.qkv_proj.quantize_int8();
        self.o_proj = self.o_proj.quantize_int8();
    }

    fn params(&self) -> AttentionParams<'_> {
        AttentionParams {
            layer: self.layer,
            spec: &self.spec,
            q_norm: &self.q_norm,
            k_norm: &self.k_norm,
            eps: self.eps,
            inv_freq: &self.inv_freq,
        }
    }

    /// x `[t, hidden]` (normed) → out `[t, hidden]`; appends this step's keys and values.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &[f32],
        segments: &[Segment],
        cache: &mut ModelCache,
        out: &mut [f32],
    ) -> Result<()> {
        let (nh, d) = (self.spec.heads, self.spec.head_dim);
        let p = self.params();
        let t = x.len() / self.qkv_proj.cols;
        // Per token: [q | gate] per head (nh·2d), then k (nkv·d), then v (nkv·d).
        let mut qkv = scratch::for_overwrite::<f32>(t * p.width()); // [t, width]
        b.matmul(x, &self.qkv_proj, &mut qkv);
        for seg in segments {
            b.rope_and_cache_kv(&p, seg, &mut qkv, cache)?;
        }
        let mut attn = scratch::for_overwrite::<f32>(t * nh * d); // [t, nh·d]
        for seg in segments {
            let view = cache.kv_view(self.layer, seg.seq, seg.start_pos + seg.len)?;
            let rows = &mut attn[seg.offset * nh * d..(seg.offset + seg.len) * nh * d];
            b.attention(&p, seg, &qkv, &view, rows);
        }
        b.matmul(&attn, &self.o_proj, out);
        Ok(())
    }
}
