//! The decode worker: adopts caches pushed by prefill workers (or prefills short prompts
//! itself) and runs one continuous batch over all its sequences within a paged KV budget
//! ([`scheduler`]), streaming each sequence's tokens to its `Decode` call. A call that goes
//! away (client cancellation, `Abort`) frees its sequence before the next step.

mod metrics;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{CacheConfig, LanguageModel, Sampler, SamplingParams};
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::cache_transfer_server::CacheTransferServer;
use sluice_proto::worker::v1::decode_server::{Decode, DecodeServer};
use sluice_proto::worker::v1::worker_status_server::WorkerStatusServer;
use sluice_runtime::engine_thread::EngineWatch;
use sluice_runtime::error::engine_status;
use sluice_runtime::grammar::{Constraint, GrammarCompiler, GuidedSampler, start_guide};
use sluice_runtime::serve::{advertised_address, serve_draining, standard_routes};
use sluice_runtime::status::{LoadCounters, WorkerLimits, WorkerStatusService, report_health};
use sluice_runtime::transport::select::TransportPlan;
use sluice_runtime::transport::{CacheTransferService, InProcessHub};
use sluice_runtime::{
    AttemptKey, CacheInbox, InboxLimits, Membership, Result, Role, RuntimeError, TransportKind,
    WorkerId, WorkerInfo, sampling,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::metrics::DecodeMetrics;
use crate::scheduler::{ChunkSender, Command, NewSequence, Scheduler, SchedulerLimits};

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub worker_id: WorkerId,
    pub advertise: Option<String>,
    pub model_name: String,
    /// Sequences running at once (state slots).
    pub max_sequences: usize,
    /// Longest sequence (prompt + output), in tokens.
    pub max_context: usize,
    /// KV blocks (of [`KV_BLOCK_TOKENS`] tokens) shared by all sequences; `None` sizes the pool
    /// for `max_sequences` sequences of `max_context` tokens (no preemption ever needed).
    pub kv_blocks: Option<usize>,
    /// Tokens per step: decode tokens plus prompt chunks prefilled here.
    pub max_batch_tokens: usize,
    /// Sequences waiting to start before new ones are refused.
    pub max_waiting: usize,
    pub prefill_chunk: usize,
    /// How long a `Decode` call waits for its cache.
    pub transfer_timeout: Duration,
    /// The transports it receives caches over (besides in-process with a hub).
    pub transport: TransportPlan,
    /// The host it runs on (same-node transports).
    pub node: String,
    /// After shutdown is asked, how long calls in flight may still finish.
    pub drain_timeout: Duration,
    /// Compiles constrained requests' grammars; `None`: such requests are refused.
    pub grammars: Option<Arc<GrammarCompiler>>,
}

pub use sluice_engine::KV_BLOCK_TOKENS;

/// `--max-sequences` unless set.
pub const DEFAULT_MAX_SEQUENCES: usize = 32;
/// `--max-batch-tokens` (decode) unless set.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// `--max-waiting` (decode) unless set.
pub const DEFAULT_MAX_WAITING: usize = 256;

/// The decode worker's batching flags (its binary and `sluice up` share them).
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Sequences running at once; more wait (and preempted ones wait to be recomputed).
    #[arg(long, env = "SLUICE_MAX_SEQUENCES", default_value_t = DEFAULT_MAX_SEQUENCES)]
    pub max_sequences: usize,
    /// KV cache budget in blocks of 16 tokens, shared by all sequences. Unset: room for
    /// max-sequences sequences of max-context tokens, so nothing is ever preempted. Smaller
    /// budgets admit more than they could hold at full length and preempt the newest
    /// sequence when blocks run out.
    #[arg(long, env = "SLUICE_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Tokens computed per step: one per decoding sequence, plus prompt chunks of sequences
    /// prefilled (or recomputed) here while room is left.
    #[arg(long, env = "SLUICE_DECODE_MAX_BATCH_TOKENS", default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Sequences waiting here to start (cache not yet arrived, no slot free, preempted);
    /// beyond it a new one is refused with RESOURCE_EXHAUSTED and the router tries another
    /// decode worker.
    #[arg(long, env = "SLUICE_DECODE_MAX_WAITING", default_value_t = DEFAULT_MAX_WAITING)]
    pub max_waiting: usize,
}

impl DecodeArgs {
    pub fn apply(&self, config: &mut DecodeConfig) {
        config.max_sequences = self.max_sequences;
        config.kv_blocks = self.kv_blocks;
        config.max_batch_tokens = self.max_batch_tokens;
        config.max_waiting = self.max_waiting;
    }
}

impl DecodeConfig {
    pub fn new(worker_id: WorkerId, model_name: String) -> Self {
        DecodeConfig {
            worker_id,
            advertise: None,
            model_name,
            max_sequences: DEFAULT_MAX_SEQUENCES,
            max_context: sluice_runtime::model_host::DEFAULT_MAX_CONTEXT,
            kv_blocks: None,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_waiting: DEFAULT_MAX_WAITING,
            prefill_chunk: sluice_engine::DEFAULT_PREFILL_CHUNK,
            transfer_timeout: Duration::from_secs(60),
            transport: TransportPlan::tcp(),
            node: sluice_runtime::worker_info::this_host(),
            drain_timeout: Duration::from_secs(30),
            grammars: None,
        }
    }

    fn cache_config(&self) -> CacheConfig {
        let sequences = self.max_sequences.max(1);
        let full = self.max_context.div_ceil(KV_BLOCK_TOKENS).max(1) * sequences;
        CacheConfig {
            block_size: KV_BLOCK_TOKENS,
            num_blocks: self.kv_blocks.unwrap_or(full).max(1),
            max_sequences: sequences,
        }
    }
}

/// Serves `Decode`, `CacheTransfer` and `WorkerStatus` on `listener` until `shutdown`. With a
/// `hub`, caches can also arrive in-process (`sluice up`).
pub async fn run(
    listener: TcpListener,
    model: Arc<dyn LanguageModel>,
    membership: Arc<dyn Membership>,
    hub: Option<Arc<InProcessHub>>,
    config: DecodeConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let address = advertised_address(listener.local_addr()?, config.advertise.as_deref());
    let probe = model.new_cache(CacheConfig::for_sequences(1, 1))?;
    let limits = InboxLimits {
        max_tokens: config.max_context,
        // A cache staged waits seconds at most for its Decode call (sent first): room for
        // every sequence twice over is plenty.
        max_staged: 2 * config.max_sequences.max(1),
    };
    let inbox = Arc::new(
        CacheInbox::new(model.fingerprint(), move |t| probe.layout(t)).with_limits(limits),
    );
    let receiver = CacheTransferService::new(inbox.clone())
        .with_device(&config.transport.device, config.transport.communicators);
    let mut transports = receiver.kinds();
    if let Some(hub) = &hub {
        hub.register(&address, inbox.clone());
        transports.push(TransportKind::InProcess);
    }
    let counters = Arc::new(LoadCounters::new(WorkerLimits {
        capacity: config.max_sequences.max(1),
        max_waiting: config.max_waiting,
        max_batch_tokens: config.max_batch_tokens,
        prefill_chunk: config.prefill_chunk,
    }));
    let waiting = counters.clone();
    // Everything the worker runs — registration, server — stops on `worker`: at shutdown,
    // or when the engine thread dies.
    let worker = shutdown.child_token();
    let arriving = inbox.clone();
    let extra_waiting = Box::new(move || arriving.staged() + arriving.waiting());
    let (commands, engine) = start_engine(model.clone(), &config, counters.clone(), extra_waiting)?;
    let engine = EngineWatch::start("decode engine", engine, worker.clone());
    let info = WorkerInfo {
        worker_id: config.worker_id.clone(),
        role: Role::Decode,
        address: address.clone(),
        model_fingerprint: WorkerInfo::fingerprint_hex(model.fingerprint()),
        model: config.model_name.clone(),
        capacity: config.max_sequences,
        transports,
        node: config.node.clone(),
        expert_shard: None,
    };
    let registration = membership.register(info, worker.clone()).await?;
    tracing::info!(worker = %config.worker_id, %address, "decode worker registered");
    let (health, routes) = standard_routes()?;
    report_health(
        health,
        registration.clone(),
        vec!["sluice.worker.v1.Decode", "sluice.worker.v1.CacheTransfer"],
        config.worker_id.as_str(),
        worker.clone(),
    );
    let staged = inbox.clone();
    let status =
        WorkerStatusService::new(config.worker_id.to_string(), counters, registration.clone())
            .with_extra_waiting(move || staged.staged() + staged.waiting());
    let service = DecodeService {
        vocab: model.spec().vocab,
        inbox: inbox.clone(),
        commands,
        counters: waiting,
        max_waiting: config.max_waiting,
        transfer_timeout: config.transfer_timeout,
        max_context: config.max_context,
        grammars: config.grammars.clone(),
    };
    let routes = routes
        .add_service(DecodeServer::new(service))
        .add_service(
            CacheTransferServer::new(receiver)
                .max_decoding_message_size(sluice_runtime::transport::MAX_PUSH_MESSAGE_BYTES),
        )
        .add_service(WorkerStatusServer::new(status));
    serve_draining(listener, routes.finish()?, worker, config.drain_timeout).await?;
    engine.outcome(&shutdown).await
}

fn start_engine(
    model: Arc<dyn LanguageModel>,
    config: &DecodeConfig,
    counters: Arc<LoadCounters>,
    extra_waiting: Box<dyn Fn() -> usize + Send>,
) -> Result<(mpsc::UnboundedSender<Command>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let cache = model.new_cache(config.cache_config())?;
    let metrics = Arc::new(DecodeMetrics::new(config.worker_id.as_str()));
    let limits = SchedulerLimits {
        max_batch_tokens: config.max_batch_tokens,
        prefill_chunk: config.prefill_chunk,
    };
    let mut scheduler = Scheduler::new(model, cache, limits, counters, metrics, extra_waiting);
    let engine = std::thread::Builder::new()
        .name("sluice-decode-engine".into())
        .spawn(move || scheduler.run(rx))?;
    Ok((tx, engine))
}

struct DecodeService {
    vocab: usize,
    inbox: Arc<CacheInbox>,
    commands: mpsc::UnboundedSender<Command>,
    /// The engine's load (its waiting list), for the bound on waiting sequences.
    counters: Arc<LoadCounters>,
    max_waiting: usize,
    transfer_timeout: Duration,
    max_context: usize,
    grammars: Option<Arc<GrammarCompiler>>,
}

/// What a `Decode` call asks of sampling, read once at the edge.
struct DecodeSampling {
    params: SamplingParams,
    logprobs: bool,
    /// A constrained request's constraint and the compiler that makes its guide.
    constraint: Option<(Constraint, Arc<GrammarCompiler>)>,
}

impl DecodeService {
    /// Refuses a new sequence while `max_waiting` already wait here (the engine's waiting list
    /// as of its last step, and calls waiting for their cache).
    fn check_room(&self) -> Result<()> {
        let waiting = self
            .counters
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed) as usize
            + self.inbox.waiting();
        if waiting >= self.max_waiting {
            return Err(RuntimeError::Overloaded(format!(
                "{waiting} sequences already wait on this decode worker (--max-waiting {})",
                self.max_waiting
            )));
        }
        Ok(())
    }

    /// The request's key, its sampler parameters and whether it reports log-probabilities,
    /// once its fields are checked.
    fn validate(&self, req: &pb::DecodeRequest) -> Result<(AttemptKey, DecodeSampling)> {
        let key: AttemptKey = req.request_id.parse()?;
        if req.transfer_id.is_empty() && !req.prefill {
            return Err(RuntimeError::invalid(
                "transfer_id",
                "must not be empty unless `prefill` is set",
            ));
        }
        if req.prefill && req.prompt_token_ids.is_empty() {
            return Err(RuntimeError::invalid(
                "prompt_token_ids",
                "the prompt is empty",
            ));
        }
        if !req.prefill && !req.generated_token_ids.is_empty() {
            return Err(RuntimeError::invalid(
                "generated_token_ids",
                "a migrated request is prefilled here: set `prefill`",
            ));
        }
        if !req.generated_token_ids.is_empty() && req.rng_state.is_none() {
            return Err(RuntimeError::invalid(
                "rng_state",
                "must be set with `generated_token_ids` (the sampler's state after them)",
            ));
        }
        if req.max_new_tokens == 0 {
            return Err(RuntimeError::invalid(
                "max_new_tokens",
                "must be at least 1",
            ));
        }
        let total = req.prompt_token_ids.len()
            + req.generated_token_ids.len()
            + req.max_new_tokens as usize;
        if total > self.max_context {
            return Err(RuntimeError::invalid(
                "max_new_tokens",
                format!(
                    "prompt + generated + max_new_tokens = {total} tokens is above this worker's limit of {}",
                    self.max_context
                ),
            ));
        }
        sampling::check_token_ids("prompt_token_ids", &req.prompt_token_ids, self.vocab)?;
        sampling::check_token_ids("generated_token_ids", &req.generated_token_ids, self.vocab)?;
        let (params, logprobs) = sampling::from_worker(req.sampling.as_ref());
        let constraint = match sampling::constraint_from_worker(req.sampling.as_ref())? {
            None => None,
            Some(c) => {
                let compiler = self.grammars.clone().ok_or_else(|| {
                    RuntimeError::invalid(
                        "constraint",
                        "this worker runs without a tokenizer: guided decoding is off",
                    )
                })?;
                Some((c, compiler))
            }
        };
        Ok((
            key,
            DecodeSampling {
                params,
                logprobs,
                constraint,
            },
        ))
    }
}

/// Waits for `req`'s cache (unless it prefills here) and hands the sequence to the engine.
async fn start_sequence(
    key: AttemptKey,
    req: pb::DecodeRequest,
    sampling: DecodeSampling,
    inbox: Arc<CacheInbox>,
    commands: mpsc::UnboundedSender<Command>,
    timeout: Duration,
    tx: ChunkSender,
) {
    let DecodeSampling {
        params,
        logprobs,
        constraint,
    } = sampling;
    // Only a sequence that has sent nothing may be shed (a migrated one has).
    let shed_at = (req.prefill && req.generated_token_ids.is_empty() && req.queue_budget_ms > 0)
        .then(|| std::time::Instant::now() + Duration::from_millis(req.queue_budget_ms.into()));
    let prepared = if req.prefill {
        match req.rng_state {
            // A migrated request continues the sampling it had reached elsewhere.
            Some(state) => Sampler::resume(
                params,
                &req.prompt_token_ids,
                &req.generated_token_ids,
                state,
            ),
            None => Sampler::new(params, &req.prompt_token_ids),
        }
        .map(|s| (s, None))
    } else {
        let arrival = tokio::select! {
            a = inbox.take(&req.transfer_id, timeout) => a,
            // The caller gave up before the cache came: nothing to adopt.
            () = tx.closed() => return,
        };
        let arrival = match arrival {
            Ok(a) => a,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return;
            }
        };
        let handoff = arrival.handoff;
        Sampler::resume(
            params,
            &req.prompt_token_ids,
            &[handoff.first_token],
            handoff.rng_state,
        )
        .map(|s| (s, Some((handoff.first_token, arrival.snapshot))))
    };
    let (sampler, adopted) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(Err(engine_status(&e)));
            return;
        }
    };
    let guide = match constraint {
        None => None,
        Some((constraint, compiler)) => {
            // The guide resumes after every token generated before this worker took over.
            let replay = match &adopted {
                Some((first, _)) => vec![*first],
                None => req.generated_token_ids.clone(),
            };
            match start_guide(Some(&compiler), constraint, replay).await {
                Ok(g) => Some(g),
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            }
        }
    };
    let sampler = GuidedSampler::new(sampler, guide);
    let new = NewSequence {
        key,
        prompt: req.prompt_token_ids,
        sampler,
        adopted,
        generated: req.generated_token_ids,
        max_new_tokens: req.max_new_tokens as usize,
        finish: sampling::FinishRule {
            eos: req.eos_token_ids,
            stop: req.stop_token_ids,
        },
        logprobs,
        shed_at,
        tx,
    };
    if let Err(mpsc::error::SendError(Command::Start(new))) =
        commands.send(Command::Start(Box::new(new)))
    {
        let _ = new
            .tx
            .send(Err(Status::internal("the decode engine has stopped")));
    }
}

#[tonic::async_trait]
impl Decode for DecodeService {
    type DecodeStream = UnboundedReceiverStream<Result<pb::TokenChunk, Status>>;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let (key, sampling) = self.validate(&req)?;
        self.check_room()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!(
            "request",
            id = %req.client_request_id,
            attempt = %key
        );
        sluice_runtime::telemetry::continue_trace(&span, &metadata);
        tokio::spawn(
            start_sequence(
                key,
                req,
                sampling,
                self.inbox.clone(),
                self.commands.clone(),
                self.transfer_timeout,
                tx,
            )
            .instrument(span),
        );
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let key: AttemptKey = request.into_inner().request_id.parse()?;
        let (reply, found) = oneshot::channel();
        self.commands
            .send(Command::Abort { key, reply })
            .map_err(|_| Status::internal("the decode engine has stopped"))?;
        let found = found.await.unwrap_or(false);
        Ok(Response::new(pb::AbortResponse { found }))
    }
}
