//! One request through the cluster. Disaggregated: open the decode stream, run the prompt on
//! the prefill worker (which pushes the cache to the decode worker), then relay tokens — the
//! first from the prefill answer, the rest from the decode stream. Prompts shorter than
//! `disagg_min_tokens` skip the prefill worker: the decode worker prefills them itself and
//! streams every token. Either way text is decoded incrementally, stop strings and stop token
//! ids applied, and a caller that goes away aborts the request on the decode worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::IncrementalDecoder;
use sluice_proto::v1::{self as pb, FinishReason};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::decode_client::DecodeClient;
use sluice_proto::worker::v1::prefill_client::PrefillClient;
use sluice_runtime::telemetry::traced;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::pool::{Assignment, Pair, WorkerPool};
use crate::stop::StopMatcher;
use crate::validate::{ModelContext, ValidRequest};

pub type ChunkTx = mpsc::Sender<Result<pb::GenerateChunk, Status>>;

/// What every request's relay needs from the router.
pub struct Relay {
    pub pool: Arc<WorkerPool>,
    pub model: Arc<ModelContext>,
    pub transfer_timeout: Duration,
    /// Prompts shorter than this are prefilled on the decode worker (0: never).
    pub disagg_min_tokens: usize,
    pub metrics: Arc<RouterMetrics>,
}

/// The workers one request runs on.
enum Route {
    Disaggregated(Pair),
    /// The decode worker prefills the prompt itself.
    Local(Assignment),
}

impl Route {
    fn decode(&self) -> &Assignment {
        match self {
            Route::Disaggregated(pair) => &pair.decode,
            Route::Local(decode) => decode,
        }
    }
}

/// Turns tokens into chunks: text increments, stop rules, log-probabilities, usage, latency.
struct Emitter<'a> {
    relay: &'a Relay,
    request: &'a ValidRequest,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// The prompt's text, sent before the first token's (echo).
    echo: Option<String>,
    generated: usize,
    arrived: Instant,
    last_token: Option<Instant>,
    tx: &'a ChunkTx,
}

impl Emitter<'_> {
    /// Sends `token` (with `finish` when the worker says it is the last). Returns the finish
    /// reason when the request is over.
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
        self.generated += 1;
        let tokenizer = &self.relay.model.tokenizer;
        let sampling = &self.request.sampling;
        let stop_token = sampling.stop_token_ids.contains(&token);
        // A stop token ends the text without adding to it.
        let piece = if stop_token {
            String::new()
        } else {
            self.decoder
                .push(tokenizer, token)
                .map_err(|e| RouterError::Runtime(e.into()))?
        };
        let (mut text, stopped) = self.stops.push(&piece);
        let finish = if stopped || stop_token {
            Some(FinishReason::Stop)
        } else if self.request.eos.contains(&token) {
            Some(FinishReason::Eos)
        } else if let Some(f) = finish {
            Some(f)
        } else if self.generated >= sampling.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
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
        };
        // A closed channel means the caller left; the select in `run` handles that.
        let _ = self.tx.send(Ok(chunk)).await;
        Ok(finish)
    }

    fn usage(&self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.request.prompt.len() as u32,
            completion_tokens: self.generated as u32,
        }
    }
}

fn worker_failed(role: &'static str, worker: &Assignment, status: &Status) -> RouterError {
    RouterError::WorkerFailed {
        role,
        worker: worker.worker().info.worker_id.to_string(),
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

/// A worker's refusal with a meaning of its own keeps it; anything else is the worker failing.
fn worker_error(role: &'static str, worker: &Assignment, status: Status) -> RouterError {
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::ResourceExhausted
        | tonic::Code::FailedPrecondition => RouterError::Runtime(status.into()),
        _ => worker_failed(role, worker, &status),
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
        let route = if request.prompt.len() < self.disagg_min_tokens {
            Route::Local(self.pool.pick_decode()?)
        } else {
            Route::Disaggregated(self.pool.pick_pair()?)
        };
        let outcome = tokio::select! {
            r = self.relay(&route, &request, arrived, &tx) => r,
            () = tx.closed() => Err(RouterError::Cancelled),
        };
        if outcome.is_err() {
            // Whatever happened, the decode worker must not keep the sequence.
            let mut client = DecodeClient::new(route.decode().worker().channel.clone());
            let request_id = request.request_id.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.abort(wpb::AbortRequest { request_id }),
                )
                .await;
            });
        }
        outcome
    }

    async fn relay(
        &self,
        route: &Route,
        request: &ValidRequest,
        arrived: Instant,
        tx: &ChunkTx,
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
            request,
            decoder: IncrementalDecoder::new(true),
            stops: StopMatcher::new(request.sampling.stop.clone()),
            echo,
            generated: 0,
            arrived,
            last_token: None,
            tx,
        };
        let sampling = Some(to_wire_sampling(request));
        let decode = route.decode();
        let transfer_id = format!(
            "{}@{}",
            request.request_id,
            crate::validate::new_request_id()
        );
        let local = matches!(route, Route::Local(_));
        let max_tokens = request.sampling.max_tokens;
        // The decode worker waits for the cache (or prefills) from now on.
        let mut decode_stream = if local || max_tokens > 1 {
            let mut client = DecodeClient::new(decode.worker().channel.clone());
            let call = client.decode(traced(wpb::DecodeRequest {
                request_id: request.request_id.clone(),
                transfer_id: if local {
                    String::new()
                } else {
                    transfer_id.clone()
                },
                prompt_token_ids: request.prompt.clone(),
                sampling: sampling.clone(),
                max_new_tokens: if local { max_tokens } else { max_tokens - 1 } as u32,
                eos_token_ids: request.worker_stop_ids(),
                prefill: local,
            }));
            let stream = call.await.map_err(|s| worker_error("decode", decode, s))?;
            Some(stream.into_inner())
        } else {
            None
        };
        if let Route::Disaggregated(pair) = route {
            let mut prefill = PrefillClient::new(pair.prefill.worker().channel.clone());
            // Without a decode stream the cache has nowhere to go: the prefill worker keeps
            // nothing.
            let (decode_address, transfer_id) = match decode_stream {
                Some(_) => (decode.worker().info.address.clone(), transfer_id),
                None => (String::new(), String::new()),
            };
            let first = prefill
                .prefill(traced(wpb::PrefillRequest {
                    request_id: request.request_id.clone(),
                    prompt_token_ids: request.prompt.clone(),
                    sampling,
                    decode_worker_id: decode.worker().info.worker_id.to_string(),
                    decode_address,
                    transfer_id,
                    transport: pair.transport.to_string(),
                }))
                .await
                .map_err(|s| worker_error("prefill", &pair.prefill, s))?
                .into_inner();
            if let Some(reason) = emitter
                .token(first.first_token, None, first.first_logprobs)
                .await?
            {
                return Ok(reason);
            }
        }
        match decode_stream.as_mut() {
            Some(stream) => self.relay_decode(stream, decode, &mut emitter).await,
            None => Err(RouterError::Internal(
                "the first token did not end a one-token request".into(),
            )),
        }
    }

    async fn relay_decode(
        &self,
        stream: &mut Streaming<wpb::TokenChunk>,
        decode: &Assignment,
        emitter: &mut Emitter<'_>,
    ) -> Result<FinishReason, RouterError> {
        let failed = |message: String| RouterError::WorkerFailed {
            role: "decode",
            worker: decode.worker().info.worker_id.to_string(),
            message,
        };
        loop {
            let chunk = tokio::time::timeout(self.transfer_timeout, stream.message())
                .await
                .map_err(|_| failed(format!("no token for {:?}", self.transfer_timeout)))?;
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return Err(failed(
                        "the token stream ended without a finish reason".into(),
                    ));
                }
                Err(s) => return Err(worker_error("decode", decode, s)),
            };
            let reason =
                FinishReason::try_from(chunk.finish_reason).unwrap_or(FinishReason::Unspecified);
            let n = chunk.token_ids.len();
            let mut logprobs = chunk.logprobs.into_iter();
            for (i, &token) in chunk.token_ids.iter().enumerate() {
                let last = i + 1 == n && reason != FinishReason::Unspecified;
                if let Some(reason) = emitter
                    .token(token, last.then_some(reason), logprobs.next())
                    .await?
                {
                    return Ok(reason);
                }
            }
            if n == 0 && reason != FinishReason::Unspecified {
                return Err(RouterError::Internal(format!(
                    "decode worker finished with {reason:?} and no token"
                )));
            }
        }
    }
}

fn to_wire_sampling(request: &ValidRequest) -> pb::SamplingParams {
    let s = &request.sampling;
    let p = &s.params;
    pb::SamplingParams {
        temperature: Some(p.temperature),
        top_p: Some(p.top_p),
        top_k: p.top_k as u32,
        min_p: p.min_p,
        seed: p.seed,
        repetition_penalty: Some(p.repetition_penalty),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        max_tokens: Some(s.max_tokens as u32),
        // Stop strings, stop ids and echo are the router's business.
        stop: Vec::new(),
        ignore_eos: s.ignore_eos,
        stop_token_ids: Vec::new(),
        logprobs: s.logprobs.map(|n| n as u32),
        echo: false,
    }
}
