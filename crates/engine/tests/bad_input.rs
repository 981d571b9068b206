//! Bad input gets a clear error that names what is wrong, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use sluice_engine::synth::write_checkpoint;
use sluice_engine::tensor::DType;
use sluice_engine::weights::{WeightStore, write_safetensors};
use sluice_engine::{
    CacheConfig, EngineError, GenerationRequest, LogitsMode, Model, Preset, SamplingParams,
    SeqChunk, generate,
};

fn tiny(dir: &Path) {
    write_checkpoint(Preset::Tiny, dir, 0, |_, _| {}).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, |_, _| {}) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors through `edit`, which sees (name, shape, dtype, bytes).
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, DType, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = {
        let store = WeightStore::open(dir).unwrap();
        let mut names: Vec<String> = store.names().map(str::to_string).collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let t = store.get(&n).unwrap();
                (n.clone(), t.shape.to_vec(), t.dtype, t.bytes.to_vec())
            })
            .collect::<Vec<_>>()
    };
    edit(&mut tensors);
    write_safetensors(&path, &tensors).unwrap();
}

#[test]
fn missing_and_malformed_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();

    std::fs::remove_file(&config).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");

    std::fs::write(&config, "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("malformed") && err.contains("config.json"),
        "{err}"
    );

    std::fs::write(&config, original.replace("qwen3_5_moe_text", "llama")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("unsupported model_type `llama`"), "{err}");

    std::fs::write(
        &config,
        original.replace("\"hidden_size\"", "\"hidden_sizes\""),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("hidden_size"), "{err}");
}

#[test]
fn wrong_shape_wrong_dtype_and_missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let norm = "model.norm.weight";

    rewrite(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == norm).unwrap();
        t.1 = vec![t.1[0] / 2, 2];
    });
    let err = load_err(dir.path());
    assert!(err.contains(norm) && err.contains("shape"), "{err}");

    rewrite(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == norm).unwrap();
        t.1 = vec![t.1[0] * t.1[1] / 2];
        t.2 = DType::F32;
    });
    // Same bytes, now read as F32 of half the length: a shape error naming the tensor.
    let err = load_err(dir.path());
    assert!(err.contains(norm), "{err}");

    tiny(dir.path());
    let a_log = "model.layers.1.linear_attn.A_log";
    rewrite(dir.path(), |ts| ts.retain(|t| t.0 != a_log));
    let err = load_err(dir.path());
    assert_eq!(err, format!("missing tensor `{a_log}`"));
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    // Relabel the (f32) A_log of layer 0 as I32: same byte count, a dtype the engine cannot use.
    let entry = header
        .find("\"model.layers.0.linear_attn.A_log\":{")
        .unwrap();
    let at = entry + header[entry..].find("\"dtype\":\"F32\"").unwrap();
    let patched = format!("{}\"dtype\":\"I32\"{}", &header[..at], &header[at + 13..]);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(patched.as_bytes());
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&path, out).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.linear_attn.A_log") && err.contains("I32"),
        "{err}"
    );
}

#[test]
fn truncated_checkpoint_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("truncated") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_tokens_and_sampling_parameters_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let model = Model::load(dir.path(), |_, _| {}).unwrap();
    let vocab = model.spec().vocab;
    let mut cache = model.new_cache(CacheConfig::for_sequences(1, 16)).unwrap();
    let seq = cache.add_sequence().unwrap();

    let err = model.forward(
        &mut cache,
        &[SeqChunk {
            seq,
            tokens: &[1, vocab as u32],
        }],
        LogitsMode::AllTokens,
    );
    assert!(matches!(err, Err(EngineError::TokenOutOfRange { id, .. }) if id == vocab as u32));
    // A rejected step leaves the sequence untouched.
    assert_eq!(cache.seq_len(seq).unwrap(), 0);

    let err = model.forward(
        &mut cache,
        &[SeqChunk { seq, tokens: &[] }],
        LogitsMode::AllTokens,
    );
    assert!(matches!(err, Err(EngineError::EmptyPrompt)));

    let request = |prompt: Vec<u32>, sampling| GenerationRequest {
        prompt,
        max_tokens: 4,
        sampling,
        ignore_eos: true,
        prefill_chunk: 64,
    };
    let err = generate(
        &model,
        &request(vec![], SamplingParams::default()),
        &[],
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::EmptyPrompt));
    let bad = SamplingParams {
        top_p: 1.5,
        ..SamplingParams::default()
    };
    let err = generate(&model, &request(vec![1, 2], bad), &[], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`top_p`") && err.contains("0 < top_p ≤ 1"),
        "{err}"
    );
}
