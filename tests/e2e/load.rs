//! `sluice load` against the mock engine: what it reports must match what the mock was told
//! to do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_harness::{Up, load_report, synth};

/// Runs `sluice load --json` with `args`; the parsed report.
fn load(args: &[&str]) -> Value {
    load_report(args)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `measured` within `tolerance` (a fraction) of `want`.
fn near(what: &str, measured: f64, want: f64, tolerance: f64) {
    assert!(
        (measured - want).abs() <= want * tolerance,
        "{what}: measured {measured:.2}, expected {want:.2} ± {:.0} %",
        tolerance * 100.0
    );
}

#[test]
fn load_reports_the_mock_engines_configured_rate_and_delays() {
    let model_dir = tempfile::tempdir().unwrap();
    synth("tiny", model_dir.path());
    // Every step 20 ms whatever its batch; prompts cost nothing extra.
    let step_ms = 20.0;
    let up = Up::start(
        model_dir.path(),
        &[
            "--engine",
            "mock",
            "--mock-step-ms",
            "20",
            "--mock-prefill-tps",
            "0",
        ],
    );
    let (streams, outputs) = (8.0, 50.0);
    for api in ["grpc", "http"] {
        let http = format!("http://{}", up.http);
        let mut args = vec![
            "-c",
            "8",
            "-n",
            "32",
            "--prompt-tokens",
            "16",
            "--output-tokens",
            "50",
        ];
        args.extend(["--warmup", "8", "--slo-ttft", "1000", "--slo-tpot", "1000"]);
        if api == "http" {
            args.extend(["--http", &http]);
        } else {
            args.extend(["--endpoint", &up.endpoint]);
        }
        let r = load(&args);
        assert_eq!(r["requests"]["completed"], 32, "{api}: {r}");
        assert_eq!(r["requests"]["failed"], 0, "{api}: {r}");
        assert_eq!(r["tokens"]["output"], 32 * 50, "{api}");
        assert_eq!(r["tokens"]["prompt"], 32 * 16, "{api}");
        // Between tokens: one step.
        near(
            &format!("{api} ITL p50"),
            f(&r["itl_ms"]["p50"]),
            step_ms,
            0.10,
        );
        near(
            &format!("{api} TPOT mean"),
            f(&r["tpot_ms"]["mean"]),
            step_ms,
            0.10,
        );
        // First token: the prefill worker's one step, plus at most one step of waiting for
        // the batch in progress, plus the hops.
        let ttft = f(&r["ttft_ms"]["p50"]);
        assert!(
            (step_ms..3.0 * step_ms).contains(&ttft),
            "{api} TTFT p50 {ttft}"
        );
        // Each stream decodes one token per step: 8 streams → 400 tokens/s, less the share of
        // time spent before the first token.
        let ideal = streams / (step_ms / 1000.0);
        let decoding_share = (outputs - 1.0) * step_ms / (ttft + (outputs - 1.0) * step_ms);
        near(
            &format!("{api} output tokens/s"),
            f(&r["throughput"]["output_tokens_per_s"]),
            ideal * decoding_share,
            0.10,
        );
        assert_eq!(f(&r["goodput"]["share"]), 1.0, "{api}");
    }

    // Open loop: Poisson arrivals at 40/s for 1.5 s issue about 60 requests, each answered.
    let r = load(&[
        "--endpoint",
        &up.endpoint,
        "--rps",
        "40",
        "--duration",
        "1.5",
        "--prompt-tokens",
        "4..32",
        "--output-tokens",
        "2..10",
    ]);
    let done = r["requests"]["completed"].as_u64().unwrap();
    assert!(
        (30..=95).contains(&done),
        "{done} requests in 1.5 s at 40/s"
    );
    assert_eq!(r["requests"]["failed"], 0);
}
