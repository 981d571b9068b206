//! The NCCL transport: a two-rank communicator per prefill→decode pair, made lazily on the
//! first push (the unique id travels in `CacheTransfer.Handshake`), kept in a bounded pool on
//! both sides (least recently used first out), and one transfer at a time per communicator.
//!
//! A push: `PushNccl` carries the header; the receiver checks it, queues its receives on the
//! communicator (in arrival order) and answers; only then does the sender send the regions,
//! so nothing is ever sent to a receiver that refused. The receiver hands the cache to its
//! inbox once every region has arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_engine::CacheSnapshot;
use sluice_proto::worker::v1 as pb;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::device::{Communicator, CommunicatorFactory};
use super::tcp::{Channels, push_error};
use super::{
    CacheInbox, CacheTransport, Destination, TransferHeader, TransportKind, header_from_pb,
    header_to_pb,
};
use crate::error::{Result, RuntimeError};

/// Communicators one worker keeps by default (each holds device buffers and a proxy thread).
pub const DEFAULT_COMMUNICATORS: usize = 8;

/// How long a receiver waits for its end of a communicator to finish joining.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A communicator and the lock that keeps one transfer at a time on it (FIFO, so receives are
/// queued in the order their pushes were accepted).
pub struct PairComm {
    comm: Arc<dyn Communicator>,
    turn: Arc<AsyncMutex<()>>,
}

impl PairComm {
    pub(super) fn new(comm: Arc<dyn Communicator>) -> Arc<Self> {
        Arc::new(PairComm {
            comm,
            turn: Arc::new(AsyncMutex::new(())),
        })
    }

    async fn turn(&self) -> OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }
}

/// At most `capacity` communicators by key; inserting into a full pool drops the least
/// recently used (a transfer still using it keeps it alive until it ends).
pub struct CommunicatorPool<K> {
    capacity: usize,
    entries: Mutex<HashMap<K, (Arc<PairComm>, Instant)>>,
}

impl<K: std::hash::Hash + Eq + Clone> CommunicatorPool<K> {
    pub fn new(capacity: usize) -> Self {
        CommunicatorPool {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Arc<PairComm>, Instant)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, key: &K) -> Option<Arc<PairComm>> {
        let mut entries = self.lock();
        let (comm, used) = entries.get_mut(key)?;
        *used = Instant::now();
        Some(comm.clone())
    }

    /// Adds `comm` under `key`; returns the key evicted to make room, if any.
    pub fn insert(&self, key: K, comm: Arc<PairComm>) -> Option<K> {
        let mut entries = self.lock();
        let mut evicted = None;
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                entries.remove(&k);
                evicted = Some(k);
            }
        }
        entries.insert(key, (comm, Instant::now()));
        evicted
    }

    pub fn remove(&self, key: &K) {
        self.lock().remove(key);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sending side, on prefill workers.
pub struct NcclTransport {
    sender_id: String,
    factory: Arc<dyn CommunicatorFactory>,
    /// By destination worker id; each remembers its unique id for `PushNccl`.
    pool: CommunicatorPool<crate::WorkerId>,
    ids: Mutex<HashMap<crate::WorkerId, Vec<u8>>>,
    /// One communicator set-up at a time, so concurrent first pushes to a new peer make one.
    creating: AsyncMutex<()>,
    channels: Channels,
}

impl NcclTransport {
    pub fn new(
        sender_id: impl Into<String>,
        factory: Arc<dyn CommunicatorFactory>,
        capacity: usize,
    ) -> Self {
        NcclTransport {
            sender_id: sender_id.into(),
            factory,
            pool: CommunicatorPool::new(capacity),
            ids: Mutex::new(HashMap::new()),
            creating: AsyncMutex::new(()),
            channels: Channels::default(),
        }
    }

    /// Communicators held now.
    pub fn communicators(&self) -> usize {
        self.pool.len()
    }

    fn id_of(&self, dest: &Destination) -> Option<Vec<u8>> {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&dest.worker_id)
            .cloned()
    }

    /// The communicator with `dest`, made on first use.
    async fn communicator(&self, dest: &Destination) -> Result<(Arc<PairComm>, Vec<u8>)> {
        let _creating = self.creating.lock().await;
        if let (Some(comm), Some(id)) = (self.pool.get(&dest.worker_id), self.id_of(dest)) {
            return Ok((comm, id));
        }
        let id = self.factory.unique_id()?;
        let mut client = self.channels.client(&dest.address)?;
        client
            .handshake(pb::HandshakeRequest {
                sender_id: self.sender_id.clone(),
                transport: TransportKind::Nccl.to_pb(),
                payload: id.clone(),
            })
            .await
            .map_err(|status| push_error(dest, status))?;
        // The receiver accepted and is joining as rank 1; join as rank 0.
        let factory = self.factory.clone();
        let join_id = id.clone();
        let comm = tokio::task::spawn_blocking(move || factory.join(&join_id, 0))
            .await
            .map_err(|e| RuntimeError::Internal(format!("communicator set-up panicked: {e}")))??;
        let comm = PairComm::new(comm);
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(evicted) = self.pool.insert(dest.worker_id.clone(), comm.clone()) {
            ids.remove(&evicted);
            tracing::debug!(peer = %evicted, "NCCL communicator evicted");
        }
        ids.insert(dest.worker_id.clone(), id.clone());
        Ok((comm, id))
    }

    fn forget(&self, dest: &Destination) {
        self.pool.remove(&dest.worker_id);
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&dest.worker_id);
    }

    async fn push_once(
        &self,
        dest: &Destination,
        header: &TransferHeader,
        snapshot: &Arc<CacheSnapshot>,
    ) -> Result<u64> {
        let (comm, id) = self.communicator(dest).await?;
        let _turn = comm.turn().await;
        let total = snapshot.total_bytes() as u64;
        self.channels
            .client(&dest.address)?
            .push_nccl(pb::NcclPush {
                header: Some(header_to_pb(header, total)),
                communicator: id,
            })
            .await
            .map_err(|status| push_error(dest, status))?;
        let (comm, snapshot) = (comm.comm.clone(), snapshot.clone());
        tokio::task::spawn_blocking(move || snapshot.regions.iter().try_for_each(|r| comm.send(r)))
            .await
            .map_err(|e| RuntimeError::Internal(format!("NCCL send panicked: {e}")))??;
        Ok(total)
    }
}

#[async_trait]
impl CacheTransport for NcclTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Nccl
    }

    async fn handshake(&self, dest: &Destination) -> Result<()> {
        self.communicator(dest).await.map(drop)
    }

    async fn push(
        &self,
        dest: &Destination,
        header: TransferHeader,
        snapshot: CacheSnapshot,
    ) -> Result<u64> {
        let snapshot = Arc::new(snapshot);
        match self.push_once(dest, &header, &snapshot).await {
            // The receiver dropped its end (restart, or its pool evicted it): set up anew once.
            Err(RuntimeError::Rpc(status))
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains(NO_COMMUNICATOR) =>
            {
                self.forget(dest);
                self.push_once(dest, &header, &snapshot).await
            }
            other => other,
        }
    }
}

const NO_COMMUNICATOR: &str = "no NCCL communicator";

/// The receiving side, on decode workers.
pub struct NcclReceiver {
    factory: Arc<dyn CommunicatorFactory>,
    /// By unique id; joins in progress are waited for.
    pool: CommunicatorPool<Vec<u8>>,
    joining: Mutex<HashMap<Vec<u8>, tokio::sync::watch::Receiver<bool>>>,
}

impl NcclReceiver {
    pub fn new(factory: Arc<dyn CommunicatorFactory>, capacity: usize) -> Self {
        NcclReceiver {
            factory,
            pool: CommunicatorPool::new(capacity),
            joining: Mutex::new(HashMap::new()),
        }
    }

    /// Communicators held now.
    pub fn communicators(&self) -> usize {
        self.pool.len()
    }

    /// Starts joining the communicator `id` as rank 1 and returns at once: the sender joins
    /// as rank 0 once it has this answer.
    pub fn accept(self: &Arc<Self>, sender_id: &str, id: Vec<u8>) -> Result<()> {
        if id.is_empty() {
            return Err(RuntimeError::invalid("payload", "no communicator id"));
        }
        let (done, wait) = tokio::sync::watch::channel(false);
        self.joining
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), wait);
        let this = self.clone();
        let sender = sender_id.to_string();
        tokio::task::spawn_blocking(move || {
            match this.factory.join(&id, 1) {
                Ok(comm) => {
                    if let Some(evicted) = this.pool.insert(id.clone(), PairComm::new(comm)) {
                        tracing::debug!(bytes = evicted.len(), "NCCL communicator evicted");
                    }
                }
                Err(e) => tracing::warn!(%sender, error = %e, "NCCL communicator set-up failed"),
            }
            this.joining
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            let _ = done.send(true);
        });
        Ok(())
    }

    async fn communicator(&self, id: &[u8]) -> Result<Arc<PairComm>> {
        let joining = self
            .joining
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(mut joined) = joining {
            let _ = tokio::time::timeout(JOIN_TIMEOUT, joined.wait_for(|done| *done)).await;
        }
        self.pool.get(&id.to_vec()).ok_or_else(|| {
            RuntimeError::TransferRefused(format!(
                "{NO_COMMUNICATOR} with this id here: handshake again"
            ))
        })
    }

    /// Checks the header, queues the receives behind earlier transfers on the same
    /// communicator and returns; the cache reaches `inbox` when every region has arrived.
    pub async fn receive(&self, inbox: Arc<CacheInbox>, push: pb::NcclPush) -> Result<pb::PushAck> {
        let header = push
            .header
            .as_ref()
            .ok_or_else(|| RuntimeError::invalid("header", "missing"))?;
        let header = header_from_pb(header)?;
        inbox.check(&header)?;
        let comm = self.communicator(&push.communicator).await?;
        let turn = comm.turn().await;
        let transfer_id = header.transfer_id.clone();
        let bytes: u64 = header
            .layout
            .regions
            .iter()
            .map(|r| r.elements as u64 * 4)
            .sum();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut regions: Vec<Vec<u8>> = header
                .layout
                .regions
                .iter()
                .map(|r| vec![0u8; r.elements * 4])
                .collect();
            let received = regions.iter_mut().try_for_each(|r| comm.comm.recv(r));
            let delivered = received.and_then(|()| {
                let snapshot = CacheSnapshot {
                    layout: header.layout.clone(),
                    regions,
                };
                inbox.deliver(header, snapshot)
            });
            if let Err(e) = delivered {
                tracing::warn!(error = %e, "NCCL cache receive failed");
            }
        });
        Ok(pb::PushAck { transfer_id, bytes })
    }
}
