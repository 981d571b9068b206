//! Model workers' side of remote experts: an [`ExpertExecutor`] that sends, for one MoE layer
//! of one step, every routed row to the expert workers hosting its expert — one message per
//! expert worker, all workers at once — and returns the weighted outputs in request order.
//! Each expert worker is reached over one long-lived `Experts.Dispatch` stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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

/// How long one layer's dispatch may take before the step fails.
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

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
        }
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
            match tokio::time::timeout(DISPATCH_TIMEOUT, stream.rx.message()).await {
                Ok(Ok(Some(result))) => Ok(result),
                Ok(Ok(None)) => Err(unavailable("dispatch stream ended".into())),
                Ok(Err(status)) => Err(match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                        RuntimeError::Rpc(status)
                    }
                    _ => unavailable(status.message().to_string()),
                }),
                Err(_) => Err(unavailable(format!(
                    "no answer within {DISPATCH_TIMEOUT:?}"
                ))),
            }
        }
        .await;
        if outcome.is_err() {
            // The stream is unusable after any failure; the next step opens a new one.
            *guard = None;
        }
        outcome
    }

    /// Which expert worker serves each group: the first (by id) whose shard holds its expert.
    fn plan(
        &self,
        layer: usize,
        groups: &[ExpertGroup],
    ) -> Result<BTreeMap<WorkerId, (WorkerInfo, Vec<usize>)>> {
        let fingerprint = WorkerInfo::fingerprint_hex(self.fingerprint);
        let workers: Vec<WorkerInfo> = self
            .directory
            .workers(Role::Expert)
            .into_iter()
            .filter(|w| w.model_fingerprint == fingerprint)
            .collect();
        let mut plan: BTreeMap<WorkerId, (WorkerInfo, Vec<usize>)> = BTreeMap::new();
        for (i, g) in groups.iter().enumerate() {
            let worker = workers
                .iter()
                .find(|w| w.expert_shard.is_some_and(|s| s.contains(g.expert)))
                .ok_or_else(|| RuntimeError::Unavailable {
                    worker: "expert".into(),
                    message: format!(
                        "no registered expert worker of this model hosts expert {} (layer {layer})",
                        g.expert
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
        let plan = self.plan(layer, groups)?;
        let hidden = groups
            .first()
            .map_or(0, |g| g.x.len() / g.weights.len().max(1));
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
        let started = std::time::Instant::now();
        let results = self.runtime.block_on(futures::future::join_all(calls));
        self.round_trip.observe(started.elapsed().as_secs_f64());
        let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); groups.len()];
        for ((_, members), result) in plan.values().zip(results) {
            let result = result?;
            if result.outputs.len() != members.len() {
                return Err(RuntimeError::Internal(format!(
                    "expert worker answered {} groups for {}",
                    result.outputs.len(),
                    members.len()
                )));
            }
            for (&i, out) in members.iter().zip(result.outputs) {
                outputs[i] = bytes_to_f32s(&out.y, "y")?;
            }
        }
        Ok(outputs)
    }
}

impl ExpertExecutor for RemoteExperts {
    fn run(&self, layer: usize, groups: &[ExpertGroup]) -> sluice_engine::Result<Vec<Vec<f32>>> {
        self.dispatch(layer, groups)
            .map_err(|e| EngineError::Experts(e.to_string()))
    }
}
