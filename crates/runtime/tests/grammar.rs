//! Guided decoding against Qwen3.5's real tokenizer (`../shared/fixtures`): whatever the
//! logits, the sampled text is what the constraint accepts (checked by parsing it, not by
//! the constraint engine), a guide rebuilt from the tokens so far continues exactly, and
//! the reasoning block before `after_token` is free.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use sluice_engine::{Sampler, SamplingParams, Tokenizer};
use sluice_harness::noise_logits;
use sluice_runtime::grammar::{Constraint, Grammar, GrammarCompiler, GuidedSampler};

/// Qwen3.5's embedding rows (the tokenizer has fewer ids: the rest are padding).
const VOCAB: usize = 248_320;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/qwen3_5-tokenizer")
}

struct Setup {
    tokenizer: Tokenizer,
    compiler: Arc<GrammarCompiler>,
    eos: u32,
}

fn setup() -> Setup {
    let tokenizer = Tokenizer::from_dir(&fixture()).unwrap();
    let eos = tokenizer.token_id("<|im_end|>").unwrap();
    let compiler = GrammarCompiler::new(&fixture(), VOCAB, &[eos]);
    Setup {
        tokenizer,
        compiler,
        eos,
    }
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Samples until end-of-sequence, a complete grammar, or `max` tokens; the tokens, EOS
/// excluded.
fn run(s: &Setup, sampler: &mut GuidedSampler, seed: u64, from: usize, max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for step in from..max {
        let t = sampler
            .sample(&noise_logits(seed, step, VOCAB))
            .unwrap()
            .token;
        if t == s.eos {
            break;
        }
        out.push(t);
        if sampler.grammar_complete() {
            break;
        }
    }
    out
}

fn booking_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "nights": {"type": "integer", "minimum": 1, "maximum": 30},
            "refundable": {"type": "boolean"},
            "class": {"enum": ["economy", "business"]}
        },
        "required": ["city", "nights", "refundable", "class"],
        "additionalProperties": false
    })
}

#[test]
fn noise_sampled_under_a_schema_parses_and_satisfies_it() {
    let s = setup();
    let constraint = Constraint {
        grammar: Grammar::JsonSchema(booking_schema()),
        after_token: None,
    };
    s.compiler.check(&constraint, "constraint").unwrap();
    for seed in 1..=4 {
        let guide = s.compiler.guide(&constraint, &[]).unwrap();
        let mut sampler =
            GuidedSampler::new(Sampler::new(sampling(seed), &[]).unwrap(), Some(guide));
        let tokens = run(&s, &mut sampler, seed, 0, 400);
        let text = s.tokenizer.decode(&tokens, false).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["city"].as_str().unwrap().chars().count() <= 12, "{text}");
        let nights = o["nights"].as_i64().unwrap();
        assert!((1..=30).contains(&nights), "{text}");
        assert!(o["refundable"].is_boolean(), "{text}");
        assert!(["economy", "business"].contains(&o["class"].as_str().unwrap()));
        // Compact, as documented: no whitespace outside strings.
        assert_eq!(text, v.to_string(), "seed {seed}");
    }
}

#[test]
fn a_regex_holds_the_whole_output() {
    let s = setup();
    let constraint = Constraint {
        grammar: Grammar::Regex(r"[A-Z]{3}-[0-9]{4}".into()),
        after_token: None,
    };
    for seed in 1..=3 {
        let guide = s.compiler.guide(&constraint, &[]).unwrap();
        let mut sampler =
            GuidedSampler::new(Sampler::new(sampling(seed), &[]).unwrap(), Some(guide));
        let tokens = run(&s, &mut sampler, seed, 0, 50);
        let text = s.tokenizer.decode(&tokens, false).unwrap();
        let b = text.as_bytes();
        assert_eq!(b.len(), 8, "{text:?}");
        assert!(b[..3].iter().all(u8::is_ascii_uppercase), "{text:?}");
        assert_eq!(b[3], b'-');
        assert!(b[4..].iter().all(u8::is_ascii_digit), "{text:?}");
        // Complete after its last character: the sequence ends without needing EOS.
        assert!(sampler.grammar_complete());
    }
}

#[test]
fn a_guide_rebuilt_from_the_tokens_so_far_continues_exactly() {
    let s = setup();
    let constraint = Constraint {
        grammar: Grammar::JsonSchema(booking_schema()),
        after_token: None,
    };
    let seed = 7;
    let whole = {
        let guide = s.compiler.guide(&constraint, &[]).unwrap();
        let mut sampler =
            GuidedSampler::new(Sampler::new(sampling(seed), &[]).unwrap(), Some(guide));
        run(&s, &mut sampler, seed, 0, 400)
    };
    assert!(whole.len() > 6, "{whole:?}");
    // What a decode worker does after a handoff or a migration: a new guide past the tokens
    // generated elsewhere, the sampler resumed at their RNG state.
    for k in [1, whole.len() / 2] {
        let mut first = GuidedSampler::new(
            Sampler::new(sampling(seed), &[]).unwrap(),
            Some(s.compiler.guide(&constraint, &[]).unwrap()),
        );
        let head = run(&s, &mut first, seed, 0, k);
        assert_eq!(head, whole[..k]);
        let resumed = Sampler::resume(sampling(seed), &[], &head, first.rng_state()).unwrap();
        let guide = s.compiler.guide(&constraint, &head).unwrap();
        let mut rest = GuidedSampler::new(resumed, Some(guide));
        let tail = run(&s, &mut rest, seed, k, 400);
        assert_eq!([head, tail].concat(), whole, "resumed at {k}");
    }
}

#[test]
fn reasoning_before_after_token_is_free_and_the_schema_holds_after_it() {
    let s = setup();
    let think_close = s.tokenizer.token_id("</think>").unwrap();
    let constraint = Constraint {
        grammar: Grammar::JsonSchema(json!({"type": "integer", "minimum": 0, "maximum": 99})),
        after_token: Some(think_close),
    };
    // Before `</think>`: a token no integer starts with is allowed.
    let word = s.tokenizer.encode("Hmm").unwrap()[0];
    let mut favour = vec![0.0f32; VOCAB];
    favour[word as usize] = 50.0;
    let guide = s.compiler.guide(&constraint, &[]).unwrap();
    let mut free = GuidedSampler::new(Sampler::new(sampling(1), &[]).unwrap(), Some(guide));
    assert_eq!(free.sample(&favour).unwrap().token, word);
    // After it (replayed, as a worker resuming mid-answer does): the schema holds.
    let reasoning = [word, think_close];
    let guide = s.compiler.guide(&constraint, &reasoning).unwrap();
    let mut held = GuidedSampler::new(Sampler::new(sampling(1), &[]).unwrap(), Some(guide));
    assert_ne!(held.sample(&favour).unwrap().token, word);
    let guide = s.compiler.guide(&constraint, &reasoning).unwrap();
    let mut held = GuidedSampler::new(Sampler::new(sampling(3), &[]).unwrap(), Some(guide));
    let tokens = run(&s, &mut held, 3, 0, 20);
    let text = s.tokenizer.decode(&tokens, false).unwrap();
    let n: i64 = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!((0..=99).contains(&n));
}

#[test]
fn constraints_that_cannot_hold_are_refused_naming_the_field() {
    let s = setup();
    let refused = |grammar: Grammar, after_token: Option<u32>| {
        let c = Constraint {
            grammar,
            after_token,
        };
        s.compiler.check(&c, "constraint").unwrap_err().to_string()
    };
    let e = refused(Grammar::Regex("(".into()), None);
    assert!(e.contains("`constraint.regex`"), "{e}");
    let e = refused(Grammar::Lark("start: undefined_rule".into()), None);
    assert!(e.contains("`constraint.lark`"), "{e}");
    let e = refused(Grammar::JsonSchema(json!({"type": "frobnicate"})), None);
    assert!(e.contains("`constraint.json_schema`"), "{e}");
    let e = refused(Grammar::Regex("a".into()), Some(VOCAB as u32));
    assert!(e.contains("`constraint.after_token`"), "{e}");
}

/// A mask made ahead on another thread (as the decode scheduler makes it while the forward
/// runs) gives the same picks as one made at sampling time, with `after_token` too.
#[test]
fn masks_made_ahead_on_another_thread_pick_the_same_tokens() {
    let s = setup();
    for after_token in [None, Some(s.tokenizer.token_id("</think>").unwrap())] {
        let constraint = Constraint {
            grammar: Grammar::JsonSchema(booking_schema()),
            after_token,
        };
        for seed in 1..=3 {
            let new = || {
                let guide = s.compiler.guide(&constraint, &[]).unwrap();
                GuidedSampler::new(Sampler::new(sampling(seed), &[]).unwrap(), Some(guide))
            };
            let inline = run(&s, &mut new(), seed, 0, 400);
            let mut ahead = new();
            let mut tokens = Vec::new();
            for step in 0..400 {
                // Sometimes twice (a step that did not sample), sometimes not at all.
                for _ in 0..(step % 3) {
                    std::thread::scope(|scope| {
                        scope.spawn(|| ahead.prepare_mask());
                    });
                }
                let logits = noise_logits(seed, step, VOCAB);
                let t = ahead.sample(&logits).unwrap().token;
                if t == s.eos {
                    break;
                }
                tokens.push(t);
                if ahead.grammar_complete() {
                    break;
                }
            }
            assert_eq!(tokens, inline, "seed {seed}, after {after_token:?}");
        }
    }
}
