//! The CPU backend, the reference every other backend matches: kernels split by concern
//! (`products.rs`, `vector.rs`, `attention.rs`, `gated_delta.rs` with the one-token
//! `delta_rule.rs`, `experts.rs`), compiled for AVX-512 and AVX2+FMA and picked at run time,
//! with a portable fallback. A [`CpuBackend`] owns its kernel pool (`pool.rs`) and its
//! precision; temporaries come from per-thread pools (`../scratch.rs`): a warmed-up decode
//! step allocates nothing.

use std::sync::{Arc, OnceLock};

use super::{
    AttentionParams, Backend, BackendInfo, DeltaGates, DeltaHeads, Device, KvView, MlpWeights,
    Segment,
};
use crate::cache::ModelCache;
use crate::config::LinearSpec;
use crate::error::Result;
use crate::tensor::Weight;

#[cfg(target_arch = "x86_64")]
pub mod aligned;
mod attention;
mod avx512;
mod delta_rule;
mod experts;
pub mod flop_peak;
mod gated_delta;
pub mod pool;
mod products;
pub mod sampling;
pub(crate) mod vector;

pub(crate) use super::scratch;
use pool::KernelPool;
pub use vector::{sigmoid, silu, softplus};

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

    fn from_str(s: &str) -> std::result::Result<Self, String> {
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

/// How a CPU backend is opened: its pool's size and its precision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Threads for the kernels, caller included; `None`: the process's shared pool, one
    /// thread per CPU this process may use (cgroup quota included).
    pub threads: Option<usize>,
    pub precision: Precision,
}

/// The CPU backend: a kernel pool and a precision. Cloning shares the pool.
#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<KernelPool>,
    /// Fast precision, and this CPU has its kernel.
    fast: bool,
}

impl Default for CpuBackend {
    /// Exact precision on the process's shared pool.
    fn default() -> Self {
        CpuBackend::new(CpuOptions::default())
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuBackend({})", self.describe())
    }
}

impl CpuBackend {
    /// A backend with its own pool of `options.threads` (or the shared one) in
    /// `options.precision`; fast falls back to exact on a CPU without AVX-512 BF16 (see
    /// [`CpuBackend::precision`]).
    pub fn new(options: CpuOptions) -> Self {
        let pool = match options.threads {
            Some(n) => Arc::new(KernelPool::new(n)),
            None => shared_pool(),
        };
        CpuBackend {
            pool,
            fast: options.precision == Precision::Fast && fast_available(),
        }
    }

    /// The precision in effect.
    pub fn precision(&self) -> Precision {
        if self.fast {
            Precision::Fast
        } else {
            Precision::Exact
        }
    }

    /// The pool that runs this backend's kernels (for callers that measure the host with the
    /// same threads, e.g. `sluice bench`'s read bandwidth).
    pub fn pool(&self) -> &KernelPool {
        &self.pool
    }
}

/// The pool of backends opened without a size: started on first use, shared so that tests
/// and tools that open many models do not start a pool each.
fn shared_pool() -> Arc<KernelPool> {
    static SHARED: OnceLock<Arc<KernelPool>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            Arc::new(KernelPool::new(n))
        })
        .clone()
}

/// Sizes rayon's global pool, which loading (conversion, quantisation) runs on; call once,
/// before the first load.
pub fn set_load_threads(n: usize) -> std::result::Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| e.to_string())
}

impl Backend for CpuBackend {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            device: Device::Cpu,
            kernel: kernel_name(),
            threads: self.pool.threads(),
            precision: self.precision(),
        }
    }

    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]) {
        products::matmul(&self.pool, self.fast, x, w, y, true)
    }

    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut [f32]) {
        for (&id, row) in tokens.iter().zip(out.chunks_exact_mut(table.cols)) {
            table.row_f32(id as usize, row);
        }
    }

    fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) {
        vector::rms_norm_1p(x, w, eps)
    }

    fn add(&self, acc: &mut [f32], x: &[f32]) {
        vector::add_assign(acc, x)
    }

    fn softmax_rows(&self, x: &mut [f32], width: usize) {
        x.chunks_exact_mut(width).for_each(vector::softmax)
    }

    fn add_gated(&self, acc: &mut [f32], y: &[f32], gate: &[f32]) {
        let width = acc.len() / gate.len().max(1);
        for ((o, y), g) in acc
            .chunks_exact_mut(width.max(1))
            .zip(y.chunks_exact(width.max(1)))
            .zip(gate)
        {
            let s = sigmoid(*g);
            for (ov, yv) in o.iter_mut().zip(y) {
                *ov += s * yv;
            }
        }
    }

    fn rope_and_cache_kv(
        &self,
        p: &AttentionParams<'_>,
        seg: &Segment,
        qkv: &mut [f32],
        cache: &mut ModelCache,
    ) -> Result<()> {
        attention::rope_and_cache_kv(p, seg, qkv, cache)
    }

    fn attention(
        &self,
        p: &AttentionParams<'_>,
        seg: &Segment,
        qkv: &[f32],
        kv: &KvView<'_>,
        out: &mut [f32],
    ) {
        attention::attention(&self.pool, p, seg, qkv, kv, out)
    }

    fn causal_conv(
        &self,
        rows: &[f32],
        stride: usize,
        taps: &[f32],
        state: &mut [f32],
        out: &mut [f32],
    ) {
        gated_delta::causal_conv(rows, stride, taps, state, out)
    }

    fn delta_inputs(
        &self,
        spec: &LinearSpec,
        qkv: &mut [f32],
        rows: &[f32],
        stride: usize,
        gates_at: usize,
        gate_params: DeltaGates<'_>,
        beta: &mut [f32],
        g: &mut [f32],
    ) {
        gated_delta::delta_inputs(spec, qkv, rows, stride, gates_at, gate_params, beta, g)
    }

    fn delta_rule_chunked(&self, heads: &DeltaHeads<'_>, state: &mut [f32], out: &mut [f32]) {
        gated_delta::delta_rule(&self.pool, heads, true, state, out)
    }

    fn delta_rule_recurrent(&self, heads: &DeltaHeads<'_>, state: &mut [f32], out: &mut [f32]) {
        gated_delta::delta_rule(&self.pool, heads, false, state, out)
    }

    fn mlp(&self, w: MlpWeights<'_>, x: &[f32], out: &mut [f32]) {
        experts::mlp(&self.pool, self.fast, w, x, out, true)
    }

    fn expert_groups<'w>(
        &self,
        expert: &(dyn Fn(usize) -> MlpWeights<'w> + Sync),
        ids: &[usize],
        bounds: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    ) {
        experts::expert_groups(&self.pool, self.fast, expert, ids, bounds, xs, ys)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Uniform in [-1, 1): a tiny deterministic generator for kernel tests.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
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

    /// Two backends in one process keep their own precision and pool size.
    #[test]
    fn backends_keep_their_own_precision_and_threads() {
        let exact = CpuBackend::new(CpuOptions {
            threads: Some(1),
            precision: Precision::Exact,
        });
        let fast = CpuBackend::new(CpuOptions {
            threads: Some(3),
            precision: Precision::Fast,
        });
        assert_eq!(exact.describe().threads, 1);
        assert_eq!(fast.describe().threads, 3);
        assert_eq!(exact.precision(), Precision::Exact);
        let want = if fast_available() {
            Precision::Fast
        } else {
            Precision::Exact
        };
        assert_eq!(fast.precision(), want);
        assert_eq!(exact.precision(), Precision::Exact);
    }
}
