//! Moving a sequence's cache from a prefill worker to a decode worker.
//!
//! A [`CacheTransport`] sends; the decode worker's [`CacheInbox`] receives, checks the model
//! fingerprint and the [`CacheLayout`] before any byte is adopted, and hands the state to the
//! `Decode` call that asked for it (which may start before or after the cache arrives).
//! Implementations: `tcp` (gRPC `CacheTransfer.Push`, chunked, crc32c per chunk),
//! `in-process` (`sluice up`), and the device transports: `cuda-ipc` (same node: the receiver
//! maps the sender's exported buffer) and `nccl` (a communicator per pair, set up by
//! `handshake`); their headers still travel over `CacheTransfer`. Which ones a worker offers
//! is [`select`]ed once at start-up and advertised in its `WorkerInfo`.

#[cfg(feature = "cuda")]
pub mod cuda;
mod cuda_ipc;
pub mod device;
#[cfg(test)]
mod device_tests;
mod in_process;
mod nccl;
pub mod select;
mod service;
mod tcp;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_engine::cache::{RegionKind, RegionLayout};
use sluice_engine::{CacheLayout, CacheSnapshot};
use sluice_proto::worker::v1 as pb;
use tokio::sync::oneshot;

pub use cuda_ipc::CudaIpcTransport;
pub use device::DeviceTransports;
pub use in_process::{InProcessHub, InProcessTransport};
pub use nccl::{CommunicatorPool, DEFAULT_COMMUNICATORS, NcclReceiver, NcclTransport};
pub use select::TransportChoice;
pub use service::CacheTransferService;
pub use tcp::{MAX_PUSH_MESSAGE_BYTES, PushAssembly, TcpTransport};

use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    Tcp,
    InProcess,
    Nccl,
    CudaIpc,
}

impl TransportKind {
    /// Works only between processes of one host. (`in-process` is advertised only inside
    /// one process, whose hub rejects anything else.)
    pub fn same_node_only(self) -> bool {
        self == TransportKind::CudaIpc
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::InProcess => "in-process",
            TransportKind::Nccl => "nccl",
            TransportKind::CudaIpc => "cuda-ipc",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self> {
        [
            TransportKind::Tcp,
            TransportKind::InProcess,
            TransportKind::Nccl,
            TransportKind::CudaIpc,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            RuntimeError::invalid(
                "transport",
                format!("`{s}` is not tcp, in-process, nccl or cuda-ipc"),
            )
        })
    }
}

impl TransportKind {
    /// The wire form (`PrefillRequest.transport`, `HandshakeRequest.transport`).
    pub fn to_pb(self) -> i32 {
        (match self {
            TransportKind::Tcp => pb::TransportKind::Tcp,
            TransportKind::InProcess => pb::TransportKind::InProcess,
            TransportKind::Nccl => pb::TransportKind::Nccl,
            TransportKind::CudaIpc => pb::TransportKind::CudaIpc,
        }) as i32
    }

    /// Reads the wire form of `field`, refusing an unset or unknown value.
    pub fn from_pb(field: &str, value: i32) -> Result<Self> {
        match pb::TransportKind::try_from(value) {
            Ok(pb::TransportKind::Tcp) => Ok(TransportKind::Tcp),
            Ok(pb::TransportKind::InProcess) => Ok(TransportKind::InProcess),
            Ok(pb::TransportKind::Nccl) => Ok(TransportKind::Nccl),
            Ok(pb::TransportKind::CudaIpc) => Ok(TransportKind::CudaIpc),
            Ok(pb::TransportKind::Unspecified) | Err(_) => Err(RuntimeError::invalid(
                field,
                format!("{value} is not a transport (tcp, in-process, nccl or cuda-ipc)"),
            )),
        }
    }
}

/// Where a cache goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub worker_id: crate::WorkerId,
    pub address: String,
}

/// What the decode worker needs besides the cache to continue the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub first_token: u32,
    /// Sampler RNG state after the first token.
    pub rng_state: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransferHeader {
    pub transfer_id: String,
    pub fingerprint: u64,
    pub layout: CacheLayout,
    pub handoff: Handoff,
}

#[async_trait]
pub trait CacheTransport: Send + Sync {
    fn kind(&self) -> TransportKind;

    /// One-time set-up with a receiver before the first push (NCCL: exchange the unique id of
    /// a communicator). Nothing to do for byte-stream transports.
    async fn handshake(&self, _dest: &Destination) -> Result<()> {
        Ok(())
    }

    /// Moves the state to `dest`; returns the bytes moved once the receiver holds it all.
    async fn push(
        &self,
        dest: &Destination,
        header: TransferHeader,
        snapshot: CacheSnapshot,
    ) -> Result<u64>;
}

/// A cache received and checked, waiting for (or handed to) its `Decode` call.
#[derive(Debug)]
pub struct Arrival {
    pub handoff: Handoff,
    pub snapshot: CacheSnapshot,
}

enum Slot {
    Waiting(oneshot::Sender<Arrival>),
    Staged(Arrival, Instant),
}

/// Caches staged longer than this without a `Decode` call asking for them are dropped.
const STAGED_TTL: Duration = Duration::from_secs(60);

type LayoutFn = Box<dyn Fn(usize) -> CacheLayout + Send + Sync>;

/// The decode worker's receiving end, shared by every transport.
pub struct CacheInbox {
    fingerprint: u64,
    layout: LayoutFn,
    slots: Mutex<HashMap<String, Slot>>,
    limits: InboxLimits,
}

/// What one decode worker accepts, checked against a push header before anything is
/// allocated for it: a header may name any size, and the receiver's memory is its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    /// Tokens of one pushed cache (the worker's context limit).
    pub max_tokens: usize,
    /// Caches held at once without their `Decode` call having claimed them.
    pub max_staged: usize,
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits {
            max_tokens: crate::model_host::DEFAULT_MAX_CONTEXT,
            max_staged: 64,
        }
    }
}

impl CacheInbox {
    /// `layout(tokens)` is what this worker's model expects for a sequence of `tokens`.
    pub fn new(
        fingerprint: u64,
        layout: impl Fn(usize) -> CacheLayout + Send + Sync + 'static,
    ) -> Self {
        CacheInbox {
            fingerprint,
            layout: Box::new(layout),
            slots: Mutex::new(HashMap::new()),
            limits: InboxLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: InboxLimits) -> Self {
        self.limits = limits;
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a header whose model or layout differs from ours, before any data is read.
    pub fn check(&self, header: &TransferHeader) -> Result<()> {
        if header.transfer_id.is_empty() {
            return Err(RuntimeError::invalid("transfer_id", "must not be empty"));
        }
        // Before the layout is even computed: its size follows the token count.
        if header.layout.tokens > self.limits.max_tokens {
            return Err(RuntimeError::invalid(
                "header.layout.tokens",
                format!(
                    "a cache of {} tokens is above this worker's limit of {}",
                    header.layout.tokens, self.limits.max_tokens
                ),
            ));
        }
        let staged = self.staged();
        if staged >= self.limits.max_staged {
            return Err(RuntimeError::Overloaded(format!(
                "{staged} caches are already staged here without their Decode call (the limit)"
            )));
        }
        if header.fingerprint != self.fingerprint {
            return Err(RuntimeError::TransferRefused(format!(
                "model fingerprint {:016x} differs from this worker's {:016x}: the workers serve different models",
                header.fingerprint, self.fingerprint
            )));
        }
        let expected = (self.layout)(header.layout.tokens);
        if header.layout != expected {
            return Err(RuntimeError::TransferRefused(format!(
                "cache layout for {} tokens has {} regions ({} elements), this model expects {} regions ({} elements)",
                header.layout.tokens,
                header.layout.regions.len(),
                header
                    .layout
                    .regions
                    .iter()
                    .map(|r| r.elements)
                    .sum::<usize>(),
                expected.regions.len(),
                expected.regions.iter().map(|r| r.elements).sum::<usize>(),
            )));
        }
        Ok(())
    }

    /// Hands a complete, checked cache to its `Decode` call, or stages it until that comes.
    pub fn deliver(&self, header: TransferHeader, snapshot: CacheSnapshot) -> Result<()> {
        self.check(&header)?;
        if snapshot.layout != header.layout
            || snapshot
                .regions
                .iter()
                .zip(&header.layout.regions)
                .any(|(b, r)| b.len() != r.elements * 4)
        {
            return Err(RuntimeError::TransferRefused(
                "the cache bytes do not match their header's layout".into(),
            ));
        }
        let mut arrival = Arrival {
            handoff: header.handoff,
            snapshot,
        };
        let mut slots = self.lock();
        let now = Instant::now();
        slots.retain(
            |_, s| !matches!(s, Slot::Staged(_, at) if now.duration_since(*at) > STAGED_TTL),
        );
        if let Some(Slot::Waiting(tx)) = slots.remove(&header.transfer_id) {
            match tx.send(arrival) {
                Ok(()) => return Ok(()),
                // Its Decode call went away meanwhile.
                Err(back) => arrival = back,
            }
            tracing::debug!(transfer = %header.transfer_id, "cache arrived after its Decode call ended");
            drop(arrival);
            return Ok(());
        }
        slots.insert(header.transfer_id, Slot::Staged(arrival, now));
        Ok(())
    }

    /// Waits up to `timeout` for the cache of `transfer_id`.
    pub async fn take(&self, transfer_id: &str, timeout: Duration) -> Result<Arrival> {
        let rx = {
            let mut slots = self.lock();
            match slots.remove(transfer_id) {
                Some(Slot::Staged(arrival, _)) => return Ok(arrival),
                Some(Slot::Waiting(_)) => {
                    return Err(RuntimeError::invalid(
                        "transfer_id",
                        format!("`{transfer_id}` is already being waited for"),
                    ));
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert(transfer_id.to_string(), Slot::Waiting(tx));
                    rx
                }
            }
        };
        // Removes the waiting slot if this call is dropped or times out.
        struct Forget<'a>(&'a CacheInbox, &'a str);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                let mut slots = self.0.lock();
                if matches!(slots.get(self.1), Some(Slot::Waiting(_))) {
                    slots.remove(self.1);
                }
            }
        }
        let _forget = Forget(self, transfer_id);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(arrival)) => Ok(arrival),
            Ok(Err(_)) => Err(RuntimeError::Internal("cache inbox closed".into())),
            Err(_) => Err(RuntimeError::TransferTimeout(transfer_id.to_string())),
        }
    }

    /// Drops whatever is held for `transfer_id`.
    pub fn forget(&self, transfer_id: &str) {
        self.lock().remove(transfer_id);
    }

    /// Caches received and not yet adopted.
    pub fn staged(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, Slot::Staged(..)))
            .count()
    }

    /// `Decode` calls waiting for their cache.
    pub fn waiting(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, Slot::Waiting(_)))
            .count()
    }
}

fn kind_to_pb(kind: RegionKind) -> pb::RegionKind {
    match kind {
        RegionKind::Keys => pb::RegionKind::Keys,
        RegionKind::Values => pb::RegionKind::Values,
        RegionKind::ConvState => pb::RegionKind::ConvState,
        RegionKind::RecurrentState => pb::RegionKind::RecurrentState,
    }
}

pub fn layout_to_pb(layout: &CacheLayout) -> pb::CacheLayout {
    pb::CacheLayout {
        tokens: layout.tokens as u64,
        regions: layout
            .regions
            .iter()
            .map(|r| pb::Region {
                layer: r.layer as u32,
                kind: kind_to_pb(r.kind) as i32,
                elements: r.elements as u64,
            })
            .collect(),
    }
}

pub fn layout_from_pb(layout: &pb::CacheLayout) -> Result<CacheLayout> {
    let regions = layout
        .regions
        .iter()
        .map(|r| {
            let kind = match pb::RegionKind::try_from(r.kind) {
                Ok(pb::RegionKind::Keys) => RegionKind::Keys,
                Ok(pb::RegionKind::Values) => RegionKind::Values,
                Ok(pb::RegionKind::ConvState) => RegionKind::ConvState,
                Ok(pb::RegionKind::RecurrentState) => RegionKind::RecurrentState,
                _ => {
                    return Err(RuntimeError::invalid(
                        "layout.regions.kind",
                        format!("unknown region kind {}", r.kind),
                    ));
                }
            };
            Ok(RegionLayout {
                layer: r.layer as usize,
                kind,
                elements: r.elements as usize,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CacheLayout {
        tokens: layout.tokens as usize,
        regions,
    })
}

pub fn header_to_pb(h: &TransferHeader, total_bytes: u64) -> pb::CacheHeader {
    pb::CacheHeader {
        transfer_id: h.transfer_id.clone(),
        model_fingerprint: h.fingerprint,
        layout: Some(layout_to_pb(&h.layout)),
        handoff: Some(pb::SequenceHandoff {
            first_token: h.handoff.first_token,
            rng_state: h.handoff.rng_state,
        }),
        total_bytes,
    }
}

pub fn header_from_pb(h: &pb::CacheHeader) -> Result<TransferHeader> {
    let layout = h
        .layout
        .as_ref()
        .ok_or_else(|| RuntimeError::invalid("header.layout", "missing"))?;
    let handoff = h
        .handoff
        .as_ref()
        .ok_or_else(|| RuntimeError::invalid("header.handoff", "missing"))?;
    Ok(TransferHeader {
        transfer_id: h.transfer_id.clone(),
        fingerprint: h.model_fingerprint,
        layout: layout_from_pb(layout)?,
        handoff: Handoff {
            first_token: handoff.first_token,
            rng_state: handoff.rng_state,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn layout(tokens: usize) -> CacheLayout {
        CacheLayout {
            tokens,
            regions: vec![
                RegionLayout {
                    layer: 0,
                    kind: RegionKind::ConvState,
                    elements: 6,
                },
                RegionLayout {
                    layer: 1,
                    kind: RegionKind::Keys,
                    elements: 4 * tokens,
                },
            ],
        }
    }

    fn header(id: &str, fingerprint: u64, tokens: usize) -> TransferHeader {
        TransferHeader {
            transfer_id: id.into(),
            fingerprint,
            layout: layout(tokens),
            handoff: Handoff {
                first_token: 7,
                rng_state: 9,
            },
        }
    }

    fn snapshot(tokens: usize) -> CacheSnapshot {
        let layout = layout(tokens);
        let regions = layout
            .regions
            .iter()
            .map(|r| vec![1u8; r.elements * 4])
            .collect();
        CacheSnapshot { layout, regions }
    }

    #[tokio::test]
    async fn delivers_before_or_after_the_decode_call_asks() {
        let inbox = Arc::new(CacheInbox::new(5, layout));
        inbox.deliver(header("a", 5, 3), snapshot(3)).unwrap();
        assert_eq!(inbox.staged(), 1);
        let got = inbox.take("a", Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.handoff.first_token, 7);
        assert_eq!(inbox.staged(), 0);

        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.take("b", Duration::from_secs(5)).await })
        };
        while inbox.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        inbox.deliver(header("b", 5, 2), snapshot(2)).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().snapshot.layout.tokens, 2);
        assert_eq!(inbox.waiting(), 0);
    }

    #[tokio::test]
    async fn refuses_other_models_and_layouts_and_adopts_nothing() {
        let inbox = CacheInbox::new(5, layout);
        let err = inbox.deliver(header("a", 6, 3), snapshot(3)).unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
        let mut bad = header("b", 5, 3);
        bad.layout.regions.pop();
        let err = inbox.check(&bad).unwrap_err();
        assert!(err.to_string().contains("layout"), "{err}");
        let mut short = snapshot(3);
        short.regions[1].pop();
        assert!(inbox.deliver(header("c", 5, 3), short).is_err());
        assert_eq!(inbox.staged(), 0);
        let err = inbox
            .take("a", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::TransferTimeout(_)));
        assert_eq!(inbox.waiting(), 0, "a timed-out wait leaves nothing behind");
    }

    #[test]
    fn layouts_round_trip_through_proto() {
        let h = header("x", 1, 5);
        let back = header_from_pb(&header_to_pb(&h, 10)).unwrap();
        assert_eq!(back, h);
        for k in ["tcp", "in-process", "nccl", "cuda-ipc"] {
            assert_eq!(k.parse::<TransportKind>().unwrap().as_str(), k);
        }
    }
}
