//! CUDA devices (`cuda` feature). The driver is loaded at run time, so a build with the
//! feature starts on hosts without CUDA and says what is missing when a device is asked for.
//! The model's kernels are not here yet: probing a device works, opening its backend is
//! refused with a clear error. [`CudaBackend`] implements the whole [`Backend`] seam so that
//! every call site type-checks against a second backend; it cannot be constructed until its
//! kernels exist (its `kernels` field is uninhabited), so none of its methods can run.

use std::convert::Infallible;

use cudarc::driver::{CudaContext, sys};

use super::{
    AttentionParams, Backend, BackendInfo, DeltaGates, DeltaHeads, KvView, MlpWeights, Segment,
};
use crate::cache::ModelCache;
use crate::config::LinearSpec;
use crate::error::{EngineError, Result};
use crate::tensor::Weight;

/// A CUDA device found and opened: its name and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: usize,
    pub compute_capability: (i32, i32),
}

fn unavailable(ordinal: usize, reason: String) -> EngineError {
    EngineError::DeviceUnavailable {
        device: format!("cuda:{ordinal}"),
        reason,
    }
}

/// Loads the driver and opens `cuda:ordinal`.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(
            ordinal,
            "no CUDA driver (libcuda.so) could be loaded on this host".into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| unavailable(ordinal, format!("the CUDA driver failed: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(unavailable(
            ordinal,
            format!("this host has {count} CUDA device(s)"),
        ));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| unavailable(ordinal, format!("cannot open the device: {e}")))?;
    let failed = |e: cudarc::driver::DriverError| unavailable(ordinal, e.to_string());
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(failed)?,
        memory_bytes: ctx.total_mem().map_err(failed)?,
        compute_capability: ctx.compute_capability().map_err(failed)?,
    })
}

/// The CUDA backend: a device and (one day) its kernels.
pub struct CudaBackend {
    pub info: DeviceInfo,
    /// The model's kernels for this device: none yet, so no value of this type exists.
    pub(super) kernels: Infallible,
}

impl CudaBackend {
    /// Probes `cuda:ordinal`, then refuses: the model's CUDA kernels are not in this version.
    pub fn open(ordinal: usize) -> Result<CudaBackend> {
        let found = probe(ordinal)?;
        Err(unavailable(
            ordinal,
            format!(
                "{} found, but the model's CUDA kernels are not in this version (run the model with `--device cpu`)",
                found.name
            ),
        ))
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> BackendInfo {
        match self.kernels {}
    }
    fn matmul(&self, _: &[f32], _: &Weight, _: &mut [f32]) {
        match self.kernels {}
    }
    fn embed(&self, _: &Weight, _: &[u32], _: &mut [f32]) {
        match self.kernels {}
    }
    fn rms_norm(&self, _: &mut [f32], _: &[f32], _: f32) {
        match self.kernels {}
    }
    fn add(&self, _: &mut [f32], _: &[f32]) {
        match self.kernels {}
    }
    fn softmax_rows(&self, _: &mut [f32], _: usize) {
        match self.kernels {}
    }
    fn add_gated(&self, _: &mut [f32], _: &[f32], _: &[f32]) {
        match self.kernels {}
    }
    fn rope_and_cache_kv(
        &self,
        _: &AttentionParams<'_>,
        _: &Segment,
        _: &mut [f32],
        _: &mut ModelCache,
    ) -> Result<()> {
        match self.kernels {}
    }
    fn attention(
        &self,
        _: &AttentionParams<'_>,
        _: &Segment,
        _: &[f32],
        _: &KvView<'_>,
        _: &mut [f32],
    ) {
        match self.kernels {}
    }
    fn causal_conv(&self, _: &[f32], _: usize, _: &[f32], _: &mut [f32], _: &mut [f32]) {
        match self.kernels {}
    }
    fn delta_inputs(
        &self,
        _: &LinearSpec,
        _: &mut [f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: DeltaGates<'_>,
        _: &mut [f32],
        _: &mut [f32],
    ) {
        match self.kernels {}
    }
    fn delta_rule_chunked(&self, _: &DeltaHeads<'_>, _: &mut [f32], _: &mut [f32]) {
        match self.kernels {}
    }
    fn delta_rule_recurrent(&self, _: &DeltaHeads<'_>, _: &mut [f32], _: &mut [f32]) {
        match self.kernels {}
    }
    fn mlp(&self, _: MlpWeights<'_>, _: &[f32], _: &mut [f32]) {
        match self.kernels {}
    }
    fn expert_groups<'w>(
        &self,
        _: &(dyn Fn(usize) -> MlpWeights<'w> + Sync),
        _: &[usize],
        _: &[usize],
        _: &[f32],
        _: &mut [f32],
    ) {
        match self.kernels {}
    }
}
