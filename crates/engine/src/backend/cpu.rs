//! CPU kernels: the matrix products that dominate every step, and the small vector ops.
//!
//! Matmuls read the weights in their stored dtype and widen them in registers or a small
//! per-thread buffer; activations and accumulation are f32. Work is split over output rows on
//! the kernel pool (`pool.rs`); the inner product kernel is compiled for AVX-512 and AVX2+FMA
//! and picked at run time, with a portable fallback for other machines. Temporary buffers come
//! from per-thread pools (`scratch.rs`): a warmed-up decode step allocates nothing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

pub use delta_rule::delta_rule_token;

use crate::tensor::{Weight, WeightData};

#[cfg(target_arch = "x86_64")]
pub mod aligned;
mod avx512;
mod delta_rule;
pub mod pool;
pub(crate) mod scratch;

/// Output rows handled per task of a multi-token product (a multiple of the 4-row kernel).
const ROW_TILE: usize = 32;
/// Fewest rows in a task of a one-token product (GEMV): the last, smallest tasks of the
/// guided split (a multiple of the 4-row kernel and of `ROW_TILE`).
const GEMV_MIN_ROWS: usize = 2 * ROW_TILE;

const LANES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimdLevel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // The bf16 GEMV needs BW and VL (16-bit masked loads); every AVX-512 server has them.
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    })
}

/// How matrix products treat activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 activations and accumulation: results within the golden tolerances.
    #[default]
    Exact,
    /// Activations rounded to bf16 for products with bf16 weights, f32 accumulation (as GPU
    /// engines do), where the CPU has AVX-512 BF16; elsewhere, and for f32/f16 weights, exact.
    Fast,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Precision::Exact),
            "fast" => Ok(Precision::Fast),
            other => Err(format!("`{other}`: expected exact or fast")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        })
    }
}

static FAST: AtomicBool = AtomicBool::new(false);

/// Sets the precision of every later product (process-wide, like the thread pool); returns
/// the one in effect (fast falls back to exact on a CPU without AVX-512 BF16).
pub fn set_precision(p: Precision) -> Precision {
    let fast = p == Precision::Fast && fast_available();
    FAST.store(fast, Ordering::Relaxed);
    precision()
}

pub fn precision() -> Precision {
    if FAST.load(Ordering::Relaxed) {
        Precision::Fast
    } else {
        Precision::Exact
    }
}

/// Whether fast precision has a kernel on this CPU.
pub fn fast_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static BF16: OnceLock<bool> = OnceLock::new();
        *BF16.get_or_init(|| {
            simd_level() == SimdLevel::Avx512 && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Sizes the kernels' thread pool (and rayon's, used at load time); call once, before the
/// first product.
pub fn set_threads(n: usize) -> Result<(), String> {
    if !pool::configure(n) {
        return Err(format!(
            "the kernel pool already runs with {} threads",
            pool::threads()
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Name of the kernel variant in use (for `sluice bench`).
pub fn kernel_name() -> &'static str {
    match simd_level() {
        SimdLevel::Portable => "portable",
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => "avx2+fma",
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => "avx512f",
    }
}

/// `y = x · Wᵀ`: x `[t, w.cols]`, y `[t, w.rows]`, split over the thread pool by row tiles.
pub fn matmul(x: &[f32], w: &Weight, y: &mut [f32]) {
    matmul_with(x, w, y, true)
}

/// `matmul` on the calling thread only, for callers that already run one product per thread
/// (the experts of a MoE layer).
pub fn matmul_serial(x: &[f32], w: &Weight, y: &mut [f32]) {
    matmul_with(x, w, y, false)
}

fn matmul_with(x: &[f32], w: &Weight, y: &mut [f32], parallel: bool) {
    let t = x.len() / w.cols;
    debug_assert_eq!(x.len(), t * w.cols);
    debug_assert_eq!(y.len(), t * w.rows);
    #[cfg(target_arch = "x86_64")]
    if let (Precision::Fast, true, WeightData::BF16(d)) = (precision(), fast_available(), &w.data) {
        matmul_fast(x, t, d, w.rows, w.cols, y, parallel);
        return;
    }
    by_row_tiles(w.rows, t, y, parallel, |r0, out| row_tile(x, t, w, r0, out));
}

/// `y = x · Wᵀ` for a plain f32 matrix `w` `[rows, cols]` (row-major, e.g. keys gathered for
/// attention): x `[t, cols]`, y `[t, rows]`, split over the pool by row tiles.
pub fn matmul_f32(x: &[f32], w: &[f32], cols: usize, y: &mut [f32]) {
    let rows = w.len() / cols;
    let t = x.len() / cols;
    debug_assert_eq!(y.len(), t * rows);
    let level = simd_level();
    by_row_tiles(rows, t, y, true, |r0, out| {
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
            let share = 2 * pool::threads();
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
            pool::for_each_span_mut(y, &bounds, |i, o| tile(bounds[i], o));
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
        pool::for_each(tiles, one);
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
fn matmul_fast(
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
    by_row_tiles(rows, t, y, parallel, |r0, out| {
        let here = out.len() / t;
        // SAFETY: as above.
        unsafe { avx512::row_tile_dpbf16(&xb, n_pad, t, &w[r0 * n..(r0 + here) * n], n, out) }
    });
}

/// Copies columns `from..from + width` of each `[stride]` row of `src` into `dst` `[rows, width]`.
pub fn split_columns(src: &[f32], stride: usize, from: usize, width: usize, dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(stride).zip(dst.chunks_exact_mut(width)) {
        d.copy_from_slice(&s[from..from + width]);
    }
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
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Dot products of 4 weight rows with `T` activation rows, 16 lanes at a time.
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

#[inline(always)]
fn lane_sum(v: &[f32; LANES]) -> f32 {
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

/// Embedding lookup: row `id` of `w`, widened, into `out`.
pub fn embed_row(w: &Weight, id: usize, out: &mut [f32]) {
    w.row_f32(id, out);
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
pub(crate) mod tests {
    use super::*;
    use crate::tensor::{bf16_to_f32, f32_to_bf16};

    /// Uniform in [-1, 1): a tiny deterministic generator for kernel tests.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

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
                matmul(&x, &w, &mut y);
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

    /// Every kernel level this CPU can run.
    pub(super) fn runnable_levels() -> Vec<SimdLevel> {
        let mut levels = vec![SimdLevel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if simd_level() != SimdLevel::Portable {
                levels.push(SimdLevel::Avx2);
            }
            if simd_level() == SimdLevel::Avx512 {
                levels.push(SimdLevel::Avx512);
            }
        }
        levels
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
            matmul_fast(&x, t, bits, rows, cols, &mut y, false);
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
