//! Weight storage. Matrices keep their checkpoint dtype (bf16 stays bf16 in memory); the
//! kernels widen to f32 as they read. Small per-channel vectors are widened once at load.

use std::fmt;

use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// Symmetric int8 with one f32 scale per row (`--weights int8`), made at load.
    I8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 => 1,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::I8 => "I8",
        }
    }

    /// Checkpoint dtypes (int8 is made at load, never read from a file).
    pub fn from_safetensors(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// How a model keeps its large matrices in memory (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As the checkpoint stores them (bf16, f16 or f32).
    #[default]
    Checkpoint,
    /// Per-row symmetric int8, quantized at load: half the bytes of bf16 per decode step.
    Int8,
}

impl std::str::FromStr for WeightFormat {
    type Err = crate::error::EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "checkpoint" => Ok(WeightFormat::Checkpoint),
            "int8" => Ok(WeightFormat::Int8),
            _ => Err(crate::error::EngineError::InvalidArgument {
                field: "weights",
                message: format!("`{s}` is not `checkpoint` or `int8`"),
            }),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Checkpoint => "checkpoint",
            WeightFormat::Int8 => "int8",
        })
    }
}

/// Element storage of a weight matrix, in the checkpoint's dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    F32(Vec<f32>),
    /// Raw bf16 bits.
    BF16(Vec<u16>),
    /// Raw IEEE half bits.
    F16(Vec<u16>),
    /// `w[r, c] = q[r, c] · scales[r]`.
    I8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
}

/// A row-major `[rows, cols]` matrix, used as `y = x · Wᵀ` (rows are output features).
#[derive(Debug, Clone, PartialEq)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

/// An empty vector with room for `len` weight values, in memory the kernel is asked to back
/// with transparent huge pages: weights are streamed every step, and 2 MiB pages cut both the
/// page faults while filling it and the TLB misses in the kernels.
pub(crate) fn weight_buffer<T>(len: usize) -> Vec<T> {
    let out: Vec<T> = Vec::with_capacity(len);
    hugepage_hint(out.as_ptr().cast(), len * std::mem::size_of::<T>());
    out
}

#[cfg(target_os = "linux")]
fn hugepage_hint(ptr: *const u8, len: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: advisory only; the range lies inside an allocation this process owns.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn hugepage_hint(_ptr: *const u8, _len: usize) {}

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round-to-nearest-even f32 → bf16 bits (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl Weight {
    pub fn dtype(&self) -> DType {
        match self.data {
            WeightData::F32(_) => DType::F32,
            WeightData::BF16(_) => DType::BF16,
            WeightData::F16(_) => DType::F16,
            WeightData::I8 { .. } => DType::I8,
        }
    }

    /// Bytes the matrix occupies (what a matmul streams from memory).
    pub fn bytes(&self) -> usize {
        let scales = match &self.data {
            WeightData::I8 { scales, .. } => scales.len() * 4,
            _ => 0,
        };
        self.rows * self.cols * self.dtype().size() + scales
    }

    /// Per-row symmetric int8: each row's largest magnitude maps to ±127, values round to the
    /// nearest step (so each is within half a step, `amax / 254`, of the original).
    pub fn quantize_int8(&self) -> Weight {
        let n = self.cols;
        let mut q: Vec<i8> = weight_buffer(self.rows * n);
        q.resize(self.rows * n, 0);
        let mut scales = vec![0.0f32; self.rows];
        q.par_chunks_mut(n.max(1))
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each_init(
                || vec![0.0f32; n],
                |row, (r, (qr, scale))| {
                    self.row_f32(r, row);
                    let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    *scale = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for (o, v) in qr.iter_mut().zip(row.iter()) {
                        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    }
                },
            );
        Weight {
            rows: self.rows,
            cols: n,
            data: WeightData::I8 { q, scales },
        }
    }

    /// Widens row `r` into `out` (len = cols).
    #[inline]
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[range]),
            WeightData::BF16(d) => {
                for (o, &b) in out.iter_mut().zip(&d[range]) {
                    *o = bf16_to_f32(b);
                }
            }
            WeightData::F16(d) => {
                for (o, &b) in out.iter_mut().zip(&d[range]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            WeightData::I8 { q, scales } => {
                let s = scales[r];
                for (o, &v) in out.iter_mut().zip(&q[range]) {
                    *o = v as f32 * s;
                }
            }
        }
    }

    /// Rows `start..end` as a new matrix of the same dtype.
    pub fn slice_rows(&self, start: usize, end: usize) -> Weight {
        let range = start * self.cols..end * self.cols;
        let data = match &self.data {
            WeightData::F32(d) => WeightData::F32(d[range].to_vec()),
            WeightData::BF16(d) => WeightData::BF16(d[range].to_vec()),
            WeightData::F16(d) => WeightData::F16(d[range].to_vec()),
            WeightData::I8 { q, scales } => WeightData::I8 {
                q: q[range].to_vec(),
                scales: scales[start..end].to_vec(),
            },
        };
        Weight {
            rows: end - start,
            cols: self.cols,
            data,
        }
    }

    /// Stacks matrices with equal `cols` and dtype along rows (e.g. gate | up).
    pub fn concat_rows(parts: &[Weight]) -> Option<Weight> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts
            .iter()
            .any(|p| p.cols != cols || p.dtype() != first.dtype())
        {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        fn stack<'a, T: Copy + 'a>(
            parts: impl Iterator<Item = Option<&'a [T]>>,
            len: usize,
        ) -> Vec<T> {
            let mut out = weight_buffer(len);
            parts.for_each(|p| out.extend_from_slice(p.unwrap_or(&[])));
            out
        }
        let len = rows * cols;
        let data = match first.data {
            WeightData::F32(_) => WeightData::F32(stack(parts.iter().map(Weight::as_f32), len)),
            WeightData::BF16(_) => WeightData::BF16(stack(parts.iter().map(Weight::as_u16), len)),
            WeightData::F16(_) => WeightData::F16(stack(parts.iter().map(Weight::as_u16), len)),
            WeightData::I8 { .. } => WeightData::I8 {
                q: stack(parts.iter().map(|p| p.as_i8().map(|(q, _)| q)), len),
                scales: stack(parts.iter().map(|p| p.as_i8().map(|(_, s)| s)), rows),
            },
        };
        Some(Weight { rows, cols, data })
    }

    /// Reorders rows: row `i` of the result is row `order[i]` of `self`.
    pub fn gather_rows(&self, order: &[usize]) -> Weight {
        let parts: Vec<Weight> = order.iter().map(|&r| self.slice_rows(r, r + 1)).collect();
        // Every part has this matrix's cols and dtype, so concatenation cannot fail.
        Weight::concat_rows(&parts).unwrap_or_else(|| self.clone())
    }

    fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            WeightData::F32(d) => Some(d),
            _ => None,
        }
    }

    fn as_u16(&self) -> Option<&[u16]> {
        match &self.data {
            WeightData::BF16(d) | WeightData::F16(d) => Some(d),
            _ => None,
        }
    }

    fn as_i8(&self) -> Option<(&[i8], &[f32])> {
        match &self.data {
            WeightData::I8 { q, scales } => Some((q, scales)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_is_exact_for_representable_values() {
        for x in [0.0f32, 1.0, -2.5, 0.15625, 3.0e38, -1.0e-30] {
            let b = f32_to_bf16(x);
            let back = bf16_to_f32(b);
            assert_eq!(f32_to_bf16(back), b);
            assert!((back - x).abs() <= x.abs() / 128.0, "{x} -> {back}");
        }
    }

    #[test]
    fn concat_and_gather_rows_keep_dtype_and_order() {
        let a = Weight {
            rows: 1,
            cols: 2,
            data: WeightData::BF16(vec![1, 2]),
        };
        let b = Weight {
            rows: 2,
            cols: 2,
            data: WeightData::BF16(vec![3, 4, 5, 6]),
        };
        let c = Weight::concat_rows(&[a, b]).unwrap();
        assert_eq!(c.data, WeightData::BF16(vec![1, 2, 3, 4, 5, 6]));
        let g = c.gather_rows(&[2, 0]);
        assert_eq!(g.data, WeightData::BF16(vec![5, 6, 1, 2]));
    }
}
