//! The cluster as separate processes against a real etcd: router, prefill, decode and expert
//! workers started from their binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_client::{ClientError, FinishReason, GenerateRequest, SamplingParams};
use sluice_harness::{ClusterSpec, eventually, load_of, local_greedy, reflected_services, synth};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::cache_transfer_client::CacheTransferClient;
use tonic::Code;

fn greedy(tokens: &[u32], max_tokens: u32, ignore_eos: bool) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: tokens.to_vec(),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn status(e: ClientError) -> tonic::Status {
    match e.code() {
        Some(code) => tonic::Status::new(code, e.message()),
        None => panic!("expected a status, got {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disaggregated_cluster_matches_local_generation() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let running = ClusterSpec::new(1, 1).experts(2).start(model);
    let cluster = &running.cluster;
    let workers = cluster.wait_ready(4).await;
    let decode_addr = workers
        .iter()
        .find(|w| w.role == "decode")
        .unwrap()
        .address
        .clone();

    // --- Each server's reflection lists exactly what it serves (what `grpcurl list` shows):
    // the router never advertises a worker's service, a worker never `Inference`.
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let listed = |own: &[&str]| {
        let mut names: Vec<String> = own.iter().chain(&common).map(|s| s.to_string()).collect();
        names.sort();
        names
    };
    assert_eq!(
        reflected_services(&cluster.router).await,
        listed(&["sluice.v1.Inference"])
    );
    // Worker addresses and loads only on the router's internal listener.
    assert_eq!(
        reflected_services(&cluster.router_status[0]).await,
        listed(&["sluice.worker.v1.RouterStatus"])
    );
    let mut public = sluice_proto::worker::v1::router_status_client::RouterStatusClient::connect(
        cluster.router.clone(),
    )
    .await
    .unwrap();
    let refused = public
        .workers(sluice_proto::worker::v1::WorkersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused}");
    for w in &workers {
        let own: &[&str] = match w.role.as_str() {
            "prefill" => &["sluice.worker.v1.Prefill", "sluice.worker.v1.WorkerStatus"],
            "decode" => &[
                "sluice.worker.v1.Decode",
                "sluice.worker.v1.CacheTransfer",
                "sluice.worker.v1.WorkerStatus",
            ],
            "expert" => &["sluice.worker.v1.Experts", "sluice.worker.v1.WorkerStatus"],
            role => panic!("unexpected role {role}"),
        };
        assert_eq!(
            reflected_services(&w.address).await,
            listed(own),
            "{} worker at {}",
            w.role,
            w.address
        );
    }

    // --- A prefill worker pushes a cache only to a registered decode worker at the address
    // it registered: never to one a caller names (no server-side request forgery).
    {
        use sluice_proto::worker::v1 as wpb;
        let prefill = workers.iter().find(|w| w.role == "prefill").unwrap();
        let decode = workers.iter().find(|w| w.role == "decode").unwrap();
        let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        trap.set_nonblocking(true).unwrap();
        let elsewhere = trap.local_addr().unwrap().to_string();
        let mut client = wpb::prefill_client::PrefillClient::connect(prefill.address.clone())
            .await
            .unwrap();
        for (worker_id, address) in [
            (decode.worker_id.clone(), elsewhere.clone()),
            (decode.worker_id.clone(), format!("http://{elsewhere}")),
            // A registered worker, but not a decode one.
            (prefill.worker_id.clone(), prefill.address.clone()),
        ] {
            let refused = client
                .prefill(wpb::PrefillRequest {
                    request_id: "forged".into(),
                    prompt_token_ids: vec![1, 2, 3],
                    decode_worker_id: worker_id,
                    decode_address: address.clone(),
                    transfer_id: "forged-transfer".into(),
                    transport: wpb::TransportKind::Tcp as i32,
                    max_new_tokens: 4,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(
                refused.code(),
                tonic::Code::FailedPrecondition,
                "{address}: {refused}"
            );
            assert!(
                refused.message().contains("not a registered decode worker"),
                "{refused}"
            );
        }
        assert_eq!(
            trap.accept().map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "nothing connected to the forged address"
        );
    }

    // --- Disaggregation is exact: prefill, decode and experts in different processes give the
    // tokens of one local process, several requests in flight at once.
    let prompts: Vec<(Vec<u32>, u32, bool)> = vec![
        ((0..150).map(|i| (i * 37 + 11) % 1000).collect(), 12, true), // > 2 chunks of 64
        (vec![5, 6, 7, 8, 9], 20, true),
        (vec![300, 2, 999, 41, 17, 17, 80], 16, false),
        (vec![42], 1, true),
    ];
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(p, n, ignore)| local_greedy(model, p, *n as usize, *ignore))
        .collect();
    let client = cluster.client().await;
    let answers = futures::future::join_all(prompts.iter().map(|(p, n, ignore)| {
        let mut c = client.clone();
        let req = greedy(p, *n, *ignore);
        async move { c.generate(req).await.unwrap() }
    }))
    .await;
    for ((answer, want), (prompt, n, _)) in answers.iter().zip(&expected).zip(&prompts) {
        assert_eq!(&answer.token_ids, want, "prompt of {} tokens", prompt.len());
        let usage = answer.usage.unwrap();
        assert_eq!(usage.prompt_tokens as usize, prompt.len());
        assert_eq!(usage.completion_tokens as usize, want.len());
        if want.len() == *n as usize {
            assert_eq!(answer.finish_reason, FinishReason::Length as i32);
        }
    }

    // --- Streaming: chunks arrive before the end; their text is the unary text.
    let mut c = cluster.client().await;
    let mut req = greedy(&prompts[1].0, 20, true);
    req.prompt_token_ids.clear();
    req.prompt = "Tell me about rivers".into();
    req.chat = true;
    let unary = c.generate(req.clone()).await.unwrap();
    let mut stream = c.generate_stream(req).await.unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.finish_reason == FinishReason::Unspecified as i32)
    );
    assert_ne!(
        chunks.last().unwrap().finish_reason,
        FinishReason::Unspecified as i32
    );
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.clone()).collect();
    assert_eq!(text, unary.text);
    assert_eq!(ids, unary.token_ids);

    // --- Bad input is INVALID_ARGUMENT naming the field.
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest::default(), "prompt"),
        (greedy(&[1, 2, 1_000_000], 4, false), "prompt_token_ids"),
        (greedy(&[1, 2], 0, false), "max_tokens"),
        (greedy(&[1, 2], 1_000_000, false), "max_tokens"),
        (
            GenerateRequest {
                sampling: Some(SamplingParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                }),
                ..greedy(&[1], 4, false)
            },
            "temperature",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                }),
                ..greedy(&[1], 4, false)
            },
            "top_p",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                }),
                ..greedy(&[1], 4, false)
            },
            "top_p",
        ),
    ];
    for (req, field) in cases {
        let s = status(c.generate(req).await.unwrap_err());
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().contains(field), "{field}: {}", s.message());
    }

    // --- A cache push for another model or layout is refused before anything is adopted.
    let mut push = CacheTransferClient::connect(decode_addr.clone())
        .await
        .unwrap();
    for (fingerprint, regions) in [(0xbad_u64, 0usize), (0, 1)] {
        let header = wpb::CacheHeader {
            transfer_id: "bogus".into(),
            model_fingerprint: fingerprint,
            layout: Some(wpb::CacheLayout {
                tokens: 3,
                regions: (0..regions)
                    .map(|_| wpb::Region {
                        layer: 0,
                        kind: wpb::RegionKind::Keys as i32,
                        elements: 12,
                    })
                    .collect(),
            }),
            handoff: Some(wpb::SequenceHandoff::default()),
            total_bytes: 48,
        };
        let msgs = vec![
            wpb::CacheChunk {
                kind: Some(wpb::cache_chunk::Kind::Header(header)),
            },
            wpb::CacheChunk {
                kind: Some(wpb::cache_chunk::Kind::Data(wpb::CacheData {
                    region: 0,
                    offset: 0,
                    data: vec![0; 48],
                    crc32c: 0,
                })),
            },
        ];
        let s = push.push(futures::stream::iter(msgs)).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains("fingerprint") || s.message().contains("layout"),
            "{}",
            s.message()
        );
    }
    let load = load_of(&decode_addr).await;
    assert_eq!(
        (load.running, load.waiting),
        (0, 0),
        "nothing adopted or staged: {load:?}"
    );

    // --- Client cancellation frees the sequence on the decode worker.
    let mut stream = c
        .generate_stream(greedy(&[3, 4, 5], 4000, true))
        .await
        .unwrap();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    let busy = load_of(&decode_addr).await;
    assert_eq!(busy.running, 1, "{busy:?}");
    assert!(busy.kv_blocks_used > 0, "{busy:?}");
    drop(stream);
    eventually(
        Duration::from_secs(10),
        "the decode worker to free the cancelled sequence",
        || async {
            let l = load_of(&decode_addr).await;
            (l.running == 0 && l.kv_blocks_used == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_leaves_the_cluster_and_without_migration_its_request_fails_cleanly() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let ttl = 3;
    // Migration off: the request in flight has nowhere to go (with it on, `tests/e2e/faults.rs`
    // checks that it continues elsewhere).
    let mut running = ClusterSpec::new(1, 2)
        .ttl(ttl)
        .router_args(&["--migration-limit", "0"])
        .start(model);
    running.cluster.wait_ready(3).await;
    let cluster = &running.cluster;

    // A long request on one decode worker; find which.
    let mut c = cluster.client().await;
    let mut stream = c
        .generate_stream(greedy(&[9, 8, 7], 4000, true))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    stream.next().await.unwrap().unwrap();
    let decodes: Vec<_> = cluster
        .workers()
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.role == "decode")
        .collect();
    let mut busy = None;
    for w in &decodes {
        if load_of(&w.address).await.running == 1 {
            busy = Some(w.clone());
        }
    }
    let busy = busy.expect("one decode worker runs the request");
    // The worker logs the address it registered with.
    let index = running
        .cluster
        .procs
        .iter()
        .position(|p| p.name.starts_with("decode") && p.log().contains(&busy.address))
        .expect("the busy worker's process");
    let killed_at = Instant::now();
    running.cluster.procs[index].kill9();
    let cluster = &running.cluster;

    // The request in flight ends with UNAVAILABLE, promptly, never a hang.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(status(e)),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream must end soon after the worker dies");
    let s = end.expect("the stream must end with an error status");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");

    // The router drops the worker within the lease TTL (plus scheduling slack).
    eventually(
        Duration::from_secs(ttl + 5),
        "the router to drop the killed worker",
        || async {
            let w = cluster.workers().await?;
            (!w.iter().any(|v| v.worker_id == busy.worker_id)).then_some(())
        },
    )
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(ttl + 5));

    // New requests succeed on the remaining workers.
    let want = local_greedy(model, &[1, 2, 3, 4], 8, true);
    let got = c.generate(greedy(&[1, 2, 3, 4], 8, true)).await.unwrap();
    assert_eq!(got.token_ids, want);
}

/// A device transport asked of a worker that cannot run it stops the worker at start-up,
/// before it registers, saying what it would need.
#[test]
fn device_transports_a_worker_cannot_run_are_refused_at_start() {
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    for (binary, transport) in [("sluice-prefill", "nccl"), ("sluice-decode", "cuda-ipc")] {
        let out = std::process::Command::new(sluice_harness::bin(binary))
            .args(["--transport", transport, "--etcd", "http://127.0.0.1:9"])
            .arg("--model")
            .arg(model_dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} started: {stderr}");
        assert!(stderr.contains(&format!("`{transport}`")), "{stderr}");
        // Without the `cuda` feature the build is missing; with it, the CUDA device.
        assert!(
            stderr.contains("--features cuda") || stderr.contains("--device cuda:N"),
            "{stderr}"
        );
    }
}

/// With API keys on, a request without a valid key is refused (gRPC `UNAUTHENTICATED`, HTTP
/// 401 in OpenAI's shape) before anything runs; a valid key is served and counted by its id,
/// never by the key; health stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_need_a_valid_api_key_when_keys_are_set() {
    use sluice_harness::http::{metric, request, request_with};
    use sluice_proto::v1 as pb;
    use sluice_proto::v1::inference_client::InferenceClient;

    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let keys = model_dir.path().join("api-keys.txt");
    std::fs::write(
        &keys,
        "# id:key\nops:ops-0123456789abcdef\nci:ci-fedcba9876543210\nslow:slow-0123456789abcdef rps=0.5\n",
    )
    .unwrap();
    let running = ClusterSpec::new(1, 1)
        .router_args(&["--api-keys-file", keys.to_str().unwrap()])
        .start(model_dir.path());
    let cluster = &running.cluster;
    cluster.wait_ready(2).await;

    let mut grpc = InferenceClient::connect(cluster.router.clone())
        .await
        .unwrap();
    let generate = |key: Option<&str>| {
        let mut r = tonic::Request::new(pb::GenerateRequest {
            prompt_token_ids: vec![1, 2, 3],
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        });
        if let Some(k) = key {
            r.metadata_mut().insert("authorization", k.parse().unwrap());
        }
        r
    };
    for key in [
        None,
        Some("Bearer ops-0123456789abcdeX"),
        Some("ops-0123456789abcdef"),
    ] {
        let e = grpc.generate(generate(key)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{key:?}: {e}");
    }
    let http = &cluster.http;
    let body = r#"{"prompt": "hi", "max_tokens": 2}"#;
    let refused = request(http, "POST", "/v1/completions", Some(body));
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "invalid_api_key");
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    let wrong = [("authorization", "Bearer ci-fedcba987654321")];
    assert_eq!(
        request_with(http, "GET", "/v1/models", None, &wrong).status,
        401
    );
    // Nothing ran for the refused ones.
    let metrics = request(http, "GET", "/metrics", None).body;
    assert_eq!(
        metric(&metrics, "sluice_prompt_tokens_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{outcome="unauthenticated"}"#
        ),
        Some(5.0)
    );
    // Health is open; valid keys are served and counted by id.
    assert_eq!(request(http, "GET", "/health", None).status, 200);
    let out = grpc
        .generate(generate(Some("Bearer ops-0123456789abcdef")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.usage.unwrap().completion_tokens, 3);
    let ok = [("authorization", "Bearer ci-fedcba9876543210")];
    let served = request_with(http, "POST", "/v1/completions", Some(body), &ok);
    assert_eq!(served.status, 200, "{}", served.body);
    let metrics = request(http, "GET", "/metrics", None).body;
    for id in ["ops", "ci"] {
        let series = format!(r#"sluice_router_authenticated_requests_total{{key="{id}"}}"#);
        assert_eq!(metric(&metrics, &series), Some(1.0), "{id}");
    }
    assert!(
        !metrics.contains("0123456789abcdef"),
        "a key in the metrics"
    );
    assert!(
        !cluster.procs[cluster.procs.len() - 1]
            .log()
            .contains("0123456789abcdef")
    );

    // A key over its rate is refused with when to retry; the others are not held back.
    let slow = [("authorization", "Bearer slow-0123456789abcdef")];
    assert_eq!(
        request_with(http, "GET", "/v1/models", None, &slow).status,
        200
    );
    let limited = request_with(http, "GET", "/v1/models", None, &slow);
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.header("retry-after"), Some("2"));
    assert_eq!(
        request_with(http, "GET", "/v1/models", None, &ok).status,
        200
    );

    // The Rust SDK and `sluice generate` send a key when given one.
    let request = GenerateRequest {
        prompt_token_ids: vec![1, 2, 3],
        sampling: Some(SamplingParams {
            max_tokens: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut open = sluice_client::Client::connect(&cluster.router)
        .await
        .unwrap();
    match open.generate(request.clone()).await {
        Err(ClientError::Unauthenticated(_)) => {}
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    let mut keyed = sluice_client::Client::builder(&cluster.router)
        .api_key("ops-0123456789abcdef")
        .connect()
        .await
        .unwrap();
    assert_eq!(keyed.generate(request).await.unwrap().token_ids.len(), 2);
    let cli = |key: &str| {
        std::process::Command::new(sluice_harness::bin("sluice"))
            .args(["generate", "--endpoint", &cluster.router, "--prompt", "hi"])
            .args(["--max-tokens", "2", "--json"])
            .env("SLUICE_API_KEY", key)
            .output()
            .unwrap()
    };
    assert!(cli("ci-fedcba9876543210").status.success());
    let refused = cli("wrong-key-0000000000");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthenticated"));
}

/// A router given `--metrics-listen` serves its metrics there only, not on the public port;
/// with `--no-reflection` no server lists its services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_off_the_public_port_and_reflection_off() {
    use sluice_harness::http::request;
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let metrics = format!("127.0.0.1:{}", sluice_harness::free_port());
    let running = ClusterSpec::new(1, 1)
        .router_args(&["--metrics-listen", &metrics])
        .all_args(&["--no-reflection"])
        .start(model_dir.path());
    let cluster = &running.cluster;
    let workers = cluster.wait_ready(2).await;
    assert!(reflected_services(&cluster.router).await.is_empty());
    for w in &workers {
        assert!(
            reflected_services(&w.address).await.is_empty(),
            "{}",
            w.role
        );
    }
    assert_eq!(request(&cluster.http, "GET", "/metrics", None).status, 404);
    let own = request(&metrics, "GET", "/metrics", None);
    assert_eq!(own.status, 200);
    assert!(
        own.body.contains("sluice_requests_in_flight"),
        "{}",
        own.body
    );
    assert_eq!(request(&cluster.http, "GET", "/health", None).status, 200);
}
