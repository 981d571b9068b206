//! Gated DeltaNet's kernels: the causal conv with its carried state, the delta rule's inputs
//! (normalised q/k, β and the decay g), and the delta rule over every head of a segment, in
//! the chunked form (multi-token steps: chunks of 64, a unit-lower-triangular solve inside
//! each chunk, one state update per chunk) or the recurrent form (`delta_rule.rs`, one token
//! at a time), each head followed by its gated RMSNorm. The two forms agree up to f32
//! rounding (tested below).

use super::delta_rule::delta_rule_token;
use super::pool::KernelPool;
use super::products::matmul_f32;
use super::scratch::{self, Scratch};
use super::vector::{l2_norm, rms_norm_gated, sigmoid, silu, softplus};
use crate::backend::{DeltaGates, DeltaHeads};
use crate::config::LinearSpec;

const CHUNK: usize = 64;

/// See [`crate::backend::Backend::causal_conv`]. Each channel sums its taps in order, whole
/// rows at a time.
pub(super) fn causal_conv(
    rows: &[f32],
    stride: usize,
    taps: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    // taps `[kernel, channels]` and state `[channels, kernel - 1]` give both sizes.
    let conv_dim = taps.len() - state.len();
    let hist = state.len() / conv_dim;
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
        for (tap, w) in taps.chunks_exact(conv_dim).enumerate() {
            let x = input(i as isize - hist as isize + tap as isize);
            for ((acc, wv), xv) in o.iter_mut().zip(w).zip(x) {
                *acc += wv * xv;
            }
        }
        o.iter_mut().for_each(|v| *v = silu(*v));
    }
    // The last `hist` inputs become the state.
    for j in 0..hist {
        let x = input(len as isize - hist as isize + j as isize);
        for (c, v) in x.iter().enumerate() {
            state[c * hist + j] = *v;
        }
    }
}

/// See [`crate::backend::Backend::delta_inputs`].
#[allow(clippy::too_many_arguments)]
pub(super) fn delta_inputs(
    spec: &LinearSpec,
    qkv: &mut [f32],
    rows: &[f32],
    stride: usize,
    gates_at: usize,
    gates: DeltaGates<'_>,
    beta: &mut [f32],
    g: &mut [f32],
) {
    let (nk, nv, dk) = (spec.key_heads, spec.value_heads, spec.key_dim);
    let scale = (dk as f32).powf(-0.5);
    for row in qkv.chunks_exact_mut(spec.conv_dim()) {
        let (q, rest) = row.split_at_mut(nk * dk);
        l2_norm(q, dk, 1e-6);
        q.iter_mut().for_each(|v| *v *= scale);
        l2_norm(&mut rest[..nk * dk], dk, 1e-6);
    }
    for (i, row) in rows.chunks_exact(stride).enumerate() {
        for h in 0..nv {
            beta[i * nv + h] = sigmoid(row[gates_at + h]);
            g[i * nv + h] = gates.neg_a[h] * softplus(row[gates_at + nv + h] + gates.dt_bias[h]);
        }
    }
}

/// The delta rule over every value head of `heads` (one pool task per head), chunked or
/// recurrent, each head's rows then gated-normed; `out` `[len, nv·dv]`, `state`
/// `[nv, dk, dv]`. See [`crate::backend::Backend::delta_rule_chunked`].
pub(super) fn delta_rule(
    pool: &KernelPool,
    heads: &DeltaHeads<'_>,
    chunked_form: bool,
    state: &mut [f32],
    out: &mut [f32],
) {
    let s = heads.spec;
    let (nk, nv, dk, dv) = (s.key_heads, s.value_heads, s.key_dim, s.value_dim);
    let len = heads.len;
    let inputs = HeadInputs {
        qkv: heads.qkv,
        beta: heads.beta,
        g: heads.g,
        len,
        nk,
        nv,
        dk,
        dv,
    };
    let mut per_head = scratch::for_overwrite::<f32>(nv * len * dv); // [nv, len, dv]
    pool.for_each_chunk_pair_mut(state, dk * dv, &mut per_head, len * dv, |h, state, o| {
        if chunked_form {
            chunked(pool, &inputs.gather(h).head(), state, o)
        } else if len == 1 {
            recurrent_step(&inputs.token_head(h), state, o)
        } else {
            recurrent_step(&inputs.gather(h).head(), state, o)
        }
        // The gated norm of this head's rows, while they are in cache.
        for (i, row) in o.chunks_exact_mut(dv).enumerate() {
            let z = &heads.z[i * heads.z_stride + h * dv..i * heads.z_stride + (h + 1) * dv];
            rms_norm_gated(row, z, heads.norm, heads.eps);
        }
    });
    for (h, o) in per_head.chunks_exact(len * dv).enumerate() {
        for (i, v) in o.chunks_exact(dv).enumerate() {
            out[(i * nv + h) * dv..(i * nv + h + 1) * dv].copy_from_slice(v);
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

/// The recurrence, token by token (`delta_rule_token`): S ← S·e^g; S += k ⊗ (v − Sᵀk)·β;
/// o = Sᵀq, into `out` `[len, dv]`.
fn recurrent_step(head: &Head<'_>, state: &mut [f32], out: &mut [f32]) {
    let (dk, dv) = (head.dk, head.dv);
    for (i, o) in out.chunks_exact_mut(dv).take(head.beta.len()).enumerate() {
        delta_rule_token(
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
/// Everything but the triangular solve is a matrix product (`matmul_f32`); `out`
/// `[len, dv]` is overwritten.
fn chunked(pool: &KernelPool, head: &Head<'_>, state: &mut [f32], out: &mut [f32]) {
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
        matmul_f32(pool, k, k, dk, &mut kk);
        let mut qk = scratch::for_overwrite::<f32>(n * n);
        matmul_f32(pool, q, k, dk, &mut qk);
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
        matmul_f32(pool, &w, &st, dk, &mut ws);
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
        matmul_f32(pool, &qe, &st, dk, o);
        let mut vt = scratch::for_overwrite::<f32>(dv * n); // v'ᵀ [dv, n]
        for (i, row) in v_new.chunks_exact(dv).enumerate() {
            for (c, x) in row.iter().enumerate() {
                vt[c * n + i] = *x;
            }
        }
        let mut intra = scratch::for_overwrite::<f32>(n * dv);
        matmul_f32(pool, &a, &vt, n, &mut intra);
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
        matmul_f32(pool, &kt, &vt, n, &mut update);
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
    use crate::backend::cpu::vector::{l2_norm, sigmoid};

    /// q, k (unit rows), v, beta, g of a random head.
    fn random_head(len: usize, dk: usize, dv: usize, seed: &mut u64) -> [Vec<f32>; 5] {
        let unit = |n: usize, s: &mut u64| {
            let mut v: Vec<f32> = (0..n).map(|_| lcg(s)).collect();
            l2_norm(&mut v, dk.min(n), 1e-6);
            v
        };
        [
            unit(len * dk, seed),
            unit(len * dk, seed),
            (0..len * dv).map(|_| lcg(seed)).collect(),
            (0..len).map(|_| sigmoid(2.0 * lcg(seed))).collect(),
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
        chunked(&KernelPool::new(2), &head, &mut s_chunk, &mut o_chunk);
        for (a, b) in o_rec.iter().zip(&o_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (a, b) in s_rec.iter().zip(&s_chunk) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
