//! Golden tests against HF transformers (fixtures made by `tests/oracle/make_fixtures.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use sluice_engine::weights::WeightStore;
use sluice_engine::{CacheConfig, LogitsMode, Model, ModelCache, SeqChunk};

const CASES: [&str; 5] = ["moe", "dense_tied", "next", "vl_fused", "bf16"];
const TOL: f32 = 1e-4;

struct Golden {
    prompt: Vec<u32>,
    /// `[prompt, vocab]`
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(case)
}

fn load(case: &str) -> (Model, Golden) {
    let dir = fixture(case);
    let model = Model::load(&dir, |_, _| {}).unwrap_or_else(|e| panic!("{case}: {e}"));
    let store = WeightStore::open_file(&dir.join("golden.safetensors")).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        let (dtype, _, bytes) = store.raw(name).unwrap();
        assert_eq!(dtype, "I32");
        bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect()
    };
    let (dtype, shape, bytes) = store.raw("logits").unwrap();
    assert_eq!(dtype, "F32");
    assert_eq!(shape[1], model.spec().vocab);
    let logits = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (
        model,
        Golden {
            prompt: ints("prompt"),
            logits,
            greedy: ints("greedy"),
        },
    )
}

fn cache(model: &Model, block_size: usize) -> ModelCache {
    model
        .new_cache(CacheConfig {
            block_size,
            num_blocks: 64,
            max_sequences: 4,
        })
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn full_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut c = cache(model, 16);
    let s = c.add_sequence().unwrap();
    model
        .forward(
            &mut c,
            &[SeqChunk { seq: s, tokens }],
            LogitsMode::AllTokens,
        )
        .unwrap()
}

#[test]
fn full_prompt_logits_match_transformers() {
    for case in CASES {
        let (model, g) = load(case);
        let logits = full_logits(&model, &g.prompt);
        let d = max_abs_diff(&logits, &g.logits);
        eprintln!("{case}: logits max |Δ| vs transformers = {d:.2e}");
        assert!(d <= TOL, "{case}: max |Δ| = {d}");
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    for case in CASES {
        let (model, g) = load(case);
        let mut c = cache(&model, 16);
        let s = c.add_sequence().unwrap();
        let mut logits = model
            .forward(
                &mut c,
                &[SeqChunk {
                    seq: s,
                    tokens: &g.prompt,
                }],
                LogitsMode::LastPerSequence,
            )
            .unwrap();
        let mut out = Vec::new();
        while out.len() < g.greedy.len() {
            let tok = argmax(&logits);
            out.push(tok);
            logits = model
                .forward(
                    &mut c,
                    &[SeqChunk {
                        seq: s,
                        tokens: &[tok],
                    }],
                    LogitsMode::LastPerSequence,
                )
                .unwrap();
        }
        assert_eq!(out, g.greedy, "{case}");
    }
}

#[test]
fn prefill_then_decode_equals_one_full_forward() {
    for case in CASES {
        let (model, g) = load(case);
        let vocab = model.spec().vocab;
        let split = g.prompt.len() - 8;
        let mut c = cache(&model, 16);
        let s = c.add_sequence().unwrap();
        model
            .forward(
                &mut c,
                &[SeqChunk {
                    seq: s,
                    tokens: &g.prompt[..split],
                }],
                LogitsMode::LastPerSequence,
            )
            .unwrap();
        for pos in split..g.prompt.len() {
            let step = model
                .forward(
                    &mut c,
                    &[SeqChunk {
                        seq: s,
                        tokens: &g.prompt[pos..pos + 1],
                    }],
                    LogitsMode::LastPerSequence,
                )
                .unwrap();
            let d = max_abs_diff(&step, &g.logits[pos * vocab..(pos + 1) * vocab]);
            assert!(d <= TOL, "{case} position {pos}: max |Δ| = {d}");
        }
    }
}

#[test]
fn chunked_prompt_equals_one_shot() {
    for case in CASES {
        let (model, g) = load(case);
        assert_eq!(g.prompt.len(), 111);
        let one_shot = full_logits(&model, &g.prompt);
        let mut c = cache(&model, 16);
        let s = c.add_sequence().unwrap();
        let mut chunked = Vec::new();
        for part in g.prompt.chunks(37) {
            chunked.extend(
                model
                    .forward(
                        &mut c,
                        &[SeqChunk {
                            seq: s,
                            tokens: part,
                        }],
                        LogitsMode::AllTokens,
                    )
                    .unwrap(),
            );
        }
        let d = max_abs_diff(&chunked, &one_shot);
        assert!(d <= TOL, "{case}: max |Δ| = {d}");
    }
}

/// Greedy continuation of `steps` tokens from the state of `seq`; returns every step's logits.
fn continue_greedy(
    model: &Model,
    c: &mut ModelCache,
    seq: sluice_engine::SeqId,
    first: u32,
    steps: usize,
) -> Vec<Vec<f32>> {
    let mut tok = first;
    let mut all = Vec::new();
    for _ in 0..steps {
        let logits = model
            .forward(
                c,
                &[SeqChunk {
                    seq,
                    tokens: &[tok],
                }],
                LogitsMode::LastPerSequence,
            )
            .unwrap();
        tok = argmax(&logits);
        all.push(logits);
    }
    all
}

#[test]
fn exported_snapshot_continues_bit_identically() {
    for case in CASES {
        let (model, g) = load(case);
        let mut a = cache(&model, 16);
        let s = a.add_sequence().unwrap();
        let logits = model
            .forward(
                &mut a,
                &[SeqChunk {
                    seq: s,
                    tokens: &g.prompt,
                }],
                LogitsMode::LastPerSequence,
            )
            .unwrap();
        let snapshot = a.export(s).unwrap();
        // A different block size on the receiving side: the snapshot carries no block table.
        let mut b = cache(&model, 8);
        let t = b.import(&snapshot).unwrap();
        let first = argmax(&logits);
        let here = continue_greedy(&model, &mut a, s, first, 8);
        let there = continue_greedy(&model, &mut b, t, first, 8);
        for (x, y) in here.iter().zip(&there) {
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{case}: continuation after import differs");
        }
    }
}

#[test]
fn mixed_batch_gives_each_sequence_its_solo_result() {
    let (model, g) = load("moe");
    let vocab = model.spec().vocab;
    // Solo: sequence A decodes after a 50-token prompt; sequence B prefills 30 tokens.
    let (pa, pb) = (&g.prompt[..50], &g.prompt[50..80]);
    let mut solo = cache(&model, 16);
    let a = solo.add_sequence().unwrap();
    model
        .forward(
            &mut solo,
            &[SeqChunk { seq: a, tokens: pa }],
            LogitsMode::LastPerSequence,
        )
        .unwrap();
    let solo_a = model
        .forward(
            &mut solo,
            &[SeqChunk {
                seq: a,
                tokens: &[7],
            }],
            LogitsMode::LastPerSequence,
        )
        .unwrap();
    let b = solo.add_sequence().unwrap();
    let solo_b = model
        .forward(
            &mut solo,
            &[SeqChunk { seq: b, tokens: pb }],
            LogitsMode::LastPerSequence,
        )
        .unwrap();

    let mut mixed = cache(&model, 16);
    let a = mixed.add_sequence().unwrap();
    model
        .forward(
            &mut mixed,
            &[SeqChunk { seq: a, tokens: pa }],
            LogitsMode::LastPerSequence,
        )
        .unwrap();
    let b = mixed.add_sequence().unwrap();
    let both = model
        .forward(
            &mut mixed,
            &[
                SeqChunk {
                    seq: a,
                    tokens: &[7],
                },
                SeqChunk { seq: b, tokens: pb },
            ],
            LogitsMode::LastPerSequence,
        )
        .unwrap();
    assert_eq!(both.len(), 2 * vocab);
    assert!(max_abs_diff(&both[..vocab], &solo_a) <= TOL);
    assert!(max_abs_diff(&both[vocab..], &solo_b) <= TOL);
}

/// `--weights int8` against transformers' logits of the checkpoint as stored: relative L2 of
/// the logits over every prompt position, top-1 agreement per position, and how many greedy
/// tokens match before the first difference. The figures are in docs/performance.md. (That
/// the int8 kernels compute exactly the dequantized products is tested in `backend::cpu`.)
#[test]
fn int8_weights_stay_close_to_the_stored_model() {
    for case in CASES {
        let (mut model, g) = load(case);
        model.set_weight_format(sluice_engine::WeightFormat::Int8);
        assert_eq!(model.dtype(), sluice_engine::tensor::DType::I8);
        let logits = full_logits(&model, &g.prompt);
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (a, b) in logits.iter().zip(&g.logits) {
            err += ((a - b) as f64).powi(2);
            norm += (*b as f64).powi(2);
        }
        let rel = (err / norm).sqrt();
        let vocab = model.spec().vocab;
        let agree = logits
            .chunks_exact(vocab)
            .zip(g.logits.chunks_exact(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        let positions = g.prompt.len();
        let tokens = continue_greedy_from_prompt(&model, &g.prompt, g.greedy.len());
        let same = tokens
            .iter()
            .zip(&g.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{case}: int8 logits rel L2 {rel:.2e}, top-1 agreement {agree}/{positions}, greedy {same}/{} tokens equal",
            g.greedy.len()
        );
        // These tiny random models amplify weight noise (their Gated DeltaNet layers most:
        // quantizing everything else gives a third of the error); measured 0.08–0.19 rel L2
        // and 79–92 % top-1. The bounds catch a broken path, not a worse rounding.
        assert!(rel <= 0.3, "{case}: rel L2 {rel}");
        assert!(
            agree * 4 >= positions * 3,
            "{case}: top-1 {agree}/{positions}"
        );
    }
}

fn continue_greedy_from_prompt(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut c = cache(model, 16);
    let s = c.add_sequence().unwrap();
    let mut tokens = prompt;
    let mut out = Vec::new();
    let mut next;
    while out.len() < n {
        let logits = model
            .forward(
                &mut c,
                &[SeqChunk { seq: s, tokens }],
                LogitsMode::LastPerSequence,
            )
            .unwrap();
        next = [argmax(&logits)];
        out.push(next[0]);
        tokens = &next;
    }
    out
}
