//! The Rust SDK against `sluice up --preset tiny` (and a TLS server): typed errors, retries
//! while nothing was generated, a dropped stream cancelling on the server, TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use sluice_client::{Client, ClientError, GenerateRequest, RetryPolicy, SamplingParams};
use sluice_harness::http::{metric, request};
use sluice_harness::{Up, eventually, free_port, synth};
use sluice_proto::v1 as pb;
use tonic::{Request, Response, Status};

fn long(tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: vec![3, 1, 4, 1, 5],
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sum of every series of `name` in a `/metrics` text.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_calls_typed_errors_and_stream_drop_cancels_on_the_server() {
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let up = Up::start(model_dir.path(), &[]);
    let mut client = Client::connect(&up.endpoint).await.unwrap();

    let models = client.list_models().await.unwrap();
    assert_eq!(models.len(), 1);
    assert!(models[0].vocab_size > 0);
    let ids = client
        .tokenize("Tell me about rivers", false)
        .await
        .unwrap();
    assert!(!ids.is_empty());
    let answer = client.generate(long(6)).await.unwrap();
    assert_eq!(answer.token_ids.len(), 6);
    assert_eq!(answer.usage.unwrap().completion_tokens, 6);

    // A refused request is typed, with the field named.
    let mut bad = long(4);
    bad.sampling.as_mut().unwrap().temperature = Some(-1.0);
    match client.generate(bad).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("temperature"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }

    // Drop a stream after three chunks: the server cancels it and frees its sequence.
    let mut stream = client.generate_stream(long(4000)).await.unwrap();
    for _ in 0..3 {
        let chunk = stream.next().await.unwrap().unwrap();
        assert_eq!(chunk.token_ids.len(), 1);
    }
    drop(stream);
    let http = up.http.clone();
    let metrics = eventually(
        Duration::from_secs(20),
        "the router to count a cancelled request",
        || {
            let http = http.clone();
            async move {
                let m = request(&http, "GET", "/metrics", None).body;
                let cancelled =
                    metric(&m, "sluice_requests_total{outcome=\"cancelled\"}") == Some(1.0);
                let idle = sum(&m, "sluice_running_sequences") == 0.0
                    && sum(&m, "sluice_kv_blocks_used") == 0.0
                    && metric(&m, "sluice_requests_in_flight") == Some(0.0);
                (cancelled && idle).then_some(m)
            }
        },
    )
    .await;
    // Nothing kept generating for the dropped stream.
    let generated = sum(&metrics, "sluice_decode_tokens_total");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = sum(
        &request(&up.http, "GET", "/metrics", None).body,
        "sluice_decode_tokens_total",
    );
    assert_eq!(generated, later);
    assert!(
        generated < 1000.0,
        "{generated} tokens decoded for a stream dropped after 3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unavailable_is_retried_until_the_router_answers() {
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");

    // Without retries, nothing listening is UNAVAILABLE at once.
    let mut once = Client::builder(&endpoint)
        .lazy()
        .retry(RetryPolicy::none())
        .connect()
        .await
        .unwrap();
    match once.generate(long(2)).await {
        Err(e @ ClientError::Unavailable(_)) => {
            assert_eq!(e.code(), Some(tonic::Code::Unavailable))
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // With retries, a request sent before the router starts is answered once it does.
    let mut patient = Client::builder(&endpoint)
        .lazy()
        .retry(RetryPolicy {
            max_attempts: 200,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
        })
        .connect()
        .await
        .unwrap();
    let pending = tokio::spawn(async move { patient.generate_stream(long(3)).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "the request must still be retrying");
    let _up = Up::start_on(port, model_dir.path(), &[]);
    tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("answered once the router is up")
        .unwrap()
        .unwrap();
}

/// Answers `ListModels` only: enough to check the TLS handshake and a call over it.
struct FakeInference;

#[tonic::async_trait]
impl pb::inference_server::Inference for FakeInference {
    async fn generate(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type GenerateStreamStream = futures::stream::Empty<Result<pb::GenerateChunk, Status>>;

    async fn generate_stream(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn tokenize(
        &self,
        _: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: "over-tls".into(),
                ..Default::default()
            }],
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/client/tests/tls");
    let read = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();
    let identity = tonic::transport::Identity::from_pem(read("server.pem"), read("server.key"));
    let port = free_port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(pb::inference_server::InferenceServer::new(FakeInference))
            .serve(([127, 0, 0, 1], port).into()),
    );
    let endpoint = format!("https://localhost:{port}");
    let mut client = eventually(Duration::from_secs(10), "the TLS server", || {
        let endpoint = endpoint.clone();
        let ca = read("ca.pem");
        async move {
            Client::builder(&endpoint)
                .ca_certificate(ca)
                .connect()
                .await
                .ok()
        }
    })
    .await;
    let models = client.list_models().await.unwrap();
    assert_eq!(models[0].id, "over-tls");

    // The web's roots do not vouch for the private CA: the handshake fails.
    let untrusted = Client::builder(&endpoint)
        .retry(RetryPolicy::none())
        .connect()
        .await;
    assert!(
        matches!(untrusted, Err(ClientError::Connect { .. })),
        "{:?}",
        untrusted.err()
    );
    server.abort();
}
