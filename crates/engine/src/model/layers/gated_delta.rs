//! Gated DeltaNet (linear attention): causal depthwise conv1d with carried state + SiLU,
//! L2-normalised q/k, q scaled by dk^-0.5, beta = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias),
//! the delta rule over an f32 state S `[dk, dv]` per value head, gated RMSNorm × SiLU(z).
//!
//! Multi-token steps use the chunked form (chunks of 64, a unit-lower-triangular solve inside
//! each chunk, one state update per chunk); single-token steps use the recurrent form. The two
//! agree up to f32 rounding (tested below).

use super::{Segment, fuse_rows};
use crate::backend::cpu::scratch::{self, Scratch};
use crate::backend::cpu::{self, pool};
use crate::cache::ModelCache;
use crate::config::LinearSpec;
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

const CHUNK: usize = 64;

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
    pub fn forward(
        &self,
        x: &[f32],
        segments: &[Segment],
        cache: &mut ModelCache,
        out: &mut [f32],
    ) -> Result<()> {
        let s = &self.spec;
        let (nk, nv, dk, dv) = (s.key_heads, s.value_heads, s.key_dim, s.value_dim);
        let conv_dim = s.conv_dim();
        let t = x.len() / self.in_proj.cols;
        let width = self.in_proj.rows;
        // Per token: conv channels [q | k | v] (conv_dim), then z (nv·dv), b (nv), a (nv).
        let mut projected = scratch::for_overwrite::<f32>(t * width); // [t, width]
        cpu::matmul(x, &self.in_proj, &mut projected);
        let (z_at, b_at, a_at) = (conv_dim, conv_dim + nv * dv, conv_dim + nv * dv + nv);

        let mut core = scratch::for_overwrite::<f32>(t * nv * dv); // [t, nv, dv]
        for seg in segments {
            let (conv_state, recurrent) = cache.linear_state(self.layer, seg.seq)?;
            let rows = &projected[seg.offset * width..(seg.offset + seg.len) * width];
            let mut qkv = scratch::for_overwrite::<f32>(seg.len * conv_dim); // [len, conv_dim]
            self.causal_conv(rows, width, conv_state, &mut qkv);
            let scale = (dk as f32).powf(-0.5);
            for row in qkv.chunks_exact_mut(conv_dim) {
                let (q, rest) = row.split_at_mut(nk * dk);
                cpu::l2_norm(q, dk, 1e-6);
                q.iter_mut().for_each(|v| *v *= scale);
                cpu::l2_norm(&mut rest[..nk * dk], dk, 1e-6);
            }
            let mut beta = scratch::for_overwrite::<f32>(seg.len * nv); // [len, nv]
            let mut g = scratch::for_overwrite::<f32>(seg.len * nv);
            for (i, row) in rows.chunks_exact(width).enumerate() {
                for h in 0..nv {
                    beta[i * nv + h] = cpu::sigmoid(row[b_at + h]);
                    g[i * nv + h] = self.neg_a[h] * cpu::softplus(row[a_at + h] + self.dt_bias[h]);
                }
            }
            let inputs = HeadInputs {
                qkv: &qkv,
                beta: &beta,
                g: &g,
                len: seg.len,
                nk,
                nv,
                dk,
                dv,
            };
            let mut per_head = scratch::for_overwrite::<f32>(nv * seg.len * dv); // [nv, len, dv]
            pool::for_each_chunk_pair_mut(
                recurrent,
                dk * dv,
                &mut per_head,
                seg.len * dv,
                |h, state, o| {
                    if seg.len == 1 {
                        recurrent_step(&inputs.token_head(h), state, o)
                    } else {
                        chunked(&inputs.gather(h).head(), state, o)
                    }
                    // The gated norm of this head's rows, while they are in cache.
                    for (row, proj) in o.chunks_exact_mut(dv).zip(rows.chunks_exact(width)) {
                        let z = &proj[z_at + h * dv..z_at + (h + 1) * dv];
                        cpu::rms_norm_gated(row, z, &self.norm, self.eps);
                    }
                },
            );
            let seg_core = &mut core[seg.offset * nv * dv..(seg.offset + seg.len) * nv * dv];
            for (h, o) in per_head.chunks_exact(seg.len * dv).enumerate() {
                for (i, v) in o.chunks_exact(dv).enumerate() {
                    seg_core[(i * nv + h) * dv..(i * nv + h + 1) * dv].copy_from_slice(v);
                }
            }
        }
        cpu::matmul(&core, &self.out_proj, out);
        Ok(())
    }

    /// Depthwise causal conv + SiLU over `len` rows of `stride` floats (channels first) into
    /// `out` `[len, conv_dim]`, continuing from and updating `state` `[conv_dim, kernel-1]`
    /// (oldest input first). Each channel sums its taps in order, whole rows at a time.
    fn causal_conv(&self, rows: &[f32], stride: usize, state: &mut [f32], out: &mut [f32]) {
        let conv_dim = self.spec.conv_dim();
        let kern = self.spec.conv_kernel;
        let hist = kern - 1;
        let len = rows.len() / stride;
        // The inputs before this step, `[hist, conv_dim]`, oldest first.
        let mut past = scratch::for_overwrite::<f32>(hist * conv_dim);
        if hist > 0 {
            for (c, s) in state.chunks_exact(hist).enumerate() {
                for (j, v) in s.iter().enumerate() {
                    past[j * conv_dim + c] = *v;
                }
            }
        }
        // Input row at relative time j (negative: from before this step).
        let input = |j: isize| -> &[f32] {
            if j >= 0 {
                &rows[j as usize * stride..j as usize * stride + conv_dim]
            } else {
                let p = (hist as isize + j) as usize;
                &past[p * conv_dim..(p + 1) * conv_dim]
            }
        };
        for (i, o) in out.chunks_exact_mut(conv_dim).take(len).enumerate() {
            o.fill(0.0);
            for (tap, w) in self.conv_taps.chunks_exact(conv_dim).enumerate() {
                let x = input(i as isize - hist as isize + tap as isize);
                for ((acc, wv), xv) in o.iter_mut().zip(w).zip(x) {
                    *acc += wv * xv;
                }
            }
            o.iter_mut().for_each(|v| *v = cpu::silu(*v));
        }
        // The last `hist` inputs become the state.
        for j in 0..hist {
            let x = input(len as isize - hist as isize + j as isize);
            for (c, v) in x.iter().enumerate() {
                state[c * hist + j] = *v;
            }
        }
    }
}

/// Per-segment delta-rule inputs for all heads: q, k, v in the conv output rows `[len,
/// conv_dim]` (q and k normalised, q scaled), beta and g `[len, nv]`.
struct HeadInputs<'a> {
    qkv: &'a [f32],
    beta: &'a [f32],
    g: &'a [f32],
    len: usize,
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
}

/// One value head's inputs: q, k `[len, dk]`, v `[len, dv]`, beta, g `[len]`.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    g: &'a [f32],
    dk: usize,
    dv: usize,
}

/// A head's inputs copied out contiguous (multi-token steps).
struct GatheredHead {
    q: Scratch<f32>,
    k: Scratch<f32>,
    v: Scratch<f32>,
    beta: Scratch<f32>,
    g: Scratch<f32>,
    dk: usize,
    dv: usize,
}

impl GatheredHead {
    fn head(&self) -> Head<'_> {
        Head {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            beta: &self.beta,
            g: &self.g,
            dk: self.dk,
            dv: self.dv,
        }
    }
}

impl HeadInputs<'_> {
    fn conv_dim(&self) -> usize {
        2 * self.nk * self.dk + self.nv * self.dv
    }

    /// Offsets of head `h`'s q (and k, `nk·dk` further) and v in a conv row.
    fn offsets(&self, h: usize) -> (usize, usize) {
        let kh = h / (self.nv / self.nk);
        (kh * self.dk, 2 * self.nk * self.dk + h * self.dv)
    }

    /// Head `h` of a one-token step, borrowed in place.
    fn token_head(&self, h: usize) -> Head<'_> {
        let (qo, vo) = self.offsets(h);
        let (nkd, dk, dv) = (self.nk * self.dk, self.dk, self.dv);
        Head {
            q: &self.qkv[qo..qo + dk],
            k: &self.qkv[nkd + qo..nkd + qo + dk],
            v: &self.qkv[vo..vo + dv],
            beta: &self.beta[h..h + 1],
            g: &self.g[h..h + 1],
            dk,
            dv,
        }
    }

    fn gather(&self, h: usize) -> GatheredHead {
        let (qo, vo) = self.offsets(h);
        let (nkd, dk, dv, cd) = (self.nk * self.dk, self.dk, self.dv, self.conv_dim());
        let mut head = GatheredHead {
            q: scratch::with_capacity(self.len * dk),
            k: scratch::with_capacity(self.len * dk),
            v: scratch::with_capacity(self.len * dv),
            beta: scratch::with_capacity(self.len),
            g: scratch::with_capacity(self.len),
            dk,
            dv,
        };
        for (i, row) in self.qkv.chunks_exact(cd).enumerate() {
            head.q.extend_from_slice(&row[qo..qo + dk]);
            head.k.extend_from_slice(&row[nkd + qo..nkd + qo + dk]);
            head.v.extend_from_slice(&row[vo..vo + dv]);
            head.beta.push(self.beta[i * self.nv + h]);
            head.g.push(self.g[i * self.nv + h]);
        }
        head
    }
}

/// The recurrence, token by token (`cpu::delta_rule_token`): S ← S·e^g; S += k ⊗ (v − Sᵀk)·β;
/// o = Sᵀq, into `out` `[len, dv]`.
fn recurrent_step(head: &Head<'_>, state: &mut [f32], out: &mut [f32]) {
    let (dk, dv) = (head.dk, head.dv);
    for (i, o) in out.chunks_exact_mut(dv).take(head.beta.len()).enumerate() {
        cpu::delta_rule_token(
            &head.q[i * dk..(i + 1) * dk],
            &head.k[i * dk..(i + 1) * dk],
            &head.v[i * dv..(i + 1) * dv],
            head.beta[i],
            head.g[i].exp(),
            state,
            o,
        );
    }
}

/// The chunked form. Within a chunk with cumulative log-decay γ:
///   M = I + strict_lower((β_i k_i·k_j) e^{γ_i−γ_j});  U = M⁻¹(β v);  W = M⁻¹(β k e^γ)
///   v'_i = U_i − W_i S;  o_i = (q_i e^{γ_i}) S + Σ_{j≤i} (q_i·k_j) e^{γ_i−γ_j} v'_j
///   S ← S e^{γ_last} + Σ_i (k_i e^{γ_last−γ_i}) ⊗ v'_i
/// Everything but the triangular solve is a matrix product (`cpu::matmul_f32`); `out`
/// `[len, dv]` is overwritten.
fn chunked(head: &Head<'_>, state: &mut [f32], out: &mut [f32]) {
    let (dk, dv) = (head.dk, head.dv);
    let len = head.beta.len();
    let mut start = 0;
    while start < len {
        let n = CHUNK.min(len - start);
        let k = &head.k[start * dk..(start + n) * dk]; // [n, dk]
        let q = &head.q[start * dk..(start + n) * dk];
        let v = &head.v[start * dv..(start + n) * dv]; // [n, dv]
        let beta = &head.beta[start..start + n];
        let mut gamma = scratch::for_overwrite::<f32>(n);
        let mut acc = 0.0;
        for (gm, g) in gamma.iter_mut().zip(&head.g[start..start + n]) {
            acc += g;
            *gm = acc;
        }
        // k_i·k_j and q_i·k_j, [n, n].
        let mut kk = scratch::for_overwrite::<f32>(n * n);
        cpu::matmul_f32(k, k, dk, &mut kk);
        let mut qk = scratch::for_overwrite::<f32>(n * n);
        cpu::matmul_f32(q, k, dk, &mut qk);
        // Strictly lower part of M and the intra-chunk weights A (j ≤ i), both × e^{γ_i−γ_j}.
        let mut m = scratch::zeroed::<f32>(n * n);
        let mut a = scratch::zeroed::<f32>(n * n);
        for i in 0..n {
            for j in 0..=i {
                let decay = (gamma[i] - gamma[j]).exp();
                if j < i {
                    m[i * n + j] = beta[i] * kk[i * n + j] * decay;
                }
                a[i * n + j] = qk[i * n + j] * decay;
            }
        }
        // Forward substitution for U [n, dv] and W [n, dk].
        let mut u = scratch::for_overwrite::<f32>(n * dv);
        let mut w = scratch::for_overwrite::<f32>(n * dk);
        for i in 0..n {
            for c in 0..dv {
                u[i * dv + c] = beta[i] * v[i * dv + c];
            }
            let e = gamma[i].exp();
            for c in 0..dk {
                w[i * dk + c] = beta[i] * k[i * dk + c] * e;
            }
            for j in 0..i {
                let mij = m[i * n + j];
                if mij != 0.0 {
                    let (done_u, row_u) = u.split_at_mut(i * dv);
                    for (x, y) in row_u[..dv].iter_mut().zip(&done_u[j * dv..(j + 1) * dv]) {
                        *x -= mij * y;
                    }
                    let (done_w, row_w) = w.split_at_mut(i * dk);
                    for (x, y) in row_w[..dk].iter_mut().zip(&done_w[j * dk..(j + 1) * dk]) {
                        *x -= mij * y;
                    }
                }
            }
        }
        // Sᵀ [dv, dk], so that products with S read rows.
        let mut st = scratch::for_overwrite::<f32>(dv * dk);
        for (r, srow) in state.chunks_exact(dv).enumerate() {
            for (c, sv) in srow.iter().enumerate() {
                st[c * dk + r] = *sv;
            }
        }
        // v' = U − W S; o = (q e^γ) S + A v'.
        let mut ws = scratch::for_overwrite::<f32>(n * dv);
        cpu::matmul_f32(&w, &st, dk, &mut ws);
        let mut v_new = u;
        for (x, y) in v_new.iter_mut().zip(ws.iter()) {
            *x -= y;
        }
        let mut qe = scratch::for_overwrite::<f32>(n * dk);
        for (i, (dst, src)) in qe.chunks_exact_mut(dk).zip(q.chunks_exact(dk)).enumerate() {
            let e = gamma[i].exp();
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s * e;
            }
        }
        let o = &mut out[start * dv..(start + n) * dv];
        cpu::matmul_f32(&qe, &st, dk, o);
        let mut vt = scratch::for_overwrite::<f32>(dv * n); // v'ᵀ [dv, n]
        for (i, row) in v_new.chunks_exact(dv).enumerate() {
            for (c, x) in row.iter().enumerate() {
                vt[c * n + i] = *x;
            }
        }
        let mut intra = scratch::for_overwrite::<f32>(n * dv);
        cpu::matmul_f32(&a, &vt, n, &mut intra);
        for (x, y) in o.iter_mut().zip(intra.iter()) {
            *x += y;
        }
        // S ← S e^{γ_last} + K̃ᵀ v' with K̃ᵀ [dk, n] = (k_i e^{γ_last−γ_i})ᵀ.
        let last = gamma[n - 1];
        let mut kt = scratch::for_overwrite::<f32>(dk * n);
        for i in 0..n {
            let e = (last - gamma[i]).exp();
            for c in 0..dk {
                kt[c * n + i] = k[i * dk + c] * e;
            }
        }
        let mut update = scratch::for_overwrite::<f32>(dk * dv);
        cpu::matmul_f32(&kt, &vt, n, &mut update);
        let decay = last.exp();
        for (s, d) in state.iter_mut().zip(update.iter()) {
            *s = *s * decay + d;
        }
        start += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::lcg;

    /// q, k (unit rows), v, beta, g of a random head.
    fn random_head(len: usize, dk: usize, dv: usize, seed: &mut u64) -> [Vec<f32>; 5] {
        let unit = |n: usize, s: &mut u64| {
            let mut v: Vec<f32> = (0..n).map(|_| lcg(s)).collect();
            cpu::l2_norm(&mut v, dk.min(n), 1e-6);
            v
        };
        [
            unit(len * dk, seed),
            unit(len * dk, seed),
            (0..len * dv).map(|_| lcg(seed)).collect(),
            (0..len).map(|_| cpu::sigmoid(2.0 * lcg(seed))).collect(),
            (0..len).map(|_| -0.5 * (lcg(seed) + 1.0)).collect(),
        ]
    }

    #[test]
    fn chunked_form_equals_recurrence() {
        let mut seed = 11;
        // 150 tokens: two full chunks and a partial one, from a non-zero starting state.
        let [q, k, v, beta, g] = random_head(150, 8, 6, &mut seed);
        let head = Head {
            q: &q,
            k: &k,
            v: &v,
            beta: &beta,
            g: &g,
            dk: 8,
            dv: 6,
        };
        let init: Vec<f32> = (0..48).map(|_| 0.3 * lcg(&mut seed)).collect();
        let mut s_rec = init.clone();
        let mut s_chunk = init;
        // Stale values in the outputs must not leak into the results.
        let (mut o_rec, mut o_chunk) = (vec![9.0; 150 * 6], vec![-9.0; 150 * 6]);
        recurrent_step(&head, &mut s_rec, &mut o_rec);
        chunked(&head, &mut s_chunk, &mut o_chunk);
        for (a, b) in o_rec.iter().zip(&o_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (a, b) in s_rec.iter().zip(&s_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
