//! Vector ops: norms, activations, softmax, dot products and scaled adds, in f32. The dot
//! product and scaled add are vectorised (with fused multiply-adds where the CPU has them) in a
//! fixed order per length, so results do not depend on the batch.

use super::{SimdLevel, simd_level};

pub(super) const LANES: usize = 16;

#[inline(always)]
pub(super) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// The lanes folded pairwise: a fixed order, so every variant sums alike.
#[inline(always)]
pub(super) fn lane_sum<T: Copy + std::ops::AddAssign>(v: &[T; LANES]) -> T {
    let mut h = *v;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            h[i] += h[i + width];
        }
        width /= 2;
    }
    h[0]
}

/// `Σ a[i]·b[i]` over the shorter length, in 4 × 16 lanes of partial sums (vectorised; a plain
/// `.sum()` of products is one serial chain of dependent adds). The order is fixed for a given
/// length, so results do not depend on the batch.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    match simd_level() {
        // SAFETY: the features these variants are compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { dot_avx2(a, b) },
        SimdLevel::Portable => dot_lanes::<false>(a, b),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const BLOCK: usize = 4 * LANES;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f32; LANES]; 4];
    let mut blocks_a = a.chunks_exact(BLOCK);
    let mut blocks_b = b.chunks_exact(BLOCK);
    for (ba, bb) in (&mut blocks_a).zip(&mut blocks_b) {
        for (k, lanes) in acc.iter_mut().enumerate() {
            for (l, s) in lanes.iter_mut().enumerate() {
                *s = fmadd::<FMA>(ba[k * LANES + l], bb[k * LANES + l], *s);
            }
        }
    }
    let mut sum = [0.0f32; LANES];
    for l in 0..LANES {
        sum[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let mut total = lane_sum(&sum);
    for (x, y) in blocks_a.remainder().iter().zip(blocks_b.remainder()) {
        total = fmadd::<FMA>(*x, *y, total);
    }
    total
}

/// `acc += a·x` over the shorter length, vectorised (with fused multiply-adds where the CPU
/// has them).
#[inline]
pub fn add_scaled(acc: &mut [f32], a: f32, x: &[f32]) {
    match simd_level() {
        // SAFETY: the features these variants are compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { add_scaled_avx512(acc, a, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { add_scaled_avx2(acc, a, x) },
        SimdLevel::Portable => add_scaled_lanes::<false>(acc, a, x),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn add_scaled_avx512(acc: &mut [f32], a: f32, x: &[f32]) {
    add_scaled_lanes::<true>(acc, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_scaled_avx2(acc: &mut [f32], a: f32, x: &[f32]) {
    add_scaled_lanes::<true>(acc, a, x)
}

#[inline(always)]
fn add_scaled_lanes<const FMA: bool>(acc: &mut [f32], a: f32, x: &[f32]) {
    for (s, v) in acc.iter_mut().zip(x) {
        *s = fmadd::<FMA>(a, *v, *s);
    }
}

/// Zero-centred RMSNorm `x̂·(1+w)` over rows of `w.len()`, in place.
pub fn rms_norm_1p(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let inv = inv_rms(row, eps);
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * (1.0 + g);
        }
    }
}

/// Plain-weight RMSNorm gated by SiLU(z): `(w·x̂)·silu(z)`, rows of `w.len()`, in place.
pub fn rms_norm_gated(x: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    for (row, zrow) in x.chunks_exact_mut(w.len()).zip(z.chunks_exact(w.len())) {
        let inv = inv_rms(row, eps);
        for ((v, g), zv) in row.iter_mut().zip(w).zip(zrow) {
            *v = g * (*v * inv) * silu(*zv);
        }
    }
}

#[inline]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// L2 normalisation `x · rsqrt(Σx² + eps)` of each row of `dim`, in place.
pub fn l2_norm(x: &mut [f32], dim: usize, eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `log(1 + e^x)` as torch computes it (linear above 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// In-place softmax of one row, in f32.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// SwiGLU on a fused `[t, 2i]` gate|up product → `[t, i]`.
pub fn swiglu(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (g, o) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
    {
        let (gate, up) = g.split_at(inter);
        for ((o, a), b) in o.iter_mut().zip(gate).zip(up) {
            *o = silu(*a) * b;
        }
    }
}

/// `acc += x`.
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::lcg;

    #[test]
    fn dot_matches_f64_for_every_length() {
        let mut seed = 17;
        for n in [0, 1, 15, 16, 63, 64, 65, 130, 256, 1000] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n + 3).map(|_| lcg(&mut seed)).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
            assert_eq!(
                dot_lanes::<false>(&a, &b) as f64,
                dot_lanes::<false>(&b, &a) as f64
            );
        }
    }

    #[test]
    fn norms_follow_their_definitions() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rms_norm_1p(&mut x, &[0.0, 1.0, 0.0, -1.0], 0.0);
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((x[0] - 1.0 / rms).abs() < 1e-6);
        assert!((x[1] - 4.0 / rms).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
        let mut v = vec![3.0, 4.0];
        l2_norm(&mut v, 2, 0.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut g = vec![3.0, 4.0];
        rms_norm_gated(&mut g, &[0.0, 100.0], &[1.0, 2.0], 0.0);
        assert_eq!(g[0], 0.0); // silu(0) = 0
        let rms = (12.5f32).sqrt();
        assert!((g[1] - 2.0 * 4.0 / rms * 100.0).abs() < 1e-3);
    }

    #[test]
    fn softmax_sums_to_one_and_softplus_is_stable() {
        let mut row = vec![1000.0, 1001.0, -5.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[0] && row[2] < 1e-6);
        assert_eq!(softplus(50.0), 50.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
    }
}
