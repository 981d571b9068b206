//! One token of the Gated DeltaNet recurrence on a state `S` `[dk, dv]` (row-major f32):
//!
//!   δ = (v − e^g·Sᵀk)·β;   S ← S·e^g + k ⊗ δ;   o = Sᵀq
//!
//! Two passes over `S` per token: read (Sᵀk), then update and read out. Columns of `S` are
//! independent, so the AVX-512 variant sweeps blocks of 128 columns whose δ and `o` stay in
//! registers while the rows stream past; the others keep δ in a scratch row. Each column sums
//! its rows in order in every variant; AVX-512 fuses multiply-adds, the others do not.

use super::scratch;
#[cfg(target_arch = "x86_64")]
use super::vector::LANES;
use super::{SimdLevel, simd_level};

/// Lane groups per column block: 8 × 16 = 128 columns, δ and `o` in 16 vector registers.
#[cfg(target_arch = "x86_64")]
const GROUPS: usize = 8;

/// One token: `q`, `k` `[dk]`, `v` `[dv]`, `beta`, `decay` = e^g; `state` `[dk, dv]` is
/// updated and `out` `[dv]` overwritten with `Sᵀq`.
pub fn delta_rule_token(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    decay: f32,
    state: &mut [f32],
    out: &mut [f32],
) {
    delta_rule_token_at(simd_level(), q, k, v, beta, decay, state, out)
}

/// `level` must not exceed what `simd_level()` detected.
#[allow(clippy::too_many_arguments)]
pub(super) fn delta_rule_token_at(
    level: SimdLevel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    decay: f32,
    state: &mut [f32],
    out: &mut [f32],
) {
    let step = Token {
        q,
        k,
        v,
        beta,
        decay,
    };
    assert!(
        q.len() == k.len() && v.len() == out.len() && state.len() == k.len() * v.len(),
        "delta rule shapes: q {}, k {}, v {}, out {}, state {}",
        q.len(),
        k.len(),
        v.len(),
        out.len(),
        state.len()
    );
    match level {
        // SAFETY: the features these variants are compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { token_avx512(&step, state, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { token_avx2(&step, state, out) },
        SimdLevel::Portable => token_plain(&step, state, out),
    }
}

struct Token<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: f32,
    decay: f32,
}

/// Both passes for all columns with the δ row in a scratch buffer: plain loops that
/// vectorise as they stand (and give the same bits at every width, having no FMA).
#[inline(always)]
fn token_plain(step: &Token<'_>, state: &mut [f32], out: &mut [f32]) {
    let dv = out.len();
    let mut delta = scratch::zeroed::<f32>(dv);
    for (srow, &kc) in state.chunks_exact(dv).zip(step.k) {
        for (acc, s) in delta.iter_mut().zip(srow) {
            *acc += s * kc;
        }
    }
    for (d, v) in delta.iter_mut().zip(step.v) {
        *d = (v - *d * step.decay) * step.beta;
    }
    out.fill(0.0);
    for ((srow, &kc), &qc) in state.chunks_exact_mut(dv).zip(step.k).zip(step.q) {
        for ((s, d), acc) in srow.iter_mut().zip(delta.iter()).zip(out.iter_mut()) {
            *s = *s * step.decay + kc * d;
            *acc += *s * qc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn token_avx2(step: &Token<'_>, state: &mut [f32], out: &mut [f32]) {
    token_plain(step, state, out)
}

/// Blocks of 128 columns, then of 16, then single columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn token_avx512(step: &Token<'_>, state: &mut [f32], out: &mut [f32]) {
    let dv = out.len();
    let mut c0 = 0;
    while c0 + GROUPS * LANES <= dv {
        columns_avx512::<GROUPS>(step, state, c0, out);
        c0 += GROUPS * LANES;
    }
    while c0 + LANES <= dv {
        columns_avx512::<1>(step, state, c0, out);
        c0 += LANES;
    }
    for c in c0..dv {
        column(step, state, c, out);
    }
}

/// Columns `c0 .. c0 + 16·G`: δ and `o` held in `2G` registers across both passes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn columns_avx512<const G: usize>(step: &Token<'_>, state: &mut [f32], c0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (dk, dv) = (step.k.len(), out.len());
    assert!(c0 + G * LANES <= dv && state.len() == dk * dv && step.v.len() == dv);
    let base = state.as_mut_ptr();
    let mut delta = [_mm512_setzero_ps(); G];
    for (r, &kc) in step.k.iter().enumerate() {
        let kc = _mm512_set1_ps(kc);
        for (g, d) in delta.iter_mut().enumerate() {
            // SAFETY: row r, columns c0 + 16g .. +16 lie within `state` (asserted above).
            let s = unsafe { _mm512_loadu_ps(base.add(r * dv + c0 + g * LANES)) };
            *d = _mm512_fmadd_ps(s, kc, *d);
        }
    }
    let (decay, beta) = (_mm512_set1_ps(step.decay), _mm512_set1_ps(step.beta));
    for (g, d) in delta.iter_mut().enumerate() {
        // SAFETY: columns c0 + 16g .. +16 lie within `v` (asserted above).
        let v = unsafe { _mm512_loadu_ps(step.v.as_ptr().add(c0 + g * LANES)) };
        *d = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_mul_ps(*d, decay)), beta);
    }
    let mut o = [_mm512_setzero_ps(); G];
    for (r, (&kc, &qc)) in step.k.iter().zip(step.q).enumerate() {
        let (kc, qc) = (_mm512_set1_ps(kc), _mm512_set1_ps(qc));
        for (g, (d, acc)) in delta.iter().zip(o.iter_mut()).enumerate() {
            // SAFETY: as in the first pass; nothing else borrows `state` meanwhile.
            unsafe {
                let at = base.add(r * dv + c0 + g * LANES);
                let s = _mm512_fmadd_ps(_mm512_loadu_ps(at), decay, _mm512_mul_ps(kc, *d));
                _mm512_storeu_ps(at, s);
                *acc = _mm512_fmadd_ps(s, qc, *acc);
            }
        }
    }
    for (g, acc) in o.iter().enumerate() {
        // SAFETY: columns c0 + 16g .. +16 lie within `out` (asserted above).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c0 + g * LANES), *acc) };
    }
}

/// One column, for the last `dv mod 16`.
#[cfg(target_arch = "x86_64")]
fn column(step: &Token<'_>, state: &mut [f32], c: usize, out: &mut [f32]) {
    let dv = out.len();
    let mut d = 0.0f32;
    for (srow, &kc) in state.chunks_exact(dv).zip(step.k) {
        d += srow[c] * kc;
    }
    let d = (step.v[c] - d * step.decay) * step.beta;
    let mut acc = 0.0f32;
    for ((srow, &kc), &qc) in state.chunks_exact_mut(dv).zip(step.k).zip(step.q) {
        srow[c] = srow[c] * step.decay + kc * d;
        acc += srow[c] * qc;
    }
    out[c] = acc;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::{lcg, runnable_levels};

    /// The recurrence in f64, as written in the module header.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        beta: f32,
        decay: f32,
        state: &mut [f64],
    ) -> Vec<f64> {
        let (dk, dv) = (k.len(), v.len());
        let (beta, decay) = (beta as f64, decay as f64);
        let mut o = vec![0.0; dv];
        for c in 0..dv {
            let skc: f64 = (0..dk).map(|r| state[r * dv + c] * k[r] as f64).sum();
            let d = (v[c] as f64 - decay * skc) * beta;
            for r in 0..dk {
                state[r * dv + c] = state[r * dv + c] * decay + k[r] as f64 * d;
                o[c] += state[r * dv + c] * q[r] as f64;
            }
        }
        o
    }

    /// Every level agrees with the f64 recurrence over several tokens, for state widths that
    /// use the 128-column blocks, the 16-column blocks and the single-column tail.
    #[test]
    fn every_level_follows_the_f64_recurrence() {
        let mut seed = 5;
        for &(dk, dv) in &[(24, 128 + 16 + 5), (8, 6), (16, 256)] {
            let init: Vec<f32> = (0..dk * dv).map(|_| 0.5 * lcg(&mut seed)).collect();
            let tokens: Vec<[Vec<f32>; 3]> = (0..4)
                .map(|_| {
                    [
                        (0..dk).map(|_| lcg(&mut seed)).collect(),
                        (0..dk)
                            .map(|_| lcg(&mut seed) / (dk as f32).sqrt())
                            .collect(),
                        (0..dv).map(|_| lcg(&mut seed)).collect(),
                    ]
                })
                .collect();
            for level in runnable_levels() {
                let mut state = init.clone();
                let mut want_state: Vec<f64> = init.iter().map(|&x| x as f64).collect();
                // Stale values in `out` must not leak into the result.
                let mut out = vec![7.0; dv];
                for (i, [q, k, v]) in tokens.iter().enumerate() {
                    let (beta, decay) = (0.3 + 0.1 * i as f32, 0.9 - 0.05 * i as f32);
                    delta_rule_token_at(level, q, k, v, beta, decay, &mut state, &mut out);
                    let want = reference(q, k, v, beta, decay, &mut want_state);
                    for (c, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                            "{level:?} dk={dk} dv={dv} token {i} column {c}: {a} vs {b}"
                        );
                    }
                }
                for (a, b) in state.iter().zip(&want_state) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                        "{level:?} dk={dk} dv={dv} state: {a} vs {b}"
                    );
                }
            }
        }
    }
}
