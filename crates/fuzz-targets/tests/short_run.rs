//! A short run of every fuzz target without the fuzzing toolchain: each seed of its corpus
//! and a few thousand deterministic mutations of it, plus the crashes the fuzzer found
//! (kept in the corpus once fixed). The long coverage-guided runs are `cargo fuzz`'s
//! (`fuzz/README.md`, figures in `docs/reliability.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use prost::Message;
use sluice_fuzz_targets::{TARGETS, corpus_dir, mutations};
use sluice_proto::v1 as pb;
use sluice_proto::worker::v1 as wpb;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir().join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name}: empty corpus");
        let mut runs = 0;
        for (i, seed) in seeds.iter().enumerate() {
            target(seed);
            let other = &seeds[(i + 1) % seeds.len()];
            for m in mutations(seed, other, 2000 / seeds.len().max(1) + 200) {
                target(&m);
                runs += 1;
            }
        }
        eprintln!("{name}: {} seeds, {runs} mutations", seeds.len());
    }
}

/// The seeds of the binary corpora, as code (`cargo test -p sluice-fuzz-targets -- --ignored`
/// writes them): a valid cache push and valid public requests.
fn binary_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let header = wpb::CacheHeader {
        transfer_id: "t".into(),
        model_fingerprint: 0x5eed,
        layout: Some(wpb::CacheLayout {
            tokens: 3,
            regions: vec![
                wpb::Region {
                    layer: 0,
                    kind: wpb::RegionKind::ConvState as i32,
                    elements: 6,
                },
                wpb::Region {
                    layer: 1,
                    kind: wpb::RegionKind::Keys as i32,
                    elements: 12,
                },
            ],
        }),
        handoff: Some(wpb::SequenceHandoff {
            first_token: 7,
            rng_state: 1,
        }),
        total_bytes: 72,
    };
    let mut push = Vec::new();
    wpb::CacheChunk {
        kind: Some(wpb::cache_chunk::Kind::Header(header)),
    }
    .encode_length_delimited(&mut push)
    .unwrap();
    for (region, bytes) in [(0u32, 24usize), (1, 48)] {
        let data: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
        wpb::CacheChunk {
            kind: Some(wpb::cache_chunk::Kind::Data(wpb::CacheData {
                region,
                offset: 0,
                crc32c: crc(&data),
                data,
            })),
        }
        .encode_length_delimited(&mut push)
        .unwrap();
    }
    let request = pb::GenerateRequest {
        request_id: "fuzz".into(),
        prompt: "Tell me about rivers".into(),
        chat: true,
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: 20,
            max_tokens: Some(16),
            stop: vec!["\n\n".into()],
            logprobs: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let tokens = pb::GenerateRequest {
        prompt_token_ids: vec![1, 2, 3, 900],
        sampling: Some(pb::SamplingParams {
            seed: Some(7),
            stop_token_ids: vec![5],
            echo: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        ("cache_push", "valid", push),
        ("generate_request", "chat", request.encode_to_vec()),
        ("generate_request", "tokens", tokens.encode_to_vec()),
    ]
}

/// Castagnoli CRC, bit by bit (the receiver's check; no crate needed for a seed).
fn crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn the_push_seed_is_a_valid_push_and_a_corrupt_one_is_not() {
    let (_, _, push) = binary_seeds().remove(0);
    assert!(sluice_fuzz_targets::cache_push_delivers(&push));
    let mut corrupt = push.clone();
    let last = corrupt.len() - 1;
    corrupt[last - 10] ^= 1; // inside the last chunk's data: its crc no longer matches
    assert!(!sluice_fuzz_targets::cache_push_delivers(&corrupt));
}

#[test]
fn the_binary_seeds_in_the_corpus_are_current() {
    for (target, name, bytes) in binary_seeds() {
        let path = corpus_dir().join(target).join(name);
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (run the ignored test to write it)", path.display())
        });
        assert_eq!(stored, bytes, "{} is stale", path.display());
    }
}

#[test]
#[ignore = "writes fuzz/corpus/: run by hand after changing a seed"]
fn write_binary_seeds() {
    for (target, name, bytes) in binary_seeds() {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), bytes).unwrap();
    }
}
