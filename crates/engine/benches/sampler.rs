//! `cargo bench -p sluice-engine --bench sampler`: the serving sampler's cost per token at
//! Qwen3.5's vocabulary (248 320), for one sequence and for a batch of 32 sampled one after
//! the other (as a decode step does), under the parameter sets requests use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use sluice_engine::{Sampler, SamplingParams};

const VOCAB: usize = 248_320;

/// Logits shaped like a language model's: most of the vocabulary far down, a few hundred
/// plausible tokens, one or two favourites (deterministic).
fn logits(seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..VOCAB)
        .map(|_| {
            let u = next();
            // A heavy upper tail: -8 for most tokens, up to ~+12 for a handful.
            -8.0 + 20.0 * u.powi(12) + 2.0 * next()
        })
        .collect()
}

/// Default parameters with `f` applied (field by field, so this builds against older
/// `SamplingParams` too: the before/after figures in docs/performance.md).
fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

fn main() {
    let cases: Vec<(&str, SamplingParams)> = vec![
        ("greedy", SamplingParams::default()),
        (
            "greedy + 5 logprobs",
            with(|p| {
                p.top_logprobs = 5;
            }),
        ),
        (
            "temperature 1",
            with(|p| {
                p.temperature = 1.0;
            }),
        ),
        (
            "T 1, top_p 0.95",
            with(|p| {
                p.temperature = 1.0;
                p.top_p = 0.95;
            }),
        ),
        (
            "Qwen3.5's: T 0.6, top_p 0.95, top_k 20",
            with(|p| {
                p.temperature = 0.6;
                p.top_p = 0.95;
                p.top_k = 20;
            }),
        ),
        (
            "T 1, min_p 0.05",
            with(|p| {
                p.temperature = 1.0;
                p.min_p = 0.05;
            }),
        ),
        (
            "T 0.7, top_p 0.9, repetition 1.1, frequency 0.3",
            with(|p| {
                p.temperature = 0.7;
                p.top_p = 0.9;
                p.repetition_penalty = 1.1;
                p.frequency_penalty = 0.3;
            }),
        ),
    ];
    let rows: Vec<Vec<f32>> = (0..32).map(|i| logits(i + 1)).collect();
    let prompt: Vec<u32> = (0..512).map(|i| (i * 7919) % VOCAB as u32).collect();
    println!("vocabulary {VOCAB}; µs per token (median of 5 runs)");
    println!("| parameters | batch 1 | batch 32 (per token) |");
    println!("|---|---|---|");
    for (name, params) in cases {
        let per_token = |batch: usize| {
            let mut runs: Vec<f64> = (0..5)
                .map(|run| {
                    let mut samplers: Vec<Sampler> = (0..batch)
                        .map(|b| {
                            let mut p = params.clone();
                            p.seed = Some((run * 100 + b) as u64);
                            Sampler::new(p, &prompt).unwrap()
                        })
                        .collect();
                    let steps = if batch == 1 { 64 } else { 4 };
                    let start = Instant::now();
                    let mut sink = 0u64;
                    for step in 0..steps {
                        for (b, s) in samplers.iter_mut().enumerate() {
                            sink += s.sample(&rows[(b + step) % rows.len()]).token as u64;
                        }
                    }
                    std::hint::black_box(sink);
                    start.elapsed().as_secs_f64() * 1e6 / (steps * batch) as f64
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[2]
        };
        let one = per_token(1);
        let many = per_token(32);
        println!("| {name} | {one:.0} | {many:.0} |");
    }
}
