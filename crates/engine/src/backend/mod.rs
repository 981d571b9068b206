//! Compute backends. The CPU backend is the reference and the fast path on CPU-only hosts;
//! the device is chosen once, at start-up, from a [`Device`] value.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt;
use std::str::FromStr;

use crate::error::{EngineError, Result};

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
    /// Fails with a clear error when this build cannot run on the device.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let found = cuda::probe(n)?;
                Err(EngineError::DeviceUnavailable {
                    device: self.to_string(),
                    reason: format!(
                        "{} found, but the model's CUDA kernels are not in this version (run the model with `--device cpu`)",
                        found.name
                    ),
                })
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
        assert!(Device::Cpu.ensure_available().is_ok());
        let err = Device::Cuda(0).ensure_available().unwrap_err().to_string();
        assert!(err.contains("cuda:0"), "{err}");
    }

    /// A `cuda` build on a host without a driver says what is missing; with a GPU, it names
    /// the device it found and why the model still cannot run there.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_builds_explain_what_is_missing() {
        let err = Device::Cuda(0).ensure_available().unwrap_err().to_string();
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
            .ensure_available()
            .unwrap_err()
            .to_string();
        assert!(err.contains("cuda:4096"), "{err}");
    }
}
