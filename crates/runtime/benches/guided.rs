//! `cargo bench -p sluice-runtime --bench guided`: what guided decoding costs at Qwen3.5's
//! real tokenizer (`../shared/fixtures`, 248 320 rows): building the vocabulary's trie (once
//! per process), compiling a schema (once per request, per worker), and a token's mask plus
//! masked sampling against plain sampling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use sluice_engine::{Sampler, SamplingParams, Tokenizer};
use sluice_harness::noise_logits;
use sluice_runtime::grammar::{Constraint, Grammar, GrammarCompiler, GuidedSampler};

const VOCAB: usize = 248_320;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This process's resident set (Linux), in MiB.
fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn main() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/qwen3_5-tokenizer");
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let eos = tokenizer.token_id("<|im_end|>").unwrap();
    let schema = Constraint {
        grammar: Grammar::JsonSchema(json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "nights": {"type": "integer", "minimum": 1, "maximum": 30},
                "refundable": {"type": "boolean"},
                "class": {"enum": ["economy", "premium", "business", "first"]},
                "guests": {"type": "array", "items": {"type": "string"}, "maxItems": 4}
            },
            "required": ["city", "nights", "refundable", "class", "guests"]
        })),
        after_token: None,
    };
    let before = resident_mib();
    let started = Instant::now();
    let compiler = GrammarCompiler::new(&dir, VOCAB, &[eos]);
    compiler.check(&schema, "constraint").unwrap();
    let first = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "resident memory the compiler added: {:.0} MiB",
        resident_mib() - before
    );
    let compiles: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            compiler.guide(&schema, &[]).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!("first constrained request (trie + compile): {first:.0} ms");
    println!("compile a schema, median of 20: {:.2} ms", median(compiles));

    let rows: Vec<Vec<f32>> = (0..8).map(|i| noise_logits(i, 0, VOCAB)).collect();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(1),
        ..SamplingParams::default()
    };
    // Batch 1: four whole answers one after another; batch 32: 32 answers side by side, each
    // step sampling every unfinished one in turn, as a decode step does.
    for batch in [1usize, 32] {
        for (name, guided) in [("plain", false), ("schema", true)] {
            let (mut per_token, mut masks, mut picks) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..5 {
                let (mut tokens, mut mask_s, mut pick_s) = (0usize, 0.0, 0.0);
                let t = Instant::now();
                for answers in 0..(4 / batch).max(1) {
                    let mut samplers: Vec<Option<GuidedSampler>> = (0..batch)
                        .map(|_| {
                            let guide = guided.then(|| compiler.guide(&schema, &[]).unwrap());
                            let sampler = Sampler::new(params.clone(), &[]).unwrap();
                            Some(GuidedSampler::new(sampler, guide))
                        })
                        .collect();
                    // Whole answers, from the schema's start to its end (or 200 tokens).
                    for step in 0..200 {
                        for (i, slot) in samplers.iter_mut().enumerate() {
                            let Some(s) = slot.as_mut() else { continue };
                            let row = &rows[(answers + i + step + round) % rows.len()];
                            // The mask apart (the decode scheduler makes it while the forward
                            // runs), then the pick: all that stays on the step's critical path.
                            let t0 = Instant::now();
                            s.prepare_mask();
                            let t1 = Instant::now();
                            let token = s.sample(row).unwrap().token;
                            mask_s += (t1 - t0).as_secs_f64();
                            pick_s += t1.elapsed().as_secs_f64();
                            tokens += 1;
                            if token == eos || s.grammar_complete() {
                                *slot = None;
                            }
                        }
                        if samplers.iter().all(Option::is_none) {
                            break;
                        }
                    }
                }
                per_token.push(t.elapsed().as_secs_f64() * 1e6 / tokens as f64);
                masks.push(mask_s * 1e6 / tokens as f64);
                picks.push(pick_s * 1e6 / tokens as f64);
            }
            println!(
                "batch {batch}, {name}: {:.0} µs per token (median of 5): mask {:.0} µs, pick {:.0} µs",
                median(per_token),
                median(masks),
                median(picks)
            );
        }
    }
}
