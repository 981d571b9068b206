//! Matrix products, the work that dominates every step: `x · Wᵀ` for stored weights (f32,
//! bf16, f16, int8 widened in registers or a small per-thread buffer; f32 activations and
//! accumulation, or bf16 activations in fast precision) and for plain f32 matrices (attention
//! scores, the delta rule's chunks). Work is split over output rows on the kernel pool.

use super::pool::KernelPool;
use super::vector::{LANES, dot, fmadd, lane_sum};
use super::{SimdLevel, avx512, fast_available, scratch, simd_level};
use crate::tensor::{Weight, WeightData};

/// Output rows handled per task of a multi-token product (a multiple of the 4-row kernel).
const ROW_TILE: usize = 32;
/// Fewest rows in a task of a one-token product (GEMV): the last, smallest tasks of the
/// guided split (a multiple of the 4-row kernel and of `ROW_TILE`).
const GEMV_MIN_ROWS: usize = 2 * ROW_TILE;

/// `y = x · Wᵀ`: x `[t, w.cols]`, y `[t, w.rows]`, split over `pool` by row tiles when
/// `parallel` (else on the calling thread, for callers that already run one product per
/// thread); bf16 activations into bf16 weights when `fast` (see [`Precision::Fast`]).
pub(crate) fn matmul(
    pool: &KernelPool,
    fast: bool,
    x: &[f32],
    w: &Weight,
    y: &mut [f32],
    parallel: bool,
) {
    let t = x.len() / w.cols;
    debug_assert_eq!(x.len(), t * w.cols);
    debug_assert_eq!(y.len(), t * w.rows);
    #[cfg(target_arch = "x86_64")]
    if let (true, WeightData::BF16(d)) = (fast && fast_available(), &w.data) {
        matmul_fast(pool, x, t, d, w.rows, w.cols, y, parallel);
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fast;
    by_row_tiles(pool, w.rows, t, y, parallel, |r0, out| {
        row_tile(x, t, w, r0, out)
    });
}

/// `y = x · Wᵀ` for a plain f32 matrix `w` `[rows, cols]` (row-major, e.g. keys gathered for
/// attention): x `[t, cols]`, y `[t, rows]`, split over the pool by row tiles.
pub(crate) fn matmul_f32(pool: &KernelPool, x: &[f32], w: &[f32], cols: usize, y: &mut [f32]) {
    let rows = w.len() / cols;
    let t = x.len() / cols;
    debug_assert_eq!(y.len(), t * rows);
    let level = simd_level();
    by_row_tiles(pool, rows, t, y, true, |r0, out| {
        let here = out.len() / t;
        let tile = &w[r0 * cols..(r0 + here) * cols];
        match level {
            // SAFETY: AVX-512 F/BW/VL were detected (see `simd_level`).
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => unsafe { avx512::tile_products(x, t, tile, cols, out) },
            _ => {
                for (r, row) in tile.chunks_exact(cols).enumerate() {
                    for (tok, xr) in x.chunks_exact(cols).enumerate() {
                        out[tok * here + r] = dot(row, xr);
                    }
                }
            }
        }
    });
}

/// `y` `[t, rows]` from tiles of `ROW_TILE` rows, split over the pool when `parallel`:
/// `tile(r0, out)` fills `out` `[t, rows_here]` (rows `r0..`). With one token that is a piece
/// of `y` itself; otherwise each task fills a buffer of its own and copies each token's
/// `rows_here` values into place as one run. (The kernels used to fill `[rows_here, t]`, and
/// transposing that into place cost ~5 % of a batch-32 decode step.)
fn by_row_tiles(
    pool: &KernelPool,
    rows: usize,
    t: usize,
    y: &mut [f32],
    parallel: bool,
    tile: impl Fn(usize, &mut [f32]) + Sync,
) {
    if t == 1 {
        if parallel {
            // Guided split: each task takes 1/(2·threads) of the rows still unassigned, so
            // tasks shrink toward the end and the threads finish together (equal fixed-size
            // tasks left one thread idle for half a task at the end of every product). Every
            // task still streams a contiguous run of the weights, which the prefetchers follow.
            let share = 2 * pool.threads();
            let mut bounds = scratch::with_capacity::<usize>(rows.div_ceil(GEMV_MIN_ROWS) + 1);
            let mut start = 0;
            bounds.push(start);
            while start < rows {
                let size = ((rows - start) / share)
                    .next_multiple_of(ROW_TILE)
                    .max(GEMV_MIN_ROWS);
                start = (start + size).min(rows);
                bounds.push(start);
            }
            pool.for_each_span_mut(y, &bounds, |i, o| tile(bounds[i], o));
        } else {
            y.chunks_mut(ROW_TILE)
                .enumerate()
                .for_each(|(i, o)| tile(i * ROW_TILE, o));
        }
        return;
    }
    let out = SharedRows(y.as_mut_ptr(), y.len());
    let one = |i: usize| {
        let r0 = i * ROW_TILE;
        let here = (rows - r0).min(ROW_TILE);
        let mut buf = scratch::for_overwrite::<f32>(t * here); // [t, here]
        tile(r0, &mut buf);
        for (tok, src) in buf.chunks_exact(here).enumerate() {
            // SAFETY: tile i writes only rows r0..r0+here of each token, which no other tile
            // writes; tok * rows + r0 + here <= t * rows = y.len().
            let dst = unsafe { out.run(tok * rows + r0, here) };
            dst.copy_from_slice(src);
        }
    };
    let tiles = rows.div_ceil(ROW_TILE);
    if parallel {
        pool.for_each(tiles, one);
    } else {
        (0..tiles).for_each(one);
    }
}

/// `y` shared by the tasks of `by_row_tiles`, each writing disjoint runs.
struct SharedRows(*mut f32, usize);

// SAFETY: tasks write disjoint runs (see `by_row_tiles`); nothing reads through it.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// The run `start..start + len`.
    /// SAFETY: in bounds, and no other live reference overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1);
        // SAFETY: in bounds (asserted); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Fast precision (bf16 activations, `vdpbf16ps`): as `matmul_with`, for bf16 weights.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matmul_fast(
    pool: &KernelPool,
    x: &[f32],
    t: usize,
    w: &[u16],
    rows: usize,
    n: usize,
    y: &mut [f32],
    parallel: bool,
) {
    let n_pad = n.div_ceil(avx512::BF16_CHUNK) * avx512::BF16_CHUNK;
    // SAFETY (both calls): `fast_available` detected AVX-512 F/BW/VL and BF16.
    let mut xb = scratch::for_overwrite::<u16>(t * n_pad); // [t, n_pad]
    unsafe { avx512::to_bf16_rows(x, t, n, n_pad, &mut xb) };
    by_row_tiles(pool, rows, t, y, parallel, |r0, out| {
        let here = out.len() / t;
        // SAFETY: as above.
        unsafe { avx512::row_tile_dpbf16(&xb, n_pad, t, &w[r0 * n..(r0 + here) * n], n, out) }
    });
}

/// Computes rows `r0 .. r0 + out.len()/t` of Wᵀ-products into `out` `[t, rows]`.
fn row_tile(x: &[f32], t: usize, w: &Weight, r0: usize, out: &mut [f32]) {
    row_tile_at(simd_level(), x, t, w, r0, out)
}

/// `level` must not exceed what `simd_level()` detected.
fn row_tile_at(level: SimdLevel, x: &[f32], t: usize, w: &Weight, r0: usize, out: &mut [f32]) {
    match level {
        // SAFETY: the CPU features these variants are compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { avx512::row_tile(x, t, w, r0, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { row_tile_avx2(x, t, w, r0, out) },
        SimdLevel::Portable => row_tile_impl::<false>(x, t, w, r0, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_tile_avx2(x: &[f32], t: usize, w: &Weight, r0: usize, out: &mut [f32]) {
    row_tile_impl::<true>(x, t, w, r0, out)
}

/// Portable tile: widen up to four weight rows, then blocked dot products.
#[inline(always)]
fn row_tile_impl<const FMA: bool>(x: &[f32], t: usize, w: &Weight, r0: usize, out: &mut [f32]) {
    let n = w.cols;
    let rows = out.len() / t;
    // Widened copies of up to four weight rows (unused for f32 weights).
    let mut scratch = match w.data {
        WeightData::F32(_) => scratch::for_overwrite::<f32>(0),
        _ => scratch::for_overwrite::<f32>(4 * n),
    };
    let mut r = 0;
    while r < rows {
        let group = (rows - r).min(4);
        let wrows: [&[f32]; 4] = match &w.data {
            WeightData::F32(d) => std::array::from_fn(|i| {
                let row = r0 + r + i.min(group - 1);
                &d[row * n..(row + 1) * n]
            }),
            _ => {
                for i in 0..group {
                    w.row_f32(r0 + r + i, &mut scratch[i * n..(i + 1) * n]);
                }
                let s = &scratch;
                std::array::from_fn(|i| {
                    let i = i.min(group - 1);
                    &s[i * n..(i + 1) * n]
                })
            }
        };
        for tok in 0..t {
            let d = dot_block::<FMA, 1>(wrows, [&x[tok * n..(tok + 1) * n]]);
            for i in 0..group {
                out[tok * rows + r + i] = d[i][0];
            }
        }
        r += group;
    }
}

#[inline(always)]
fn dot_block<const FMA: bool, const T: usize>(w: [&[f32]; 4], x: [&[f32]; T]) -> [[f32; T]; 4] {
    let n = w[0].len();
    let full = n / LANES * LANES;
    let mut acc = [[[0.0f32; LANES]; T]; 4];
    let mut c = 0;
    while c < full {
        let wc: [&[f32; LANES]; 4] =
            std::array::from_fn(|r| w[r][c..c + LANES].try_into().unwrap_or(&[0.0; LANES]));
        let xc: [&[f32; LANES]; T] =
            std::array::from_fn(|j| x[j][c..c + LANES].try_into().unwrap_or(&[0.0; LANES]));
        for r in 0..4 {
            for j in 0..T {
                for l in 0..LANES {
                    acc[r][j][l] = fmadd::<FMA>(wc[r][l], xc[j][l], acc[r][j][l]);
                }
            }
        }
        c += LANES;
    }
    let mut out = [[0.0f32; T]; 4];
    for r in 0..4 {
        for j in 0..T {
            let mut s = lane_sum(&acc[r][j]);
            for i in full..n {
                s = fmadd::<FMA>(w[r][i], x[j][i], s);
            }
            out[r][j] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::{lcg, runnable_levels};
    use crate::tensor::{bf16_to_f32, f32_to_bf16};

    /// The same random matrix as f32 and as bf16, each with the f32 values it holds.
    /// The same random matrix as f32, bf16 and int8, each with the f32 values it stands for.
    fn random_weights(rows: usize, cols: usize, seed: &mut u64) -> [(Weight, Vec<f32>); 3] {
        let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(seed)).collect();
        let bits: Vec<u16> = wf.iter().map(|v| f32_to_bf16(*v)).collect();
        let wb: Vec<f32> = bits.iter().map(|b| bf16_to_f32(*b)).collect();
        let wq = Weight {
            rows,
            cols,
            data: WeightData::F32(wf.clone()),
        }
        .quantize_int8();
        let WeightData::I8 { q, scales } = &wq.data else {
            unreachable!()
        };
        let wi: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * scales[i / cols])
            .collect();
        [
            (
                Weight {
                    rows,
                    cols,
                    data: WeightData::F32(wf.clone()),
                },
                wf,
            ),
            (
                Weight {
                    rows,
                    cols,
                    data: WeightData::BF16(bits),
                },
                wb,
            ),
            (wq, wi),
        ]
    }

    #[test]
    fn int8_rows_are_within_half_a_step_of_the_weights() {
        let mut seed = 21;
        let (rows, cols) = (7, 300);
        let mut wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        wf[cols..2 * cols].fill(0.0); // an all-zero row stays zero
        let w = Weight {
            rows,
            cols,
            data: WeightData::F32(wf.clone()),
        };
        let wq = w.quantize_int8();
        assert_eq!(wq.bytes(), rows * cols + rows * 4);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            wq.row_f32(r, &mut row);
            let orig = &wf[r * cols..(r + 1) * cols];
            let amax = orig.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in row.iter().zip(orig) {
                assert!(
                    (a - b).abs() <= amax / 254.0 * 1.0001,
                    "row {r}: {a} vs {b}"
                );
            }
            // The largest magnitude is represented exactly (±127 steps).
            let at = orig.iter().position(|v| v.abs() == amax).unwrap();
            assert!((row[at].abs() - amax).abs() <= amax * 1e-6, "row {r}");
        }
        let WeightData::I8 { q, .. } = &wq.data else {
            unreachable!()
        };
        assert!(q.iter().all(|&v| v >= -127));
        assert!(q[cols..2 * cols].iter().all(|&v| v == 0));
        // Slicing and stacking keep each row's scale with it.
        let back = Weight::concat_rows(&[wq.slice_rows(4, 7), wq.slice_rows(0, 4)]).unwrap();
        let mut moved = vec![0.0; cols];
        back.row_f32(0, &mut moved);
        wq.row_f32(4, &mut row);
        assert_eq!(moved, row);
    }

    /// f64 reference for `x · Wᵀ`.
    fn reference(x: &[f32], w: &[f32], rows: usize, cols: usize) -> Vec<f64> {
        let t = x.len() / cols;
        let mut y = vec![0.0f64; t * rows];
        for tok in 0..t {
            for r in 0..rows {
                y[tok * rows + r] = (0..cols)
                    .map(|i| x[tok * cols + i] as f64 * w[r * cols + i] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matmul_matches_f64_reference_for_all_shapes_and_dtypes() {
        let pool = KernelPool::new(2);
        let mut seed = 7;
        for &(t, rows, cols) in &[
            (1, 37, 50),
            (3, 64, 16),
            (9, 70, 33),
            (4, 5, 128),
            (17, 33, 100),
        ] {
            let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
            for (w, wref) in random_weights(rows, cols, &mut seed) {
                let wref = &wref;
                let mut y = vec![0.0; t * rows];
                matmul(&pool, false, &x, &w, &mut y, true);
                let r = reference(&x, wref, rows, cols);
                for (a, b) in y.iter().zip(&r) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4,
                        "t={t} {rows}x{cols}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Every kernel variant this CPU can run agrees with the f64 reference, for decode (t < 4)
    /// and prefill shapes, rows not a multiple of 4 and row lengths not a multiple of 16.
    #[test]
    fn every_kernel_level_matches_the_reference() {
        let levels = runnable_levels();
        let mut seed = 3;
        for &(t, rows, cols) in &[(1, 7, 40), (2, 9, 33), (6, 13, 70), (65, 6, 17)] {
            let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
            for (w, wref) in random_weights(rows, cols, &mut seed) {
                let wref = &wref;
                let r = reference(&x, wref, rows, cols);
                for &level in &levels {
                    let mut out = vec![0.0; t * rows]; // [t, rows]
                    row_tile_at(level, &x, t, &w, 0, &mut out);
                    for tok in 0..t {
                        for row in 0..rows {
                            let (a, b) = (out[tok * rows + row] as f64, r[tok * rows + row]);
                            assert!((a - b).abs() < 1e-4, "{level:?} t={t}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// Batch invariance: a token's products are bit-identical whether it is alone (the GEMV
    /// path) or one of many (the blocked GEMM path), at every kernel level and dtype. Decode
    /// results then never depend on which other requests share the step.
    #[test]
    fn a_tokens_result_does_not_depend_on_its_batch() {
        let levels = runnable_levels();
        let mut seed = 11;
        // 5 and 7 tokens: the in-register kernel's 4 + 1..3 token blocks; 9: one token block
        // of the prefill kernel; 70: two.
        for &(rows, cols, t) in &[
            (7, 50, 5),
            (9, 70, 7),
            (9, 70, 9),
            (8, 64, 9),
            (5, 100, 9),
            (6, 40, 70),
        ] {
            let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
            for (w, _) in random_weights(rows, cols, &mut seed) {
                for &level in &levels {
                    let mut all = vec![0.0; t * rows]; // [t, rows]
                    row_tile_at(level, &x, t, &w, 0, &mut all);
                    for tok in 0..t {
                        let mut one = vec![0.0; rows]; // [rows, 1]
                        row_tile_at(level, &x[tok * cols..(tok + 1) * cols], 1, &w, 0, &mut one);
                        for row in 0..rows {
                            assert_eq!(
                                one[row].to_bits(),
                                all[tok * rows + row].to_bits(),
                                "{level:?} {rows}x{cols} token {tok} row {row}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Fast precision (bf16 activations, `vdpbf16ps`) against f64 on the stored weights:
    /// relative L2 error per output row ≤ 3e-3, and a token's result bit-identical alone or in
    /// a batch. Runs only where the CPU has AVX-512 BF16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fast_precision_is_close_to_f64_and_batch_invariant() {
        if !fast_available() {
            eprintln!("this CPU has no AVX-512 BF16: the fast kernel was NOT tested here");
            return;
        }
        let pool = KernelPool::new(2);
        let mut seed = 5;
        for &(t, rows, cols) in &[
            (1, 37, 50),
            (3, 64, 16),
            (9, 70, 33),
            (17, 33, 100),
            (70, 40, 1030),
        ] {
            let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
            let [_, (w, wref), _] = random_weights(rows, cols, &mut seed);
            let WeightData::BF16(bits) = &w.data else {
                unreachable!()
            };
            let mut y = vec![0.0; t * rows];
            matmul_fast(&pool, &x, t, bits, rows, cols, &mut y, false);
            let r = reference(&x, &wref, rows, cols);
            for tok in 0..t {
                let (mut err, mut norm) = (0.0f64, 0.0f64);
                for row in 0..rows {
                    let (a, b) = (y[tok * rows + row] as f64, r[tok * rows + row]);
                    err += (a - b).powi(2);
                    norm += b * b;
                }
                let rel = (err / norm).sqrt();
                assert!(rel <= 3e-3, "t={t} {rows}x{cols} token {tok}: rel L2 {rel}");
                let mut one = vec![0.0; rows];
                matmul_fast(
                    &pool,
                    &x[tok * cols..(tok + 1) * cols],
                    1,
                    bits,
                    rows,
                    cols,
                    &mut one,
                    true,
                );
                for row in 0..rows {
                    assert_eq!(
                        one[row].to_bits(),
                        y[tok * rows + row].to_bits(),
                        "t={t} token {tok}"
                    );
                }
            }
        }
    }
}
