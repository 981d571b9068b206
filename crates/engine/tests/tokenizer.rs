//! Tokenizers: the synthetic one `sluice synth` writes, and the real Qwen3.5 tokenizer from
//! `../shared/fixtures` (ids from its README).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use sluice_engine::synth::write_checkpoint;
use sluice_engine::{ChatMessage, IncrementalDecoder, Preset, Tokenizer};

const MIXED: &str =
    "Hello, world! Ünïcödé — 你好，世界。🙂 👩‍👩‍👧 e\u{301} \t\nfn main() { println!(\"hi\"); }";

/// Decodes token by token; every increment must be whole characters.
fn incremental(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut dec = IncrementalDecoder::new(false);
    let mut text = String::new();
    for &id in ids {
        let piece = dec.push(tok, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "split character in {piece:?}");
        text.push_str(&piece);
    }
    text.push_str(&dec.finish(tok).unwrap());
    text
}

#[test]
fn synthetic_tokenizer_round_trips_any_text_and_renders_chatml() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(Preset::Tiny, dir.path(), 0, |_, _| {}).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    assert_eq!(tok.token_id("<|im_end|>"), Some(1023));
    let ids = tok.encode(MIXED).unwrap();
    assert!(ids.iter().all(|&i| i < 1024));
    assert!(ids.len() < MIXED.len(), "merges should shorten ASCII text");
    assert_eq!(tok.decode(&ids, false).unwrap(), MIXED);
    assert_eq!(incremental(&tok, &ids), MIXED);

    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
}

fn shared_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/qwen3_5-tokenizer")
}

#[test]
fn qwen35_tokenizer_special_ids_and_incremental_decoding() {
    let dir = shared_tokenizer();
    assert!(
        dir.join("tokenizer.json").exists(),
        "missing {}",
        dir.display()
    );
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.token_id("<|endoftext|>"), Some(248044));
    assert_eq!(tok.token_id("<|im_start|>"), Some(248045));
    assert_eq!(tok.token_id("<|im_end|>"), Some(248046));
    assert_eq!(tok.token_id("<think>"), Some(248068));
    // Its normalizer is NFC: the combining accent comes back precomposed.
    let nfc = MIXED.replace("e\u{301}", "\u{e9}");
    let ids = tok.encode(MIXED).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), nfc);
    assert_eq!(incremental(&tok, &ids), nfc);
    // Special tokens stay whole and are skipped on request.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&248045));
    assert_eq!(ids.last(), Some(&248046));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}
