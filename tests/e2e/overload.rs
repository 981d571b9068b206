//! Overload against the mock engine (deterministic step times): past capacity the cluster
//! still serves what it can within the targets, refuses the rest at once, recovers from a
//! flash crowd within seconds, and two routers share one cluster's capacity.
//!
//! The cluster: one decode worker of `SLOTS` sequences stepping every `STEP_MS`, requests of
//! 16 prompt and `OUTPUT` output tokens: each holds a slot for `OUTPUT - 1` steps (the first
//! token comes from the prefill worker), so the decode worker completes at most
//! `SLOTS / ((OUTPUT - 1) × STEP_MS)` requests a second — the capacity the rates below are
//! multiples of. The routers admit against the same targets the load generator scores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_harness::{ClusterSpec, Up, load_report, synth};

/// The tests measure rates on 2 cores: one at a time, so neither's load skews the other's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SLOTS: f64 = 4.0;
const STEP_MS: f64 = 20.0;
const OUTPUT: f64 = 8.0;
const TTFT_MS: f64 = 500.0;
const TPOT_MS: f64 = 50.0;

/// Requests a second the decode worker can complete.
fn capacity() -> f64 {
    SLOTS / ((OUTPUT - 1.0) * STEP_MS / 1000.0)
}

fn mock_args() -> Vec<String> {
    [
        "--engine",
        "mock",
        "--mock-step-ms",
        &STEP_MS.to_string(),
        "--mock-prefill-tps",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn targets() -> Vec<String> {
    vec![
        "--slo-ttft".into(),
        TTFT_MS.to_string(),
        "--slo-tpot".into(),
        TPOT_MS.to_string(),
    ]
}

/// `sluice load --json` against `endpoint` with `pace` (e.g. `--rps 20 --duration 4`).
fn load(endpoint: &str, pace: &[String]) -> Value {
    let output = OUTPUT.to_string();
    let mut args: Vec<String> = ["--endpoint", endpoint, "--prompt-tokens", "16"]
        .into_iter()
        .chain(["--output-tokens", &output])
        .map(String::from)
        .collect();
    args.extend(targets());
    args.extend(pace.iter().cloned());
    args.extend(["--connections".into(), "2".into()]);
    load_report(&args)
}

fn open_loop(rps: f64, seconds: f64) -> Vec<String> {
    vec![
        "--rps".into(),
        format!("{rps:.1}"),
        "--duration".into(),
        seconds.to_string(),
    ]
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn goodput(r: &Value) -> f64 {
    f(&r["goodput"]["requests_per_s"])
}

/// Requests that failed other than by a refusal for load.
fn failed_otherwise(r: &Value) -> u64 {
    let errors = r["requests"]["errors"].as_object().unwrap();
    errors
        .iter()
        .filter(|(status, _)| status.as_str() != "RESOURCE_EXHAUSTED")
        .map(|(_, e)| e["count"].as_u64().unwrap())
        .sum()
}

fn refused(r: &Value) -> u64 {
    r["requests"]["errors"]["RESOURCE_EXHAUSTED"]["count"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn past_capacity_goodput_holds_and_a_flash_crowd_passes() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let mut args = mock_args();
    args.extend(["--max-sequences".into(), SLOTS.to_string()]);
    args.extend(targets());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = Up::start(model_dir.path(), &args);
    let cap = capacity();

    // Half the capacity: everything admitted, everything within the targets.
    let half = load(&up.endpoint, &open_loop(0.5 * cap, 4.0));
    assert_eq!(refused(&half), 0, "refused at half capacity: {half}");
    assert_eq!(failed_otherwise(&half), 0, "{half}");
    assert!(f(&half["goodput"]["share"]) >= 0.95, "{half}");

    // At capacity, and at 4×: the overloaded run keeps ≥ 80 % of the goodput at capacity,
    // its admitted requests within the TTFT target, the rest refused fast.
    let at = load(&up.endpoint, &open_loop(cap, 5.0));
    let over = load(&up.endpoint, &open_loop(4.0 * cap, 5.0));
    eprintln!(
        "capacity {cap:.1} req/s: goodput {:.1} at 1×, {:.1} at 4× ({} refused, refusal p99 {} ms)",
        goodput(&at),
        goodput(&over),
        refused(&over),
        over["refusal_ms"]["p99"]
    );
    assert_eq!(failed_otherwise(&at), 0, "{at}");
    assert_eq!(failed_otherwise(&over), 0, "{over}");
    assert!(
        goodput(&over) >= 0.8 * goodput(&at),
        "goodput at 4× {:.1} < 80 % of {:.1} at capacity: {over}",
        goodput(&over),
        goodput(&at)
    );
    assert!(
        f(&over["ttft_ms"]["p99"]) <= TTFT_MS,
        "admitted TTFT p99 past the target: {over}"
    );
    assert!(
        refused(&over) > 0,
        "4× the capacity and nothing refused: {over}"
    );
    assert!(
        f(&over["refusal_ms"]["p99"]) < 100.0,
        "slow refusals: {over}"
    );

    // A flash crowd: ×10 of half the capacity for 10 s. Two seconds after it, every request
    // is admitted and within the targets again.
    let base = 0.5 * cap;
    let phases = format!("{base:.1}:3,{:.1}:10,{base:.1}:6", 10.0 * base);
    let crowd = load(&up.endpoint, &["--phases".into(), phases]);
    assert_eq!(failed_otherwise(&crowd), 0, "{crowd}");
    let timeline = crowd["timeline"].as_array().unwrap();
    let during: u64 = timeline[3..13]
        .iter()
        .map(|s| s["refused"].as_u64().unwrap())
        .sum();
    assert!(during > 0, "the crowd was never refused: {crowd}");
    for s in &timeline[15..19] {
        assert_eq!(
            s["refused"], 0,
            "still refusing after the crowd: {timeline:?}"
        );
        assert_eq!(s["good"], s["issued"], "not recovered: {timeline:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_one_clusters_capacity() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    let mock = mock_args();
    let mock: Vec<&str> = mock.iter().map(String::as_str).collect();
    let targets = targets();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let slots = SLOTS.to_string();
    let running = ClusterSpec::new(1, 1)
        .routers(2)
        .prefill_args(&mock)
        .decode_args(&mock)
        .decode_args(&["--max-sequences", &slots])
        .router_args(&targets)
        .start(model_dir.path());
    let cluster = &running.cluster;
    cluster.wait_ready(2).await;
    // Each router offered twice the capacity: together 4×. Admitting as if each were alone
    // would queue twice what the targets allow, and the admitted would miss them.
    let cap = capacity();
    let runs: Vec<_> = cluster
        .routers
        .iter()
        .map(|endpoint| {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || load(&endpoint, &open_loop(2.0 * cap, 5.0)))
        })
        .collect();
    let reports: Vec<Value> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let total: f64 = reports.iter().map(goodput).sum();
    for r in &reports {
        assert_eq!(failed_otherwise(r), 0, "{r}");
        assert!(refused(r) > 0, "a router at 2× refused nothing: {r}");
        assert!(
            f(&r["goodput"]["share"]) > 0.0 && f(&r["ttft_ms"]["p99"]) <= TTFT_MS,
            "{r}"
        );
        let completed = f(&r["requests"]["completed"]);
        let good = f(&r["goodput"]["good"]);
        assert!(
            good >= 0.8 * completed,
            "admitted requests missed the targets (double admission?): {r}"
        );
    }
    eprintln!("two routers: goodput {total:.1} req/s of a {cap:.1} req/s capacity");
    assert!(
        total >= 0.7 * cap,
        "together {total:.1} req/s within the targets, capacity {cap:.1}"
    );
}
