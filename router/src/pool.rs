//! The router's view of the workers: the membership directory plus, per worker, a gRPC
//! channel, the requests this router has in flight on it, and its latest load report (polled).
//! Scheduling policies pick from it; the default is least-loaded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::worker_status_client::WorkerStatusClient;
use sluice_runtime::serve::connect_lazy;
use sluice_runtime::{Role, TransportKind, WorkerDirectory, WorkerId, WorkerInfo};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::RouterError;

pub struct WorkerState {
    pub info: WorkerInfo,
    pub channel: Channel,
    in_flight: AtomicUsize,
    load: Mutex<Option<pb::LoadReport>>,
}

impl WorkerState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn load(&self) -> Option<pb::LoadReport> {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// False when the worker said it lost its registration.
    pub fn accepting(&self) -> bool {
        self.load().is_none_or(|l| l.registered)
    }
}

/// Counts a request against a worker while alive.
pub struct Assignment(Arc<WorkerState>);

impl Assignment {
    pub fn new(state: Arc<WorkerState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Assignment(state)
    }

    pub fn worker(&self) -> &Arc<WorkerState> {
        &self.0
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks one of `candidates` (all of the same role, all able to take the request).
pub trait SchedulingPolicy: Send + Sync {
    fn pick(&self, role: Role, candidates: &[Arc<WorkerState>]) -> Option<usize>;
}

/// Fewest requests: the larger of what this router has in flight there and what the worker
/// last reported (other routers' requests included); ties go to the lower worker id.
pub struct LeastLoaded;

impl SchedulingPolicy for LeastLoaded {
    fn pick(&self, _role: Role, candidates: &[Arc<WorkerState>]) -> Option<usize> {
        let score = |w: &Arc<WorkerState>| {
            let reported = w.load().map_or(0, |l| (l.running + l.waiting) as usize);
            w.in_flight().max(reported)
        };
        (0..candidates.len())
            .min_by_key(|&i| (score(&candidates[i]), candidates[i].info.worker_id.clone()))
    }
}

/// Cache transports in order of preference.
const TRANSPORT_PREFERENCE: [TransportKind; 4] = [
    TransportKind::InProcess,
    TransportKind::CudaIpc,
    TransportKind::Nccl,
    TransportKind::Tcp,
];

pub struct WorkerPool {
    directory: Arc<WorkerDirectory>,
    states: Mutex<HashMap<WorkerId, Arc<WorkerState>>>,
    policy: Box<dyn SchedulingPolicy>,
}

/// A prefill and a decode worker that can work together, and how the cache will move.
pub struct Pair {
    pub prefill: Assignment,
    pub decode: Assignment,
    pub transport: TransportKind,
}

impl WorkerPool {
    pub fn new(directory: Arc<WorkerDirectory>, policy: Box<dyn SchedulingPolicy>) -> Arc<Self> {
        Arc::new(WorkerPool {
            directory,
            states: Mutex::new(HashMap::new()),
            policy,
        })
    }

    /// Current workers of `role` (those whose key disappeared are gone from here at once).
    pub fn workers(&self, role: Role) -> Vec<Arc<WorkerState>> {
        let infos = self.directory.workers(role);
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        infos
            .into_iter()
            .filter_map(|info| {
                if let Some(s) = states.get(&info.worker_id)
                    && s.info == info
                {
                    return Some(s.clone());
                }
                let channel = match connect_lazy(&info.address) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(worker = %info.worker_id, "unusable address: {e}");
                        return None;
                    }
                };
                let state = Arc::new(WorkerState {
                    channel,
                    in_flight: AtomicUsize::new(0),
                    load: Mutex::new(None),
                    info: info.clone(),
                });
                states.insert(info.worker_id, state.clone());
                Some(state)
            })
            .collect()
    }

    /// Chooses a decode worker alone (for prompts it prefills itself).
    pub fn pick_decode(&self) -> Result<Assignment, RouterError> {
        self.choose_decode().map(Assignment::new)
    }

    fn choose_decode(&self) -> Result<Arc<WorkerState>, RouterError> {
        let decodes: Vec<_> = self
            .workers(Role::Decode)
            .into_iter()
            .filter(|w| w.accepting())
            .collect();
        let d = self
            .policy
            .pick(Role::Decode, &decodes)
            .ok_or(RouterError::NoWorker("decode"))?;
        Ok(decodes[d].clone())
    }

    /// Chooses a decode worker, then a prefill worker of the same model sharing a transport.
    pub fn pick_pair(&self) -> Result<Pair, RouterError> {
        let decode = self.choose_decode()?;
        let prefills: Vec<_> = self
            .workers(Role::Prefill)
            .into_iter()
            .filter(|p| {
                p.accepting()
                    && p.info.model_fingerprint == decode.info.model_fingerprint
                    && shared_transport(&p.info, &decode.info).is_some()
            })
            .collect();
        let p = self
            .policy
            .pick(Role::Prefill, &prefills)
            .ok_or(RouterError::NoWorker(
                "prefill (of the decode worker's model, sharing a transport)",
            ))?;
        let prefill = prefills[p].clone();
        let transport = shared_transport(&prefill.info, &decode.info).unwrap_or(TransportKind::Tcp);
        Ok(Pair {
            prefill: Assignment::new(prefill),
            decode: Assignment::new(decode),
            transport,
        })
    }

    /// Polls every prefill and decode worker's load report every `period` until `shutdown`.
    pub fn poll_loads(self: &Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let workers: Vec<_> = [Role::Prefill, Role::Decode]
                    .into_iter()
                    .flat_map(|r| pool.workers(r))
                    .collect();
                let polls = workers.iter().map(|w| async move {
                    let mut client = WorkerStatusClient::new(w.channel.clone());
                    let report =
                        tokio::time::timeout(period, client.load(pb::LoadRequest {})).await;
                    if let Ok(Ok(r)) = report {
                        *w.load.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(r.into_inner());
                    }
                });
                futures::future::join_all(polls).await;
                pool.prune();
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Forgets workers no longer in the directory.
    fn prune(&self) {
        let live: Vec<WorkerId> = self
            .directory
            .all()
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| live.contains(id));
    }

    pub fn views(&self) -> Vec<pb::WorkerView> {
        Role::ALL
            .into_iter()
            .flat_map(|r| self.workers(r))
            .map(|w| pb::WorkerView {
                worker_id: w.info.worker_id.to_string(),
                role: w.info.role.to_string(),
                address: w.info.address.clone(),
                in_flight: w.in_flight() as u32,
                load: w.load(),
            })
            .collect()
    }

    pub fn directory(&self) -> &Arc<WorkerDirectory> {
        &self.directory
    }
}

fn shared_transport(prefill: &WorkerInfo, decode: &WorkerInfo) -> Option<TransportKind> {
    prefill.shared_transport(decode, &TRANSPORT_PREFERENCE)
}
