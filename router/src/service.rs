//! `sluice.v1.Inference` and `RouterStatus` on the router.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sluice_proto::v1::inference_server::Inference;
use sluice_proto::v1::{self as pb, FinishReason};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::router_status_server::RouterStatus;
use sluice_runtime::serve::grpc_timeout;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::admission::Admission;
use crate::error::RouterError;
use crate::generation;
use crate::pool::WorkerPool;
use crate::validate::ModelContext;

pub struct InferenceService {
    pub pool: Arc<WorkerPool>,
    pub model: Arc<ModelContext>,
    pub admission: Arc<Admission>,
    /// Deadline of requests whose caller sets none.
    pub default_deadline: Duration,
    pub transfer_timeout: Duration,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

impl InferenceService {
    /// Validates and admits `request`, then runs it on a task; the chunks come on the receiver.
    /// Refusals (invalid, overloaded) are returned at once, before any chunk.
    async fn start(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<mpsc::Receiver<Result<pb::GenerateChunk, Status>>, Status> {
        let deadline = grpc_timeout(request.metadata()).unwrap_or(self.default_deadline);
        let valid = self.model.validate(request.into_inner())?;
        let admitted = self.admission.admit(deadline).await?;
        let (tx, rx) = mpsc::channel(64);
        let pool = self.pool.clone();
        let model = self.model.clone();
        let transfer_timeout = self.transfer_timeout;
        let request_id = valid.request_id.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let run = generation::run(pool, model, valid, transfer_timeout, tx.clone());
            let outcome = match tokio::time::timeout(deadline, run).await {
                Ok(r) => r,
                Err(_) => Err(RouterError::DeadlineExceeded(format!("after {deadline:?}"))),
            };
            if let Err(e) = outcome
                && !tx.is_closed()
            {
                tracing::warn!(request = %request_id, "request failed: {e}");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(rx)
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut rx = self.start(request).await?;
        let mut out = pb::GenerateResponse::default();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            out.request_id = chunk.request_id;
            out.token_ids.extend(chunk.token_ids);
            out.text.push_str(&chunk.text);
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
        let rx = self.start(request).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let token_ids = self.model.tokenize(&r.text, r.chat)?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: self.model.name.clone(),
                model_type: self.model.model_type.clone(),
                vocab_size: self.model.vocab as u32,
                max_context: self.model.max_context as u32,
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
