//! Model workers' side of remote experts: an [`ExpertExecutor`] that sends, for one MoE layer
//! of one step, every routed row to the expert workers hosting its expert — one message per
//! expert worker, all workers at once — and returns the weighted outputs in request order.
//! Each expert worker is reached over one long-lived `Experts.Dispatch` stream.
//!
//! Several expert workers may host the same experts (replicas of a shard): dispatches rotate
//! over them, so they share the load, and a dispatch whose worker fails (dies, stalls past
//! the dispatch timeout, breaks its stream) is sent again to another replica at once — the
//! step survives an expert worker's death. A failed worker is avoided for a back-off while any
//! replica is left. Every replica computes the same bits, so the tokens do not depend on which
//! one answered.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sluice_engine::{EngineError, ExpertExecutor, ExpertGroup};
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::experts_client::ExpertsClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::directory::WorkerDirectory;
use crate::error::{Result, RuntimeError};
use crate::keys::{Role, WorkerId};
use crate::serve::connect_lazy;
use crate::wire::{bytes_to_f32s, f32s_to_bytes};
use crate::worker_info::WorkerInfo;

/// How long one layer's dispatch to one expert worker may take before it counts as failed
/// (`--expert-timeout`).
pub const DEFAULT_DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a failed expert worker is avoided while a replica of its experts is left.
const FAILED_BACKOFF: Duration = Duration::from_secs(2);

struct DispatchStream {
    tx: mpsc::Sender<pb::ExpertBatch>,
    rx: Streaming<pb::ExpertResult>,
}

type StreamSlot = Arc<tokio::sync::Mutex<Option<DispatchStream>>>;

pub struct RemoteExperts {
    directory: Arc<WorkerDirectory>,
    fingerprint: u64,
    runtime: tokio::runtime::Handle,
    streams: Mutex<HashMap<WorkerId, StreamSlot>>,
    round_trip: Arc<crate::metrics::Histogram>,
    timeout: Duration,
    /// Rotates dispatches over replicas.
    turn: AtomicU64,
    /// Workers whose last dispatch failed, and when.
    failed: Mutex<HashMap<WorkerId, Instant>>,
    failovers: Arc<crate::metrics::Counter>,
}

/// `sluice_expert_dispatch_seconds`: one MoE layer's dispatch to every expert worker involved
/// and back, as the model worker waits for it.
pub fn dispatch_histogram() -> Arc<crate::metrics::Histogram> {
    crate::metrics::registry()
        .histogram(
            "sluice_expert_dispatch_seconds",
            "Round trip of one MoE layer's dispatch to the expert workers, seen by a model worker.",
            &[],
            crate::metrics::LATENCY_BUCKETS,
        )
        .with(&[])
}

impl RemoteExperts {
    /// `runtime` runs the RPCs; `run` must be called from outside it (the engine thread).
    pub fn new(
        directory: Arc<WorkerDirectory>,
        fingerprint: u64,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        RemoteExperts {
            directory,
            fingerprint,
            runtime,
            streams: Mutex::new(HashMap::new()),
            round_trip: dispatch_histogram(),
            timeout: DEFAULT_DISPATCH_TIMEOUT,
            turn: AtomicU64::new(0),
            failed: Mutex::new(HashMap::new()),
            failovers: crate::metrics::registry()
                .counter(
                    "sluice_expert_failovers_total",
                    "Expert dispatches sent again to another replica after their expert worker failed.",
                    &[],
                )
                .with(&[]),
        }
    }

    /// How long one dispatch to one expert worker may take before it counts as failed.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn recently_failed(&self, worker: &WorkerId) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(worker)
            .is_some_and(|at| at.elapsed() < FAILED_BACKOFF)
    }

    fn mark_failed(&self, worker: &WorkerId) {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(worker.clone(), Instant::now());
    }

    fn slot(&self, worker: &WorkerId) -> StreamSlot {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(worker.clone())
            .or_default()
            .clone()
    }

    async fn exchange(
        &self,
        worker: &WorkerInfo,
        batch: pb::ExpertBatch,
    ) -> Result<pb::ExpertResult> {
        let unavailable = |message: String| RuntimeError::Unavailable {
            worker: worker.worker_id.to_string(),
            message,
        };
        let slot = self.slot(&worker.worker_id);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            let mut client = ExpertsClient::new(connect_lazy(&worker.address)?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let (tx, rx) = mpsc::channel(4);
            let response = client
                .dispatch(ReceiverStream::new(rx))
                .await
                .map_err(|s| {
                    unavailable(format!("opening the dispatch stream: {}", s.message()))
                })?;
            *guard = Some(DispatchStream {
                tx,
                rx: response.into_inner(),
            });
        }
        let Some(stream) = guard.as_mut() else {
            return Err(RuntimeError::Internal("dispatch stream vanished".into()));
        };
        let outcome = async {
            stream
                .tx
                .send(batch)
                .await
                .map_err(|_| unavailable("dispatch stream closed".into()))?;
            match tokio::time::timeout(self.timeout, stream.rx.message()).await {
                Ok(Ok(Some(result))) => Ok(result),
                Ok(Ok(None)) => Err(unavailable("dispatch stream ended".into())),
                Ok(Err(status)) => Err(match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                        RuntimeError::Rpc(status)
                    }
                    _ => unavailable(status.message().to_string()),
                }),
                Err(_) => Err(unavailable(format!("no answer within {:?}", self.timeout))),
            }
        }
        .await;
        if outcome.is_err() {
            // The stream is unusable after any failure; the next step opens a new one.
            *guard = None;
        }
        outcome
    }

    /// Which expert worker serves each of `todo` (indices into `groups`): of the workers of
    /// this model hosting its expert and not in `excluded`, those not failed recently (all of
    /// them if every one has), in turn. Groups with the same replicas go to the same one.
    fn plan(
        &self,
        layer: usize,
        groups: &[ExpertGroup],
        todo: &[usize],
        excluded: &[WorkerId],
    ) -> Result<BTreeMap<WorkerId, (WorkerInfo, Vec<usize>)>> {
        let fingerprint = WorkerInfo::fingerprint_hex(self.fingerprint);
        let workers: Vec<WorkerInfo> = self
            .directory
            .workers(Role::Expert)
            .into_iter()
            .filter(|w| w.model_fingerprint == fingerprint && !excluded.contains(&w.worker_id))
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        // One look at the failed set per plan, not one per group and host.
        let failed: Vec<&WorkerId> = workers
            .iter()
            .map(|w| &w.worker_id)
            .filter(|id| self.recently_failed(id))
            .collect();
        let mut plan: BTreeMap<WorkerId, (WorkerInfo, Vec<usize>)> = BTreeMap::new();
        for &i in todo {
            let expert = groups[i].expert;
            let hosts: Vec<&WorkerInfo> = workers
                .iter()
                .filter(|w| w.expert_shard.is_some_and(|s| s.contains(expert)))
                .collect();
            let healthy: Vec<&WorkerInfo> = hosts
                .iter()
                .copied()
                .filter(|w| !failed.contains(&&w.worker_id))
                .collect();
            let choice = if healthy.is_empty() { &hosts } else { &healthy };
            let worker = (!choice.is_empty())
                .then(|| choice[turn % choice.len()])
                .ok_or_else(|| RuntimeError::Unavailable {
                    worker: "expert".into(),
                    message: format!(
                        "no registered expert worker of this model hosts expert {expert} (layer {layer}) and is still answering"
                    ),
                })?;
            plan.entry(worker.worker_id.clone())
                .or_insert_with(|| (worker.clone(), Vec::new()))
                .1
                .push(i);
        }
        Ok(plan)
    }

    fn dispatch(&self, layer: usize, groups: &[ExpertGroup]) -> Result<Vec<Vec<f32>>> {
        let hidden = groups
            .first()
            .map_or(0, |g| g.x.len() / g.weights.len().max(1));
        let mut outputs: Vec<Option<Vec<f32>>> = vec![None; groups.len()];
        let mut todo: Vec<usize> = (0..groups.len()).collect();
        // Workers that failed this dispatch: what they had goes to another replica.
        let mut excluded: Vec<WorkerId> = Vec::new();
        let started = std::time::Instant::now();
        while !todo.is_empty() {
            let plan = self.plan(layer, groups, &todo, &excluded)?;
            let calls = plan.values().map(|(worker, members)| {
                let batch = pb::ExpertBatch {
                    layer: layer as u32,
                    hidden: hidden as u32,
                    model_fingerprint: self.fingerprint,
                    groups: members
                        .iter()
                        .map(|&i| pb::ExpertRows {
                            expert: groups[i].expert as u32,
                            weights: groups[i].weights.clone(),
                            x: f32s_to_bytes(&groups[i].x),
                        })
                        .collect(),
                };
                self.exchange(worker, batch)
            });
            let results = self.runtime.block_on(futures::future::join_all(calls));
            todo.clear();
            for ((worker, members), result) in plan.values().zip(results) {
                let result = match result {
                    Ok(r) => r,
                    // The request itself is wrong: no replica would answer otherwise.
                    Err(e @ RuntimeError::Rpc(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(worker = %worker.worker_id, "expert dispatch failed, sending it to another replica: {e}");
                        self.mark_failed(&worker.worker_id);
                        self.failovers.inc();
                        excluded.push(worker.worker_id.clone());
                        todo.extend(members);
                        continue;
                    }
                };
                if result.outputs.len() != members.len() {
                    return Err(RuntimeError::Internal(format!(
                        "expert worker answered {} groups for {}",
                        result.outputs.len(),
                        members.len()
                    )));
                }
                for (&i, out) in members.iter().zip(result.outputs) {
                    outputs[i] = Some(bytes_to_f32s(&out.y, "y")?);
                }
            }
        }
        self.round_trip.observe(started.elapsed().as_secs_f64());
        Ok(outputs.into_iter().map(Option::unwrap_or_default).collect())
    }
}

impl ExpertExecutor for RemoteExperts {
    fn run(&self, layer: usize, groups: &[ExpertGroup]) -> sluice_engine::Result<Vec<Vec<f32>>> {
        self.dispatch(layer, groups)
            .map_err(|e| EngineError::Experts(e.to_string()))
    }
}
