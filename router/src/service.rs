//! `sluice.v1.Inference` and `RouterStatus` on the router.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use sluice_proto::v1::inference_server::Inference;
use sluice_proto::v1::{self as pb, FinishReason};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::router_status_server::RouterStatus;
use sluice_runtime::serve::grpc_timeout;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::admission::{Admission, estimate};
use crate::api_keys::HeldKey;
use crate::chat::{GrpcChat, GrpcChatReader, ToolCallIds};
use crate::error::RouterError;
use crate::generation::Relay;
use crate::metrics::RouterMetrics;
use crate::pool::{Work, WorkerPool};
use crate::validate::{ModelContext, ValidRequest, new_request_id};

/// The router's core, shared by the gRPC and HTTP front ends: admission, then the relay of
/// each admitted request on its own task.
pub struct Frontend {
    pub relay: Arc<Relay>,
    pub admission: Arc<Admission>,
    /// Deadline of requests whose caller sets none.
    pub default_deadline: Duration,
    /// Requests running at once and waiting for a place: fixed, or (`None`) what the decode
    /// workers report they hold.
    pub max_in_flight: Option<usize>,
    pub max_queue: Option<usize>,
}

pub type ChunkRx = mpsc::Receiver<Result<pb::GenerateChunk, Status>>;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

impl Frontend {
    pub fn model(&self) -> &ModelContext {
        &self.relay.model
    }

    pub fn metrics(&self) -> &RouterMetrics {
        &self.relay.metrics
    }

    pub fn metrics_handle(&self) -> Arc<RouterMetrics> {
        self.relay.metrics.clone()
    }

    /// Counts a request refused before admission.
    pub fn refused(&self, e: &RouterError) {
        self.metrics().outcome(e.outcome());
    }

    /// Admits `request` and runs it on a task; the chunks come on the receiver. Refusals
    /// (overloaded, deadline in the queue) are returned at once, before any chunk. The
    /// request's span continues the trace in the caller's `metadata` (`traceparent`), if any,
    /// and names its API key; the key's permit is held until the request ends.
    pub async fn start(
        &self,
        request: ValidRequest,
        deadline: Option<Duration>,
        metadata: &MetadataMap,
        key: Option<HeldKey>,
    ) -> Result<ChunkRx, RouterError> {
        let arrived = Instant::now();
        let deadline = deadline.unwrap_or(self.default_deadline);
        let metrics = self.relay.metrics.clone();
        let targets = self.relay.targets;
        let work = Work {
            prompt_tokens: request.prompt.len(),
            output_tokens: request.sampling.max_tokens,
        };
        let local = request.prompt.len() < self.relay.disagg_min_tokens;
        if let Some(e) = estimate(&self.relay.pool, work, local) {
            metrics.estimated_start.observe(e.start().as_secs_f64());
            if let Err(refused) = targets.judge(&e, work.output_tokens, deadline) {
                metrics.refused("estimate");
                self.refused(&refused);
                return Err(refused);
            }
        }
        let admission = self.admission.clone();
        let limit = self
            .max_in_flight
            .unwrap_or_else(|| self.relay.pool.decode_room());
        let queue = self.max_queue.unwrap_or(limit);
        metrics.admission_limit.set(limit as f64);
        // A queued request waits at most its time-to-first-token budget (or its deadline).
        let budget = targets.ttft_left(Duration::ZERO);
        let patience = budget.map_or(deadline, |b| b.min(deadline));
        let shed = || match budget {
            Some(b) if b <= deadline => RouterError::Overloaded {
                message: format!(
                    "shed: no place among the {limit} requests running within its {} ms time-to-first-token target",
                    b.as_millis()
                ),
                retry_after: Some(Duration::from_secs(1)),
            },
            _ => RouterError::DeadlineExceeded("waiting in the admission queue".into()),
        };
        let admitted = {
            let queued = admission.admit(limit, queue, patience, shed);
            metrics.queue_depth.set(admission.queued() as f64);
            let admitted = queued.await;
            metrics.queue_depth.set(admission.queued() as f64);
            admitted
        };
        let admitted = match admitted {
            Ok(a) => a,
            Err((reason, e)) => {
                metrics.refused(reason);
                self.refused(&e);
                return Err(e);
            }
        };
        metrics.in_flight.set(admission.in_flight() as f64);
        metrics.prompt_tokens.add(request.prompt.len() as f64);
        let (tx, rx) = mpsc::channel(64);
        let relay = self.relay.clone();
        let request_id = request.request_id.clone();
        let key_id = key.as_ref().map(|k| k.id.to_string());
        let permit = key.as_ref().and_then(HeldKey::take);
        let span = tracing::info_span!("request", id = %request_id, key = key_id.as_deref());
        sluice_runtime::telemetry::continue_trace(&span, metadata);
        let remaining = deadline.saturating_sub(arrived.elapsed());
        tokio::spawn(
            async move {
                let run = relay.run(request, arrived, tx.clone());
                let outcome = match tokio::time::timeout(remaining, run).await {
                    Ok(r) => r,
                    Err(_) => Err(RouterError::DeadlineExceeded(format!("after {deadline:?}"))),
                };
                drop(admitted);
                drop(permit);
                metrics.in_flight.set(admission.in_flight() as f64);
                match outcome {
                    Ok(reason) => {
                        metrics.e2e.observe(arrived.elapsed().as_secs_f64());
                        metrics.outcome(finish_label(reason));
                    }
                    Err(e) => {
                        metrics.outcome(e.outcome());
                        if !tx.is_closed() {
                            tracing::warn!("request failed: {e}");
                            let _ = tx.send(Err(e.into())).await;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(rx)
    }
}

/// The `outcome` label of a request that finished normally.
fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Eos => "eos",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Error | FinishReason::Unspecified => "error",
    }
}

/// `sluice.v1.Inference` over the [`Frontend`].
pub struct InferenceService {
    pub frontend: Arc<Frontend>,
}

impl InferenceService {
    /// Starts the request; with `messages`, also the reader that splits its answer.
    async fn start(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<(ChunkRx, Option<GrpcChatReader>), Status> {
        let deadline = grpc_timeout(request.metadata());
        let metadata = request.metadata().clone();
        let key = request.extensions().get::<HeldKey>().cloned();
        let mut request = request.into_inner();
        let model = self.frontend.model();
        let reader = if request.messages.is_empty() {
            None
        } else {
            Some(render_chat(model, &mut request).inspect_err(|e| self.frontend.refused(e))?)
        };
        let valid = model
            .validate(request)
            .inspect_err(|e| self.frontend.refused(e))?;
        Ok((
            self.frontend.start(valid, deadline, &metadata, key).await?,
            reader,
        ))
    }
}

/// Renders `request`'s conversation into its prompt (and its forced calls into its
/// constraint), returning the reader of the answer.
fn render_chat(
    model: &ModelContext,
    request: &mut pb::GenerateRequest,
) -> Result<GrpcChatReader, RouterError> {
    let chat = GrpcChat::read(request)?;
    let mut constraint = request.sampling.as_ref().and_then(|s| s.constraint.clone());
    let (prompt, reader) = chat.conversation(request)?.prepare(
        &model.tokenizer,
        &mut constraint,
        "sampling.constraint",
    )?;
    request.prompt = prompt;
    request.sampling.get_or_insert_default().constraint = constraint;
    Ok(GrpcChatReader::new(reader, ToolCallIds(new_request_id())))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (mut rx, mut reader) = self.start(request).await?;
        let mut out = pb::GenerateResponse::default();
        while let Some(chunk) = rx.recv().await {
            let mut chunk = chunk?;
            if let Some(r) = reader.as_mut() {
                r.read(&mut chunk);
            }
            out.request_id = chunk.request_id;
            out.token_ids.extend(chunk.token_ids);
            out.text.push_str(&chunk.text);
            out.logprobs.extend(chunk.logprobs);
            out.reasoning.push_str(&chunk.reasoning);
            out.tool_calls.extend(chunk.tool_calls);
            if chunk.finish_reason != FinishReason::Unspecified as i32 {
                out.finish_reason = chunk.finish_reason;
                out.usage = chunk.usage;
                return Ok(Response::new(out));
            }
        }
        Err(Status::internal(
            "the generation ended without a finish reason",
        ))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (rx, reader) = self.start(request).await?;
        let chunks = ReceiverStream::new(rx);
        Ok(Response::new(match reader {
            None => Box::pin(chunks),
            Some(mut reader) => Box::pin(chunks.map(move |chunk| {
                chunk.map(|mut c| {
                    reader.read(&mut c);
                    c
                })
            })),
        }))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let token_ids = self.frontend.model().tokenize(&r.text, r.chat)?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let model = self.frontend.model();
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: model.name.clone(),
                model_type: model.model_type.clone(),
                vocab_size: model.vocab as u32,
                max_context: model.max_context as u32,
            }],
        }))
    }
}

pub struct RouterStatusService {
    pub pool: Arc<WorkerPool>,
}

#[tonic::async_trait]
impl RouterStatus for RouterStatusService {
    async fn workers(
        &self,
        _: Request<wpb::WorkersRequest>,
    ) -> Result<Response<wpb::WorkersResponse>, Status> {
        Ok(Response::new(wpb::WorkersResponse {
            workers: self.pool.views(),
        }))
    }
}
