//! Gated full attention's kernels: q/k RMSNorm and partial NeoX RoPE with the KV write, then
//! causal GQA attention over the paged cache with the softmax in f32 and the output gate:
//! one pass with an online softmax for short segments (decode), matrix products per key head
//! and block of queries for long ones (prefill).

use super::pool::KernelPool;
use super::products::matmul_f32;
use super::scratch;
use super::vector::{add_scaled, dot, rms_norm_1p, sigmoid, softmax};
use crate::backend::{AttentionParams, KvView, Segment};
use crate::cache::ModelCache;
use crate::config::AttentionSpec;
use crate::error::Result;

/// Keys scored per block of the online softmax.
const KEY_BLOCK: usize = 64;
/// Segments this long or longer attend through matrix products (prefill).
const BLOCKED_FROM: usize = 16;
/// Queries per block of the matrix-product attention (bounds the score matrix's size).
const QUERY_BLOCK: usize = 64;

/// `[cos | sin]` of position `pos`'s rotation angles, `[2 · rotary_dim / 2]`: computed once
/// per token for all its heads.
fn rope_angles(inv_freq: &[f32], pos: usize, cos_sin: &mut [f32]) {
    let (cos, sin) = cos_sin.split_at_mut(inv_freq.len());
    for ((c, s), inv) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        (*s, *c) = (pos as f32 * inv).sin_cos();
    }
}

/// Rotates the first `rotary_dim` dims of one head vector by `cos_sin` (`rope_angles`).
fn rope(rotary_dim: usize, x: &mut [f32], cos_sin: &[f32]) {
    let half = rotary_dim / 2;
    let (cos, sin) = cos_sin.split_at(half);
    for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// See [`crate::backend::Backend::rope_and_cache_kv`].
pub(super) fn rope_and_cache_kv(
    p: &AttentionParams<'_>,
    seg: &Segment,
    qkv: &mut [f32],
    cache: &mut ModelCache,
) -> Result<()> {
    let (nh, nkv, d) = (p.spec.heads, p.spec.kv_heads, p.spec.head_dim);
    let width = p.width();
    let (k_at, v_at) = (nh * 2 * d, nh * 2 * d + nkv * d);
    let mut cos_sin = scratch::for_overwrite::<f32>(2 * p.inv_freq.len());
    for i in 0..seg.len {
        let tok = seg.offset + i;
        let pos = seg.start_pos + i;
        rope_angles(p.inv_freq, pos, &mut cos_sin);
        let row = &mut qkv[tok * width..(tok + 1) * width];
        for head in row[..k_at].chunks_exact_mut(2 * d) {
            let q = &mut head[..d];
            rms_norm_1p(q, p.q_norm, p.eps);
            rope(p.spec.rotary_dim, q, &cos_sin);
        }
        for head in row[k_at..v_at].chunks_exact_mut(d) {
            rms_norm_1p(head, p.k_norm, p.eps);
            rope(p.spec.rotary_dim, head, &cos_sin);
        }
        cache.write_kv(p.layer, seg.seq, pos, &row[k_at..v_at], &row[v_at..])?;
    }
    Ok(())
}

/// See [`crate::backend::Backend::attention`].
pub(super) fn attention(
    pool: &KernelPool,
    p: &AttentionParams<'_>,
    seg: &Segment,
    qkv: &[f32],
    view: &KvView<'_>,
    rows: &mut [f32],
) {
    let width = p.width();
    if seg.len >= BLOCKED_FROM {
        attend_blocked(pool, p.spec, seg, qkv, width, view, rows);
    } else {
        attend_per_token(pool, p, seg, qkv, width, view, rows);
    }
}

/// Attention of a short segment (decode): scores, online softmax and values in one pass
/// over the keys. A task takes several query heads of one key head — as many as still
/// leave a task per thread — so each key and value it reads serves all of them.
fn attend_per_token(
    pool: &KernelPool,
    p: &AttentionParams<'_>,
    seg: &Segment,
    qkv: &[f32],
    width: usize,
    view: &KvView<'_>,
    rows: &mut [f32],
) {
    let group = p.spec.heads / p.spec.kv_heads;
    let threads = pool.threads();
    let per_task = (1..=group)
        .rev()
        .find(|&g| group.is_multiple_of(g) && seg.len * p.spec.heads / g >= threads)
        .unwrap_or(1);
    attend_per_token_grouped(pool, p.spec, seg, qkv, width, view, rows, per_task);
}

/// `attend_per_token` with `per_task` query heads (a divisor of the group size) per task.
#[allow(clippy::too_many_arguments)]
fn attend_per_token_grouped(
    pool: &KernelPool,
    spec: &AttentionSpec,
    seg: &Segment,
    qkv: &[f32],
    width: usize,
    view: &KvView<'_>,
    rows: &mut [f32],
    per_task: usize,
) {
    let (nh, nkv, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    let scale = (d as f32).powf(-0.5);
    let group = nh / nkv;
    pool.for_each_chunk_mut(rows, per_task * d, |task, o| {
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
                    scores[g * KEY_BLOCK + j] = dot(&q[..d], key) * scale;
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
                    add_scaled(og, scores[g * KEY_BLOCK + j], val);
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
                *acc *= inv * sigmoid(*g);
            }
        }
    });
}

/// Attention of a long segment (prefill) as matrix products, per key head and block of
/// queries: S = Q·Kᵀ for the group's query heads at once, causal softmax per row, O = S·V.
/// Keys past a block's last query are left out of its products.
fn attend_blocked(
    pool: &KernelPool,
    spec: &AttentionSpec,
    seg: &Segment,
    qkv: &[f32],
    width: usize,
    view: &KvView<'_>,
    rows: &mut [f32],
) {
    let (nh, nkv, d) = (spec.heads, spec.kv_heads, spec.head_dim);
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
            matmul_f32(pool, &q, &k[..visible * d], d, &mut s);
            pool.for_each_chunk_mut(&mut s, visible, |row, sr| {
                let seen = seg.start_pos + first + row % n + 1; // causal
                let (live, masked) = sr.split_at_mut(seen);
                live.iter_mut().for_each(|v| *v *= scale);
                softmax(live);
                masked.fill(0.0);
            });
            let mut vt = scratch::for_overwrite::<f32>(d * visible); // Vᵀ [d, visible]
            for p in 0..visible {
                for (c, v) in view.value(p)[kh * d..(kh + 1) * d].iter().enumerate() {
                    vt[c * visible + p] = *v;
                }
            }
            let mut o = scratch::for_overwrite::<f32>(group * n * d); // [group·n, d]
            matmul_f32(pool, &s, &vt, visible, &mut o);
            for (row, or) in o.chunks_exact(d).enumerate() {
                let (g, i) = (row / n, row % n);
                let h = kh * group + g;
                let tok = seg.offset + first + i;
                let gate = &qkv[tok * width + h * 2 * d + d..tok * width + (h + 1) * 2 * d];
                let dst =
                    &mut rows[(first + i) * nh * d + h * d..(first + i) * nh * d + (h + 1) * d];
                for ((y, v), gv) in dst.iter_mut().zip(or).zip(gate) {
                    *y = v * sigmoid(*gv);
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
        let pool = KernelPool::new(2);
        let view = cache.kv_view(layer, seq, len).unwrap();
        let outputs: Vec<Vec<f32>> = [1, 2, 4]
            .iter()
            .map(|&per_task| {
                let mut rows = vec![f32::NAN; seg.len * nh * d];
                attend_per_token_grouped(&pool, a, &seg, &qkv, width, &view, &mut rows, per_task);
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
