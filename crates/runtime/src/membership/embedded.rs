//! In-process membership for `sluice up` and tests: the same trait, no etcd, no leases to lose.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{ExpertPlacement, Membership, Registration, WorkerEvent};
use crate::error::Result;
use crate::worker_info::WorkerInfo;

#[derive(Default)]
struct State {
    workers: BTreeMap<String, WorkerInfo>,
    subscribers: Vec<mpsc::UnboundedSender<WorkerEvent>>,
    placement: Option<ExpertPlacement>,
}

impl State {
    fn publish(&mut self, event: WorkerEvent) {
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }
}

#[derive(Clone)]
pub struct EmbeddedMembership {
    cluster: String,
    state: Arc<Mutex<State>>,
}

impl EmbeddedMembership {
    pub fn new(cluster: impl Into<String>) -> Self {
        EmbeddedMembership {
            cluster: cluster.into(),
            state: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Membership for EmbeddedMembership {
    async fn register(
        &self,
        info: WorkerInfo,
        shutdown: CancellationToken,
    ) -> Result<Registration> {
        let key = info.key(&self.cluster);
        {
            let mut state = self.lock();
            state.workers.insert(key.to_string(), info.clone());
            state.publish(WorkerEvent::Up(info));
        }
        let (tx, rx) = watch::channel(true);
        let this = self.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let mut state = this.lock();
            state.workers.remove(&key.to_string());
            state.publish(WorkerEvent::Down(key));
            let _ = tx.send(false);
        });
        Ok(Registration::new(rx, Arc::default()))
    }

    async fn watch_workers(
        &self,
    ) -> Result<(Vec<WorkerInfo>, mpsc::UnboundedReceiver<WorkerEvent>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        state.subscribers.push(tx);
        Ok((state.workers.values().cloned().collect(), rx))
    }

    async fn placement(&self) -> Result<Option<ExpertPlacement>> {
        Ok(self.lock().placement.clone())
    }

    async fn put_placement(&self, placement: &ExpertPlacement) -> Result<()> {
        self.lock().placement = Some(placement.clone());
        Ok(())
    }
}
