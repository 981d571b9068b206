//! CUDA devices (`cuda` feature). The driver is loaded at run time, so a build with the
//! feature starts on hosts without CUDA and says what is missing when a device is asked for.
//! The model's kernels are not here yet: opening a device works, running the model on it is
//! refused with a clear error.

use cudarc::driver::{CudaContext, sys};

use crate::error::{EngineError, Result};

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
