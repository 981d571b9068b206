//! Overload control, measured: a real cluster (router, one prefill and one decode worker,
//! real etcd) on the tiny synthetic model.
//!
//! 1. Sustainable load: a closed loop at the router's in-flight limit gives the throughput and
//!    the latency of admitted requests without overload.
//! 2. Overload: an open loop at 4× that throughput for a while. Admitted requests should keep
//!    their latency within 2× of step 1; refusals should come back at once.
//!
//! `cargo build --release --workspace --bins && cargo bench -p sluice-tests --bench overload`
//! (the binaries next to the bench executable are the ones started). With
//! `SLUICE_ENDPOINT=http://HOST:PORT` it measures a running router instead (e.g. `sluice up
//! --preset small --max-in-flight 8 --max-queue 2`), whose limits should match the ones here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sluice_client::{ClientError, GenerateRequest, SamplingParams};
use sluice_harness::{ClusterSpec, synth};

const IN_FLIGHT: usize = 8;
const QUEUE: usize = 2;

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: (0..16).map(|i| (i * 37 + 3) % 1000).collect(),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(16),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name}: n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
        v.len(),
        percentile(&v, 0.5) * 1e3,
        percentile(&v, 0.9) * 1e3,
        percentile(&v, 0.99) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let model_dir = tempfile::tempdir().unwrap();
    let external = std::env::var("SLUICE_ENDPOINT").ok();
    let running = external.is_none().then(|| {
        synth("tiny", model_dir.path());
        ClusterSpec::new(1, 1)
            .router_args(&[
                "--max-in-flight",
                &IN_FLIGHT.to_string(),
                "--max-queue",
                &QUEUE.to_string(),
            ])
            .start(model_dir.path())
    });
    if let Some(r) = &running {
        r.cluster.wait_ready(2).await;
    }
    let endpoint = external
        .clone()
        .or_else(|| running.as_ref().map(|r| r.cluster.router.clone()))
        .unwrap();
    let client = sluice_client::Client::connect(&endpoint).await.unwrap();

    // Warm-up, then the sustainable load: IN_FLIGHT closed loops.
    for _ in 0..4 {
        client.clone().generate(request()).await.unwrap();
    }
    let window = Duration::from_secs(15);
    let started = Instant::now();
    let loops = (0..IN_FLIGHT).map(|_| {
        let mut c = client.clone();
        async move {
            let mut latencies = Vec::new();
            while started.elapsed() < window {
                let t = Instant::now();
                c.generate(request()).await.unwrap();
                latencies.push(t.elapsed().as_secs_f64());
            }
            latencies
        }
    });
    let unloaded: Vec<f64> = futures::future::join_all(loops)
        .await
        .into_iter()
        .flatten()
        .collect();
    let rate = unloaded.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "sustainable: {rate:.1} requests/s ({:.0} output tokens/s) at {IN_FLIGHT} in flight",
        rate * 16.0
    );
    summary("  latency", unloaded);

    // Overload: arrivals at 4× the sustainable rate, evenly spaced.
    let offered = 4.0 * rate;
    let interval = Duration::from_secs_f64(1.0 / offered);
    let window = Duration::from_secs(15);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut next = Instant::now();
    while started.elapsed() < window {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.generate(request()).await;
            (r, t.elapsed().as_secs_f64())
        }));
    }
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    let mut other = 0;
    for t in tasks {
        match t.await.unwrap() {
            (Ok(_), s) => admitted.push(s),
            (Err(ClientError::Overloaded(_)), s) => refused.push(s),
            (Err(e), _) => {
                other += 1;
                eprintln!("unexpected: {e}");
            }
        }
    }
    println!(
        "overload: offered {offered:.1} requests/s for {window:?}: {} admitted ({:.1}/s), {} refused, {other} other errors",
        admitted.len(),
        admitted.len() as f64 / window.as_secs_f64(),
        refused.len()
    );
    summary("  admitted latency", admitted);
    summary("  refusal latency", refused);
    if let Some(r) = &running {
        r.cluster.wait_idle().await;
        println!("after: every worker idle, no KV block held");
    }
}
