//! One request through the cluster: open the decode stream, run the prompt on the prefill
//! worker (which pushes the cache to the decode worker), then relay tokens as chunks — the
//! first from the prefill answer, the rest from the decode stream — with text decoded
//! incrementally and stop strings applied. A caller that goes away aborts the request on the
//! decode worker.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::IncrementalDecoder;
use sluice_proto::v1::{self as pb, FinishReason};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::decode_client::DecodeClient;
use sluice_proto::worker::v1::prefill_client::PrefillClient;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::RouterError;
use crate::pool::{Pair, WorkerPool};
use crate::stop::StopMatcher;
use crate::validate::{ModelContext, ValidRequest};

pub type ChunkTx = mpsc::Sender<Result<pb::GenerateChunk, Status>>;

/// Turns tokens into chunks: text increments, stop strings, usage.
struct Emitter<'a> {
    model: &'a ModelContext,
    request: &'a ValidRequest,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    generated: usize,
    tx: &'a ChunkTx,
}

impl Emitter<'_> {
    /// Sends `token` (with `finish` when the worker says it is the last). Returns the finish
    /// reason when the request is over.
    async fn token(
        &mut self,
        token: u32,
        finish: Option<FinishReason>,
    ) -> Result<Option<FinishReason>, RouterError> {
        self.generated += 1;
        let piece = self
            .decoder
            .push(&self.model.tokenizer, token)
            .map_err(|e| RouterError::Runtime(e.into()))?;
        let (mut text, stopped) = self.stops.push(&piece);
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if let Some(f) = finish {
            Some(f)
        } else if self.generated >= self.request.sampling.max_tokens {
            Some(FinishReason::Length)
        } else if self.request.eos.contains(&token) {
            Some(FinishReason::Eos)
        } else {
            None
        };
        if finish.is_some() && !stopped {
            let tail = self
                .decoder
                .finish(&self.model.tokenizer)
                .map_err(|e| RouterError::Runtime(e.into()))?;
            let (more, _) = self.stops.push(&tail);
            text.push_str(&more);
            text.push_str(&self.stops.finish());
        }
        let chunk = pb::GenerateChunk {
            request_id: self.request.request_id.clone(),
            token_ids: vec![token],
            text,
            finish_reason: finish.map_or(FinishReason::Unspecified, |f| f) as i32,
            usage: finish.map(|_| self.usage()),
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

fn worker_failed(
    role: &'static str,
    pair_worker: &crate::pool::Assignment,
    status: &Status,
) -> RouterError {
    // Refusals with a meaning of their own keep it; everything else is the worker failing.
    RouterError::WorkerFailed {
        role,
        worker: pair_worker.worker().info.worker_id.to_string(),
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

fn passthrough(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::ResourceExhausted
            | tonic::Code::FailedPrecondition
    )
}

/// Runs `request` to its end, sending chunks on `tx`.
pub async fn run(
    pool: Arc<WorkerPool>,
    model: Arc<ModelContext>,
    request: ValidRequest,
    transfer_timeout: Duration,
    tx: ChunkTx,
) -> Result<(), RouterError> {
    let pair = pool.pick_pair()?;
    let outcome = tokio::select! {
        r = relay(&pair, &model, &request, transfer_timeout, &tx) => r,
        () = tx.closed() => Err(RouterError::Internal("the caller went away".into())),
    };
    if outcome.is_err() {
        // Whatever happened, the decode worker must not keep the sequence.
        let mut client = DecodeClient::new(pair.decode.worker().channel.clone());
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
    pair: &Pair,
    model: &ModelContext,
    request: &ValidRequest,
    transfer_timeout: Duration,
    tx: &ChunkTx,
) -> Result<(), RouterError> {
    let decode_info = &pair.decode.worker().info;
    let transfer_id = format!(
        "{}@{}",
        request.request_id,
        crate::validate::new_request_id()
    );
    let sampling = Some(to_wire_sampling(request));
    let mut emitter = Emitter {
        model,
        request,
        decoder: IncrementalDecoder::new(true),
        stops: StopMatcher::new(request.sampling.stop.clone()),
        generated: 0,
        tx,
    };
    // The decode worker waits for the cache from now on.
    let mut decode_stream = if request.sampling.max_tokens > 1 {
        let mut decode = DecodeClient::new(pair.decode.worker().channel.clone());
        let call = decode.decode(wpb::DecodeRequest {
            request_id: request.request_id.clone(),
            transfer_id: transfer_id.clone(),
            prompt_token_ids: request.prompt.clone(),
            sampling: sampling.clone(),
            max_new_tokens: (request.sampling.max_tokens - 1) as u32,
            eos_token_ids: request.eos.clone(),
        });
        let stream = call.await.map_err(|s| {
            if passthrough(&s) {
                RouterError::Runtime(s.into())
            } else {
                worker_failed("decode", &pair.decode, &s)
            }
        })?;
        Some(stream.into_inner())
    } else {
        None
    };
    let mut prefill = PrefillClient::new(pair.prefill.worker().channel.clone());
    // Without a decode stream the cache has nowhere to go: the prefill worker keeps nothing.
    let (decode_address, transfer_id) = match decode_stream {
        Some(_) => (decode_info.address.clone(), transfer_id),
        None => (String::new(), String::new()),
    };
    let first = prefill
        .prefill(wpb::PrefillRequest {
            request_id: request.request_id.clone(),
            prompt_token_ids: request.prompt.clone(),
            sampling,
            decode_worker_id: decode_info.worker_id.to_string(),
            decode_address,
            transfer_id,
            transport: pair.transport.to_string(),
        })
        .await
        .map_err(|s| {
            if passthrough(&s) {
                RouterError::Runtime(s.into())
            } else {
                worker_failed("prefill", &pair.prefill, &s)
            }
        })?
        .into_inner();
    if emitter.token(first.first_token, None).await?.is_some() {
        return Ok(());
    }
    let Some(stream) = decode_stream.as_mut() else {
        return Ok(());
    };
    loop {
        let chunk = tokio::time::timeout(transfer_timeout, stream.message())
            .await
            .map_err(|_| RouterError::WorkerFailed {
                role: "decode",
                worker: decode_info.worker_id.to_string(),
                message: format!("no token for {transfer_timeout:?}"),
            })?;
        let chunk = match chunk {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(RouterError::WorkerFailed {
                    role: "decode",
                    worker: decode_info.worker_id.to_string(),
                    message: "the token stream ended without a finish reason".into(),
                });
            }
            Err(s) if passthrough(&s) => return Err(RouterError::Runtime(s.into())),
            Err(s) => return Err(worker_failed("decode", &pair.decode, &s)),
        };
        let reason =
            FinishReason::try_from(chunk.finish_reason).unwrap_or(FinishReason::Unspecified);
        let n = chunk.token_ids.len();
        for (i, &token) in chunk.token_ids.iter().enumerate() {
            let last = i + 1 == n && reason != FinishReason::Unspecified;
            if emitter
                .token(token, last.then_some(reason))
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        if n == 0 && reason != FinishReason::Unspecified {
            return Err(RouterError::Internal(format!(
                "decode worker finished with {reason:?} and no token"
            )));
        }
    }
}

fn to_wire_sampling(request: &ValidRequest) -> pb::SamplingParams {
    let p = &request.sampling.params;
    pb::SamplingParams {
        temperature: Some(p.temperature),
        top_p: Some(p.top_p),
        top_k: p.top_k as u32,
        min_p: p.min_p,
        seed: p.seed,
        repetition_penalty: Some(p.repetition_penalty),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        max_tokens: Some(request.sampling.max_tokens as u32),
        stop: Vec::new(),
        ignore_eos: request.sampling.ignore_eos,
    }
}
