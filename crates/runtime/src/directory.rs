//! The live set of workers, kept from the membership watch. A deleted key (graceful revoke or
//! lease expiry) removes its worker at once; a broken watch is re-established from a fresh
//! snapshot, dropping workers that vanished meanwhile.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::keys::{Role, WorkerId};
use crate::membership::{Membership, WorkerEvent};
use crate::worker_info::WorkerInfo;

pub struct WorkerDirectory {
    workers: RwLock<BTreeMap<WorkerId, WorkerInfo>>,
    /// Bumped on every change.
    version: watch::Sender<u64>,
}

impl WorkerDirectory {
    /// Takes the first snapshot (so callers see the cluster as it is now) and follows the
    /// watch on a task until `shutdown`.
    pub async fn start(
        membership: Arc<dyn Membership>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>> {
        let (snapshot, events) = membership.watch_workers().await?;
        let directory = Arc::new(WorkerDirectory {
            workers: RwLock::new(BTreeMap::new()),
            version: watch::channel(0).0,
        });
        directory.replace(snapshot);
        let dir = directory.clone();
        tokio::spawn(async move {
            let mut events = events;
            loop {
                loop {
                    let event = tokio::select! {
                        e = events.recv() => e,
                        () = shutdown.cancelled() => return,
                    };
                    match event {
                        Some(e) => dir.apply(e),
                        None => break,
                    }
                }
                // The watch broke: resubscribe from a fresh snapshot.
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = shutdown.cancelled() => return,
                    }
                    match membership.watch_workers().await {
                        Ok((snapshot, ev)) => {
                            dir.replace(snapshot);
                            events = ev;
                            break;
                        }
                        Err(e) => tracing::warn!("cannot re-establish the membership watch: {e}"),
                    }
                }
            }
        });
        Ok(directory)
    }

    fn replace(&self, snapshot: Vec<WorkerInfo>) {
        let mut map = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        *map = snapshot
            .into_iter()
            .map(|w| (w.worker_id.clone(), w))
            .collect();
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    fn apply(&self, event: WorkerEvent) {
        let mut map = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            WorkerEvent::Up(info) => {
                tracing::info!(worker = %info.worker_id, role = %info.role, address = %info.address, "worker up");
                map.insert(info.worker_id.clone(), info);
            }
            WorkerEvent::Down(key) => {
                tracing::info!(worker = %key.worker, role = %key.role, "worker down");
                map.remove(&key.worker);
            }
        }
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    /// Workers of `role`, ordered by id.
    pub fn workers(&self, role: Role) -> Vec<WorkerInfo> {
        self.workers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|w| w.role == role)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<WorkerInfo> {
        self.workers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &WorkerId) -> Option<WorkerInfo> {
        self.workers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Changes whenever the set of workers does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::EmbeddedMembership;
    use crate::transport::TransportKind;

    fn info(id: &str, role: Role) -> WorkerInfo {
        WorkerInfo {
            worker_id: WorkerId::new(id).unwrap(),
            role,
            address: format!("http://127.0.0.1:1/{id}"),
            model_fingerprint: "0".into(),
            model: "m".into(),
            capacity: 1,
            transports: vec![TransportKind::InProcess],
            node: String::new(),
            expert_shard: None,
        }
    }

    #[tokio::test]
    async fn follows_registrations_and_shutdowns() {
        let membership: Arc<dyn Membership> = Arc::new(EmbeddedMembership::new("t"));
        let before = CancellationToken::new();
        membership
            .register(info("p0", Role::Prefill), before.clone())
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let dir = WorkerDirectory::start(membership.clone(), stop.clone())
            .await
            .unwrap();
        assert_eq!(dir.workers(Role::Prefill).len(), 1);
        let mut changes = dir.changes();

        let d0 = CancellationToken::new();
        membership
            .register(info("d0", Role::Decode), d0.clone())
            .await
            .unwrap();
        changes.changed().await.unwrap();
        assert_eq!(dir.workers(Role::Decode)[0].worker_id.as_str(), "d0");

        d0.cancel();
        changes.changed().await.unwrap();
        assert!(dir.workers(Role::Decode).is_empty());
        assert_eq!(dir.all().len(), 1);
        stop.cancel();
    }
}
