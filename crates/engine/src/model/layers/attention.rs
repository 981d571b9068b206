//! Gated full attention: q_proj yields [q | gate] per head, zero-centred q/k RMSNorm, partial
//! NeoX RoPE on the first `rotary_dim` dims, GQA over the paged KV cache, causal softmax in f32,
//! output × sigmoid(gate).

use super::{Segment, fuse_rows};
use crate::backend::cpu::{self, pool, scratch};
use crate::cache::{KvView, ModelCache};
use crate::config::AttentionSpec;
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

/// Keys scored per block of the online softmax.
const KEY_BLOCK: usize = 64;
/// Segments this long or longer attend through matrix products (prefill).
const BLOCKED_FROM: usize = 16;
/// Queries per block of the matrix-product attention (bounds the score matrix's size).
const QUERY_BLOCK: usize = 64;

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

    /// `[cos | sin]` of position `pos`'s rotation angles, `[2 · rotary_dim / 2]`: computed once
    /// per token for all its heads.
    fn rope_angles(&self, pos: usize, cos_sin: &mut [f32]) {
        let (cos, sin) = cos_sin.split_at_mut(self.inv_freq.len());
        for ((c, s), inv) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            (*s, *c) = (pos as f32 * inv).sin_cos();
        }
    }

    /// Rotates the first `rotary_dim` dims of one head vector by `cos_sin` (`rope_angles`).
    fn rope(&self, x: &mut [f32], cos_sin: &[f32]) {
        let half = self.spec.rotary_dim / 2;
        let (cos, sin) = cos_sin.split_at(half);
        for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    }

    /// x `[t, hidden]` (normed) → out `[t, hidden]`; appends this step's keys and values.
    pub fn forward(
        &self,
        x: &[f32],
        segments: &[Segment],
        cache: &mut ModelCache,
        out: &mut [f32],
    ) -> Result<()> {
        let (nh, nkv, d) = (self.spec.heads, self.spec.kv_heads, self.spec.head_dim);
        let t = x.len() / self.qkv_proj.cols;
        let width = self.qkv_proj.rows;
        // Per token: [q | gate] per head (nh·2d), then k (nkv·d), then v (nkv·d).
        let mut qkv = scratch::for_overwrite::<f32>(t * width); // [t, width]
        cpu::matmul(x, &self.qkv_proj, &mut qkv);
        let (k_at, v_at) = (nh * 2 * d, nh * 2 * d + nkv * d);

        let mut cos_sin = scratch::for_overwrite::<f32>(2 * self.inv_freq.len());
        for seg in segments {
            for i in 0..seg.len {
                let tok = seg.offset + i;
                let pos = seg.start_pos + i;
                self.rope_angles(pos, &mut cos_sin);
                let row = &mut qkv[tok * width..(tok + 1) * width];
                for head in row[..k_at].chunks_exact_mut(2 * d) {
                    let q = &mut head[..d];
                    cpu::rms_norm_1p(q, &self.q_norm, self.eps);
                    self.rope(q, &cos_sin);
                }
                for head in row[k_at..v_at].chunks_exact_mut(d) {
                    cpu::rms_norm_1p(head, &self.k_norm, self.eps);
                    self.rope(head, &cos_sin);
                }
                cache.write_kv(self.layer, seg.seq, pos, &row[k_at..v_at], &row[v_at..])?;
            }
        }

        let mut attn = scratch::for_overwrite::<f32>(t * nh * d); // [t, nh·d]
        for seg in segments {
            let view = cache.kv_view(self.layer, seg.seq, seg.start_pos + seg.len)?;
            let rows = &mut attn[seg.offset * nh * d..(seg.offset + seg.len) * nh * d];
            if seg.len >= BLOCKED_FROM {
                self.attend_blocked(seg, &qkv, width, &view, rows);
            } else {
                self.attend_per_token(seg, &qkv, width, &view, rows);
            }
        }
        cpu::matmul(&attn, &self.o_proj, out);
        Ok(())
    }
    /// Attention of a short segment (decode): scores, online softmax and values in one pass
    /// over the keys. A task takes several query heads of one key head — as many as still
    /// leave a task per thread — so each key and value it reads serves all of them.
    fn attend_per_token(
        &self,
        seg: &Segment,
        qkv: &[f32],
        width: usize,
        view: &KvView<'_>,
        rows: &mut [f32],
    ) {
        let group = self.spec.heads / self.spec.kv_heads;
        let threads = pool::threads();
        let per_task = (1..=group)
            .rev()
            .find(|&g| group.is_multiple_of(g) && seg.len * self.spec.heads / g >= threads)
            .unwrap_or(1);
        self.attend_per_token_grouped(seg, qkv, width, view, rows, per_task);
    }

    /// `attend_per_token` with `per_task` query heads (a divisor of the group size) per task.
    fn attend_per_token_grouped(
        &self,
        seg: &Segment,
        qkv: &[f32],
        width: usize,
        view: &KvView<'_>,
        rows: &mut [f32],
        per_task: usize,
    ) {
        let (nh, nkv, d) = (self.spec.heads, self.spec.kv_heads, self.spec.head_dim);
        let scale = (d as f32).powf(-0.5);
        let group = nh / nkv;
        pool::for_each_chunk_mut(rows, per_task * d, |task, o| {
            // Heads h0 .. h0 + per_task of token i, all of key head kh.
            let (i, h0) = (task * per_task / nh, task * per_task % nh);
            let tok = seg.offset + i;
            let visible = seg.start_pos + i + 1; // causal
            let kh = h0 / group;
            // [per_task, q | gate]
            let heads = &qkv[tok * width + h0 * 2 * d..tok * width + (h0 + per_task) * 2 * d];
            // Softmax online over blocks of keys (running max and sum per head, output
            // rescaled when the max grows): memory stays fixed however long the context.
            let mut max = scratch::for_overwrite::<f32>(per_task);
            max.fill(f32::NEG_INFINITY);
            let mut sum = scratch::zeroed::<f32>(per_task);
            let mut scores = scratch::for_overwrite::<f32>(per_task * KEY_BLOCK); // [per_task, KEY_BLOCK]
            o.fill(0.0);
            for from in (0..visible).step_by(KEY_BLOCK) {
                let n = KEY_BLOCK.min(visible - from);
                for j in 0..n {
                    let key = &view.key(from + j)[kh * d..(kh + 1) * d];
                    for (g, q) in heads.chunks_exact(2 * d).enumerate() {
                        scores[g * KEY_BLOCK + j] = cpu::dot(&q[..d], key) * scale;
                    }
                }
                for (g, (s, og)) in scores
                    .chunks_exact_mut(KEY_BLOCK)
                    .zip(o.chunks_exact_mut(d))
                    .enumerate()
                {
                    let s = &mut s[..n];
                    let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_max = max[g].max(block_max);
                    if new_max > max[g] {
                        let rescale = (max[g] - new_max).exp(); // 0 for the first block
                        sum[g] *= rescale;
                        og.iter_mut().for_each(|v| *v *= rescale);
                        max[g] = new_max;
                    }
                    for p in s.iter_mut() {
                        *p = (*p - max[g]).exp();
                        sum[g] += *p;
                    }
                }
                for j in 0..n {
                    let val = &view.value(from + j)[kh * d..(kh + 1) * d];
                    for (g, og) in o.chunks_exact_mut(d).enumerate() {
                        cpu::add_scaled(og, scores[g * KEY_BLOCK + j], val);
                    }
                }
            }
            for ((og, q), total) in o
                .chunks_exact_mut(d)
                .zip(heads.chunks_exact(2 * d))
                .zip(sum.iter())
            {
                let inv = 1.0 / total;
                for (acc, g) in og.iter_mut().zip(&q[d..]) {
                    *acc *= inv * cpu::sigmoid(*g);
                }
            }
        });
    }

    /// Attention of a long segment (prefill) as matrix products, per key head and block of
    /// queries: S = Q·Kᵀ for the group's query heads at once, causal softmax per row, O = S·V.
    /// Keys past a block's last query are left out of its products.
    fn attend_blocked(
        &self,
        seg: &Segment,
        qkv: &[f32],
        width: usize,
        view: &KvView<'_>,
        rows: &mut [f32],
    ) {
        let (nh, nkv, d) = (self.spec.heads, self.spec.kv_heads, self.spec.head_dim);
        let scale = (d as f32).powf(-0.5);
        let group = nh / nkv;
        let keys = seg.start_pos + seg.len;
        for kh in 0..nkv {
            let mut k = scratch::for_overwrite::<f32>(keys * d); // [keys, d]
            for (p, row) in k.chunks_exact_mut(d).enumerate() {
                row.copy_from_slice(&view.key(p)[kh * d..(kh + 1) * d]);
            }
            for first in (0..seg.len).step_by(QUERY_BLOCK) {
                let n = QUERY_BLOCK.min(seg.len - first);
                let visible = seg.start_pos + first + n; // keys any query of the block sees
                // Q of the group's heads, [group · n, d], head-major.
                let mut q = scratch::for_overwrite::<f32>(group * n * d);
                for (row, qr) in q.chunks_exact_mut(d).enumerate() {
                    let (g, i) = (row / n, row % n);
                    let at = (seg.offset + first + i) * width + (kh * group + g) * 2 * d;
                    qr.copy_from_slice(&qkv[at..at + d]);
                }
                let mut s = scratch::for_overwrite::<f32>(group * n * visible); // [group·n, visible]
                cpu::matmul_f32(&q, &k[..visible * d], d, &mut s);
                pool::for_each_chunk_mut(&mut s, visible, |row, sr| {
                    let seen = seg.start_pos + first + row % n + 1; // causal
                    let (live, masked) = sr.split_at_mut(seen);
                    live.iter_mut().for_each(|v| *v *= scale);
                    cpu::softmax(live);
                    masked.fill(0.0);
                });
                let mut vt = scratch::for_overwrite::<f32>(d * visible); // Vᵀ [d, visible]
                for p in 0..visible {
                    for (c, v) in view.value(p)[kh * d..(kh + 1) * d].iter().enumerate() {
                        vt[c * visible + p] = *v;
                    }
                }
                let mut o = scratch::for_overwrite::<f32>(group * n * d); // [group·n, d]
                cpu::matmul_f32(&s, &vt, visible, &mut o);
                for (row, or) in o.chunks_exact(d).enumerate() {
                    let (g, i) = (row / n, row % n);
                    let h = kh * group + g;
                    let tok = seg.offset + first + i;
                    let gate = &qkv[tok * width + h * 2 * d + d..tok * width + (h + 1) * 2 * d];
                    let dst =
                        &mut rows[(first + i) * nh * d + h * d..(first + i) * nh * d + (h + 1) * d];
                    for ((y, v), gv) in dst.iter_mut().zip(or).zip(gate) {
                        *y = v * cpu::sigmoid(*gv);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::lcg;
    use crate::cache::CacheConfig;
    use crate::config::parse_spec;
    use crate::tensor::WeightData;

    /// Single-token attention gives the same bits however many query heads share a task, and
    /// follows softmax attention computed in f64, over several blocks of keys.
    #[test]
    fn per_token_attention_matches_f64_for_every_grouping() {
        // 8 query heads on 2 key heads, head_dim 24 (not a multiple of 16).
        let spec = parse_spec(&serde_json::json!({
            "model_type": "qwen3_5_text", "hidden_size": 16, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24,
            "vocab_size": 32, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 4,
            "linear_value_head_dim": 4, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
            "intermediate_size": 8
        }))
        .unwrap();
        let layer = 3; // full attention in the default 3 : 1 pattern
        let a = &spec.attention;
        let (nh, nkv, d) = (a.heads, a.kv_heads, a.head_dim);
        let config = CacheConfig {
            block_size: 16,
            num_blocks: 12,
            max_sequences: 1,
        };
        let mut cache = ModelCache::new(&spec, config).unwrap();
        let seq = cache.add_sequence().unwrap();
        let len = 150; // three blocks of the online softmax
        cache.reserve(seq, len).unwrap();
        let mut seed = 21;
        let mut keys = vec![0.0f32; len * nkv * d];
        let mut values = vec![0.0f32; len * nkv * d];
        keys.iter_mut().for_each(|v| *v = 2.0 * lcg(&mut seed));
        values.iter_mut().for_each(|v| *v = lcg(&mut seed));
        for p in 0..len {
            let at = p * nkv * d..(p + 1) * nkv * d;
            cache
                .write_kv(layer, seq, p, &keys[at.clone()], &values[at])
                .unwrap();
        }
        // Two tokens at the end of the sequence: they see 149 and 150 keys.
        let seg = Segment {
            seq,
            offset: 0,
            len: 2,
            start_pos: len - 2,
        };
        let width = nh * 2 * d + 2 * nkv * d;
        let qkv: Vec<f32> = (0..seg.len * width).map(|_| lcg(&mut seed)).collect();
        let empty = || Weight {
            rows: 0,
            cols: 0,
            data: WeightData::F32(Vec::new()),
        };
        let attention = Attention {
            layer,
            spec: a.clone(),
            qkv_proj: empty(),
            o_proj: empty(),
            q_norm: Vec::new(),
            k_norm: Vec::new(),
            eps: 1e-6,
            inv_freq: Vec::new(),
        };
        let view = cache.kv_view(layer, seq, len).unwrap();
        let outputs: Vec<Vec<f32>> = [1, 2, 4]
            .iter()
            .map(|&per_task| {
                let mut rows = vec![f32::NAN; seg.len * nh * d];
                attention.attend_per_token_grouped(&seg, &qkv, width, &view, &mut rows, per_task);
                rows
            })
            .collect();
        for other in &outputs[1..] {
            assert!(
                outputs[0]
                    .iter()
                    .zip(other)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
        let scale = 1.0 / (d as f64).sqrt();
        for i in 0..seg.len {
            let visible = seg.start_pos + i + 1;
            for h in 0..nh {
                let kh = h / (nh / nkv);
                let q = &qkv[i * width + h * 2 * d..i * width + h * 2 * d + d];
                let gate = &qkv[i * width + h * 2 * d + d..i * width + (h + 1) * 2 * d];
                let at = |p: usize| p * nkv * d + kh * d;
                let scores: Vec<f64> = (0..visible)
                    .map(|p| {
                        let k = &keys[at(p)..at(p) + d];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..d {
                    let o: f64 = (0..visible)
                        .map(|p| weights[p] * values[at(p) + c] as f64)
                        .sum::<f64>()
                        / total;
                    let want = o / (1.0 + (-(gate[c] as f64)).exp());
                    let got = outputs[0][(i * nh + h) * d + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "token {i} head {h} dim {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
