//! Vocabulary-wide scans for the sampler: the largest logit and its index, the weights
//! e^((l − max)/T) with their per-block sums, thresholds on the weights, and Σ e^(l − max)
//! for log-probabilities. At Qwen3.5's 248 320 tokens each is a pass over a megabyte, so they
//! are vectorised (sums in f64 lanes) — with plain multiplies and adds (never fused) in a fixed lane order, so
//! every variant (AVX-512, AVX2, portable) gives the same bits and a seeded draw picks the
//! same token on every machine of a cluster.

use super::vector::{LANES, lane_sum as fold};
use super::{SimdLevel, simd_level};

/// Weights are summed per block of this many tokens: a draw finds its block by the block
/// sums, then walks one block, not the vocabulary.
pub const WEIGHT_BLOCK: usize = 1024;

/// Below this, e^x is under f32's normal range: the weight is 0 (e^−87 relative to the
/// favourite is below 10^−37, far under any draw's resolution).
const EXP_FLOOR: f32 = -87.0;

/// e^x for x ≤ 0 (and −∞ → 0): 2^n · p(r) with n = round(x·log₂e), r = x − n·ln 2 split in
/// two constants, p a degree-6 Taylor polynomial on |r| ≤ ln2/2 (relative error ≤ 2·10⁻⁷).
/// Written so the compiler vectorises it: rounding by the 1.5·2²³ trick, 2^n from bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = HI + LO, HI with few enough bits that n·HI is exact (Cody and Waite).
    // 355/512 = 0.693359375 exactly: written as bits, as its decimal form is longer than f32's.
    const LN2_HI: f32 = f32::from_bits(0x3F31_8000);
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let clamped = if x < EXP_FLOOR { EXP_FLOOR } else { x };
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The low bits of `shifted` hold n (|n| < 2^22 keeps the exponent fixed).
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    if x < EXP_FLOOR { 0.0 } else { p * scale }
}

macro_rules! dispatch {
    ($portable:ident, $avx512:ident, $avx2:ident, ($($arg:expr),*)) => {
        match simd_level() {
            // SAFETY: the features these variants are compiled for were detected at run time.
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => unsafe { $avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => unsafe { $avx2($($arg),*) },
            SimdLevel::Portable => $portable($($arg),*),
        }
    };
}

/// The largest value (−∞ for an empty slice; NaNs are passed over).
pub fn max(x: &[f32]) -> f32 {
    dispatch!(max_lanes, max_avx512, max_avx2, (x))
}

/// The index of the largest value, the lowest on ties (0 for an empty or all-NaN slice), in
/// one pass.
pub fn argmax(x: &[f32]) -> u32 {
    dispatch!(argmax_lanes, argmax_avx512, argmax_avx2, (x))
}

/// Fills `weights` with e^((l − max)·inv_t) for each logit (0 for −∞) and `block_sums` with
/// their sums per [`WEIGHT_BLOCK`]; returns the total.
pub fn exp_weights(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    weights: &mut Vec<f32>,
    block_sums: &mut Vec<f64>,
) -> f64 {
    weights.resize(logits.len(), 0.0);
    block_sums.clear();
    dispatch!(
        exp_weights_lanes,
        exp_weights_avx512,
        exp_weights_avx2,
        (logits, max, inv_t, weights, block_sums)
    )
}

/// Zeroes the weights below `floor` and sums the rest again per block; returns the total.
pub fn floor_weights(weights: &mut [f32], floor: f32, block_sums: &mut Vec<f64>) -> f64 {
    block_sums.clear();
    dispatch!(
        floor_weights_lanes,
        floor_weights_avx512,
        floor_weights_avx2,
        (weights, floor, block_sums)
    )
}

/// The total of the weights at or above `threshold`.
pub fn mass_at_or_above(weights: &[f32], threshold: f32) -> f64 {
    dispatch!(mass_lanes, mass_avx512, mass_avx2, (weights, threshold))
}

/// Σ e^(l − max) over the logits, for a log-sum-exp.
pub fn sum_exp(logits: &[f32], max: f32) -> f64 {
    dispatch!(sum_exp_lanes, sum_exp_avx512, sum_exp_avx2, (logits, max))
}

macro_rules! variants {
    ($lanes:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $avx512($($arg: $ty),*) -> $ret {
            $lanes($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2($($arg: $ty),*) -> $ret {
            $lanes($($arg),*)
        }
    };
}

variants!(max_lanes, max_avx512, max_avx2, (x: &[f32]) -> f32);
variants!(argmax_lanes, argmax_avx512, argmax_avx2, (x: &[f32]) -> u32);
variants!(
    exp_weights_lanes, exp_weights_avx512, exp_weights_avx2,
    (logits: &[f32], max: f32, inv_t: f32, weights: &mut [f32], block_sums: &mut Vec<f64>) -> f64
);
variants!(
    floor_weights_lanes, floor_weights_avx512, floor_weights_avx2,
    (weights: &mut [f32], floor: f32, block_sums: &mut Vec<f64>) -> f64
);
variants!(sum_exp_lanes, sum_exp_avx512, sum_exp_avx2, (logits: &[f32], max: f32) -> f64);

variants!(mass_lanes, mass_avx512, mass_avx2, (weights: &[f32], threshold: f32) -> f64);

/// Σ x over a block, in 16 lanes of f64 (f32 lanes would let a weight of 1 swallow the
/// small ones that share its lane), the tail into lane 0.
#[inline(always)]
fn block_sum(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += f64::from(*v);
        }
    }
    for v in chunks.remainder() {
        acc[0] += f64::from(*v);
    }
    fold(&acc)
}

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            acc[l] = if chunk[l] > acc[l] { chunk[l] } else { acc[l] };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for v in acc.iter().chain(chunks.remainder()) {
        if *v > best {
            best = *v;
        }
    }
    best
}

/// Each lane keeps its first largest value and where it was; the lanes then agree on the
/// largest value and, among the lanes holding it, the lowest index.
#[inline(always)]
fn argmax_lanes(x: &[f32]) -> u32 {
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0u32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    let mut base = 0u32;
    for chunk in &mut chunks {
        for l in 0..LANES {
            let v = chunk[l];
            let better = v > best[l];
            best[l] = if better { v } else { best[l] };
            at[l] = if better { base + l as u32 } else { at[l] };
        }
        base += LANES as u32;
    }
    let (mut top, mut index) = (f32::NEG_INFINITY, u32::MAX);
    for l in 0..LANES {
        if best[l] > top || (best[l] == top && best[l] > f32::NEG_INFINITY && at[l] < index) {
            (top, index) = (best[l], at[l]);
        }
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        if v > top {
            (top, index) = (v, base + j as u32);
        }
    }
    if index == u32::MAX {
        // Nothing above −∞: the first token, as a plain scan would say.
        0
    } else {
        index
    }
}

#[inline(always)]
fn exp_weights_lanes(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    weights: &mut [f32],
    block_sums: &mut Vec<f64>,
) -> f64 {
    let mut total = 0.0;
    for (l, w) in logits
        .chunks(WEIGHT_BLOCK)
        .zip(weights.chunks_mut(WEIGHT_BLOCK))
    {
        for (l, w) in l.iter().zip(w.iter_mut()) {
            *w = exp_nonpositive((*l - max) * inv_t);
        }
        let sum = block_sum(w);
        block_sums.push(sum);
        total += sum;
    }
    total
}

#[inline(always)]
fn floor_weights_lanes(weights: &mut [f32], floor: f32, block_sums: &mut Vec<f64>) -> f64 {
    let mut total = 0.0;
    for w in weights.chunks_mut(WEIGHT_BLOCK) {
        for v in w.iter_mut() {
            *v = if *v >= floor { *v } else { 0.0 };
        }
        let sum = block_sum(w);
        block_sums.push(sum);
        total += sum;
    }
    total
}

#[inline(always)]
fn mass_lanes(weights: &[f32], threshold: f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = weights.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += f64::from(if *v >= threshold { *v } else { 0.0 });
        }
    }
    for v in chunks.remainder() {
        acc[0] += f64::from(if *v >= threshold { *v } else { 0.0 });
    }
    fold(&acc)
}

#[inline(always)]
fn sum_exp_lanes(logits: &[f32], max: f32) -> f64 {
    let mut total = 0.0;
    for block in logits.chunks(WEIGHT_BLOCK) {
        let mut acc = [0.0f64; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a += f64::from(exp_nonpositive(*v - max));
            }
        }
        for v in chunks.remainder() {
            acc[0] += f64::from(exp_nonpositive(*v - max));
        }
        total += fold(&acc);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_f64_exponential() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-90.0), 0.0);
    }

    /// Every variant this CPU has gives the bits of the portable one.
    #[test]
    fn variants_agree_bit_for_bit_with_the_portable_code() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.013 - 6.0)
            .collect();
        let m = max_lanes(&logits);
        let (mut w1, mut w2, mut b1, mut b2) =
            (vec![0.0; 5000], Vec::new(), Vec::new(), Vec::new());
        let t1 = exp_weights_lanes(&logits, m, 1.3, &mut w1, &mut b1);
        let t2 = exp_weights(&logits, m, 1.3, &mut w2, &mut b2);
        assert_eq!(
            (m.to_bits(), t1.to_bits()),
            (max(&logits).to_bits(), t2.to_bits())
        );
        assert_eq!(w1, w2);
        assert_eq!(b1, b2);
        assert_eq!(
            sum_exp_lanes(&logits, m).to_bits(),
            sum_exp(&logits, m).to_bits()
        );
        for t in [0.5, 0.1, 0.0] {
            assert_eq!(
                mass_lanes(&w1, t).to_bits(),
                mass_at_or_above(&w1, t).to_bits()
            );
        }
        // And the sums are the sums, to f32 accuracy.
        let exact: f64 = logits.iter().map(|l| ((l - m) as f64 * 1.3).exp()).sum();
        assert!((t1 - exact).abs() / exact < 1e-5, "{t1} vs {exact}");
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        // Against a plain scan, ties across lanes and in the tail included.
        let plain = |x: &[f32]| {
            let mut best = 0;
            for (i, v) in x.iter().enumerate() {
                if *v > x[best] {
                    best = i;
                }
            }
            best as u32
        };
        for len in [1, 15, 16, 17, 100, 5000] {
            let mut v: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32).collect();
            assert_eq!(argmax(&v), plain(&v), "len {len}");
            assert_eq!(argmax_lanes(&v), plain(&v), "len {len}");
            v[len - 1] = 20.0;
            assert_eq!(argmax(&v), plain(&v), "len {len}");
            v[0] = 20.0;
            assert_eq!(argmax(&v), 0, "len {len}");
        }
    }
}
