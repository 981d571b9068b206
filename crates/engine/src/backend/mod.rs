//! Compute backends: the one seam between the model and its kernels.
//!
//! The model (`model/qwen35.rs`) and its layers (`model/layers/`) hold the weights and the
//! order of the maths; every kernel they run is a method of [`Backend`], here, with the types
//! it speaks ([`Segment`], [`KvView`], [`SeqId`], the parameter structs below). A backend is a
//! value opened once (from `--device`, `--threads`, `--precision`) that owns its thread pool
//! and precision, so two models in one process may differ in both. The CPU backend
//! (`cpu/`) is the reference and the fast path on CPU-only hosts; a new backend implements
//! this trait and every layer runs on it unchanged. Activations live in host memory in this
//! version of the seam (device buffers come with the first GPU kernels).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod scratch;

use std::fmt;
use std::str::FromStr;

use crate::cache::ModelCache;
pub use crate::cache::{KvView, SeqId};
use crate::config::{AttentionSpec, LinearSpec};
use crate::error::{EngineError, Result};
use crate::tensor::Weight;
pub use cpu::{CpuBackend, CpuOptions, Precision};

/// Every kernel the Qwen3.5 layers call. Shapes are in the doc comments; activations are f32,
/// row-major, packed `[tokens, width]` in segment order.
pub trait Backend: Send + Sync + 'static {
    /// What runs the kernels (device, kernel variant, threads, precision).
    fn describe(&self) -> BackendInfo;

    // Products.

    /// `y = x · Wᵀ`: x `[t, w.cols]` → y `[t, w.rows]`.
    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]);

    // Vector ops and norms.

    /// Rows `tokens[i]` of `table` `[vocab, hidden]`, widened → `out` `[tokens, hidden]`.
    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut [f32]);
    /// Zero-centred RMSNorm `x̂·(1+w)` of every `[w.len()]` row of `x`, in place.
    fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32);
    /// `acc += x`.
    fn add(&self, acc: &mut [f32], x: &[f32]);
    /// Softmax of every `[width]` row of `x`, in place, in f32.
    fn softmax_rows(&self, x: &mut [f32], width: usize);
    /// `acc[r] += sigmoid(gate[r]) · y[r]` for the rows `r` of `acc` and `y` `[gate.len(), _]`.
    fn add_gated(&self, acc: &mut [f32], y: &[f32], gate: &[f32]);

    // Gated attention.

    /// For each token of `seg` in `qkv` `[t, p.width()]` (the batch's rows): RMSNorm and RoPE
    /// of its query heads (in place) and key heads, then its keys and values written to
    /// `cache` at its positions.
    fn rope_and_cache_kv(
        &self,
        p: &AttentionParams<'_>,
        seg: &Segment,
        qkv: &mut [f32],
        cache: &mut ModelCache,
    ) -> Result<()>;
    /// Causal GQA attention of `seg`'s queries (in `qkv`, as above) over `kv` (its keys
    /// `0..seg.start_pos + seg.len`), softmax in f32, each head's output × sigmoid(its gate)
    /// → `out` `[seg.len, heads · head_dim]`.
    fn attention(
        &self,
        p: &AttentionParams<'_>,
        seg: &Segment,
        qkv: &[f32],
        kv: &KvView<'_>,
        out: &mut [f32],
    );

    // Gated DeltaNet.

    /// Depthwise causal conv + SiLU of the first `taps.len() / kernel` channels of each
    /// `[stride]` row of `rows` → `out` `[rows, channels]`, continuing from and updating
    /// `state` `[channels, kernel - 1]` (oldest input first). `taps` is `[kernel, channels]`.
    fn causal_conv(
        &self,
        rows: &[f32],
        stride: usize,
        taps: &[f32],
        state: &mut [f32],
        out: &mut [f32],
    );
    /// The delta rule's inputs of `len` tokens: q and k of each conv row `[len, conv_dim]`
    /// L2-normalised (q also × key_dim^-0.5), in place; from each projected `[stride]` row,
    /// β = sigmoid(b) and g = neg_a · softplus(a + dt_bias) `[len, value_heads]`, where b
    /// (then a) start at `gates_at`.
    #[allow(clippy::too_many_arguments)]
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
    );
    /// The delta rule over every value head of a multi-token segment, chunked (a triangular
    /// solve per chunk, one state update per chunk), then the gated norm → `out`
    /// `[len, value_heads · value_dim]`; `state` `[value_heads, key_dim, value_dim]` updated.
    fn delta_rule_chunked(&self, heads: &DeltaHeads<'_>, state: &mut [f32], out: &mut [f32]);
    /// As `delta_rule_chunked`, token by token (the recurrent form, for decode).
    fn delta_rule_recurrent(&self, heads: &DeltaHeads<'_>, state: &mut [f32], out: &mut [f32]);

    // SwiGLU MLPs and experts.

    /// `down(silu(gate·x) ⊙ up·x)`: x `[t, hidden]` → out `[t, hidden]` (overwritten).
    fn mlp(&self, w: MlpWeights<'_>, x: &[f32], out: &mut [f32]);
    /// Expert `ids[j]`'s MLP (`expert(ids[j])`) on rows `bounds[j]..bounds[j + 1]` of `xs`
    /// `[rows, hidden]` → the same rows of `ys`, for every j (unweighted). Each row's result
    /// is the same bits as `mlp` on that row alone.
    fn expert_groups<'w>(
        &self,
        expert: &(dyn Fn(usize) -> MlpWeights<'w> + Sync),
        ids: &[usize],
        bounds: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    );
}

/// One sequence's tokens inside a packed batch.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub seq: SeqId,
    /// Index of its first token in the packed `[tokens, hidden]` activations.
    pub offset: usize,
    pub len: usize,
    /// Position of its first token in the sequence (tokens already cached).
    pub start_pos: usize,
}

/// A full-attention layer as its kernels see it. Per token, `qkv` holds `[q | gate]` per query
/// head, then the keys, then the values.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    pub layer: usize,
    pub spec: &'a AttentionSpec,
    /// Zero-centred RMSNorm weights of each query / key head, `[head_dim]`.
    pub q_norm: &'a [f32],
    pub k_norm: &'a [f32],
    pub eps: f32,
    /// `[rotary_dim / 2]`: θ^(-2i/rotary_dim).
    pub inv_freq: &'a [f32],
}

impl AttentionParams<'_> {
    /// Floats per token of `qkv`.
    pub fn width(&self) -> usize {
        let s = self.spec;
        (2 * s.heads + 2 * s.kv_heads) * s.head_dim
    }
}

/// The per-head constants of a Gated DeltaNet layer's decay and write strength.
#[derive(Debug, Clone, Copy)]
pub struct DeltaGates<'a> {
    /// `-exp(A_log)`, `[value_heads]`.
    pub neg_a: &'a [f32],
    pub dt_bias: &'a [f32],
}

/// One segment's inputs to the delta rule, every head, and the gated norm that follows it.
#[derive(Debug, Clone, Copy)]
pub struct DeltaHeads<'a> {
    pub spec: &'a LinearSpec,
    /// Conv output rows `[len, conv_dim]`: q (normalised, scaled) | k (normalised) | v.
    pub qkv: &'a [f32],
    /// `[len, value_heads]`.
    pub beta: &'a [f32],
    pub g: &'a [f32],
    pub len: usize,
    /// The norm's gate: z of token i, head h at `z[i · z_stride + h · value_dim..]`.
    pub z: &'a [f32],
    pub z_stride: usize,
    /// Plain (not zero-centred) weight of the gated norm `(w·x̂)·silu(z)`, `[value_dim]`.
    pub norm: &'a [f32],
    pub eps: f32,
}

/// A SwiGLU MLP's weights: `gate_up` `[2·inter, hidden]` (gate rows, then up rows), `down`
/// `[hidden, inter]`.
#[derive(Debug, Clone, Copy)]
pub struct MlpWeights<'a> {
    pub gate_up: &'a Weight,
    pub down: &'a Weight,
}

/// What a backend runs on, for logs and `sluice bench`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub device: Device,
    /// Kernel variant (`avx512f`, `avx2+fma`, `portable`, ...).
    pub kernel: &'static str,
    pub threads: usize,
    pub precision: Precision,
}

impl fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {} threads, {} precision)",
            self.device, self.kernel, self.threads, self.precision
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || EngineError::InvalidArgument {
            field: "device",
            message: format!("`{s}` is not a device: use `cpu` or `cuda:N`"),
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let ordinal = s.strip_prefix("cuda:").ok_or_else(invalid)?;
                ordinal.parse().map(Device::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Opens the backend of this device: the CPU one with `options`; a CUDA device is probed
    /// and refused with a clear error (its kernels are not in this version).
    pub fn open(self, options: CpuOptions) -> Result<CpuBackend> {
        match self {
            Device::Cpu => Ok(CpuBackend::new(options)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let backend = cuda::CudaBackend::open(n)?;
                match backend.kernels {}
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(EngineError::DeviceUnavailable {
                device: self.to_string(),
                reason: "this build has no CUDA support (rebuild with `--features cuda`)".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert!("gpu".parse::<Device>().is_err());
        assert!(Device::Cpu.open(CpuOptions::default()).is_ok());
        let err = Device::Cuda(0)
            .open(CpuOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cuda:0"), "{err}");
    }

    /// A `cuda` build on a host without a driver says what is missing; with a GPU, it names
    /// the device it found and why the model still cannot run there.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_builds_explain_what_is_missing() {
        let err = Device::Cuda(0)
            .open(CpuOptions::default())
            .unwrap_err()
            .to_string();
        // SAFETY: only probes whether the shared library can be loaded.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            assert!(
                err.contains("found") || err.contains("CUDA device"),
                "{err}"
            );
        } else {
            assert!(err.contains("libcuda.so"), "{err}");
        }
        let err = Device::Cuda(4096)
            .open(CpuOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cuda:4096"), "{err}");
    }
}
