//! Cluster membership behind one trait: etcd for real clusters, an in-process store for
//! `sluice up` and tests. Workers register under a lease; the router and model workers watch
//! the workers prefix through a [`WorkerDirectory`](crate::WorkerDirectory).

mod embedded;
mod etcd;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use embedded::EmbeddedMembership;
pub use etcd::EtcdMembership;

use crate::error::Result;
use crate::keys::{WorkerId, WorkerKey};
use crate::worker_info::WorkerInfo;

/// Lease TTL unless configured (DESIGN.md §4).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// Registered or updated.
    Up(WorkerInfo),
    /// Its key was deleted: graceful shutdown or lease expiry.
    Down(WorkerKey),
}

/// Which shard each expert worker hosts, for workers started without `--shard`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExpertPlacement {
    pub shards: usize,
    pub assignments: BTreeMap<WorkerId, usize>,
}

#[async_trait]
pub trait Membership: Send + Sync {
    /// Publishes `info` under its key on a lease kept alive in the background until `shutdown`
    /// is cancelled, when the lease is revoked (the key disappears at once).
    async fn register(&self, info: WorkerInfo, shutdown: CancellationToken)
    -> Result<Registration>;

    /// The workers registered now, and every change after that snapshot. The receiver closes
    /// when the watch breaks; callers take a new snapshot then.
    async fn watch_workers(
        &self,
    ) -> Result<(Vec<WorkerInfo>, mpsc::UnboundedReceiver<WorkerEvent>)>;

    async fn placement(&self) -> Result<Option<ExpertPlacement>>;

    async fn put_placement(&self, placement: &ExpertPlacement) -> Result<()>;
}

/// A worker's registration. `is_registered` is false while the lease is lost and not yet
/// re-established; the worker serves on meanwhile (routers route on the membership they last
/// saw, so an etcd outage stops no request).
#[derive(Debug, Clone)]
pub struct Registration {
    registered: watch::Receiver<bool>,
    /// Times the lease was lost (and re-registered).
    losses: Arc<AtomicU64>,
}

impl Registration {
    pub(crate) fn new(registered: watch::Receiver<bool>, losses: Arc<AtomicU64>) -> Self {
        Registration { registered, losses }
    }

    /// How many times this registration lost its lease.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Resolves at the next change of the registered state (at once when the keeper is gone).
    pub async fn changed(&mut self) -> bool {
        let _ = self.registered.changed().await;
        self.is_registered()
    }

    /// False once the lease keeper has stopped (the worker shut down).
    pub fn has_sender(&self) -> bool {
        self.registered.has_changed().is_ok()
    }
}
