//! AVX-512 matmul kernels. Stored bf16 / int8 weights are widened in registers inside the FMA
//! loop, for any number of tokens: 4 rows × 4 tokens register blocks, over blocks of 64 tokens
//! that stay in L2 while a task's rows pass over them. f32 (and f16, widened once per tile)
//! weights run the same blocks from f32 rows. Every kernel sums a (row, token) product in the
//! same order, so a token's result never depends on its batch.

use std::arch::x86_64::*;

use crate::tensor::{Weight, WeightData};

/// Tokens per block (64 tokens × 4 KiB rows stay in L2).
const TOKEN_BLOCK: usize = 64;
const LANES: usize = 16;
/// How far ahead the products prefetch weights: this many elements, in whole groups of 4 rows.
const PREFETCH_ELEMENTS: usize = 4096;

/// Prefetch hints: weights read by one pass only (up to 4 tokens) are streamed past the caches
/// (`NTA`: +2–3 % decode); weights that later token groups read again are kept (`T0`: `NTA`
/// cost 3–4 % on 32–512-token products with the weights in L3).
const STREAM: i32 = _MM_HINT_NTA;
const KEEP: i32 = _MM_HINT_T0;
/// No prefetch (a pass over rows that an earlier pass already brought in).
const NONE: i32 = -1;
const _: () = assert!(NONE != STREAM && NONE != KEEP);

/// Rows ahead of the current group of 4 that the products prefetch, for rows of `n`.
fn prefetch_rows(n: usize) -> usize {
    (PREFETCH_ELEMENTS / n.max(1)).next_multiple_of(4).max(4)
}

/// Mask for the lanes of the chunk starting at `i` of a row of `n` floats.
#[inline(always)]
fn lane_mask(i: usize, n: usize) -> __mmask16 {
    let rem = n - i;
    if rem >= LANES {
        0xffff
    } else {
        ((1u32 << rem) - 1) as __mmask16
    }
}

/// Callers must have detected AVX-512 F, BW and VL (see `simd_level`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn row_tile(x: &[f32], t: usize, w: &Weight, r0: usize, out: &mut [f32]) {
    let n = w.cols;
    let rows = out.len() / t;
    let here = r0 * n..(r0 + rows) * n;
    match &w.data {
        // Stored bf16 and int8 rows are widened in registers for any number of tokens: a
        // widened f32 copy of the tile was twice the bytes through the caches, and measured
        // slower from batched decode (32 tokens) up to prefill (512).
        WeightData::BF16(d) => gemv(x, t, &Bf16Rows(&d[here]), n, out),
        WeightData::I8 { q, scales } => {
            gemv(x, t, &I8Rows(&q[here], &scales[r0..r0 + rows]), n, out)
        }
        WeightData::F32(d) => tile_products(x, t, &d[here], n, out),
        WeightData::F16(_) => {
            // Widened once into a reused, cache-line-aligned buffer of this thread's pool.
            let mut tile = super::scratch::for_overwrite::<f32>(rows * n);
            for (i, row) in tile.chunks_exact_mut(n).enumerate() {
                w.row_f32(r0 + i, row);
            }
            tile_products(x, t, &tile, n, out);
        }
    }
}

/// `out` `[t, rows]` = x `[t, n]` · tile `[rows, n]` (f32)ᵀ, over blocks of tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn tile_products(x: &[f32], t: usize, tile: &[f32], n: usize, out: &mut [f32]) {
    let rows = out.len() / t;
    for tb in (0..t).step_by(TOKEN_BLOCK) {
        let te = (tb + TOKEN_BLOCK).min(t);
        let mut r = 0;
        while r + 4 <= rows {
            let wr = &tile[r * n..(r + 4) * n];
            let mut tok = tb;
            while tok + 4 <= te {
                let d = dot4x4(wr, &x[tok * n..(tok + 4) * n], n);
                for (i, row) in d.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        out[(tok + j) * rows + r + i] = *v;
                    }
                }
                tok += 4;
            }
            while tok < te {
                let d = dot4x1(wr, &x[tok * n..(tok + 1) * n], n);
                for (i, v) in d.iter().enumerate() {
                    out[tok * rows + r + i] = *v;
                }
                tok += 1;
            }
            r += 4;
        }
        while r < rows {
            for tok in tb..te {
                out[tok * rows + r] =
                    dot1(&tile[r * n..(r + 1) * n], &x[tok * n..(tok + 1) * n], n);
            }
            r += 1;
        }
    }
}

/// Loads 16 bf16 values at `p` (masked) as f32.
#[inline(always)]
unsafe fn load_bf16(p: *const u16, mask: __mmask16) -> __m512 {
    // SAFETY: the caller guarantees the masked-in lanes are in bounds.
    unsafe {
        let bits = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}

/// Weight rows a GEMV reads in their stored form, widened to f32 16 at a time — to exactly the
/// values the tile path widens to (bf16: `Weight::row_f32`'s; int8: the unscaled steps, with
/// the scale applied by `finish` as the tile path does), so both paths agree bit for bit.
trait WideRows {
    fn len(&self) -> usize;
    /// Lanes `at..at + 16` of the rows (from element 0 of row 0), masked.
    /// SAFETY: the masked-in lanes must be in bounds.
    unsafe fn load(&self, at: usize, mask: __mmask16) -> __m512;
    /// Row `row`'s finished dot product (int8: times the row's scale).
    fn finish(&self, _row: usize, dot: f32) -> f32 {
        dot
    }
    /// Asks for the cache line holding element `at` (which may lie past the end: prefetches
    /// do not fault, and the address is only computed, never dereferenced).
    fn prefetch<const HINT: i32>(&self, at: usize);
}

/// bf16 rows.
struct Bf16Rows<'a>(&'a [u16]);

impl WideRows for Bf16Rows<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    unsafe fn load(&self, at: usize, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's bound.
        unsafe { load_bf16(self.0.as_ptr().add(at), mask) }
    }
    #[inline(always)]
    fn prefetch<const HINT: i32>(&self, at: usize) {
        prefetch_line::<HINT>(self.0.as_ptr().wrapping_add(at).cast());
    }
}

#[inline(always)]
fn prefetch_line<const HINT: i32>(p: *const i8) {
    // SAFETY: a prefetch never faults and reads nothing the program sees.
    unsafe {
        match HINT {
            STREAM => _mm_prefetch::<STREAM>(p),
            KEEP => _mm_prefetch::<KEEP>(p),
            _ => {}
        }
    }
}

/// int8 rows with their per-row scales: half the bytes of bf16.
struct I8Rows<'a>(&'a [i8], &'a [f32]);

impl WideRows for I8Rows<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    unsafe fn load(&self, at: usize, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's bound.
        unsafe {
            let bytes = _mm_maskz_loadu_epi8(mask, self.0.as_ptr().add(at));
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))
        }
    }
    fn finish(&self, row: usize, dot: f32) -> f32 {
        dot * self.1[row]
    }
    #[inline(always)]
    fn prefetch<const HINT: i32>(&self, at: usize) {
        prefetch_line::<HINT>(self.0.as_ptr().wrapping_add(at).cast());
    }
}

/// y[tok, r] for `t` tokens and all rows of `w` (`[rows, n]`, contiguous), in blocks of 4 rows
/// × up to 4 tokens, widening the stored weights in registers (no f32 copy of the tile). Each
/// (row, token) keeps one accumulator that sums the 16-lane chunks in order, exactly as
/// `dot4x4` does: a token's result is bit-identical whatever its batch (batch-invariant
/// decoding) and whichever kernel its weights' dtype selects.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn gemv<W: WideRows>(x: &[f32], t: usize, w: &W, n: usize, out: &mut [f32]) {
    let rows = w.len() / n;
    assert!(x.len() >= t * n && out.len() >= rows * t);
    for tb in (0..t).step_by(TOKEN_BLOCK) {
        let te = (tb + TOKEN_BLOCK).min(t);
        gemv_tokens(x, tb..te, t, w, n, out);
    }
}

/// `gemv` for the tokens `toks` only (a block whose rows stay in L2 while every group of 4
/// weight rows passes over them).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn gemv_tokens<W: WideRows>(
    x: &[f32],
    toks: std::ops::Range<usize>,
    t: usize,
    w: &W,
    n: usize,
    out: &mut [f32],
) {
    let rows = w.len() / n;
    let mut r = 0;
    while r < rows {
        let group = (rows - r).min(4);
        let mut tok = toks.start;
        while tok < toks.end {
            let tg = (toks.end - tok).min(4);
            // Only the first pass over these rows asks for the next ones.
            let d = if tok != toks.start {
                gemv_group::<W, NONE>(tg, x, tok, w, r, group, n)
            } else if t <= 4 {
                gemv_group::<W, STREAM>(tg, x, tok, w, r, group, n)
            } else {
                gemv_group::<W, KEEP>(tg, x, tok, w, r, group, n)
            };
            for (g, row) in d.iter().enumerate().take(group) {
                for (j, v) in row.iter().enumerate().take(tg) {
                    out[(tok + j) * rows + r + g] = w.finish(r + g, *v);
                }
            }
            tok += tg;
        }
        r += group;
    }
}

/// `gemv_block` for `tg` (1..=4) tokens.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
fn gemv_group<W: WideRows, const HINT: i32>(
    tg: usize,
    x: &[f32],
    tok: usize,
    w: &W,
    r: usize,
    group: usize,
    n: usize,
) -> [[f32; 4]; 4] {
    match tg {
        1 => gemv_block::<W, 1, HINT>(x, tok, w, r, group, n),
        2 => gemv_block::<W, 2, HINT>(x, tok, w, r, group, n),
        3 => gemv_block::<W, 3, HINT>(x, tok, w, r, group, n),
        _ => gemv_block::<W, 4, HINT>(x, tok, w, r, group, n),
    }
}

/// Rows `r..r + group` (≤ 4) × tokens `tok..tok + T` (T ≤ 4) of `gemv`: unfinished dot
/// products, `[row][token]`. Asks for the rows ahead meanwhile with `HINT` (`NONE`: not).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn gemv_block<W: WideRows, const T: usize, const HINT: i32>(
    x: &[f32],
    tok: usize,
    w: &W,
    r: usize,
    group: usize,
    n: usize,
) -> [[f32; 4]; 4] {
    assert!(T <= 4 && x.len() >= (tok + T) * n && group <= 4 && (r + group) * n <= w.len());
    let pairs = n / (2 * LANES) * (2 * LANES);
    let xp: [*const f32; T] = std::array::from_fn(|j| x[(tok + j) * n..].as_ptr());
    // Rows ahead, walked in address order at this group's pace (4 × 32 elements per step):
    // DRAM then sees one sequential stream per thread, as a plain read does. Prefetching the
    // same place in each next row (four interleaved streams) reached 0.83 of the machine's
    // read bandwidth, this 1.0 (docs/performance.md).
    let ahead = (r + prefetch_rows(n)) * n;
    let mut acc = [[_mm512_setzero_ps(); T]; 4];
    let mut i = 0;
    while i < pairs {
        // SAFETY: i + 32 <= n: both chunks of each of the T token rows and of each row
        // `r + g` (< r + group) are in bounds (asserted above).
        unsafe {
            let x0: [__m512; T] = std::array::from_fn(|j| _mm512_loadu_ps(xp[j].add(i)));
            let x1: [__m512; T] = std::array::from_fn(|j| _mm512_loadu_ps(xp[j].add(i + LANES)));
            for (g, a) in acc.iter_mut().enumerate().take(group) {
                let at = (r + g) * n + i;
                w.prefetch::<HINT>(ahead + 4 * i + g * 2 * LANES);
                let w0 = w.load(at, 0xffff);
                let w1 = w.load(at + LANES, 0xffff);
                for j in 0..T {
                    a[j] = _mm512_fmadd_ps(w0, x0[j], a[j]);
                    a[j] = _mm512_fmadd_ps(w1, x1[j], a[j]);
                }
            }
        }
        i += 2 * LANES;
    }
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: masked-in lanes stay inside each token row and each weight row.
        unsafe {
            let xv: [__m512; T] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(m, xp[j].add(i)));
            for (g, a) in acc.iter_mut().enumerate().take(group) {
                let wv = w.load((r + g) * n + i, m);
                for j in 0..T {
                    a[j] = _mm512_fmadd_ps(wv, xv[j], a[j]);
                }
            }
        }
        i += LANES;
    }
    let mut d = [[0.0f32; 4]; 4];
    for (dg, ag) in d.iter_mut().zip(&acc).take(group) {
        for (v, a) in dg.iter_mut().zip(ag) {
            *v = _mm512_reduce_add_ps(*a);
        }
    }
    d
}

/// Dot products of 4 consecutive weight rows with 4 consecutive tokens (`n` floats each).
#[target_feature(enable = "avx512f")]
fn dot4x4(w: &[f32], x: &[f32], n: usize) -> [[f32; 4]; 4] {
    assert!(w.len() >= 4 * n && x.len() >= 4 * n);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: every masked-in lane is below n within its row (asserted lengths).
        unsafe {
            let wv = [
                _mm512_maskz_loadu_ps(m, wp.add(i)),
                _mm512_maskz_loadu_ps(m, wp.add(n + i)),
                _mm512_maskz_loadu_ps(m, wp.add(2 * n + i)),
                _mm512_maskz_loadu_ps(m, wp.add(3 * n + i)),
            ];
            let xv = [
                _mm512_maskz_loadu_ps(m, xp.add(i)),
                _mm512_maskz_loadu_ps(m, xp.add(n + i)),
                _mm512_maskz_loadu_ps(m, xp.add(2 * n + i)),
                _mm512_maskz_loadu_ps(m, xp.add(3 * n + i)),
            ];
            for r in 0..4 {
                for j in 0..4 {
                    acc[r][j] = _mm512_fmadd_ps(wv[r], xv[j], acc[r][j]);
                }
            }
        }
        i += LANES;
    }
    let mut out = [[0.0f32; 4]; 4];
    for r in 0..4 {
        for j in 0..4 {
            out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
        }
    }
    out
}

#[target_feature(enable = "avx512f")]
fn dot4x1(w: &[f32], x: &[f32], n: usize) -> [f32; 4] {
    assert!(w.len() >= 4 * n && x.len() >= n);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as in dot4x4.
        unsafe {
            let xv = _mm512_maskz_loadu_ps(m, xp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wp.add(r * n + i)), xv, *a);
            }
        }
        i += LANES;
    }
    acc.map(|a| _mm512_reduce_add_ps(a))
}

#[target_feature(enable = "avx512f")]
fn dot1(w: &[f32], x: &[f32], n: usize) -> f32 {
    assert!(w.len() >= n && x.len() >= n);
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: masked-in lanes are below n.
        unsafe {
            acc = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, w.as_ptr().add(i)),
                _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)),
                acc,
            );
        }
        i += LANES;
    }
    _mm512_reduce_add_ps(acc)
}

/// Elements per `vdpbf16ps`: 16 lanes of bf16 pairs.
pub(super) const BF16_CHUNK: usize = 32;

/// `x` `[t, n]` rounded to bf16 (nearest even) into `out` `[t, n_pad]`, `n_pad` being `n`
/// rounded up to 32 (the padding is written as zeros): the activations of the fast-precision
/// product. Every element of `out[..t * n_pad]` is written.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn to_bf16_rows(x: &[f32], t: usize, n: usize, n_pad: usize, out: &mut [u16]) {
    assert!(out.len() >= t * n_pad && n_pad == n.div_ceil(BF16_CHUNK) * BF16_CHUNK);
    for (row, dst) in x.chunks_exact(n).take(t).zip(out.chunks_exact_mut(n_pad)) {
        let mut i = 0;
        while i < n {
            let lo_m = lane_mask(i, n);
            let hi_m = if i + LANES < n {
                lane_mask(i + LANES, n)
            } else {
                0
            };
            // SAFETY: masked-in lanes are below n in `row`; dst has n_pad ≥ i + 32 elements.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lo_m, row.as_ptr().add(i));
                let hi = _mm512_maskz_loadu_ps(hi_m, row.as_ptr().add(i + LANES));
                let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut __m512i, b);
            }
            i += BF16_CHUNK;
        }
    }
}

/// Fast precision: y[tok, r] = Σ bf16(x)·w with f32 accumulation by `vdpbf16ps`, 4 rows × up
/// to 4 tokens per block, for any `t` (one accumulator per row and token, chunks in order, so a
/// token's result does not depend on its batch). `xb` is `to_bf16_rows(x)`, `n_pad` its row
/// length; `w` bf16 `[rows, n]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn row_tile_dpbf16(
    xb: &[u16],
    n_pad: usize,
    t: usize,
    w: &[u16],
    n: usize,
    out: &mut [f32],
) {
    let rows = w.len() / n;
    assert!(xb.len() >= t * n_pad && out.len() >= rows * t && t > 0 && n_pad >= n);
    // Blocks of tokens that stay in L2 while the rows pass over them, as in `gemv`.
    for tb in (0..t).step_by(TOKEN_BLOCK) {
        dpbf16_tokens(xb, n_pad, tb..(tb + TOKEN_BLOCK).min(t), t, w, n, out);
    }
}

/// `row_tile_dpbf16` for the tokens `toks` only.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn dpbf16_tokens(
    xb: &[u16],
    n_pad: usize,
    toks: std::ops::Range<usize>,
    t: usize,
    w: &[u16],
    n: usize,
    out: &mut [f32],
) {
    let rows = w.len() / n;
    let mut r = 0;
    while r < rows {
        let group = (rows - r).min(4);
        let rp: [*const u16; 4] = std::array::from_fn(|g| w[(r + g.min(group - 1)) * n..].as_ptr());
        let mut tok = toks.start;
        while tok < toks.end {
            let tg = (toks.end - tok).min(4);
            let x0 = &xb[tok * n_pad..(tok + tg) * n_pad];
            // As in `gemv_tokens`: only the first pass prefetches.
            let acc = if tok != toks.start {
                dpbf16_group::<NONE>(tg, rp, x0, n_pad, n)
            } else if t <= 4 {
                dpbf16_group::<STREAM>(tg, rp, x0, n_pad, n)
            } else {
                dpbf16_group::<KEEP>(tg, rp, x0, n_pad, n)
            };
            for (g, row) in acc.iter().enumerate().take(group) {
                for (j, v) in row.iter().enumerate().take(tg) {
                    out[(tok + j) * rows + r + g] = *v;
                }
            }
            tok += 4;
        }
        r += group;
    }
}

/// `dpbf16_block` for `tg` (1..=4) tokens.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn dpbf16_group<const HINT: i32>(
    tg: usize,
    rp: [*const u16; 4],
    x: &[u16],
    n_pad: usize,
    n: usize,
) -> [[f32; 4]; 4] {
    match tg {
        1 => dpbf16_block::<1, HINT>(rp, x, n_pad, n),
        2 => dpbf16_block::<2, HINT>(rp, x, n_pad, n),
        3 => dpbf16_block::<3, HINT>(rp, x, n_pad, n),
        _ => dpbf16_block::<4, HINT>(rp, x, n_pad, n),
    }
}

/// 4 weight rows (`rp`, `n` bf16 each) against `T` bf16 activation rows of `x` (`n_pad` each),
/// prefetching the rows ahead with `HINT` (`NONE`: not).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn dpbf16_block<const T: usize, const HINT: i32>(
    rp: [*const u16; 4],
    x: &[u16],
    n_pad: usize,
    n: usize,
) -> [[f32; 4]; 4] {
    assert!(x.len() >= T * n_pad);
    // As in `gemv_block`: the rows ahead in address order.
    let ahead = rp[0].wrapping_add(prefetch_rows(n) * n);
    let mut acc = [[_mm512_setzero_ps(); T]; 4];
    let mut i = 0;
    while i < n {
        let rem = n - i;
        let m: __mmask32 = if rem >= BF16_CHUNK {
            u32::MAX
        } else {
            (1u32 << rem) - 1
        };
        // SAFETY: the caller's weight rows have n elements (masked-in lanes are below n);
        // activation rows have n_pad ≥ i + 32 elements (asserted).
        unsafe {
            let xv: [__m512bh; T] = std::array::from_fn(|j| {
                std::mem::transmute(_mm512_loadu_si512(
                    x.as_ptr().add(j * n_pad + i) as *const __m512i
                ))
            });
            for (g, row_acc) in acc.iter_mut().enumerate() {
                prefetch_line::<HINT>(ahead.wrapping_add(4 * i + g * BF16_CHUNK).cast());
                let wv: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(m, rp[g].add(i) as *const i16));
                for (a, xj) in row_acc.iter_mut().zip(&xv) {
                    *a = _mm512_dpbf16_ps(*a, wv, *xj);
                }
            }
        }
        i += BF16_CHUNK;
    }
    let mut out = [[0.0f32; 4]; 4];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (v, lane) in o.iter_mut().zip(a) {
            *v = _mm512_reduce_add_ps(*lane);
        }
    }
    out
}
