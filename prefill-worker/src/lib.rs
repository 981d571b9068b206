//! The prefill worker: runs prompts (several per step when they arrive together), samples each
//! first token, and pushes the resulting cache to the decode worker the router chose.
//!
//! The model runs on one engine thread fed by a queue; the gRPC side only validates, queues,
//! and moves the cache with a [`CacheTransport`].

mod metrics;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_engine::{
    CacheConfig, CacheSnapshot, EngineError, LanguageModel, LogitsMode, Sampled, Sampler,
    SamplingParams, SeqChunk,
};
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::prefill_server::{Prefill, PrefillServer};
use sluice_proto::worker::v1::worker_status_server::WorkerStatusServer;
use sluice_runtime::engine_thread::EngineWatch;
use sluice_runtime::error::engine_status;
use sluice_runtime::serve::{advertised_address, serve_draining, standard_routes};
use sluice_runtime::status::{LoadCounters, WorkerStatusService, report_health};
use sluice_runtime::transport::TransferHeader;
use sluice_runtime::{
    CacheTransport, Destination, Handoff, Membership, Result, Role, RuntimeError, WorkerId,
    WorkerInfo, sampling,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::metrics::PrefillMetrics;

#[derive(Debug, Clone)]
pub struct PrefillConfig {
    pub worker_id: WorkerId,
    pub advertise: Option<String>,
    pub model_name: String,
    /// Tokens of all prompts in one batch (a longer prompt runs alone).
    pub max_batch_tokens: usize,
    /// Prompts in one batch.
    pub max_batch_prompts: usize,
    /// Prompts queued here before new ones are refused (RESOURCE_EXHAUSTED).
    pub max_waiting: usize,
    /// Longest prompt accepted.
    pub max_context: usize,
    /// Prompt tokens per forward pass of one sequence.
    pub prefill_chunk: usize,
    /// The host it runs on (same-node transports).
    pub node: String,
    /// After shutdown is asked, how long calls in flight may still finish.
    pub drain_timeout: Duration,
}

impl PrefillConfig {
    pub fn new(worker_id: WorkerId, model_name: String) -> Self {
        PrefillConfig {
            worker_id,
            advertise: None,
            model_name,
            max_batch_tokens: 4096,
            max_batch_prompts: 8,
            max_waiting: 64,
            max_context: 8192,
            prefill_chunk: sluice_engine::DEFAULT_PREFILL_CHUNK,
            node: sluice_runtime::worker_info::this_host(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A prompt run to its first token.
struct Prefilled {
    first: Sampled,
    rng_state: u64,
    snapshot: CacheSnapshot,
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    /// Shared: one failed batch fails every prompt in it with the same error.
    reply: oneshot::Sender<Result<Prefilled, Arc<EngineError>>>,
}

/// Serves `Prefill` on `listener` and registers in `membership` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    model: Arc<dyn LanguageModel>,
    membership: Arc<dyn Membership>,
    transports: Vec<Arc<dyn CacheTransport>>,
    config: PrefillConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let address = advertised_address(listener.local_addr()?, config.advertise.as_deref());
    let counters = Arc::new(LoadCounters::default());
    let metrics = Arc::new(PrefillMetrics::new(config.worker_id.as_str()));
    // Registration and server stop on `worker`: at shutdown, or when the engine thread dies.
    let worker = shutdown.child_token();
    let (jobs, engine) = start_engine(model.clone(), &config, counters.clone(), metrics.clone())?;
    let engine = EngineWatch::start("prefill engine", engine, worker.clone());
    let info = WorkerInfo {
        worker_id: config.worker_id.clone(),
        role: Role::Prefill,
        address: address.clone(),
        model_fingerprint: WorkerInfo::fingerprint_hex(model.fingerprint()),
        model: config.model_name.clone(),
        capacity: config.max_batch_prompts,
        transports: transports.iter().map(|t| t.kind()).collect(),
        node: config.node.clone(),
        expert_shard: None,
    };
    let registration = membership.register(info, worker.clone()).await?;
    tracing::info!(worker = %config.worker_id, %address, "prefill worker registered");
    let (health, routes) = standard_routes()?;
    report_health(
        health,
        registration.clone(),
        vec!["sluice.worker.v1.Prefill"],
        config.worker_id.as_str(),
        worker.clone(),
    );
    let service = PrefillService {
        model: model.clone(),
        jobs,
        transports,
        counters: counters.clone(),
        metrics,
        max_context: config.max_context,
        max_waiting: config.max_waiting,
    };
    let routes =
        routes
            .add_service(PrefillServer::new(service))
            .add_service(WorkerStatusServer::new(WorkerStatusService::new(
                config.worker_id.to_string(),
                counters,
                registration,
            )));
    serve_draining(listener, routes, worker, config.drain_timeout).await?;
    engine.outcome(&shutdown).await
}

fn start_engine(
    model: Arc<dyn LanguageModel>,
    config: &PrefillConfig,
    counters: Arc<LoadCounters>,
    metrics: Arc<PrefillMetrics>,
) -> Result<(mpsc::UnboundedSender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = config.max_batch_tokens.max(config.max_context);
    let cache_config = CacheConfig {
        block_size: 16,
        num_blocks: capacity.div_ceil(16) + config.max_batch_prompts,
        max_sequences: config.max_batch_prompts,
    };
    let mut engine = PrefillEngine {
        cache: model.new_cache(cache_config)?,
        model,
        chunk: config.prefill_chunk.max(1),
        max_batch_tokens: config.max_batch_tokens.max(1),
        max_batch_prompts: config.max_batch_prompts.max(1),
        counters,
        metrics,
    };
    let engine = std::thread::Builder::new()
        .name("sluice-prefill-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok((tx, engine))
}

struct PrefillEngine {
    model: Arc<dyn LanguageModel>,
    cache: sluice_engine::ModelCache,
    chunk: usize,
    max_batch_tokens: usize,
    max_batch_prompts: usize,
    counters: Arc<LoadCounters>,
    metrics: Arc<PrefillMetrics>,
}

impl PrefillEngine {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut next: Option<Job> = None;
        loop {
            let first = match next.take() {
                Some(job) => job,
                None => match rx.blocking_recv() {
                    Some(job) => job,
                    None => return,
                },
            };
            // Everything already queued joins the batch, within its token and prompt limits.
            let mut tokens = first.prompt.len();
            let mut batch = vec![first];
            while batch.len() < self.max_batch_prompts {
                match rx.try_recv() {
                    Ok(job) if tokens + job.prompt.len() <= self.max_batch_tokens => {
                        tokens += job.prompt.len();
                        batch.push(job);
                    }
                    Ok(job) => {
                        next = Some(job);
                        break;
                    }
                    Err(_) => break,
                }
            }
            batch.retain(|j| !j.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            LoadCounters::set(&self.counters.running, batch.len());
            self.metrics.load.running.set(batch.len() as f64);
            let results = self.prefill(&batch);
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
            LoadCounters::set(&self.counters.running, 0);
            self.metrics.load.running.set(0.0);
            self.counters
                .waiting
                .store(rx.len() as u32, Ordering::Relaxed);
            self.metrics.load.waiting.set(rx.len() as f64);
        }
    }

    /// Runs every prompt of `batch` in chunks, all prompts in each step.
    fn prefill(&mut self, batch: &[Job]) -> Vec<Result<Prefilled, Arc<EngineError>>> {
        let mut seqs = Vec::with_capacity(batch.len());
        let result = self.prefill_sequences(batch, &mut seqs);
        let out = match result {
            Ok(out) => out.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!("prefill batch of {} failed: {e}", batch.len());
                let e = Arc::new(e);
                batch.iter().map(|_| Err(e.clone())).collect()
            }
        };
        for seq in seqs {
            self.cache.release(seq);
        }
        out
    }

    fn prefill_sequences(
        &mut self,
        batch: &[Job],
        seqs: &mut Vec<sluice_engine::SeqId>,
    ) -> Result<Vec<Prefilled>, EngineError> {
        let mut samplers = Vec::with_capacity(batch.len());
        for job in batch {
            seqs.push(self.cache.add_sequence()?);
            samplers.push(Sampler::new(job.params.clone(), &job.prompt)?);
        }
        let mut done = vec![0usize; batch.len()];
        let mut first: Vec<Option<Sampled>> = vec![None; batch.len()];
        let vocab = self.model.spec().vocab;
        loop {
            let active: Vec<usize> = (0..batch.len())
                .filter(|&i| done[i] < batch[i].prompt.len())
                .collect();
            if active.is_empty() {
                break;
            }
            // Each prompt's next chunk, while the step has room (at least one per step).
            let mut budget = self.max_batch_tokens;
            let mut chunks: Vec<SeqChunk> = Vec::with_capacity(active.len());
            let mut stepped = Vec::with_capacity(active.len());
            for &i in &active {
                let p = &batch[i].prompt;
                let tokens = &p[done[i]..(done[i] + self.chunk).min(p.len())];
                if !chunks.is_empty() && tokens.len() > budget {
                    continue;
                }
                budget = budget.saturating_sub(tokens.len());
                chunks.push(SeqChunk {
                    seq: seqs[i],
                    tokens,
                });
                stepped.push(i);
            }
            let active = stepped;
            let fed: usize = chunks.iter().map(|c| c.tokens.len()).sum();
            let started = std::time::Instant::now();
            let logits =
                self.model
                    .forward(&mut self.cache, &chunks, LogitsMode::LastPerSequence)?;
            self.metrics.step(fed, started.elapsed().as_secs_f64());
            for (row, (&i, c)) in active.iter().zip(&chunks).enumerate() {
                done[i] += c.tokens.len();
                if done[i] == batch[i].prompt.len() {
                    first[i] = Some(samplers[i].sample(&logits[row * vocab..(row + 1) * vocab]));
                }
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for ((seq, sampler), first) in seqs.iter().zip(&samplers).zip(first) {
            let first = first.ok_or_else(|| EngineError::InvalidArgument {
                field: "prompt",
                message: "a prompt in the batch was never completed".into(),
            })?;
            out.push(Prefilled {
                first,
                rng_state: sampler.rng_state(),
                snapshot: self.cache.export(*seq)?,
            });
        }
        Ok(out)
    }
}

struct PrefillService {
    model: Arc<dyn LanguageModel>,
    jobs: mpsc::UnboundedSender<Job>,
    transports: Vec<Arc<dyn CacheTransport>>,
    counters: Arc<LoadCounters>,
    metrics: Arc<PrefillMetrics>,
    max_context: usize,
    max_waiting: usize,
}

impl PrefillService {
    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse> {
        let vocab = self.model.spec().vocab;
        if req.prompt_token_ids.is_empty() {
            return Err(RuntimeError::invalid(
                "prompt_token_ids",
                "the prompt is empty",
            ));
        }
        if req.prompt_token_ids.len() > self.max_context {
            return Err(RuntimeError::invalid(
                "prompt_token_ids",
                format!(
                    "{} tokens is above this worker's limit of {}",
                    req.prompt_token_ids.len(),
                    self.max_context
                ),
            ));
        }
        sampling::check_token_ids("prompt_token_ids", &req.prompt_token_ids, vocab)?;
        // No destination: only the first token is wanted (max_tokens = 1).
        let push = !req.decode_address.is_empty();
        if push && req.transfer_id.is_empty() {
            return Err(RuntimeError::invalid("transfer_id", "must not be empty"));
        }
        let params = sampling::params_from_pb(req.sampling.as_ref())?;
        let dest = Destination {
            worker_id: req.decode_worker_id.clone(),
            address: req.decode_address.clone(),
        };
        let transport = if push {
            let kind = req.transport.parse()?;
            let transport = self
                .transports
                .iter()
                .find(|t| t.kind() == kind)
                .ok_or_else(|| {
                    RuntimeError::invalid(
                        "transport",
                        format!("this worker cannot send over `{kind}`"),
                    )
                })?
                .clone();
            transport.handshake(&dest).await?;
            Some(transport)
        } else {
            None
        };

        let waiting = self.counters.waiting.load(Ordering::Relaxed) as usize;
        if waiting >= self.max_waiting {
            return Err(RuntimeError::Overloaded(format!(
                "{waiting} prompts already queued on this prefill worker (--max-waiting {})",
                self.max_waiting
            )));
        }
        let (reply, result) = oneshot::channel();
        self.counters.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.send(Job {
            prompt: req.prompt_token_ids.clone(),
            params,
            reply,
        });
        let prefilled = match sent {
            Ok(()) => result.await,
            Err(_) => {
                self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(RuntimeError::Internal(
                    "the prefill engine has stopped".into(),
                ));
            }
        };
        let _ = self
            .counters
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| w.checked_sub(1));
        let prefilled = prefilled
            .map_err(|_| RuntimeError::Internal("the prefill engine dropped the request".into()))?
            .map_err(|e| engine_status(&e))?;
        let first_logprobs = req
            .sampling
            .as_ref()
            .is_some_and(|s| s.logprobs.is_some())
            .then(|| sampling::token_logprobs(&prefilled.first));
        let first_token = prefilled.first.token;
        let Some(transport) = transport else {
            return Ok(pb::PrefillResponse {
                first_token,
                transfer_id: String::new(),
                transferred_bytes: 0,
                first_logprobs,
                rng_state: prefilled.rng_state,
            });
        };
        let header = TransferHeader {
            transfer_id: req.transfer_id.clone(),
            fingerprint: self.model.fingerprint(),
            layout: prefilled.snapshot.layout.clone(),
            handoff: Handoff {
                request_id: req.request_id.clone(),
                first_token,
                rng_state: prefilled.rng_state,
            },
        };
        let rng_state = prefilled.rng_state;
        let started = std::time::Instant::now();
        let bytes = tokio::time::timeout(
            Duration::from_secs(120),
            transport.push(&dest, header, prefilled.snapshot),
        )
        .await
        .map_err(|_| RuntimeError::Unavailable {
            worker: dest.worker_id.clone(),
            message: "cache push timed out".into(),
        })??;
        self.metrics
            .transferred(bytes, started.elapsed().as_secs_f64());
        tracing::debug!(request = %req.request_id, bytes, "cache pushed");
        Ok(pb::PrefillResponse {
            first_token,
            transfer_id: req.transfer_id,
            transferred_bytes: bytes,
            first_logprobs,
            rng_state,
        })
    }
}

#[tonic::async_trait]
impl Prefill for PrefillService {
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "request",
            id = %req.client_request_id,
            attempt = %req.request_id
        );
        sluice_runtime::telemetry::continue_trace(&span, &metadata);
        Ok(Response::new(
            PrefillService::prefill(self, req).instrument(span).await?,
        ))
    }
}
