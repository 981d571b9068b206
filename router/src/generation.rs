//! One request through the cluster, as a small state machine (`Phase`) driven by
//! [`Relay::run`]:
//!
//! ```text
//! Routing ──pair──▶ Prefilling ──first token──▶ Decoding ──finish──▶ done
//!    ▲  └──local (short prompt, or a migration)──────▶ │
//!    │                                                  ▼ an attempt failed
//!    └──────────── next attempt ──────────────── Migrating ──too many moves──▶ error
//! ```
//!
//! Disaggregated: open the decode stream, run the prompt on the prefill worker (which pushes
//! the cache to the decode worker), then relay tokens — the first from the prefill answer, the
//! rest from the decode stream. Prompts shorter than `disagg_min_tokens` skip the prefill
//! worker: the decode worker prefills them itself and streams every token.
//!
//! When an attempt fails — a worker unreachable, failing, stalled, refusing, or a stream that
//! ends without a finish — the relay alone decides what follows: before the first token the
//! request is paired again on other workers; after it, it *migrates*: another decode worker
//! recomputes the prompt and every token already sent (as they were first computed) and
//! resumes the sampler from the RNG state the last worker reported, so the client sees one
//! stream with no token lost or repeated, and greedy or seeded sampling gives exactly the
//! tokens of an unfaulted run. Each attempt has its own [`AttemptKey`]; at most
//! `migration_limit` moves per request, all within its deadline.
//!
//! Either way text is decoded incrementally, stop strings and stop token ids applied, and an
//! attempt that ends any other way than by its worker's own finish is aborted there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::IncrementalDecoder;
use sluice_proto::v1::{self as pb, FinishReason};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::decode_client::DecodeClient;
use sluice_proto::worker::v1::prefill_client::PrefillClient;
use sluice_runtime::sampling;
use sluice_runtime::telemetry::traced;
use sluice_runtime::{AttemptKey, Role, WorkerId};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::admission::Targets;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::pool::{Assignment, CallOutcome, Pair, Work, WorkerPool, WorkerState};
use crate::stop::StopMatcher;
use crate::validate::{ModelContext, ValidRequest};

pub type ChunkTx = mpsc::Sender<Result<pb::GenerateChunk, Status>>;

/// What every request's relay needs from the router.
pub struct Relay {
    pub pool: Arc<WorkerPool>,
    pub model: Arc<ModelContext>,
    /// Longest wait for the next token of a decode stream before the worker counts as stalled.
    pub token_timeout: Duration,
    /// Prompts shorter than this are prefilled on the decode worker (0: never).
    pub disagg_min_tokens: usize,
    /// Moves one request may make to other workers: re-pairings before its first token and
    /// migrations after it.
    pub migration_limit: usize,
    /// What requests were admitted against: a request not started within its
    /// time-to-first-token target is not moved again but refused.
    pub targets: Targets,
    pub metrics: Arc<RouterMetrics>,
}

/// Turns tokens into chunks: text increments, stop rules, log-probabilities, usage, latency.
struct Emitter<'a> {
    relay: &'a Relay,
    request: &'a ValidRequest,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// The prompt's text, sent before the first token's (echo).
    echo: Option<String>,
    /// Every token sent to the client so far: what a migration recomputes.
    tokens: Vec<u32>,
    /// The sampler's RNG state after the last of `tokens`, as its worker reported it.
    rng_state: Option<u64>,
    arrived: Instant,
    last_token: Option<Instant>,
    tx: &'a ChunkTx,
}

impl Emitter<'_> {
    /// Sends `token` (with `finish` when the worker that sampled it says it is the last: the
    /// worker decides end-of-sequence, stop tokens and length; this decides stop strings).
    /// Returns the finish reason when the request is over.
    async fn token(
        &mut self,
        token: u32,
        finish: Option<FinishReason>,
        logprobs: Option<pb::TokenLogprobs>,
    ) -> Result<Option<FinishReason>, RouterError> {
        let now = Instant::now();
        let m = &self.relay.metrics;
        match self.last_token {
            None => m.ttft.observe((now - self.arrived).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        m.generated_tokens.inc();
        self.tokens.push(token);
        let tokenizer = &self.relay.model.tokenizer;
        let sampling = &self.request.sampling;
        if finish.is_none() && self.tokens.len() >= sampling.max_tokens {
            return Err(RouterError::Internal(format!(
                "a worker sent token {} of a request for {} without ending it",
                self.tokens.len(),
                sampling.max_tokens
            )));
        }
        // A stop token ends the text without adding to it (a complete constraint, the other
        // way a worker stops, ends it with its last token's text).
        let piece =
            if finish == Some(FinishReason::Stop) && sampling.stop_token_ids.contains(&token) {
                String::new()
            } else if let Some(markup) = self.relay.model.markup_text(token) {
                // The decoder skips special tokens: release what it holds, then the tag.
                let mut piece = self
                    .decoder
                    .finish(tokenizer)
                    .map_err(|e| RouterError::Runtime(e.into()))?;
                piece.push_str(markup);
                piece
            } else {
                self.decoder
                    .push(tokenizer, token)
                    .map_err(|e| RouterError::Runtime(e.into()))?
            };
        let (mut text, stopped) = self.stops.push(&piece);
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else {
            finish
        };
        if finish.is_some() && !stopped {
            let tail = self
                .decoder
                .finish(tokenizer)
                .map_err(|e| RouterError::Runtime(e.into()))?;
            let (more, _) = self.stops.push(&tail);
            text.push_str(&more);
            text.push_str(&self.stops.finish());
        }
        if let Some(prompt) = self.echo.take() {
            text.insert_str(0, &prompt);
        }
        let chunk = pb::GenerateChunk {
            request_id: self.request.request_id.clone(),
            token_ids: vec![token],
            text,
            finish_reason: finish.map_or(FinishReason::Unspecified, |f| f) as i32,
            usage: finish.map(|_| self.usage()),
            logprobs: logprobs
                .filter(|_| sampling.logprobs.is_some())
                .into_iter()
                .collect(),
            // A chat answer's reader (the front end's) fills these from `text`.
            ..Default::default()
        };
        // A closed channel means the caller left; the select in `run` handles that.
        let _ = self.tx.send(Ok(chunk)).await;
        Ok(finish)
    }

    fn usage(&self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.request.prompt.len() as u32,
            completion_tokens: self.tokens.len() as u32,
        }
    }
}

/// Where one request stands.
enum Phase {
    /// Choosing workers: first, or again after an attempt failed.
    Routing,
    /// The prompt runs on the prefill worker; the decode stream (absent for a one-token
    /// request) waits for the cache it pushes.
    Prefilling {
        pair: Pair,
        stream: Option<Streaming<wpb::TokenChunk>>,
        abort: AbortOnDrop,
    },
    /// Tokens come from this decode worker's stream.
    Decoding {
        decode: Assignment,
        stream: Streaming<wpb::TokenChunk>,
        abort: AbortOnDrop,
    },
    /// An attempt failed: the request goes back to routing (paired again before its first
    /// token, migrated after it) unless it has moved too often.
    Migrating(Failure),
}

enum Next {
    Phase(Box<Phase>),
    Done(FinishReason),
}

/// Why an attempt ended without finishing the request.
enum Stop {
    /// The request itself is at fault (or cannot go on): no other worker would do better.
    Final(RouterError),
    /// The worker is: the request moves on.
    Moved(Failure),
}

struct Failure {
    worker: Arc<WorkerState>,
    kind: FailureKind,
    /// The `reason` label of `sluice_router_migrations_total`.
    reason: &'static str,
    /// What the client gets if the request cannot move any more.
    error: RouterError,
}

/// How an attempt's worker failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// The connection failed or broke.
    Unreachable,
    /// A refusal with a meaning of its own (full, or a cache it cannot take): nothing against
    /// the worker.
    Refused,
    /// An error status of the worker's own.
    Failed,
    /// No token for the token timeout.
    Stalled,
    /// The token stream ended without a finish reason.
    StreamEnded,
}

impl FailureKind {
    /// What the failure says of the worker's health (`None`: nothing).
    fn outcome(self) -> Option<CallOutcome> {
        match self {
            FailureKind::Refused => None,
            FailureKind::Unreachable => Some(CallOutcome::Unreachable),
            FailureKind::Failed | FailureKind::Stalled | FailureKind::StreamEnded => {
                Some(CallOutcome::Failed)
            }
        }
    }

    fn label(self, role: Role) -> &'static str {
        use FailureKind::*;
        match (role, self) {
            (Role::Prefill, Unreachable) => "prefill_unreachable",
            (Role::Prefill, Refused) => "prefill_refused",
            (Role::Prefill, _) => "prefill_failed",
            (_, Unreachable) => "decode_unreachable",
            (_, Refused) => "decode_refused",
            (_, Failed) => "decode_failed",
            (_, Stalled) => "decode_stalled",
            (_, StreamEnded) => "decode_stream_ended",
        }
    }
}

fn failure(role: Role, worker: &Arc<WorkerState>, kind: FailureKind, error: RouterError) -> Stop {
    Stop::Moved(Failure {
        worker: worker.clone(),
        kind,
        reason: kind.label(role),
        error,
    })
}

/// Classifies a worker's failed call once: the request's fault, a refusal, or the worker's.
fn classify(role: Role, worker: &Arc<WorkerState>, status: Status) -> Stop {
    let code = status.code();
    // A status the worker sent has no source; one made here from a broken or refused
    // connection has the transport error as its source.
    let unreachable = std::error::Error::source(&status).is_some();
    let kind = match code {
        tonic::Code::InvalidArgument => return Stop::Final(RouterError::Runtime(status.into())),
        tonic::Code::ResourceExhausted | tonic::Code::FailedPrecondition => {
            return failure(
                role,
                worker,
                FailureKind::Refused,
                RouterError::Runtime(status.into()),
            );
        }
        _ if unreachable => FailureKind::Unreachable,
        _ => FailureKind::Failed,
    };
    let message = format!("{:?}: {}", code, status.message());
    failure(role, worker, kind, worker_failed(role, worker, message))
}

fn worker_failed(role: Role, worker: &WorkerState, message: String) -> RouterError {
    RouterError::WorkerFailed {
        role: role.as_str(),
        worker: worker.info.worker_id.to_string(),
        message,
    }
}

/// A decode worker's own failure that is no status: a stall or a stream cut short.
fn decode_failure(worker: &Arc<WorkerState>, kind: FailureKind, message: String) -> Stop {
    let error = worker_failed(Role::Decode, worker, message);
    failure(Role::Decode, worker, kind, error)
}

/// Aborts an attempt's sequence on its decode worker when dropped armed: whatever ends the
/// attempt other than the worker's own finish (a failure, the caller leaving, the router's
/// stop strings), the worker never keeps the sequence. Keyed by the attempt, so it can never
/// touch the request's next attempt nor another client's.
struct AbortOnDrop {
    channel: Option<Channel>,
    key: AttemptKey,
}

impl AbortOnDrop {
    fn new(decode: &Assignment, key: AttemptKey) -> Self {
        AbortOnDrop {
            channel: Some(decode.worker().channel.clone()),
            key,
        }
    }

    /// The worker ended the sequence itself.
    fn disarm(&mut self) {
        self.channel = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request_id = self.key.to_string();
        runtime.spawn(async move {
            let mut client = DecodeClient::new(channel);
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                client.abort(wpb::AbortRequest { request_id }),
            )
            .await;
        });
    }
}

impl Relay {
    /// Runs `request` (arrived at `arrived`) to its end, sending chunks on `tx`; returns how
    /// it finished.
    pub async fn run(
        &self,
        request: ValidRequest,
        arrived: Instant,
        tx: ChunkTx,
    ) -> Result<FinishReason, RouterError> {
        let echo = if request.sampling.echo {
            let text = self
                .model
                .tokenizer
                .decode(&request.prompt, false)
                .map_err(|e| RouterError::Runtime(e.into()))?;
            Some(text)
        } else {
            None
        };
        let mut emitter = Emitter {
            relay: self,
            request: &request,
            decoder: IncrementalDecoder::new(true),
            stops: StopMatcher::new(request.sampling.stop.clone()),
            echo,
            tokens: Vec::new(),
            rng_state: None,
            arrived,
            last_token: None,
            tx: &tx,
        };
        // Dropping `drive` (the caller left) drops its phase, which aborts the attempt.
        tokio::select! {
            r = self.drive(&request, &mut emitter) => r,
            () = tx.closed() => Err(RouterError::Cancelled),
        }
    }

    /// Moves the request through its phases until it finishes or cannot go on.
    async fn drive(
        &self,
        request: &ValidRequest,
        emitter: &mut Emitter<'_>,
    ) -> Result<FinishReason, RouterError> {
        let mut key = AttemptKey::first();
        // Workers that failed this request: its next attempts go elsewhere.
        let mut excluded: Vec<WorkerId> = Vec::new();
        let mut phase = Phase::Routing;
        loop {
            let step = match phase {
                Phase::Routing => self.route(key, &excluded, request, emitter).await,
                Phase::Prefilling {
                    pair,
                    stream,
                    abort,
                } => {
                    self.prefill(key, pair, stream, abort, request, emitter)
                        .await
                }
                Phase::Decoding {
                    decode,
                    mut stream,
                    mut abort,
                } => self
                    .decode(&decode, &mut stream, &mut abort, emitter)
                    .await
                    .map(Next::Done),
                Phase::Migrating(failure) => self
                    .migrate(failure, &mut key, &mut excluded, emitter)
                    .map(|next| Next::Phase(Box::new(next)))
                    .map_err(Stop::Final),
            };
            phase = match step {
                Ok(Next::Phase(next)) => *next,
                Ok(Next::Done(reason)) => return Ok(reason),
                Err(Stop::Final(e)) => return Err(e),
                Err(Stop::Moved(failure)) => Phase::Migrating(failure),
            };
        }
    }

    /// After a failed attempt: counts it against its worker, then sends the request back to
    /// routing with the next attempt key and the worker excluded — or ends it when it has
    /// moved `migration_limit` times.
    fn migrate(
        &self,
        failure: Failure,
        key: &mut AttemptKey,
        excluded: &mut Vec<WorkerId>,
        emitter: &Emitter<'_>,
    ) -> Result<Phase, RouterError> {
        let worker = &failure.worker;
        if let Some(outcome) = failure.kind.outcome()
            && worker.record(outcome)
        {
            self.metrics.ejected(worker.info.role.as_str());
        }
        if key.attempt() as usize >= self.migration_limit {
            return Err(failure.error);
        }
        // Before its first token, a request past its time-to-first-token target is lost to
        // the client's patience: moving it would spend work on nobody.
        if emitter.tokens.is_empty()
            && self.targets.ttft_left(emitter.arrived.elapsed()) == Some(Duration::ZERO)
        {
            return Err(RouterError::Overloaded {
                message: format!(
                    "not started within its time-to-first-token target ({})",
                    failure.error
                ),
                retry_after: Some(Duration::from_secs(1)),
            });
        }
        tracing::warn!(
            attempt = %key,
            worker = %worker.info.worker_id,
            sent = emitter.tokens.len(),
            "{}; moving the request ({})",
            failure.error,
            failure.reason
        );
        self.metrics.migrated(failure.reason);
        excluded.push(worker.info.worker_id.clone());
        *key = key.next();
        Ok(Phase::Routing)
    }

    /// What is left of the request's time-to-first-token target, for a worker's queue (0:
    /// no target; at least 1 ms otherwise).
    fn queue_budget_ms(&self, emitter: &Emitter<'_>) -> u32 {
        self.targets
            .ttft_left(emitter.arrived.elapsed())
            .map_or(0, |left| left.as_millis().clamp(1, u32::MAX.into()) as u32)
    }

    /// Chooses the workers of attempt `key` and opens its decode stream.
    async fn route(
        &self,
        key: AttemptKey,
        excluded: &[WorkerId],
        request: &ValidRequest,
        emitter: &Emitter<'_>,
    ) -> Result<Next, Stop> {
        // A request with tokens sent continues on a decode worker that recomputes them.
        let mut local = !emitter.tokens.is_empty() || request.prompt.len() < self.disagg_min_tokens;
        let work = Work {
            prompt_tokens: request.prompt.len(),
            output_tokens: request.sampling.max_tokens - emitter.tokens.len(),
        };
        if !local {
            match self.pool.pick_pair(excluded, work) {
                Ok(pair) => {
                    let stream = if request.sampling.max_tokens > 1 {
                        Some(
                            self.open_decode(key, &pair.decode, false, request, emitter)
                                .await?,
                        )
                    } else {
                        // Nothing to decode after the first token: the cache goes nowhere.
                        None
                    };
                    let abort = AbortOnDrop::new(&pair.decode, key);
                    return Ok(Next::Phase(Box::new(Phase::Prefilling {
                        pair,
                        stream,
                        abort,
                    })));
                }
                // Every prefill worker failed this request: its decode worker prefills it.
                Err(RouterError::NoWorker(_)) if key.attempt() > 0 => local = true,
                Err(e) => return Err(Stop::Final(e)),
            }
        }
        debug_assert!(local);
        let decode = self.pool.pick_decode(excluded, work).map_err(Stop::Final)?;
        let stream = self
            .open_decode(key, &decode, true, request, emitter)
            .await?;
        let abort = AbortOnDrop::new(&decode, key);
        Ok(Next::Phase(Box::new(Phase::Decoding {
            decode,
            stream,
            abort,
        })))
    }

    /// Opens the decode stream of attempt `key`: waiting for a pushed cache, or (`local`)
    /// prefilling the prompt and the tokens already sent on the decode worker itself.
    async fn open_decode(
        &self,
        key: AttemptKey,
        decode: &Assignment,
        local: bool,
        request: &ValidRequest,
        emitter: &Emitter<'_>,
    ) -> Result<Streaming<wpb::TokenChunk>, Stop> {
        let max_tokens = request.sampling.max_tokens;
        let sent = emitter.tokens.len();
        let mut client = DecodeClient::new(decode.worker().channel.clone());
        let call = client.decode(traced(wpb::DecodeRequest {
            request_id: key.to_string(),
            transfer_id: if local {
                String::new()
            } else {
                key.to_string()
            },
            prompt_token_ids: request.prompt.clone(),
            sampling: Some(sampling::to_worker(&request.sampling)),
            // Disaggregated: the prefill worker samples the first token.
            max_new_tokens: if local {
                max_tokens - sent
            } else {
                max_tokens - 1
            } as u32,
            eos_token_ids: request.eos.clone(),
            stop_token_ids: request.sampling.stop_token_ids.clone(),
            prefill: local,
            generated_token_ids: emitter.tokens.clone(),
            rng_state: if sent > 0 { emitter.rng_state } else { None },
            client_request_id: request.request_id.clone(),
            // Prefilled here with nothing sent yet: shed if it waits past its budget.
            queue_budget_ms: if local && sent == 0 {
                self.queue_budget_ms(emitter)
            } else {
                0
            },
        }));
        match call.await {
            Ok(stream) => Ok(stream.into_inner()),
            Err(status) => Err(classify(Role::Decode, decode.worker(), status)),
        }
    }

    /// Runs the prompt on the prefill worker and sends the first token.
    async fn prefill(
        &self,
        key: AttemptKey,
        pair: Pair,
        stream: Option<Streaming<wpb::TokenChunk>>,
        abort: AbortOnDrop,
        request: &ValidRequest,
        emitter: &mut Emitter<'_>,
    ) -> Result<Next, Stop> {
        let decode = pair.decode.worker();
        let mut client = PrefillClient::new(pair.prefill.worker().channel.clone());
        // Without a decode stream the cache has nowhere to go: the prefill worker keeps
        // nothing.
        let (decode_address, transfer_id) = match stream {
            Some(_) => (decode.info.address.clone(), key.to_string()),
            None => (String::new(), String::new()),
        };
        let first = client
            .prefill(traced(wpb::PrefillRequest {
                request_id: key.to_string(),
                prompt_token_ids: request.prompt.clone(),
                sampling: Some(sampling::to_worker(&request.sampling)),
                decode_worker_id: decode.info.worker_id.to_string(),
                decode_address,
                transfer_id,
                transport: pair.transport.to_pb(),
                client_request_id: request.request_id.clone(),
                // Queued past what is left of its time-to-first-token target, it is shed.
                queue_budget_ms: self.queue_budget_ms(emitter),
                eos_token_ids: request.eos.clone(),
                stop_token_ids: request.sampling.stop_token_ids.clone(),
                max_new_tokens: request.sampling.max_tokens as u32,
            }))
            .await
            .map_err(|status| classify(Role::Prefill, pair.prefill.worker(), status))?
            .into_inner();
        pair.prefill.worker().record(CallOutcome::Answered);
        emitter.rng_state = Some(first.rng_state);
        let reason =
            FinishReason::try_from(first.finish_reason).unwrap_or(FinishReason::Unspecified);
        let finish = emitter
            .token(
                first.first_token,
                (reason != FinishReason::Unspecified).then_some(reason),
                first.first_logprobs,
            )
            .await
            .map_err(Stop::Final)?;
        if let Some(reason) = finish {
            return Ok(Next::Done(reason));
        }
        match stream {
            Some(stream) => Ok(Next::Phase(Box::new(Phase::Decoding {
                decode: pair.decode,
                stream,
                abort,
            }))),
            None => Err(Stop::Final(RouterError::Internal(
                "the first token did not end a one-token request".into(),
            ))),
        }
    }

    /// Relays the decode stream until the request finishes.
    async fn decode(
        &self,
        decode: &Assignment,
        stream: &mut Streaming<wpb::TokenChunk>,
        abort: &mut AbortOnDrop,
        emitter: &mut Emitter<'_>,
    ) -> Result<FinishReason, Stop> {
        let worker = decode.worker();
        let mut answered = false;
        loop {
            let chunk = match tokio::time::timeout(self.token_timeout, stream.message()).await {
                Err(_) => {
                    return Err(decode_failure(
                        worker,
                        FailureKind::Stalled,
                        format!("no token for {:?}", self.token_timeout),
                    ));
                }
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => {
                    return Err(decode_failure(
                        worker,
                        FailureKind::StreamEnded,
                        "the token stream ended without a finish reason".into(),
                    ));
                }
                Ok(Err(status)) => return Err(classify(Role::Decode, worker, status)),
            };
            if !answered {
                answered = true;
                worker.record(CallOutcome::Answered);
            }
            let reason =
                FinishReason::try_from(chunk.finish_reason).unwrap_or(FinishReason::Unspecified);
            if reason != FinishReason::Unspecified {
                // The worker has ended the sequence itself.
                abort.disarm();
            }
            let n = chunk.token_ids.len();
            let mut logprobs = chunk.logprobs.into_iter();
            for (i, &token) in chunk.token_ids.iter().enumerate() {
                let last = i + 1 == n && reason != FinishReason::Unspecified;
                let finish = emitter
                    .token(token, last.then_some(reason), logprobs.next())
                    .await
                    .map_err(Stop::Final)?;
                if let Some(reason) = finish {
                    return Ok(reason);
                }
            }
            if n > 0 {
                emitter.rng_state = Some(chunk.rng_state);
            }
            if n == 0 && reason != FinishReason::Unspecified {
                return Err(Stop::Final(RouterError::Internal(format!(
                    "decode worker finished with {reason:?} and no token"
                ))));
            }
        }
    }
}
