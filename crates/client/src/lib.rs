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
//!
//! Errors are typed ([`ClientError`]): a full router is [`ClientError::Overloaded`], a bad
//! request [`ClientError::InvalidArgument`]. `UNAVAILABLE` (no worker yet, a restarting router)
//! is retried with backoff ([`RetryPolicy`]) while the request has produced no token.

mod error;
mod stream;

use std::time::Duration;

use sluice_proto::v1::inference_client::InferenceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use error::ClientError;
pub use sluice_proto::v1::{
    ChatMessage, Constraint, FinishReason, GenerateChunk, GenerateRequest, GenerateResponse,
    ModelInfo, SamplingParams, TokenLogprobs, Tool, ToolCall, ToolChoice, ToolChoiceMode,
    TopLogprob, Usage, constraint,
};
pub use stream::GenerateStream;

/// When to try a request again after `UNAVAILABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Wait before the first retry; doubled after each, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before attempt `attempt + 1` after `attempt` failed (`attempt` from 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16));
        doubled.min(self.max_backoff)
    }
}

/// How to connect: built by [`Client::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), sluice_client::ClientError> {
/// use std::time::Duration;
/// use sluice_client::{Client, RetryPolicy};
///
/// let ca = std::fs::read("ca.pem").expect("the CA certificate");
/// let client = Client::builder("https://sluice.example.com:443")
///     .connect_timeout(Duration::from_secs(2))
///     .timeout(Duration::from_secs(30))
///     .ca_certificate(ca)
///     .retry(RetryPolicy { max_attempts: 6, ..RetryPolicy::default() })
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoint: String,
    connect_timeout: Duration,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    ca_certificate: Option<Vec<u8>>,
    domain_name: Option<String>,
    api_key: Option<ApiKey>,
    lazy: bool,
}

/// An API key, kept out of `Debug` output.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

impl ClientBuilder {
    /// Sends `authorization: Bearer KEY` with every request (a router started with API
    /// keys refuses requests without one).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey(key.into()));
        self
    }

    /// Time allowed to open the connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline of each request, sent to the server as `grpc-timeout` (default: none, the
    /// router's own default applies). For a stream it bounds the whole stream.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Trust this CA (PEM) for an `https://` endpoint, besides the bundled web roots.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// The name the server's certificate must carry (default: the endpoint's host).
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Connect on first use instead of now: [`ClientBuilder::connect`] then never fails for
    /// a server that is down, and the first request waits (and retries) instead.
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let invalid = |message: String| ClientError::InvalidEndpoint {
            endpoint: self.endpoint.clone(),
            message,
        };
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let https = self.endpoint.starts_with("https://");
        if https {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(pem) = &self.ca_certificate {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &self.domain_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(format!("TLS: {e}")))?;
        } else if self.ca_certificate.is_some() || self.domain_name.is_some() {
            return Err(invalid(
                "a CA certificate or domain name needs an https:// endpoint".into(),
            ));
        } else if !self.endpoint.starts_with("http://") {
            return Err(invalid(
                "expected http://HOST:PORT or https://HOST:PORT".into(),
            ));
        }
        Ok(endpoint)
    }

    pub async fn connect(self) -> Result<Client, ClientError> {
        let endpoint = self.endpoint()?;
        let authorization = match &self.api_key {
            Some(ApiKey(key)) => Some(
                format!("Bearer {key}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::InvalidApiKey)?,
            ),
            None => None,
        };
        let channel = if self.lazy {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|e| ClientError::Connect {
                endpoint: self.endpoint.clone(),
                message: error::source_chain(&e),
            })?
        };
        Ok(Client {
            inner: InferenceClient::new(channel),
            timeout: self.timeout,
            retry: self.retry,
            authorization,
        })
    }
}

/// A connection to a Sluice router. Cheap to clone; clones share the connection (one HTTP/2
/// connection carries any number of concurrent requests).
#[derive(Clone)]
pub struct Client {
    inner: InferenceClient<Channel>,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    /// `Bearer KEY`, when the builder was given a key.
    authorization: Option<MetadataValue<Ascii>>,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`, or `https://` with the web's CA roots),
    /// failing after 5 s; requests are retried per [`RetryPolicy::default`].
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Client::builder(endpoint).connect().await
    }

    pub fn builder(endpoint: &str) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.to_string(),
            connect_timeout: Duration::from_secs(5),
            timeout: None,
            retry: RetryPolicy::default(),
            ca_certificate: None,
            domain_name: None,
            api_key: None,
            lazy: false,
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(t) = self.timeout {
            request.set_timeout(t);
        }
        if let Some(a) = &self.authorization {
            request.metadata_mut().insert("authorization", a.clone());
        }
        request
    }

    /// Runs `call` until it succeeds, fails with something other than `UNAVAILABLE`, or the
    /// policy's attempts are spent.
    async fn with_retries<T, F, Fut>(&mut self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(InferenceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 1;
        loop {
            match call(self.inner.clone()).await {
                Ok(v) => return Ok(v),
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && attempt < self.retry.max_attempts =>
                {
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// The whole completion at once.
    ///
    /// ```no_run
    /// # async fn demo(mut client: sluice_client::Client) -> Result<(), sluice_client::ClientError> {
    /// use sluice_client::{GenerateRequest, SamplingParams};
    ///
    /// let answer = client
    ///     .generate(GenerateRequest {
    ///         prompt_token_ids: vec![1, 2, 3],
    ///         sampling: Some(SamplingParams { max_tokens: Some(8), seed: Some(7), ..Default::default() }),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// println!("{:?} ({:?})", answer.token_ids, answer.usage);
    /// # Ok(()) }
    /// ```
    pub async fn generate(
        &mut self,
        request: GenerateRequest,
    ) -> Result<GenerateResponse, ClientError> {
        let this = self.clone();
        self.with_retries(|mut inner| {
            let request = this.request(request.clone());
            async move { Ok(inner.generate(request).await?.into_inner()) }
        })
        .await
    }

    /// The completion as it is generated: returns once the first chunk has arrived (so an
    /// error before any token, after the retries, is this call's error). Dropping the stream
    /// cancels the request on the server.
    ///
    /// ```no_run
    /// # async fn demo(mut client: sluice_client::Client) -> Result<(), sluice_client::ClientError> {
    /// use futures::StreamExt;
    /// use sluice_client::{FinishReason, GenerateRequest};
    ///
    /// let request = GenerateRequest { prompt: "Once upon a time".into(), ..Default::default() };
    /// let mut stream = client.generate_stream(request).await?;
    /// while let Some(chunk) = stream.next().await {
    ///     let chunk = chunk?;
    ///     print!("{}", chunk.text);
    ///     if chunk.text.contains("dragon") {
    ///         break; // the stream is dropped: the server stops generating
    ///     }
    ///     if chunk.finish_reason() != FinishReason::Unspecified {
    ///         println!("\n[{:?}]", chunk.finish_reason());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn generate_stream(
        &mut self,
        request: GenerateRequest,
    ) -> Result<GenerateStream, ClientError> {
        let this = self.clone();
        self.with_retries(|mut inner| {
            let request = this.request(request.clone());
            async move {
                let mut stream = inner.generate_stream(request).await?.into_inner();
                let first = stream.message().await?;
                Ok(GenerateStream::new(first, stream))
            }
        })
        .await
    }

    /// Token ids of `text` (with the chat template around it when `chat`).
    pub async fn tokenize(&mut self, text: &str, chat: bool) -> Result<Vec<u32>, ClientError> {
        let this = self.clone();
        self.with_retries(|mut inner| {
            let request = this.request(sluice_proto::v1::TokenizeRequest {
                text: text.to_string(),
                chat,
            });
            async move { Ok(inner.tokenize(request).await?.into_inner().token_ids) }
        })
        .await
    }

    /// The models served (one per router today).
    ///
    /// ```no_run
    /// # async fn demo(mut client: sluice_client::Client) -> Result<(), sluice_client::ClientError> {
    /// for model in client.list_models().await? {
    ///     println!("{}: vocabulary {}, context {}", model.id, model.vocab_size, model.max_context);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_models(&mut self) -> Result<Vec<ModelInfo>, ClientError> {
        let this = self.clone();
        self.with_retries(|mut inner| {
            let request = this.request(sluice_proto::v1::ListModelsRequest {});
            async move { Ok(inner.list_models(request).await?.into_inner().models) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let waits: Vec<u128> = (1..6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn endpoints_are_checked_before_connecting() {
        let bad =
            |b: ClientBuilder| matches!(b.endpoint(), Err(ClientError::InvalidEndpoint { .. }));
        assert!(bad(Client::builder("127.0.0.1:50051")));
        assert!(bad(
            Client::builder("http://h:1").ca_certificate(b"pem".to_vec())
        ));
        assert!(Client::builder("http://127.0.0.1:50051").endpoint().is_ok());
        assert!(Client::builder("https://example.com").endpoint().is_ok());
    }
}
