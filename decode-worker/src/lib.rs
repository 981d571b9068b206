//! The decode worker: adopts caches pushed by prefill workers and runs one continuous decode
//! loop over all its sequences — every step advances each live sequence by one token — and
//! streams each sequence's tokens to its `Decode` call. A call that goes away (client
//! cancellation, `Abort`) frees its sequence before the next step.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{
    CacheConfig, LogitsMode, Model, ModelCache, Sampler, SamplingParams, SeqChunk, SeqId,
};
use sluice_proto::v1::FinishReason;
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::cache_transfer_server::CacheTransferServer;
use sluice_proto::worker::v1::decode_server::{Decode, DecodeServer};
use sluice_proto::worker::v1::worker_status_server::WorkerStatusServer;
use sluice_runtime::error::engine_status;
use sluice_runtime::serve::{advertised_address, serve, standard_routes};
use sluice_runtime::status::{
    LoadCounters, WorkerStatusService, ensure_registered, follow_registration,
};
use sluice_runtime::transport::{Arrival, CacheTransferService, InProcessHub};
use sluice_runtime::{
    CacheInbox, Membership, Registration, Result, Role, RuntimeError, TransportKind, WorkerId,
    WorkerInfo, sampling,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub worker_id: WorkerId,
    pub advertise: Option<String>,
    pub model_name: String,
    /// Sequences decoded at once.
    pub max_sequences: usize,
    /// Longest sequence (prompt + output), in tokens.
    pub max_context: usize,
    /// How long a `Decode` call waits for its cache.
    pub transfer_timeout: Duration,
}

impl DecodeConfig {
    pub fn new(worker_id: WorkerId, model_name: String) -> Self {
        DecodeConfig {
            worker_id,
            advertise: None,
            model_name,
            max_sequences: 32,
            max_context: 8192,
            transfer_timeout: Duration::from_secs(60),
        }
    }
}

type ChunkSender = mpsc::UnboundedSender<Result<pb::TokenChunk, Status>>;

struct Adopt {
    request_id: String,
    arrival: Arrival,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_new_tokens: usize,
    eos: Vec<u32>,
    tx: ChunkSender,
}

enum Command {
    Adopt(Box<Adopt>),
    Abort {
        request_id: String,
        reply: oneshot::Sender<bool>,
    },
}

/// Serves `Decode`, `CacheTransfer` and `WorkerStatus` on `listener` until `shutdown`. With a
/// `hub`, caches can also arrive in-process (`sluice up`).
pub async fn run(
    listener: TcpListener,
    model: Arc<Model>,
    membership: Arc<dyn Membership>,
    hub: Option<Arc<InProcessHub>>,
    config: DecodeConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let address = advertised_address(listener.local_addr()?, config.advertise.as_deref());
    let probe = model.new_cache(CacheConfig::for_sequences(1, 1))?;
    let inbox = Arc::new(CacheInbox::new(model.fingerprint(), move |t| {
        probe.layout(t)
    }));
    let mut transports = vec![TransportKind::Tcp];
    if let Some(hub) = &hub {
        hub.register(&address, inbox.clone());
        transports.push(TransportKind::InProcess);
    }
    let counters = Arc::new(LoadCounters::default());
    let commands = start_engine(model.clone(), &config, counters.clone())?;
    let info = WorkerInfo {
        worker_id: config.worker_id.clone(),
        role: Role::Decode,
        address: address.clone(),
        model_fingerprint: WorkerInfo::fingerprint_hex(model.fingerprint()),
        model: config.model_name.clone(),
        capacity: config.max_sequences,
        transports,
        expert_shard: None,
    };
    let registration = membership.register(info, shutdown.clone()).await?;
    tracing::info!(worker = %config.worker_id, %address, "decode worker registered");
    let (health, routes) = standard_routes()?;
    follow_registration(
        health,
        registration.clone(),
        vec!["sluice.worker.v1.Decode", "sluice.worker.v1.CacheTransfer"],
    );
    let staged = inbox.clone();
    let status =
        WorkerStatusService::new(config.worker_id.to_string(), counters, registration.clone())
            .with_extra_waiting(move || staged.staged() + staged.waiting());
    let service = DecodeService {
        vocab: model.spec().vocab,
        inbox: inbox.clone(),
        commands,
        registration,
        transfer_timeout: config.transfer_timeout,
    };
    let routes = routes
        .add_service(DecodeServer::new(service))
        .add_service(
            CacheTransferServer::new(CacheTransferService::new(inbox))
                .max_decoding_message_size(usize::MAX),
        )
        .add_service(WorkerStatusServer::new(status));
    serve(listener, routes, shutdown).await
}

fn start_engine(
    model: Arc<Model>,
    config: &DecodeConfig,
    counters: Arc<LoadCounters>,
) -> Result<mpsc::UnboundedSender<Command>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let cache_config = CacheConfig::for_sequences(config.max_sequences.max(1), config.max_context);
    LoadCounters::set(&counters.kv_blocks_total, cache_config.num_blocks);
    let mut engine = DecodeEngine {
        cache: model.new_cache(cache_config)?,
        model,
        active: Vec::new(),
        counters,
        total_blocks: cache_config.num_blocks,
    };
    std::thread::Builder::new()
        .name("sluice-decode-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok(tx)
}

struct Sequence {
    request_id: String,
    seq: SeqId,
    sampler: Sampler,
    last: u32,
    remaining: usize,
    eos: Vec<u32>,
    tx: ChunkSender,
}

struct DecodeEngine {
    model: Arc<Model>,
    cache: ModelCache,
    active: Vec<Sequence>,
    counters: Arc<LoadCounters>,
    total_blocks: usize,
}

impl DecodeEngine {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.active.is_empty() {
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            // Sequences whose caller went away are freed before the step.
            let (gone, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
                .into_iter()
                .partition(|s| s.tx.is_closed());
            self.active = live;
            for s in gone {
                tracing::debug!(request = %s.request_id, "caller went away; sequence freed");
                self.cache.release(s.seq);
            }
            self.publish_load();
            if !self.active.is_empty() {
                self.step();
                self.publish_load();
            }
        }
    }

    fn publish_load(&self) {
        LoadCounters::set(&self.counters.running, self.active.len());
        LoadCounters::set(
            &self.counters.kv_blocks_used,
            self.total_blocks - self.cache.free_blocks(),
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Adopt(a) => self.adopt(*a),
            Command::Abort { request_id, reply } => {
                let found = self.active.iter().position(|s| s.request_id == request_id);
                if let Some(i) = found {
                    let s = self.active.remove(i);
                    let _ = s.tx.send(Ok(pb::TokenChunk {
                        token_ids: Vec::new(),
                        finish_reason: FinishReason::Cancelled as i32,
                    }));
                    self.cache.release(s.seq);
                }
                let _ = reply.send(found.is_some());
            }
        }
    }

    fn adopt(&mut self, a: Adopt) {
        let handoff = a.arrival.handoff;
        let sampler = match Sampler::resume(
            a.params,
            &a.prompt,
            &[handoff.first_token],
            handoff.rng_state,
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = a.tx.send(Err(engine_status(&e)));
                return;
            }
        };
        let seq = match self.cache.import(&a.arrival.snapshot) {
            Ok(seq) => seq,
            Err(e) => {
                let _ = a.tx.send(Err(engine_status(&e)));
                return;
            }
        };
        self.active.push(Sequence {
            request_id: a.request_id,
            seq,
            sampler,
            last: handoff.first_token,
            remaining: a.max_new_tokens,
            eos: a.eos,
            tx: a.tx,
        });
    }

    /// One token for every live sequence.
    fn step(&mut self) {
        let last: Vec<[u32; 1]> = self.active.iter().map(|s| [s.last]).collect();
        let batch: Vec<SeqChunk> = self
            .active
            .iter()
            .zip(&last)
            .map(|(s, t)| SeqChunk {
                seq: s.seq,
                tokens: t,
            })
            .collect();
        let logits = match self
            .model
            .forward(&mut self.cache, &batch, LogitsMode::LastPerSequence)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("decode step of {} sequences failed: {e}", self.active.len());
                let status = engine_status(&e);
                for s in std::mem::take(&mut self.active) {
                    let _ = s.tx.send(Err(status.clone()));
                    self.cache.release(s.seq);
                }
                return;
            }
        };
        let vocab = self.model.spec().vocab;
        let mut finished = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            let token = s.sampler.sample(&logits[i * vocab..(i + 1) * vocab]).token;
            s.last = token;
            s.remaining = s.remaining.saturating_sub(1);
            let finish = if s.eos.contains(&token) {
                FinishReason::Eos
            } else if s.remaining == 0 {
                FinishReason::Length
            } else {
                FinishReason::Unspecified
            };
            let _ = s.tx.send(Ok(pb::TokenChunk {
                token_ids: vec![token],
                finish_reason: finish as i32,
            }));
            if finish != FinishReason::Unspecified {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let s = self.active.remove(i);
            self.cache.release(s.seq);
        }
    }
}

struct DecodeService {
    vocab: usize,
    inbox: Arc<CacheInbox>,
    commands: mpsc::UnboundedSender<Command>,
    registration: Registration,
    transfer_timeout: Duration,
}

impl DecodeService {
    fn validate(&self, req: &pb::DecodeRequest) -> Result<SamplingParams> {
        if req.transfer_id.is_empty() {
            return Err(RuntimeError::invalid("transfer_id", "must not be empty"));
        }
        if req.max_new_tokens == 0 {
            return Err(RuntimeError::invalid(
                "max_new_tokens",
                "must be at least 1",
            ));
        }
        if let Some(id) = req
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab)
        {
            return Err(RuntimeError::invalid(
                "prompt_token_ids",
                format!(
                    "token id {id} is not below the vocabulary size {}",
                    self.vocab
                ),
            ));
        }
        sampling::params_from_pb(req.sampling.as_ref())
    }
}

#[tonic::async_trait]
impl Decode for DecodeService {
    type DecodeStream = UnboundedReceiverStream<Result<pb::TokenChunk, Status>>;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        ensure_registered(&self.registration)?;
        let req = request.into_inner();
        let params = self.validate(&req)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox = self.inbox.clone();
        let commands = self.commands.clone();
        let timeout = self.transfer_timeout;
        tokio::spawn(async move {
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
            let adopt = Adopt {
                request_id: req.request_id,
                arrival,
                prompt: req.prompt_token_ids,
                params,
                max_new_tokens: req.max_new_tokens as usize,
                eos: req.eos_token_ids,
                tx,
            };
            if let Err(mpsc::error::SendError(Command::Adopt(a))) =
                commands.send(Command::Adopt(Box::new(adopt)))
            {
                let _ =
                    a.tx.send(Err(Status::internal("the decode engine has stopped")));
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let (reply, found) = oneshot::channel();
        self.commands
            .send(Command::Abort {
                request_id: request.into_inner().request_id,
                reply,
            })
            .map_err(|_| Status::internal("the decode engine has stopped"))?;
        let found = found.await.unwrap_or(false);
        Ok(Response::new(pb::AbortResponse { found }))
    }
}
