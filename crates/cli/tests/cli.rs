//! The `sluice` binary, run as external checks run it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sluice_engine::weights::WeightStore;

fn sluice(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_CACHE_DIR", cache)
        .output()
        .expect("run sluice")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(case)
}

/// prompt, logits [T, vocab] and greedy tokens of a golden fixture (made by HF transformers).
fn golden(case: &str) -> (Vec<u32>, Vec<Vec<f32>>, Vec<u32>) {
    let store = WeightStore::open_file(&fixture(case).join("golden.safetensors")).unwrap();
    let words = |name: &str| -> Vec<[u8; 4]> {
        let bytes = store.raw(name).unwrap().2;
        bytes
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let ints = |name: &str| {
        words(name)
            .into_iter()
            .map(|w| i32::from_le_bytes(w) as u32)
            .collect()
    };
    let vocab = store.raw("logits").unwrap().1[1];
    let floats: Vec<f32> = words("logits")
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let rows = floats.chunks(vocab).map(<[f32]>::to_vec).collect();
    (ints("prompt"), rows, ints("greedy"))
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn logits_json_matches_transformers() {
    let cache = tempfile::tempdir().unwrap();
    let (prompt, logits, _) = golden("moe");
    let model = fixture("moe");
    let tokens = ids_arg(&prompt[..5]);
    let out = sluice(
        &[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--json",
        ],
        cache.path(),
    );
    let json = stdout_json(&out);
    let rows = json["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for (row, want) in rows.iter().zip(&logits) {
        let row: Vec<f32> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(row.len(), want.len());
        let d = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "max |Δ| {d}");
    }
}

#[test]
fn generate_json_gives_transformers_greedy_tokens() {
    let cache = tempfile::tempdir().unwrap();
    let (prompt, _, greedy) = golden("next");
    let model = fixture("next");
    let tokens = ids_arg(&prompt);
    let out = sluice(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--json",
        ],
        cache.path(),
    );
    let json = stdout_json(&out);
    let ids: Vec<u32> = json["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, greedy);
    assert_eq!(json["text"], ""); // the fixture has no tokenizer
}

#[test]
fn default_model_is_synthesised_and_seeded_sampling_repeats() {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "generate",
        "--prompt",
        "Hello",
        "--chat",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--ignore-eos",
        "--json",
    ];
    let first = stdout_json(&sluice(&args, cache.path()));
    let second = stdout_json(&sluice(&args, cache.path()));
    assert_eq!(first, second);
    assert_eq!(first["token_ids"].as_array().unwrap().len(), 12);
    assert!(first["text"].is_string());
    assert!(
        cache
            .path()
            .join("synth/tiny-seed0/model.safetensors")
            .exists()
    );
}

#[test]
fn synth_writes_a_loadable_hf_layout() {
    let cache = tempfile::tempdir().unwrap();
    let out_dir = cache.path().join("tiny");
    let out = sluice(
        &[
            "synth",
            "--preset",
            "tiny",
            "--out",
            out_dir.to_str().unwrap(),
            "--seed",
            "3",
        ],
        cache.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let out = sluice(
        &[
            "generate",
            "--model",
            out_dir.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--max-tokens",
            "3",
            "--ignore-eos",
            "--json",
        ],
        cache.path(),
    );
    assert_eq!(stdout_json(&out)["token_ids"].as_array().unwrap().len(), 3);
}

fn failure(args: &[&str]) -> String {
    let cache = tempfile::tempdir().unwrap();
    let out = sluice(args, cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let model = fixture("moe");
    let m = model.to_str().unwrap();
    let err = failure(&["logits", "--model", m, "--tokens", "1,256", "--json"]);
    assert!(err.contains("token id 256 is out of range"), "{err}");
    let err = failure(&[
        "generate",
        "--model",
        m,
        "--tokens",
        "1",
        "--temperature",
        "-1",
    ]);
    assert!(err.contains("`temperature`"), "{err}");
    let err = failure(&["generate", "--model", m, "--tokens", "1", "--top-p", "2"]);
    assert!(err.contains("`top_p`"), "{err}");
    let err = failure(&["generate", "--model", "/nonexistent/model", "--tokens", "1"]);
    assert!(
        err.contains("/nonexistent/model") && err.contains("config.json"),
        "{err}"
    );
    let err = failure(&["generate", "--model", m, "--prompt", "hi"]);
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = failure(&["generate", "--tokens", "1", "--device", "cuda:0"]);
    assert!(err.contains("cuda:0"), "{err}");
    let err = failure(&["load", "--rps", "0"]);
    assert!(err.contains("--rps"), "{err}");
    let err = failure(&["load", "--output-tokens", "9..3"]);
    assert!(err.contains("MIN ≤ MAX"), "{err}");
    // Nothing listens on port 1: the error names the endpoint.
    let err = failure(&["load", "--endpoint", "http://127.0.0.1:1", "-n", "1"]);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let err = failure(&["up", "--engine", "mock", "--experts", "2"]);
    assert!(err.contains("--engine mock"), "{err}");
}

#[test]
fn bench_reports_decode_against_the_bandwidth_it_measured() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tiny");
    let dir_arg = dir.to_str().unwrap();
    let synth = sluice(
        &["synth", "--preset", "tiny", "--out", dir_arg],
        cache.path(),
    );
    assert!(synth.status.success());
    let bench = |bandwidth: &str| {
        stdout_json(&sluice(
            &[
                "bench",
                "--model",
                dir_arg,
                "--prompt-len",
                "8",
                "--gen-len",
                "2",
                "--decode-context",
                "4",
                "--batch",
                "2",
                "--bandwidth-bytes",
                bandwidth,
                "--json",
            ],
            cache.path(),
        ))
    };
    let r = bench("8388608");
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(num("machine_read_gb_s") > 0.0, "{r}");
    // A step reads the active weights once and each of the 2 sequences' state.
    assert!(num("step_read_bytes") > num("active_weight_bytes"), "{r}");
    let step_s = num("decode_step_ms") / 1000.0;
    let fraction = num("step_read_bytes") / step_s / (num("machine_read_gb_s") * 1e9);
    assert!(
        (num("roofline_fraction_whole_run") - fraction).abs() < 1e-9 * fraction.max(1.0),
        "{r}"
    );
    // 2 steps after one pass: one window, compared with that pass alone.
    assert_eq!(r["roofline_windows"], 1, "{r}");
    assert!(num("roofline_fraction").is_finite() && num("roofline_fraction") > 0.0);
    let roofline_tps = num("machine_read_gb_s") * 1e9 / num("step_read_bytes") * 2.0;
    assert!(
        (num("roofline_tok_s") / roofline_tps - 1.0).abs() < 1e-9,
        "{r}"
    );
    assert!(num("prefill_gflop_s") > 0.0);
    // Counted over extra steps after the timed ones; every allocation asks for at least a byte.
    assert!(num("decode_allocated_bytes_per_step") >= num("decode_allocations_per_step"));
    // Skipped on request.
    let r = bench("0");
    assert!(
        r["machine_read_gb_s"].is_null()
            && r["roofline_fraction"].is_null()
            && r["roofline_windows"] == 0,
        "{r}"
    );
}

#[test]
fn int8_weights_generate_and_unknown_formats_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let gen_args = |weights: &'static str| {
        [
            "generate",
            "--tokens",
            "1,2,3",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
            "--weights",
            weights,
        ]
    };
    let out = stdout_json(&sluice(&gen_args("int8"), cache.path()));
    assert_eq!(out["token_ids"].as_array().unwrap().len(), 4, "{out}");
    let out = sluice(&gen_args("int4"), cache.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("int4") && err.contains("int8"), "{err}");
}
