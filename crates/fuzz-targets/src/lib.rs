//! The bodies of Sluice's fuzz targets: every input a peer or a file can hand the cluster,
//! through the same code that handles it in production. `fuzz/` wraps each in a libFuzzer
//! target for `cargo fuzz run --sanitizer none TARGET`; the tests here run each over its seed
//! corpus (`fuzz/corpus/TARGET/`) and a few thousand deterministic mutations of it, so CI runs
//! every target briefly without the fuzzing toolchain. A target's only obligation is not to
//! panic (and not to allocate what no limit allows): every input must end in `Ok` or a clear
//! error.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use sluice_engine::CacheLayout;
use sluice_engine::cache::{RegionKind, RegionLayout};
use sluice_proto::v1 as pb;
use sluice_proto::worker::v1 as wpb;
use sluice_router::chat_output::{ChatOutputReader, ToolSet};
use sluice_router::openai::{ChatRequest, CompletionRequest, WireRequest};
use sluice_router::validate::ModelContext;
use sluice_runtime::transport::PushAssembly;
use sluice_runtime::{CacheInbox, InboxLimits};

/// A target: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// The targets, by the name of their `fuzz/fuzz_targets/NAME.rs` and corpus folder.
pub const TARGETS: [(&str, Target); 5] = [
    ("config_json", config_json),
    ("safetensors_header", safetensors_header),
    ("cache_push", cache_push),
    ("generate_request", generate_request),
    ("openai_body", openai_body),
];

/// A checkpoint's `config.json`: parsed and validated into a `ModelSpec`.
pub fn config_json(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = sluice_engine::config::parse_spec(&value);
    }
}

/// A whole safetensors file: its header length, JSON header, dtypes, shapes and offsets.
pub fn safetensors_header(data: &[u8]) {
    let _ = sluice_engine::weights::check_safetensors(data);
}

const FINGERPRINT: u64 = 0x5eed;

/// What the fuzzed receiver's model expects: a conv state and keys growing with the tokens.
fn layout(tokens: usize) -> CacheLayout {
    CacheLayout {
        tokens,
        regions: vec![
            RegionLayout {
                layer: 0,
                kind: RegionKind::ConvState,
                elements: 6,
            },
            RegionLayout {
                layer: 1,
                kind: RegionKind::Keys,
                elements: 4 * tokens,
            },
        ],
    }
}

/// A cache push stream: length-delimited `CacheChunk` messages, as a decode worker receives
/// them (header checked against its limits, chunks placed, the whole delivered).
pub fn cache_push(data: &[u8]) {
    let _ = cache_push_delivers(data);
}

/// [`cache_push`], saying whether the stream was a complete, valid push.
pub fn cache_push_delivers(mut data: &[u8]) -> bool {
    let inbox = CacheInbox::new(FINGERPRINT, layout).with_limits(InboxLimits {
        max_tokens: 4096,
        max_staged: 4,
    });
    let mut chunks = Vec::new();
    while !data.is_empty() {
        match wpb::CacheChunk::decode_length_delimited(&mut data) {
            Ok(c) => chunks.push(c),
            Err(_) => break,
        }
    }
    let mut chunks = chunks.into_iter();
    let Some(first) = chunks.next() else {
        return false;
    };
    let Ok(mut assembly) = PushAssembly::start(&inbox, first) else {
        return false;
    };
    for chunk in chunks {
        if assembly.chunk(chunk).is_err() {
            return false;
        }
    }
    assembly.finish().is_ok() && inbox.staged() == 1
}

/// The router's view of a tiny synthetic model (its tokenizer and chat template), made once.
fn model() -> &'static ModelContext {
    static MODEL: OnceLock<(tempfile::TempDir, ModelContext)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
            sluice_engine::synth::write_checkpoint(
                sluice_engine::synth::Preset::Tiny,
                dir.path(),
                0,
                |_, _| {},
            )
            .unwrap_or_else(|e| panic!("synthetic checkpoint: {e}"));
            let model = ModelContext::load(dir.path(), 8192, 4096)
                .unwrap_or_else(|e| panic!("model context: {e}"));
            (dir, model)
        })
        .1
}

/// A public `GenerateRequest` (protobuf) through the router's validation.
pub fn generate_request(data: &[u8]) {
    if let Ok(request) = pb::GenerateRequest::decode(data) {
        let _ = model().validate(request);
    }
}

/// An OpenAI body (`/v1/completions` when the first byte is even, else
/// `/v1/chat/completions`) through its conversion and the router's validation.
pub fn openai_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let model = model();
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) else {
        // Not a JSON object: read it as a chat answer instead (tool calls, reasoning).
        let mut reader = ChatOutputReader::new(which % 3 == 0, weather_tool(), which % 5 != 0);
        let _ = reader.push(&String::from_utf8_lossy(body));
        let _ = reader.finish();
        return;
    };
    let wire = if which % 2 == 0 {
        CompletionRequest::from_body(map)
            .ok()
            .and_then(|r| r.to_pb().ok())
    } else {
        ChatRequest::from_body(map)
            .ok()
            .and_then(|r| r.to_pb(&model.tokenizer).ok())
            .map(|(wire, _reader)| wire)
    };
    if let Some(wire) = wire {
        let _ = model.validate(wire);
    }
}

/// One tool with typed parameters, for the chat-answer reader.
fn weather_tool() -> ToolSet {
    ToolSet::from_openai(&[serde_json::json!({"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}})])
}

/// `fuzz/corpus/` of this repository.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Deterministic mutations of `seed` (bit flips, byte sets, truncations, duplications,
/// splices with `other`): what a short run without the fuzzing toolchain can cover.
pub fn mutations(seed: &[u8], other: &[u8], count: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.len() as u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seed = seed.to_vec();
    let other = other.to_vec();
    (0..count).map(move |_| {
        let mut m = seed.clone();
        for _ in 0..1 + next() % 4 {
            let r = next() as usize;
            let at = if m.is_empty() { 0 } else { r % m.len() };
            match next() % 6 {
                0 if !m.is_empty() => m[at] ^= 1 << (r % 8),
                1 if !m.is_empty() => m[at] = [0, 0xff, b'"', b'9', b'-', b'{'][r % 6],
                2 => m.truncate(at),
                3 => {
                    let tail = m[at..].to_vec();
                    m.extend_from_slice(&tail[..tail.len().min(64)]);
                }
                4 if !other.is_empty() => {
                    let from = r % other.len();
                    m.splice(at..at, other[from..].iter().take(32).copied());
                }
                _ => m.insert(at, (r >> 8) as u8),
            }
        }
        m
    })
}
