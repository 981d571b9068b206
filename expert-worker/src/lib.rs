//! The expert worker: hosts the routed experts of one shard of every MoE layer and answers
//! `Experts.Dispatch`: for each batch (one MoE layer of one step of some model worker) it runs
//! each group's expert on its rows and returns them multiplied by their routing weights.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sluice_engine::{ExpertGroup, ExpertShard};
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::experts_server::{Experts, ExpertsServer};
use sluice_proto::worker::v1::worker_status_server::WorkerStatusServer;
use sluice_runtime::serve::{advertised_address, serve, standard_routes};
use sluice_runtime::status::{LoadCounters, WorkerStatusService, report_health};
use sluice_runtime::wire::{bytes_to_f32s, f32s_to_bytes};
use sluice_runtime::{
    ExpertPlacement, ExpertShardInfo, Membership, Result, Role, RuntimeError, WorkerId, WorkerInfo,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone)]
pub struct ExpertConfig {
    pub worker_id: WorkerId,
    pub advertise: Option<String>,
    pub model_name: String,
    /// `(index, count)`.
    pub shard: (usize, usize),
}

/// The shard a worker hosts: `--shard i/n` when given, else its entry in the placement.
pub fn shard_from_placement(
    placement: Option<&ExpertPlacement>,
    worker: &WorkerId,
) -> Result<(usize, usize)> {
    let placement = placement.ok_or_else(|| {
        RuntimeError::invalid(
            "shard",
            "no --shard given and no expert placement in the cluster: pass --shard INDEX/COUNT",
        )
    })?;
    let index = placement.assignments.get(worker).ok_or_else(|| {
        RuntimeError::invalid(
            "shard",
            format!("the expert placement assigns no shard to worker `{worker}`: pass --shard INDEX/COUNT"),
        )
    })?;
    if *index >= placement.shards {
        return Err(RuntimeError::invalid(
            "shard",
            format!(
                "placement gives `{worker}` shard {index} of {}",
                placement.shards
            ),
        ));
    }
    Ok((*index, placement.shards))
}

/// Parses `INDEX/COUNT`.
pub fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not INDEX/COUNT (e.g. 0/2)"))?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("bad shard index in `{s}`"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("bad shard count in `{s}`"))?;
    if n == 0 || i >= n {
        return Err(format!("shard `{s}` needs INDEX < COUNT"));
    }
    Ok((i, n))
}

/// Serves `Experts` on `listener` with `shard` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    shard: Arc<ExpertShard>,
    membership: Arc<dyn Membership>,
    config: ExpertConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let address = advertised_address(listener.local_addr()?, config.advertise.as_deref());
    let range = shard.range();
    let info = WorkerInfo {
        worker_id: config.worker_id.clone(),
        role: Role::Expert,
        address: address.clone(),
        model_fingerprint: WorkerInfo::fingerprint_hex(shard.fingerprint()),
        model: config.model_name.clone(),
        capacity: 0,
        transports: Vec::new(),
        node: sluice_runtime::worker_info::this_host(),
        expert_shard: Some(ExpertShardInfo {
            index: config.shard.0,
            count: config.shard.1,
            first: range.start,
            end: range.end,
        }),
    };
    let registration = membership.register(info, shutdown.clone()).await?;
    tracing::info!(worker = %config.worker_id, %address, experts = ?range, "expert worker registered");
    let (health, routes) = standard_routes()?;
    report_health(
        health,
        registration.clone(),
        vec!["sluice.worker.v1.Experts"],
        config.worker_id.as_str(),
        shutdown.clone(),
    );
    let counters = Arc::new(LoadCounters::default());
    let service = ExpertsService {
        shard,
        counters: counters.clone(),
    };
    let routes = routes
        .add_service(
            ExpertsServer::new(service)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(WorkerStatusServer::new(WorkerStatusService::new(
            config.worker_id.to_string(),
            counters,
            registration,
        )));
    serve(listener, routes.finish()?, shutdown).await
}

struct ExpertsService {
    shard: Arc<ExpertShard>,
    counters: Arc<LoadCounters>,
}

fn answer(
    shard: &ExpertShard,
    batch: pb::ExpertBatch,
) -> std::result::Result<pb::ExpertResult, Status> {
    if batch.model_fingerprint != shard.fingerprint() {
        return Err(Status::failed_precondition(format!(
            "model fingerprint {:016x} differs from this expert worker's {:016x}",
            batch.model_fingerprint,
            shard.fingerprint()
        )));
    }
    if batch.hidden as usize != shard.hidden() {
        return Err(Status::invalid_argument(format!(
            "hidden size {} differs from the model's {}",
            batch.hidden,
            shard.hidden()
        )));
    }
    let groups = batch
        .groups
        .into_iter()
        .map(|g| {
            Ok(ExpertGroup {
                expert: g.expert as usize,
                weights: g.weights,
                x: bytes_to_f32s(&g.x, "x")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = shard
        .run(batch.layer as usize, &groups)
        .map_err(|e| Status::from(RuntimeError::from(e)))?;
    Ok(pb::ExpertResult {
        outputs: groups
            .iter()
            .zip(outputs)
            .map(|(g, y)| pb::ExpertOutput {
                expert: g.expert as u32,
                y: f32s_to_bytes(&y),
            })
            .collect(),
    })
}

#[tonic::async_trait]
impl Experts for ExpertsService {
    type DispatchStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::ExpertResult, Status>> + Send>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<pb::ExpertBatch>>,
    ) -> std::result::Result<Response<Self::DispatchStream>, Status> {
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let shard = self.shard.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            // Batches of one stream are answered in order; the math runs off the runtime.
            while let Ok(Some(batch)) = input.message().await {
                let shard = shard.clone();
                counters
                    .running
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let result = tokio::task::spawn_blocking(move || answer(&shard, batch))
                    .await
                    .unwrap_or_else(|e| Err(Status::internal(format!("expert task failed: {e}"))));
                counters
                    .running
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_come_from_the_placement() {
        assert_eq!(parse_shard("1/2"), Ok((1, 2)));
        assert!(parse_shard("2/2").is_err());
        assert!(parse_shard("x").is_err());
        let me = WorkerId::new("e1").unwrap();
        let mut placement = ExpertPlacement {
            shards: 3,
            ..Default::default()
        };
        assert!(shard_from_placement(Some(&placement), &me).is_err());
        assert!(shard_from_placement(None, &me).is_err());
        placement.assignments.insert(me.clone(), 2);
        assert_eq!(shard_from_placement(Some(&placement), &me).unwrap(), (2, 3));
    }
}
