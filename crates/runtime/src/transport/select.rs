//! Which cache transports a worker offers, decided once at start-up from `--transport` and
//! `--device`, and advertised in its `WorkerInfo` so the router pairs only workers that share
//! one (preferring in-process, then cuda-ipc, nccl, tcp).

use std::sync::Arc;

use sluice_engine::Device;

use super::device::DeviceTransports;
use super::{CacheTransport, CudaIpcTransport, NcclTransport, TcpTransport, TransportKind};
use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportChoice {
    /// cuda-ipc, nccl and tcp on a CUDA device (those it can run), tcp on the CPU.
    #[default]
    Auto,
    Tcp,
    Nccl,
    CudaIpc,
}

/// Flags of the workers that send (prefill) or receive (decode) caches.
#[derive(clap::Args, Debug, Clone)]
pub struct TransportArgs {
    /// Cache transport: tcp, nccl, cuda-ipc, or auto.
    #[arg(long, env = "SLUICE_TRANSPORT", value_enum, default_value_t = TransportChoice::Auto)]
    pub transport: TransportChoice,
    /// NCCL communicators kept at once (one per peer; least recently used first out).
    #[arg(long, env = "SLUICE_NCCL_COMMUNICATORS", default_value_t = super::DEFAULT_COMMUNICATORS)]
    pub nccl_communicators: usize,
}

/// What a worker offers: the transports, in preference order, and their device side.
#[derive(Clone)]
pub struct TransportPlan {
    pub kinds: Vec<TransportKind>,
    pub device: DeviceTransports,
    pub communicators: usize,
}

impl std::fmt::Debug for TransportPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportPlan")
            .field("kinds", &self.kinds)
            .field("communicators", &self.communicators)
            .finish()
    }
}

impl TransportPlan {
    /// TCP only (CPU workers, tests).
    pub fn tcp() -> Self {
        TransportPlan {
            kinds: vec![TransportKind::Tcp],
            device: DeviceTransports::default(),
            communicators: super::DEFAULT_COMMUNICATORS,
        }
    }

    /// The senders a prefill worker uses, one per kind.
    pub fn senders(&self, sender_id: &str) -> Vec<Arc<dyn CacheTransport>> {
        self.kinds
            .iter()
            .filter_map(|kind| -> Option<Arc<dyn CacheTransport>> {
                match kind {
                    TransportKind::Tcp => Some(Arc::new(TcpTransport::default())),
                    TransportKind::CudaIpc => self
                        .device
                        .ipc
                        .clone()
                        .map(|m| Arc::new(CudaIpcTransport::new(m)) as _),
                    TransportKind::Nccl => self.device.nccl.clone().map(|f| {
                        Arc::new(NcclTransport::new(sender_id, f, self.communicators)) as _
                    }),
                    TransportKind::InProcess => None,
                }
            })
            .collect()
    }
}

impl TransportArgs {
    /// Resolves the flags for a worker on `device`, opening the device's transports.
    pub fn plan(&self, device: Device) -> Result<TransportPlan> {
        plan_with(self.transport, device, cfg!(feature = "cuda"), open_device).map(|plan| {
            TransportPlan {
                communicators: self.nccl_communicators.max(1),
                ..plan
            }
        })
    }
}

#[cfg(feature = "cuda")]
fn open_device(ordinal: usize, ipc: bool, nccl: bool) -> Result<DeviceTransports> {
    super::cuda::device_transports(ordinal, ipc, nccl)
}

#[cfg(not(feature = "cuda"))]
fn open_device(_: usize, _: bool, _: bool) -> Result<DeviceTransports> {
    Err(RuntimeError::Device(
        "this build has no CUDA support".into(),
    ))
}

/// The decision, with the device opener and the build's CUDA support as parameters.
pub(super) fn plan_with(
    choice: TransportChoice,
    device: Device,
    cuda_built: bool,
    open: impl Fn(usize, bool, bool) -> Result<DeviceTransports>,
) -> Result<TransportPlan> {
    let explicit = match choice {
        TransportChoice::Tcp => return Ok(TransportPlan::tcp()),
        TransportChoice::Auto => None,
        TransportChoice::Nccl => Some(TransportKind::Nccl),
        TransportChoice::CudaIpc => Some(TransportKind::CudaIpc),
    };
    let ordinal = match (device, explicit) {
        (Device::Cuda(n), _) if cuda_built => n,
        (_, None) => return Ok(TransportPlan::tcp()),
        (_, Some(kind)) if !cuda_built => {
            return Err(RuntimeError::invalid(
                "transport",
                format!("`{kind}` needs a build with `--features cuda`"),
            ));
        }
        (_, Some(kind)) => {
            return Err(RuntimeError::invalid(
                "transport",
                format!("`{kind}` moves device memory: it needs `--device cuda:N`"),
            ));
        }
    };
    match explicit {
        Some(kind) => {
            let device = open(
                ordinal,
                kind == TransportKind::CudaIpc,
                kind == TransportKind::Nccl,
            )?;
            Ok(TransportPlan {
                kinds: vec![kind],
                device,
                ..TransportPlan::tcp()
            })
        }
        // Whatever of the device transports opens, then tcp; NCCL may be missing alone.
        None => {
            let device = open(ordinal, true, true).or_else(|e| {
                tracing::warn!(error = %e, "NCCL unavailable; offering cuda-ipc and tcp");
                open(ordinal, true, false)
            });
            let device = match device {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "no device transport; offering tcp only");
                    return Ok(TransportPlan::tcp());
                }
            };
            let mut kinds = Vec::new();
            if device.ipc.is_some() {
                kinds.push(TransportKind::CudaIpc);
            }
            if device.nccl.is_some() {
                kinds.push(TransportKind::Nccl);
            }
            kinds.push(TransportKind::Tcp);
            Ok(TransportPlan {
                kinds,
                device,
                ..TransportPlan::tcp()
            })
        }
    }
}
