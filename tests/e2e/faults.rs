//! Faults cost no request: workers killed with SIGKILL under load, a push header that names
//! an absurd size. Real processes on a real etcd, the tiny synthetic model, greedy sampling, so
//! every answer is checked token for token against one local process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_client::{FinishReason, GenerateRequest, SamplingParams};
use sluice_harness::{Cluster, ClusterSpec, eventually, local_greedy, synth};
use sluice_proto::worker::v1 as wpb;
use sluice_proto::worker::v1::cache_transfer_client::CacheTransferClient;
use tonic::Code;

fn greedy(tokens: &[u32], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: tokens.to_vec(),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn prompt(i: u32, len: u32) -> Vec<u32> {
    (0..len).map(|j| (i * 131 + j * 37 + 5) % 1000).collect()
}

/// The `/metrics` text served at `address` (`host:port`, or an `http://` URL).
async fn metrics_at(address: &str) -> String {
    let address = address.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        sluice_harness::http::request(&address, "GET", "/metrics", None).body
    })
    .await
    .unwrap()
}

/// The router's `/metrics` text.
async fn router_metrics(cluster: &Cluster) -> String {
    metrics_at(&cluster.http).await
}

/// Sum of a counter's series whose line starts with `prefix`.
fn counter(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_decode_worker_loses_no_stream_and_no_token() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // One prefill worker; prompts of 24+ tokens go through it, shorter ones are prefilled on
    // the decode worker: both kinds of stream are in flight when the worker dies.
    let mut running = ClusterSpec::new(1, 2)
        .ttl(3)
        .router_args(&["--disagg-min-tokens", "24", "--token-timeout", "20"])
        .start(model);
    let cluster = &running.cluster;
    cluster.wait_ready(3).await;

    const STREAMS: u32 = 12;
    const TOKENS: u32 = 300;
    let prompts: Vec<Vec<u32>> = (0..STREAMS)
        .map(|i| prompt(i, if i % 2 == 0 { 40 } else { 8 }))
        .collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| local_greedy(model, p, TOKENS as usize, true))
        .collect();

    let streams = start_streams(cluster, &prompts, TOKENS).await;
    running.cluster.proc_mut("decode0").kill9();
    let killed = Instant::now();
    let pauses = collect(streams, &expected).await;
    let cluster = &running.cluster;
    let metrics = router_metrics(cluster).await;
    let migrated = counter(&metrics, "sluice_router_migrations_total{reason=\"decode_");
    assert!(
        migrated >= 1.0,
        "no stream migrated (were they all on decode1?):\n{metrics}"
    );
    eprintln!(
        "decode worker killed: {STREAMS} streams complete and exact, {migrated} migrated; \
         {pauses}; all done {:?} after the kill",
        killed.elapsed()
    );

    // New requests after the kill go to the surviving worker at once.
    let mut c = cluster.client().await;
    let again = c.generate(greedy(&prompts[0], 20)).await.unwrap();
    assert_eq!(again.token_ids, expected[0][..20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_prefill_worker_is_ejected_and_no_request_fails() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // A long lease: the dead worker stays in etcd for the whole test, so only ejection keeps
    // requests away from it.
    let mut running = ClusterSpec::new(2, 1).ttl(60).start(model);
    let workers = running.cluster.wait_ready(3).await;

    let prompts: Vec<Vec<u32>> = (0..12).map(|i| prompt(i, 30)).collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| local_greedy(model, p, 6, true))
        .collect();
    let victim = running.cluster.proc_mut("prefill0");
    victim.kill9();
    let cluster = &running.cluster;

    // Requests right after the kill (the router still believes the worker idle): every one
    // completes, exactly.
    let client = cluster.client().await;
    let answers = futures::future::join_all(prompts.iter().map(|p| {
        let mut c = client.clone();
        let req = greedy(p, 6);
        async move { c.generate(req).await }
    }))
    .await;
    for (i, (answer, want)) in answers.into_iter().zip(&expected).enumerate() {
        let answer = answer.unwrap_or_else(|e| panic!("request {i} after the kill: {e}"));
        assert_eq!(&answer.token_ids, want, "request {i}");
    }
    let views = cluster.workers().await.unwrap();
    let dead: Vec<_> = views
        .iter()
        .filter(|v| v.role == "prefill" && !v.ejected.is_empty())
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "exactly the dead prefill worker is ejected: {views:?}"
    );
    let metrics = router_metrics(cluster).await;
    assert!(
        counter(
            &metrics,
            "sluice_router_worker_ejections_total{role=\"prefill\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // --- A push header naming a cache far above the decode worker's limits is refused
    // before anything is allocated, and the worker goes on serving.
    let decode = workers.iter().find(|w| w.role == "decode").unwrap();
    let fingerprint = u64::from_str_radix(&decode.model_fingerprint, 16).unwrap();
    let mut push = CacheTransferClient::connect(decode.address.clone())
        .await
        .unwrap();
    let tokens = 1u64 << 40;
    let header = wpb::CacheHeader {
        transfer_id: "oversized".into(),
        model_fingerprint: fingerprint,
        layout: Some(wpb::CacheLayout {
            tokens,
            regions: vec![wpb::Region {
                layer: 3,
                kind: wpb::RegionKind::Keys as i32,
                elements: tokens * 64,
            }],
        }),
        handoff: Some(wpb::SequenceHandoff::default()),
        total_bytes: tokens * 256,
    };
    let msgs = vec![wpb::CacheChunk {
        kind: Some(wpb::cache_chunk::Kind::Header(header)),
    }];
    let refused = push
        .push(futures::stream::iter(msgs))
        .await
        .expect_err("an oversized cache was accepted");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("tokens") && refused.message().contains("limit"),
        "{}",
        refused.message()
    );
    let mut c = cluster.client().await;
    let after = eventually(
        Duration::from_secs(10),
        "the decode worker to serve",
        || {
            let mut c = c.clone();
            let req = greedy(&prompts[1], 6);
            async move { c.generate(req).await.ok() }
        },
    )
    .await;
    assert_eq!(after.token_ids, expected[1]);
    let _ = c.list_models().await.unwrap();
}

/// What one stream got: its tokens, its finish reason, and its longest pause between chunks
/// once started (for a stream that moved, the client-visible gap of the move).
struct StreamOutcome {
    tokens: Vec<u32>,
    finish: Option<i32>,
    longest_pause: Duration,
}

type Streams = Vec<tokio::task::JoinHandle<StreamOutcome>>;

/// Streams every prompt (`tokens` tokens each) at once; returns once every one has its first
/// tokens (so each is running somewhere when a fault comes), to be checked with [`collect`].
async fn start_streams(cluster: &Cluster, prompts: &[Vec<u32>], tokens: u32) -> Streams {
    let client = cluster.client().await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let streams: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut c = client.clone();
            let req = greedy(p, tokens);
            let started = started_tx.clone();
            tokio::spawn(async move {
                let mut stream = c.generate_stream(req).await.unwrap();
                let mut out = StreamOutcome {
                    tokens: Vec::new(),
                    finish: None,
                    longest_pause: Duration::ZERO,
                };
                let mut last = None;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.unwrap_or_else(|e| panic!("stream {i}: {e}"));
                    if let Some(at) = last {
                        out.longest_pause = out.longest_pause.max(Instant::now() - at);
                    }
                    out.tokens.extend(chunk.token_ids);
                    if out.tokens.len() == 2 {
                        let _ = started.send(());
                        last = Some(Instant::now());
                    } else if last.is_some() {
                        last = Some(Instant::now());
                    }
                    if chunk.finish_reason != FinishReason::Unspecified as i32 {
                        out.finish = Some(chunk.finish_reason);
                    }
                }
                out
            })
        })
        .collect();
    for _ in prompts {
        tokio::time::timeout(Duration::from_secs(60), started.recv())
            .await
            .expect("every stream to start");
    }
    streams
}

/// Durations summarised: the longest pause of each stream, or each request's latency
/// (reported, never asserted: timing belongs in benchmarks).
struct Pauses {
    of: &'static str,
    values: Vec<Duration>,
}

impl std::fmt::Display for Pauses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut p = self.values.clone();
        p.sort();
        let at = |q: f64| p[((p.len() - 1) as f64 * q).round() as usize];
        write!(
            f,
            "{} over {}: p50 {:?}, p99 {:?}",
            self.of,
            p.len(),
            at(0.5),
            at(0.99)
        )
    }
}

/// Waits for the streams and checks each against `expected`: complete, every token equal.
async fn collect(streams: Streams, expected: &[Vec<u32>]) -> Pauses {
    let mut pauses = Vec::new();
    for (i, (stream, want)) in streams.into_iter().zip(expected).enumerate() {
        let out = stream.await.unwrap();
        assert_eq!(
            &out.tokens, want,
            "stream {i}: tokens differ from the reference"
        );
        assert_eq!(out.finish, Some(FinishReason::Length as i32), "stream {i}");
        pauses.push(out.longest_pause);
    }
    Pauses {
        of: "longest pause per stream",
        values: pauses,
    }
}

/// What an unfaulted cluster answers for `prompts`, one at a time.
async fn reference(cluster: &Cluster, prompts: &[Vec<u32>], tokens: u32) -> Vec<Vec<u32>> {
    let mut c = cluster.client().await;
    let mut out = Vec::new();
    for p in prompts {
        out.push(c.generate(greedy(p, tokens)).await.unwrap().token_ids);
    }
    out
}

/// One prefill and two decode workers on the mock engine (5 ms steps), a lease long enough
/// that only the worker's own leaving can take it out of membership during a test.
fn mock_cluster() -> ClusterSpec {
    const MOCK: [&str; 4] = ["--engine", "mock", "--mock-step-ms", "5"];
    ClusterSpec::new(1, 2)
        .ttl(60)
        .prefill_args(&MOCK)
        .decode_args(&MOCK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_panic_takes_the_worker_out_and_its_streams_migrate() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let mut running = mock_cluster()
        .process_args("decode0", &["--mock-panic-after-steps", "40"])
        .start(model);
    running.cluster.wait_ready(3).await;
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(i, 12)).collect();
    let streams = start_streams(&running.cluster, &prompts, 120).await;

    let victim = running.cluster.proc_mut("decode0");
    let code = tokio::task::block_in_place(|| victim.wait_exit(Duration::from_secs(30)));
    assert!(
        matches!(code, Some(c) if c != 0),
        "the worker whose engine panicked exited with {code:?}:\n{}",
        victim.log()
    );
    assert!(victim.log().contains("panicked"), "{}", victim.log());
    let cluster = &running.cluster;
    // It left membership at once (its lease revoked), long before the 60 s TTL.
    eventually(Duration::from_secs(10), "decode0 to leave", || async {
        let views = cluster.workers().await?;
        (views.iter().filter(|v| v.role == "decode").count() == 1).then_some(())
    })
    .await;
    let expected = reference(cluster, &prompts, 120).await;
    let pauses = collect(streams, &expected).await;
    eprintln!(
        "engine panic: {} streams complete and exact; {pauses}",
        prompts.len()
    );
    let metrics = router_metrics(cluster).await;
    assert!(
        counter(&metrics, "sluice_router_migrations_total{reason=\"decode_") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigterm_drains_the_worker_without_losing_a_stream() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let mut running = mock_cluster()
        .decode_args(&["--drain-timeout", "1"])
        .start(model);
    running.cluster.wait_ready(3).await;
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(i, 12)).collect();
    // 400 steps of 5 ms: longer than the drain timeout, so what is left migrates.
    let streams = start_streams(&running.cluster, &prompts, 400).await;
    let victim = running.cluster.proc_mut("decode0");
    victim.term();
    let code = tokio::task::block_in_place(|| victim.wait_exit(Duration::from_secs(30)));
    assert_eq!(code, Some(0), "a drained worker exits 0:\n{}", victim.log());
    let cluster = &running.cluster;
    let views = cluster.workers().await.unwrap();
    assert_eq!(
        views.iter().filter(|v| v.role == "decode").count(),
        1,
        "the drained worker deregistered: {views:?}"
    );
    let expected = reference(cluster, &prompts, 400).await;
    let pauses = collect(streams, &expected).await;
    eprintln!(
        "SIGTERM: {} streams complete and exact; {pauses}",
        prompts.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_etcd_stops_no_request() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // TTL 3 s: every lease is lost several times over during the 20 s pause.
    let mut running = ClusterSpec::new(1, 1).ttl(3).start(model);
    running.cluster.wait_ready(2).await;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 30)).collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| local_greedy(model, p, 8, true))
        .collect();

    running.etcd.pause();
    let paused = Instant::now();
    let cluster = &running.cluster;
    // Two clients, one request after another each, through the pause and 5 s after it.
    let mut sent = 0;
    let mut resumed = None;
    let mut latencies = Vec::new();
    let client = cluster.client().await;
    while resumed.is_none_or(|r: Instant| r.elapsed() < Duration::from_secs(5)) {
        let answers = futures::future::join_all((0..2).map(|k| {
            let mut c = client.clone();
            let i = (sent + k) % prompts.len();
            let req = greedy(&prompts[i], 8);
            async move {
                let start = Instant::now();
                let answer = c.generate(req).await;
                (i, answer, start.elapsed())
            }
        }))
        .await;
        for (i, answer, took) in answers {
            latencies.push(took);
            let answer = answer.unwrap_or_else(|e| {
                panic!(
                    "request {sent} failed {:?} after etcd paused: {e}",
                    paused.elapsed()
                )
            });
            assert_eq!(answer.token_ids, expected[i], "request {sent}");
            sent += 1;
        }
        if resumed.is_none() && paused.elapsed() >= Duration::from_secs(20) {
            running.etcd.resume();
            resumed = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "etcd paused 20 s: {sent} / {sent} requests served, every one exact; {}",
        Pauses {
            of: "request latency",
            values: latencies,
        }
    );
    assert!(sent >= 20, "only {sent} requests went through");

    // The workers lost their leases, kept serving, and re-registered; the metrics say so.
    let cluster = &running.cluster;
    for (name, url) in &cluster.metrics {
        let text = eventually(Duration::from_secs(15), "the lease to be back", || async {
            let text = metrics_at(url).await;
            (counter(&text, "sluice_lease_registered{") == 1.0).then_some(text)
        })
        .await;
        assert!(
            counter(&text, "sluice_lease_losses_total{") >= 1.0,
            "{name}: no lease loss counted\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_expert_worker_with_a_replica_costs_no_token() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // Two shards, two replicas each; the lease outlives the test, so only failover helps.
    let mut running = ClusterSpec::new(1, 1)
        .experts(2)
        .expert_replicas(2)
        .ttl(60)
        .prefill_args(&["--expert-timeout", "5"])
        .decode_args(&["--expert-timeout", "5"])
        .start(model);
    running.cluster.wait_ready(6).await;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 20)).collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| local_greedy(model, p, 300, true))
        .collect();
    let streams = start_streams(&running.cluster, &prompts, 300).await;
    running.cluster.proc_mut("expert0").kill9();
    let pauses = collect(streams, &expected).await;
    eprintln!(
        "expert worker killed: {} streams complete and exact; {pauses}",
        prompts.len()
    );

    // Later requests go on too, on the surviving replica.
    let cluster = &running.cluster;
    let mut c = cluster.client().await;
    let again = c.generate(greedy(&prompts[2], 300)).await.unwrap();
    assert_eq!(again.token_ids, expected[2]);
    let decode_metrics = &cluster
        .metrics
        .iter()
        .find(|(n, _)| n == "decode0")
        .unwrap()
        .1;
    let text = metrics_at(decode_metrics).await;
    assert!(
        counter(&text, "sluice_expert_failovers_total") >= 1.0,
        "the decode worker never failed over:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_request_never_touches_its_twin_with_the_same_client_id() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // One decode worker: both requests share it. The router aborts the cancelled one there by
    // its own attempt key; keyed by the client's id, the abort would end the twin too.
    let running = ClusterSpec::new(1, 1)
        .prefill_args(&["--engine", "mock", "--mock-step-ms", "5"])
        .decode_args(&["--engine", "mock", "--mock-step-ms", "5"])
        .start(model);
    running.cluster.wait_ready(2).await;
    let client = running.cluster.client().await;
    let twin = |tokens| GenerateRequest {
        request_id: "same-id".into(),
        ..greedy(&prompt(1, 12), tokens)
    };
    let mut cancelled = client.clone().generate_stream(twin(400)).await.unwrap();
    let mut survivor = client.clone().generate_stream(twin(200)).await.unwrap();
    cancelled.next().await.unwrap().unwrap();
    survivor.next().await.unwrap().unwrap();
    drop(cancelled);
    let mut tokens = 1;
    let mut finish = None;
    while let Some(chunk) = survivor.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("the twin failed: {e}"));
        assert_eq!(chunk.request_id, "same-id");
        tokens += chunk.token_ids.len();
        if chunk.finish_reason != FinishReason::Unspecified as i32 {
            finish = Some(chunk.finish_reason);
        }
    }
    assert_eq!((tokens, finish), (200, Some(FinishReason::Length as i32)));
    running.cluster.wait_idle().await;
}
