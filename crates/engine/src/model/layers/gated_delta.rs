//! Gated DeltaNet (linear attention): causal depthwise conv1d with carried state + SiLU,
//! L2-normalised q/k, q scaled by dk^-0.5, beta = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias),
//! the delta rule over an f32 state S `[dk, dv]` per value head, gated RMSNorm × SiLU(z).
//!
//! Multi-token steps use the chunked form (chunks of 64, a unit-lower-triangular solve inside
//! each chunk, one state update per chunk); single-token steps use the recurrent form. The two
//! agree up to f32 rounding (tested below).

use rayon::prelude::*;

use super::{Segment, fuse_rows};
use crate::backend::cpu;
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
    /// `[conv_dim, kernel]`.
    conv: Vec<f32>,
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
            conv: store.f32_tensor(&name("conv1d.weight"), &[conv_dim, 1, kern])?,
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
        let mut projected = vec![0.0; t * width]; // [t, conv_dim + nv·dv + 2·nv]
        cpu::matmul(x, &self.in_proj, &mut projected);
        let mut mixed = vec![0.0; t * conv_dim]; // [t, conv_dim]
        let mut z = vec![0.0; t * nv * dv]; // [t, nv, dv]
        let mut b = vec![0.0; t * nv]; // [t, nv]
        let mut a = vec![0.0; t * nv];
        cpu::split_columns(&projected, width, 0, conv_dim, &mut mixed);
        cpu::split_columns(&projected, width, conv_dim, nv * dv, &mut z);
        cpu::split_columns(&projected, width, conv_dim + nv * dv, nv, &mut b);
        cpu::split_columns(&projected, width, conv_dim + nv * dv + nv, nv, &mut a);

        let mut core = vec![0.0; t * nv * dv]; // [t, nv, dv]
        for seg in segments {
            let (conv_state, recurrent) = cache.linear_state(self.layer, seg.seq)?;
            let rows = seg.offset * conv_dim..(seg.offset + seg.len) * conv_dim;
            let qkv = self.causal_conv(&mixed[rows], conv_state); // [len, conv_dim]
            let mut q = vec![0.0; seg.len * nk * dk]; // [len, nk, dk]
            let mut k = vec![0.0; seg.len * nk * dk];
            let mut val = vec![0.0; seg.len * nv * dv]; // [len, nv, dv]
            for (i, row) in qkv.chunks_exact(conv_dim).enumerate() {
                q[i * nk * dk..(i + 1) * nk * dk].copy_from_slice(&row[..nk * dk]);
                k[i * nk * dk..(i + 1) * nk * dk].copy_from_slice(&row[nk * dk..2 * nk * dk]);
                val[i * nv * dv..(i + 1) * nv * dv].copy_from_slice(&row[2 * nk * dk..]);
            }
            cpu::l2_norm(&mut q, dk, 1e-6);
            cpu::l2_norm(&mut k, dk, 1e-6);
            let scale = (dk as f32).powf(-0.5);
            q.iter_mut().for_each(|v| *v *= scale);
            let mut beta = vec![0.0; seg.len * nv]; // [len, nv]
            let mut g = vec![0.0; seg.len * nv];
            for i in 0..seg.len {
                for h in 0..nv {
                    let at = (seg.offset + i) * nv + h;
                    beta[i * nv + h] = cpu::sigmoid(b[at]);
                    g[i * nv + h] = self.neg_a[h] * cpu::softplus(a[at] + self.dt_bias[h]);
                }
            }
            let inputs = HeadInputs {
                q: &q,
                k: &k,
                v: &val,
                beta: &beta,
                g: &g,
                len: seg.len,
                nk,
                nv,
                dk,
                dv,
            };
            let seg_core = &mut core[seg.offset * nv * dv..(seg.offset + seg.len) * nv * dv];
            let per_head: Vec<Vec<f32>> = recurrent
                .par_chunks_mut(dk * dv)
                .enumerate()
                .map(|(h, state)| {
                    let head = inputs.head(h);
                    if seg.len == 1 {
                        recurrent_step(&head, state)
                    } else {
                        chunked(&head, state)
                    }
                })
                .collect();
            for (h, o) in per_head.iter().enumerate() {
                for i in 0..seg.len {
                    seg_core[(i * nv + h) * dv..(i * nv + h + 1) * dv]
                        .copy_from_slice(&o[i * dv..(i + 1) * dv]);
                }
            }
        }
        cpu::rms_norm_gated(&mut core, &z, &self.norm, self.eps);
        cpu::matmul(&core, &self.out_proj, out);
        Ok(())
    }

    /// Depthwise causal conv + SiLU over `[len, conv_dim]` rows, continuing from and updating
    /// `state` `[conv_dim, kernel-1]` (oldest input first).
    fn causal_conv(&self, mixed: &[f32], state: &mut [f32]) -> Vec<f32> {
        let conv_dim = self.spec.conv_dim();
        let kern = self.spec.conv_kernel;
        let hist = kern - 1;
        let len = mixed.len() / conv_dim;
        let mut out = vec![0.0; mixed.len()];
        for c in 0..conv_dim {
            let w = &self.conv[c * kern..(c + 1) * kern];
            let past = &state[c * hist..(c + 1) * hist];
            // Input at relative time j (may be negative: then it comes from the state).
            let input = |j: isize| -> f32 {
                if j >= 0 {
                    mixed[j as usize * conv_dim + c]
                } else {
                    past[(hist as isize + j) as usize]
                }
            };
            for i in 0..len {
                let mut acc = 0.0;
                for (tap, wv) in w.iter().enumerate() {
                    acc += wv * input(i as isize - hist as isize + tap as isize);
                }
                out[i * conv_dim + c] = cpu::silu(acc);
            }
            let new_past: Vec<f32> = (0..hist)
                .map(|j| input(len as isize - hist as isize + j as isize))
                .collect();
            state[c * hist..(c + 1) * hist].copy_from_slice(&new_past);
        }
        out
    }
}

/// Per-segment delta-rule inputs for all heads.
struct HeadInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    g: &'a [f32],
    len: usize,
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
}

/// One value head's inputs, gathered contiguous: q, k `[len, dk]`, v `[len, dv]`, beta, g `[len]`.
struct Head {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
    dk: usize,
    dv: usize,
}

impl HeadInputs<'_> {
    fn head(&self, h: usize) -> Head {
        let kh = h / (self.nv / self.nk);
        let (dk, dv) = (self.dk, self.dv);
        let mut head = Head {
            q: Vec::with_capacity(self.len * dk),
            k: Vec::with_capacity(self.len * dk),
            v: Vec::with_capacity(self.len * dv),
            beta: Vec::with_capacity(self.len),
            g: Vec::with_capacity(self.len),
            dk,
            dv,
        };
        for i in 0..self.len {
            let kq = (i * self.nk + kh) * dk;
            head.q.extend_from_slice(&self.q[kq..kq + dk]);
            head.k.extend_from_slice(&self.k[kq..kq + dk]);
            let vo = (i * self.nv + h) * dv;
            head.v.extend_from_slice(&self.v[vo..vo + dv]);
            head.beta.push(self.beta[i * self.nv + h]);
            head.g.push(self.g[i * self.nv + h]);
        }
        head
    }
}

/// The recurrence, token by token: S ← S·e^g; S += k ⊗ (v − Sᵀk)·β; o = Sᵀq.
fn recurrent_step(head: &Head, state: &mut [f32]) -> Vec<f32> {
    let (dk, dv) = (head.dk, head.dv);
    let len = head.beta.len();
    let mut out = vec![0.0; len * dv];
    let mut kv = vec![0.0; dv];
    for i in 0..len {
        let q = &head.q[i * dk..(i + 1) * dk];
        let k = &head.k[i * dk..(i + 1) * dk];
        let v = &head.v[i * dv..(i + 1) * dv];
        let decay = head.g[i].exp();
        state.iter_mut().for_each(|s| *s *= decay);
        kv.fill(0.0);
        for (c, kc) in k.iter().enumerate() {
            for (acc, s) in kv.iter_mut().zip(&state[c * dv..(c + 1) * dv]) {
                *acc += s * kc;
            }
        }
        for (c, kc) in k.iter().enumerate() {
            for ((s, vv), m) in state[c * dv..(c + 1) * dv].iter_mut().zip(v).zip(&kv) {
                *s += kc * (vv - m) * head.beta[i];
            }
        }
        let o = &mut out[i * dv..(i + 1) * dv];
        for (c, qc) in q.iter().enumerate() {
            for (acc, s) in o.iter_mut().zip(&state[c * dv..(c + 1) * dv]) {
                *acc += s * qc;
            }
        }
    }
    out
}

/// The chunked form. Within a chunk with cumulative log-decay γ:
///   M = I + strict_lower((β_i k_i·k_j) e^{γ_i−γ_j});  U = M⁻¹(β v);  W = M⁻¹(β k e^γ)
///   v'_i = U_i − W_i S;  o_i = (q_i e^{γ_i}) S + Σ_{j≤i} (q_i·k_j) e^{γ_i−γ_j} v'_j
///   S ← S e^{γ_last} + Σ_i (k_i e^{γ_last−γ_i}) ⊗ v'_i
fn chunked(head: &Head, state: &mut [f32]) -> Vec<f32> {
    let (dk, dv) = (head.dk, head.dv);
    let len = head.beta.len();
    let mut out = vec![0.0; len * dv];
    let mut start = 0;
    while start < len {
        let n = CHUNK.min(len - start);
        let k = &head.k[start * dk..(start + n) * dk];
        let q = &head.q[start * dk..(start + n) * dk];
        let v = &head.v[start * dv..(start + n) * dv];
        let beta = &head.beta[start..start + n];
        let mut gamma = vec![0.0f32; n];
        let mut acc = 0.0;
        for (gm, g) in gamma.iter_mut().zip(&head.g[start..start + n]) {
            acc += g;
            *gm = acc;
        }
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let krow = |i: usize| &k[i * dk..(i + 1) * dk];
        // Strictly lower part of M, row-major [n, n].
        let mut m = vec![0.0f32; n * n];
        for i in 0..n {
            for j in 0..i {
                m[i * n + j] = beta[i] * dot(krow(i), krow(j)) * (gamma[i] - gamma[j]).exp();
            }
        }
        // Forward substitution for U [n, dv] and W [n, dk].
        let mut u = vec![0.0f32; n * dv];
        let mut w = vec![0.0f32; n * dk];
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
        // v' = U − W S, inter = (q e^γ) S.
        let mut v_new = u;
        let o = &mut out[start * dv..(start + n) * dv];
        for i in 0..n {
            let e = gamma[i].exp();
            for c in 0..dk {
                let srow = &state[c * dv..(c + 1) * dv];
                let wc = w[i * dk + c];
                let qc = q[i * dk + c] * e;
                for ((vn, oo), s) in v_new[i * dv..(i + 1) * dv]
                    .iter_mut()
                    .zip(&mut o[i * dv..(i + 1) * dv])
                    .zip(srow)
                {
                    *vn -= wc * s;
                    *oo += qc * s;
                }
            }
        }
        // Intra-chunk attention.
        for i in 0..n {
            for j in 0..=i {
                let a = dot(&q[i * dk..(i + 1) * dk], krow(j)) * (gamma[i] - gamma[j]).exp();
                let (oi, vj) = (i * dv, j * dv);
                for c in 0..dv {
                    o[oi + c] += a * v_new[vj + c];
                }
            }
        }
        // State update.
        let last = gamma[n - 1];
        let decay = last.exp();
        state.iter_mut().for_each(|s| *s *= decay);
        for i in 0..n {
            let e = (last - gamma[i]).exp();
            for c in 0..dk {
                let kc = k[i * dk + c] * e;
                for (s, vn) in state[c * dv..(c + 1) * dv]
                    .iter_mut()
                    .zip(&v_new[i * dv..(i + 1) * dv])
                {
                    *s += kc * vn;
                }
            }
        }
        start += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::lcg;

    fn random_head(len: usize, dk: usize, dv: usize, seed: &mut u64) -> Head {
        let unit = |n: usize, s: &mut u64| {
            let mut v: Vec<f32> = (0..n).map(|_| lcg(s)).collect();
            cpu::l2_norm(&mut v, dk.min(n), 1e-6);
            v
        };
        Head {
            q: unit(len * dk, seed),
            k: unit(len * dk, seed),
            v: (0..len * dv).map(|_| lcg(seed)).collect(),
            beta: (0..len).map(|_| cpu::sigmoid(2.0 * lcg(seed))).collect(),
            g: (0..len).map(|_| -0.5 * (lcg(seed) + 1.0)).collect(),
            dk,
            dv,
        }
    }

    #[test]
    fn chunked_form_equals_recurrence() {
        let mut seed = 11;
        // 150 tokens: two full chunks and a partial one, from a non-zero starting state.
        let head = random_head(150, 8, 6, &mut seed);
        let init: Vec<f32> = (0..48).map(|_| 0.3 * lcg(&mut seed)).collect();
        let mut s_rec = init.clone();
        let mut s_chunk = init;
        let o_rec = recurrent_step(&head, &mut s_rec);
        let o_chunk = chunked(&head, &mut s_chunk);
        for (a, b) in o_rec.iter().zip(&o_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (a, b) in s_rec.iter().zip(&s_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
