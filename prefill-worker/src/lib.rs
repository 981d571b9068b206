//! The prefill worker: runs prompts (several per step when they arrive together), samples each
//! first token, and pushes the resulting cache to the decode worker the router chose.
//!
//! The model runs on one engine thread fed by a queue; the gRPC side only validates, queues,
//! and moves the cache with a [`CacheTransport`].

mod metrics;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_engine::{
    CacheConfig, CacheSnapshot, EngineError, LanguageModel, LogitsMode, PrefillPlan, Sampled,
    Sampler, SamplingParams, SeqChunk,
};
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::prefill_server::{Prefill, PrefillServer};
use sluice_proto::worker::v1::worker_status_server::WorkerStatusServer;
use sluice_runtime::engine_thread::EngineWatch;
use sluice_runtime::error::engine_status;
use sluice_runtime::estimate::{CostModel, StepCost, prefill_wait};
use sluice_runtime::grammar::{GrammarCompiler, GuidedSampler, TokenGuide, start_guide};
use sluice_runtime::serve::{advertised_address, serve_draining, standard_routes};
use sluice_runtime::status::{LoadCounters, WorkerLimits, WorkerStatusService, report_health};
use sluice_runtime::transport::TransferHeader;
use sluice_runtime::{
    CacheTransport, Destination, Handoff, Membership, Result, Role, RuntimeError, TransportKind,
    WorkerDirectory, WorkerId, WorkerInfo, sampling,
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
    /// Compiles constrained requests' grammars; `None`: such requests are refused.
    pub grammars: Option<Arc<GrammarCompiler>>,
}

/// `--max-batch-tokens` (prefill) unless set.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 4096;
/// `--max-waiting` (prefill) unless set.
pub const DEFAULT_MAX_WAITING: usize = 64;

impl PrefillConfig {
    pub fn new(worker_id: WorkerId, model_name: String) -> Self {
        PrefillConfig {
            worker_id,
            advertise: None,
            model_name,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_batch_prompts: 8,
            max_waiting: DEFAULT_MAX_WAITING,
            max_context: sluice_runtime::model_host::DEFAULT_MAX_CONTEXT,
            prefill_chunk: sluice_engine::DEFAULT_PREFILL_CHUNK,
            node: sluice_runtime::worker_info::this_host(),
            drain_timeout: Duration::from_secs(30),
            grammars: None,
        }
    }
}

/// A prompt run to its first token.
struct Prefilled {
    first: Sampled,
    rng_state: u64,
    /// The constraint is complete after the first token: nothing more may follow.
    grammar_complete: bool,
    snapshot: CacheSnapshot,
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    /// The constrained request's guide, taken by the engine when the job runs.
    guide: Option<TokenGuide>,
    /// When it was queued, and how long it may wait before it is shed unrun.
    queued: Instant,
    budget: Option<Duration>,
    reply: oneshot::Sender<Result<Prefilled, JobError>>,
}

enum JobError {
    /// Shared: one failed batch fails every prompt in it with the same error.
    Engine(Arc<EngineError>),
    /// It waited longer than its budget: shed before any work was spent on it.
    Shed(Duration),
    /// Its constraint failed at its first token (this prompt only).
    Guide(RuntimeError),
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
    let counters = Arc::new(LoadCounters::new(WorkerLimits {
        capacity: config.max_batch_prompts.max(1),
        max_waiting: config.max_waiting,
        max_batch_tokens: config.max_batch_tokens.max(1),
        prefill_chunk: config.prefill_chunk.max(1),
    }));
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
    // The decode workers a cache may be pushed to: the registered ones, never an address a
    // caller makes up.
    let directory = WorkerDirectory::start(membership.clone(), worker.clone()).await?;
    let service = PrefillService {
        model: model.clone(),
        jobs,
        transports,
        directory,
        counters: counters.clone(),
        metrics,
        max_context: config.max_context,
        max_waiting: config.max_waiting,
        grammars: config.grammars.clone(),
    };
    let routes =
        routes
            .add_service(PrefillServer::new(service))
            .add_service(WorkerStatusServer::new(WorkerStatusService::new(
                config.worker_id.to_string(),
                counters,
                registration,
            )));
    serve_draining(listener, routes.finish()?, worker, config.drain_timeout).await?;
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
        block_size: sluice_engine::KV_BLOCK_TOKENS,
        num_blocks: capacity.div_ceil(sluice_engine::KV_BLOCK_TOKENS) + config.max_batch_prompts,
        max_sequences: config.max_batch_prompts,
    };
    let mut engine = PrefillEngine {
        cache: model.new_cache(cache_config)?,
        model,
        plan: PrefillPlan::new(config.prefill_chunk),
        max_batch_tokens: config.max_batch_tokens.max(1),
        max_batch_prompts: config.max_batch_prompts.max(1),
        counters,
        metrics,
        cost: StepCost::default(),
    };
    let engine = std::thread::Builder::new()
        .name("sluice-prefill-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok((tx, engine))
}

struct PrefillEngine {
    model: Arc<dyn LanguageModel>,
    cache: sluice_engine::ModelCache,
    plan: PrefillPlan,
    max_batch_tokens: usize,
    max_batch_prompts: usize,
    counters: Arc<LoadCounters>,
    metrics: Arc<PrefillMetrics>,
    /// Measured cost of a step, published for admission.
    cost: StepCost,
}

/// Publishes how long a prompt queued now would wait: every prompt queued or running ahead
/// of it, in batches, at the measured step cost.
fn publish_wait(counters: &LoadCounters) {
    let l = counters.limits;
    let prompts = (counters.waiting.load(Ordering::Relaxed)
        + counters.running.load(Ordering::Relaxed)) as usize;
    let tokens = counters.queued_tokens.load(Ordering::Relaxed) as usize;
    counters.set_start_delay(prefill_wait(
        prompts,
        tokens,
        l.capacity,
        l.max_batch_tokens,
        counters.step_cost(),
    ));
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
            // Prompts that waited past their budget are shed unrun: their time to first
            // token is already lost, and running them would only delay the others.
            let mut kept = Vec::with_capacity(batch.len());
            for job in batch {
                match job.budget {
                    Some(budget) if job.queued.elapsed() > budget => {
                        self.metrics.shed.inc();
                        let _ = job.reply.send(Err(JobError::Shed(job.queued.elapsed())));
                    }
                    _ => kept.push(job),
                }
            }
            let mut batch = kept;
            if batch.is_empty() {
                continue;
            }
            LoadCounters::set(&self.counters.running, batch.len());
            self.metrics.load.running.set(batch.len() as f64);
            let results = self.prefill(&mut batch);
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
            LoadCounters::set(&self.counters.running, 0);
            self.metrics.load.running.set(0.0);
            self.counters
                .waiting
                .store(rx.len() as u32, Ordering::Relaxed);
            self.metrics.load.waiting.set(rx.len() as f64);
            publish_wait(&self.counters);
        }
    }

    /// Runs every prompt of `batch` in chunks, all prompts in each step.
    fn prefill(&mut self, batch: &mut [Job]) -> Vec<Result<Prefilled, JobError>> {
        let mut seqs = Vec::with_capacity(batch.len());
        let result = self.prefill_sequences(batch, &mut seqs);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!("prefill batch of {} failed: {e}", batch.len());
                let e = Arc::new(e);
                batch
                    .iter()
                    .map(|_| Err(JobError::Engine(e.clone())))
                    .collect()
            }
        };
        for seq in seqs {
            self.cache.release(seq);
        }
        out
    }

    fn prefill_sequences(
        &mut self,
        batch: &mut [Job],
        seqs: &mut Vec<sluice_engine::SeqId>,
    ) -> Result<Vec<Result<Prefilled, JobError>>, EngineError> {
        let mut samplers = Vec::with_capacity(batch.len());
        for job in batch.iter_mut() {
            seqs.push(self.cache.add_sequence()?);
            let sampler = Sampler::new(job.params.clone(), &job.prompt)?;
            samplers.push(GuidedSampler::new(sampler, job.guide.take()));
        }
        let batch = &*batch;
        let mut done = vec![0usize; batch.len()];
        let mut first: Vec<Option<Result<Sampled, RuntimeError>>> =
            (0..batch.len()).map(|_| None).collect();
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
                let tokens = &p[self.plan.next(done[i], p.len())];
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
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.step(fed, seconds);
            self.cost.observe(fed, seconds);
            self.counters.set_step_cost(CostModel::from(&self.cost));
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
            out.push(match first {
                Ok(first) => Ok(Prefilled {
                    first,
                    rng_state: sampler.rng_state(),
                    grammar_complete: sampler.grammar_complete(),
                    snapshot: self.cache.export(*seq)?,
                }),
                Err(e) => Err(JobError::Guide(e)),
            });
        }
        Ok(out)
    }
}

struct PrefillService {
    model: Arc<dyn LanguageModel>,
    jobs: mpsc::UnboundedSender<Job>,
    transports: Vec<Arc<dyn CacheTransport>>,
    directory: Arc<WorkerDirectory>,
    counters: Arc<LoadCounters>,
    metrics: Arc<PrefillMetrics>,
    max_context: usize,
    max_waiting: usize,
    grammars: Option<Arc<GrammarCompiler>>,
}

/// How long a push to a decode worker not yet in this worker's view of the membership waits
/// for it to appear (it may have registered a moment ago, seen by the router first).
const DESTINATION_GRACE: Duration = Duration::from_secs(2);

impl PrefillService {
    /// A cache goes only to a registered decode worker at the address it registered: the
    /// internal plane is no relay to wherever a caller points it.
    async fn check_destination(&self, dest: &Destination) -> Result<()> {
        let registered = |d: &WorkerDirectory| {
            d.get(&dest.worker_id)
                .is_some_and(|w| w.role == Role::Decode && w.address == dest.address)
        };
        let mut changes = self.directory.changes();
        let wait = async {
            while !registered(&self.directory) {
                if changes.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(DESTINATION_GRACE, wait).await {
            Ok(true) => Ok(()),
            _ => Err(RuntimeError::TransferRefused(format!(
                "`{}` at {} is not a registered decode worker",
                dest.worker_id, dest.address
            ))),
        }
    }

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
        let (params, logprobs) = sampling::from_worker(req.sampling.as_ref());
        let guide = match sampling::constraint_from_worker(req.sampling.as_ref())? {
            Some(constraint) => {
                Some(start_guide(self.grammars.as_ref(), constraint, Vec::new()).await?)
            }
            None => None,
        };
        let transport = if push {
            let dest = Destination {
                worker_id: WorkerId::new(req.decode_worker_id.clone())?,
                address: req.decode_address.clone(),
            };
            self.check_destination(&dest).await?;
            let kind = TransportKind::from_pb("transport", req.transport)?;
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
            Some((transport, dest))
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
        let tokens = req.prompt_token_ids.len() as u64;
        self.counters.waiting.fetch_add(1, Ordering::Relaxed);
        self.counters
            .queued_tokens
            .fetch_add(tokens, Ordering::Relaxed);
        publish_wait(&self.counters);
        // Counted until answered (or abandoned by the caller).
        let _queued = QueuedTokens(&self.counters, tokens);
        let sent = self.jobs.send(Job {
            prompt: req.prompt_token_ids.clone(),
            params,
            guide,
            queued: Instant::now(),
            budget: (req.queue_budget_ms > 0)
                .then(|| Duration::from_millis(req.queue_budget_ms.into())),
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
        let prefilled = match prefilled {
            Ok(Ok(p)) => p,
            Ok(Err(JobError::Engine(e))) => return Err(engine_status(&e).into()),
            Ok(Err(JobError::Guide(e))) => return Err(e),
            Ok(Err(JobError::Shed(waited))) => {
                return Err(RuntimeError::Overloaded(format!(
                    "shed unrun: waited {} ms in this prefill worker's queue, past the request's budget of {} ms",
                    waited.as_millis(),
                    req.queue_budget_ms
                )));
            }
            Err(_) => {
                return Err(RuntimeError::Internal(
                    "the prefill engine dropped the request".into(),
                ));
            }
        };
        let first_logprobs = logprobs.then(|| sampling::token_logprobs(&prefilled.first));
        let first_token = prefilled.first.token;
        let finish = sampling::FinishRule {
            eos: req.eos_token_ids.clone(),
            stop: req.stop_token_ids.clone(),
        }
        .judge_guided(
            first_token,
            (req.max_new_tokens as usize).saturating_sub(1),
            prefilled.grammar_complete,
        );
        let response = pb::PrefillResponse {
            first_token,
            first_logprobs,
            rng_state: prefilled.rng_state,
            finish_reason: finish as i32,
        };
        let Some((transport, dest)) = transport else {
            return Ok(response);
        };
        let header = TransferHeader {
            transfer_id: req.transfer_id.clone(),
            fingerprint: self.model.fingerprint(),
            layout: prefilled.snapshot.layout.clone(),
            handoff: Handoff {
                first_token,
                rng_state: prefilled.rng_state,
            },
        };
        let started = std::time::Instant::now();
        let bytes = tokio::time::timeout(
            Duration::from_secs(120),
            transport.push(&dest, header, prefilled.snapshot),
        )
        .await
        .map_err(|_| RuntimeError::Unavailable {
            worker: dest.worker_id.to_string(),
            message: "cache push timed out".into(),
        })??;
        self.metrics
            .transferred(bytes, started.elapsed().as_secs_f64());
        tracing::debug!(request = %req.request_id, bytes, "cache pushed");
        Ok(response)
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

/// Prompt tokens counted in the queue until this drops.
struct QueuedTokens<'a>(&'a LoadCounters, u64);

impl Drop for QueuedTokens<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .queued_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(self.1))
            });
        publish_wait(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::{MockModel, MockTiming};

    fn engine(step_ms: u64) -> (mpsc::UnboundedSender<Job>, Arc<LoadCounters>) {
        let config = sluice_engine::synth::preset_config(sluice_engine::synth::Preset::Tiny);
        let spec = sluice_engine::config::parse_spec(&config).unwrap();
        let timing = MockTiming {
            step: Duration::from_millis(step_ms),
            prefill_tokens_per_s: 0.0,
        };
        let model: Arc<dyn LanguageModel> = Arc::new(MockModel::new(&spec, timing));
        let mut config = PrefillConfig::new(WorkerId::new("p").unwrap(), "m".into());
        config.max_batch_prompts = 1;
        let counters = Arc::new(LoadCounters::new(WorkerLimits {
            capacity: 1,
            max_waiting: 8,
            max_batch_tokens: config.max_batch_tokens,
            prefill_chunk: config.prefill_chunk,
        }));
        let metrics = Arc::new(PrefillMetrics::new("p"));
        let (jobs, _engine) = start_engine(model, &config, counters.clone(), metrics).unwrap();
        (jobs, counters)
    }

    fn job(budget: Option<Duration>) -> (Job, oneshot::Receiver<Result<Prefilled, JobError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            prompt: vec![1, 2, 3],
            params: SamplingParams::default(),
            guide: None,
            queued: Instant::now(),
            budget,
            reply,
        };
        (job, rx)
    }

    #[test]
    fn a_prompt_queued_past_its_budget_is_shed_unrun_and_the_step_cost_is_measured() {
        let (jobs, counters) = engine(50);
        // One prompt a batch, 50 ms a step: the second waits ~50 ms behind the first, past
        // its 10 ms budget; the third has no budget and runs.
        let (first, first_rx) = job(Some(Duration::from_secs(5)));
        let (second, second_rx) = job(Some(Duration::from_millis(10)));
        let (third, third_rx) = job(None);
        for j in [first, second, third] {
            jobs.send(j).unwrap();
        }
        assert!(matches!(first_rx.blocking_recv(), Ok(Ok(_))));
        assert!(
            matches!(second_rx.blocking_recv(), Ok(Err(JobError::Shed(w))) if w >= Duration::from_millis(10))
        );
        assert!(matches!(third_rx.blocking_recv(), Ok(Ok(_))));
        // Two steps of 50 ms measured (the shed prompt cost none).
        let cost = counters.step_cost();
        assert!(
            (0.045..0.2).contains(&cost.fixed) && cost.per_token == 0.0,
            "{cost:?}"
        );
    }
}
