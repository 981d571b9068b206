//! Rust SDK for Sluice's public API (`sluice.v1.Inference`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! use futures::StreamExt;
//! use sluice_client::{Client, GenerateRequest, SamplingParams};
//!
//! let mut client = Client::connect("http://127.0.0.1:50051").await?;
//! let request = GenerateRequest {
//!     prompt: "Tell me about rivers".into(),
//!     chat: true,
//!     sampling: Some(SamplingParams { temperature: Some(0.0), max_tokens: Some(32), ..Default::default() }),
//!     ..Default::default()
//! };
//! let answer = client.generate(request.clone()).await?;
//! println!("{}", answer.text);
//!
//! // Streaming; dropping the stream cancels the request on the server.
//! let mut stream = client.generate_stream(request).await?;
//! while let Some(chunk) = stream.next().await {
//!     print!("{}", chunk?.text);
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use futures::{Stream, StreamExt};
use sluice_proto::v1::inference_client::InferenceClient;
use tonic::transport::{Channel, Endpoint};

pub use sluice_proto::v1::{
    FinishReason, GenerateChunk, GenerateRequest, GenerateResponse, ModelInfo, SamplingParams,
    Usage,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// A connection to a Sluice router. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: InferenceClient<Channel>,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`), failing after 5 s.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        let err = |message: String| ClientError::Connect {
            endpoint: endpoint.to_string(),
            message,
        };
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Client {
            inner: InferenceClient::new(channel),
        })
    }

    /// The whole completion at once.
    pub async fn generate(
        &mut self,
        request: GenerateRequest,
    ) -> Result<GenerateResponse, ClientError> {
        Ok(self.inner.generate(request).await?.into_inner())
    }

    /// The completion as it is generated. Dropping the stream cancels the request.
    pub async fn generate_stream(
        &mut self,
        request: GenerateRequest,
    ) -> Result<impl Stream<Item = Result<GenerateChunk, ClientError>> + use<>, ClientError> {
        let stream = self.inner.generate_stream(request).await?.into_inner();
        Ok(stream.map(|r| r.map_err(ClientError::from)))
    }

    pub async fn tokenize(&mut self, text: &str, chat: bool) -> Result<Vec<u32>, ClientError> {
        let r = sluice_proto::v1::TokenizeRequest {
            text: text.to_string(),
            chat,
        };
        Ok(self.inner.tokenize(r).await?.into_inner().token_ids)
    }

    pub async fn list_models(&mut self) -> Result<Vec<ModelInfo>, ClientError> {
        let r = sluice_proto::v1::ListModelsRequest {};
        Ok(self.inner.list_models(r).await?.into_inner().models)
    }
}
