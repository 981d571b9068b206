//! Deterministic synthetic checkpoints in the HF text layout, so every command has a model to
//! run on a machine with no downloads: `config.json`, `model.safetensors` (bf16, with f32
//! `A_log` and gated-norm weights as in the Qwen3.5 release; fused experts),
//! `generation_config.json`, and a byte-level BPE `tokenizer.json` with a ChatML template.
//!
//! Weights are scaled so activations stay O(1) through every layer and the router spreads
//! tokens over many experts.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::config::{FfnKind, MixerKind, ModelSpec, parse_spec};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, f32_to_bf16};
use crate::weights::write_safetensors_streamed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few MB: tests and the README's default run.
    Tiny,
    /// Tens of MB: quick manual checks with more realistic shapes.
    Small,
    /// Exactly `shared/bench/config.json` (1.49 B parameters), for speed comparisons.
    Bench,
}

impl FromStr for Preset {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "bench" => Ok(Preset::Bench),
            other => Err(EngineError::InvalidArgument {
                field: "preset",
                message: format!("unknown preset `{other}` (tiny, small, bench)"),
            }),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Bench => "bench",
        })
    }
}

fn layer_types(n: usize) -> Vec<&'static str> {
    (0..n)
        .map(|i| {
            if (i + 1) % 4 == 0 {
                "full_attention"
            } else {
                "linear_attention"
            }
        })
        .collect()
}

struct Shape {
    hidden: usize,
    layers: usize,
    heads: (usize, usize, usize),
    linear: (usize, usize, usize),
    experts: (usize, usize, usize, usize),
    vocab: usize,
}

/// `config.json` of a preset (`qwen3_5_moe_text`).
pub fn preset_config(preset: Preset) -> Value {
    let s = match preset {
        Preset::Tiny => Shape {
            hidden: 64,
            layers: 4,
            heads: (4, 2, 32),
            linear: (2, 4, 16),
            experts: (8, 2, 32, 32),
            vocab: 1024,
        },
        Preset::Small => Shape {
            hidden: 256,
            layers: 8,
            heads: (4, 2, 64),
            linear: (4, 8, 32),
            experts: (16, 4, 128, 128),
            vocab: 8192,
        },
        Preset::Bench => Shape {
            hidden: 1024,
            layers: 24,
            heads: (8, 2, 256),
            linear: (8, 16, 128),
            experts: (64, 8, 256, 256),
            vocab: 32768,
        },
    };
    json!({
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "attention_bias": false,
        "bos_token_id": null,
        "dtype": "bfloat16",
        "eos_token_id": s.vocab - 1,
        "head_dim": s.heads.2,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "layer_types": layer_types(s.layers),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": s.linear.2,
        "linear_num_key_heads": s.linear.0,
        "linear_num_value_heads": s.linear.1,
        "linear_value_head_dim": s.linear.2,
        "max_position_embeddings": 32768,
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": s.experts.2,
        "num_attention_heads": s.heads.0,
        "num_experts": s.experts.0,
        "num_experts_per_tok": s.experts.1,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.heads.1,
        "pad_token_id": s.vocab - 3,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "mrope_interleaved": true,
            "mrope_section": [11, 11, 10],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10_000_000.0,
            "rope_type": "default"
        },
        "shared_expert_intermediate_size": s.experts.3,
        "tie_word_embeddings": false,
        "vocab_size": s.vocab
    })
}

/// How a synthetic tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation.
    Normal(f32),
    /// `log(U(0.05, 1))`: moderate decays.
    ALog,
    /// `1 + 0.1·u` (plain-weight norm).
    AroundOne,
}

/// One tensor of a synthetic checkpoint.
pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    init: Init,
}

/// Every tensor of the checkpoint for `spec`, in the text layout with fused experts.
pub fn tensors(spec: &ModelSpec) -> Vec<SynthTensor> {
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, dtype: DType, init: Init| {
        out.push(SynthTensor {
            name,
            shape,
            dtype,
            init,
        });
    };
    let bf = DType::BF16;
    let fan_in = |n: usize| Init::Normal(1.0 / (n as f32).sqrt());
    let norm = Init::Normal(0.1);
    let (h, v) = (spec.hidden, spec.vocab);
    let embed_std = if spec.tie_embeddings { 0.2 } else { 0.5 };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        bf,
        Init::Normal(embed_std),
    );
    for (i, layer) in spec.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h], bf, norm);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            bf,
            norm,
        );
        match layer.mixer {
            MixerKind::FullAttention => {
                let a = &spec.attention;
                let (nh, nkv, d) = (a.heads, a.kv_heads, a.head_dim);
                add(
                    format!("{p}.self_attn.q_proj.weight"),
                    vec![2 * nh * d, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![nkv * d, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![nkv * d, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.self_attn.o_proj.weight"),
                    vec![h, nh * d],
                    bf,
                    fan_in(nh * d),
                );
                add(format!("{p}.self_attn.q_norm.weight"), vec![d], bf, norm);
                add(format!("{p}.self_attn.k_norm.weight"), vec![d], bf, norm);
            }
            MixerKind::LinearAttention => {
                let l = &spec.linear;
                let (nv, dv, c) = (l.value_heads, l.value_dim, l.conv_dim());
                let q = format!("{p}.linear_attn");
                add(format!("{q}.in_proj_qkv.weight"), vec![c, h], bf, fan_in(h));
                add(
                    format!("{q}.in_proj_z.weight"),
                    vec![nv * dv, h],
                    bf,
                    fan_in(h),
                );
                add(format!("{q}.in_proj_b.weight"), vec![nv, h], bf, fan_in(h));
                add(format!("{q}.in_proj_a.weight"), vec![nv, h], bf, fan_in(h));
                add(
                    format!("{q}.conv1d.weight"),
                    vec![c, 1, l.conv_kernel],
                    bf,
                    Init::Normal(0.4),
                );
                add(format!("{q}.dt_bias"), vec![nv], bf, Init::Normal(0.5));
                add(format!("{q}.A_log"), vec![nv], DType::F32, Init::ALog);
                add(
                    format!("{q}.norm.weight"),
                    vec![dv],
                    DType::F32,
                    Init::AroundOne,
                );
                add(
                    format!("{q}.out_proj.weight"),
                    vec![h, nv * dv],
                    bf,
                    fan_in(nv * dv),
                );
            }
        }
        match (layer.ffn, &spec.moe) {
            (FfnKind::Moe, Some(m)) => {
                let (e, inter, si) = (m.experts, m.intermediate, m.shared_intermediate);
                add(
                    format!("{p}.mlp.gate.weight"),
                    vec![e, h],
                    bf,
                    Init::Normal(3.0 / (h as f32).sqrt()),
                );
                add(
                    format!("{p}.mlp.experts.gate_up_proj"),
                    vec![e, 2 * inter, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.mlp.experts.down_proj"),
                    vec![e, h, inter],
                    bf,
                    fan_in(inter),
                );
                add(
                    format!("{p}.mlp.shared_expert.gate_proj.weight"),
                    vec![si, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.mlp.shared_expert.up_proj.weight"),
                    vec![si, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.mlp.shared_expert.down_proj.weight"),
                    vec![h, si],
                    bf,
                    fan_in(si),
                );
                add(
                    format!("{p}.mlp.shared_expert_gate.weight"),
                    vec![1, h],
                    bf,
                    fan_in(h),
                );
            }
            _ => {
                let inter = spec.dense_intermediate;
                add(
                    format!("{p}.mlp.gate_proj.weight"),
                    vec![inter, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.mlp.up_proj.weight"),
                    vec![inter, h],
                    bf,
                    fan_in(h),
                );
                add(
                    format!("{p}.mlp.down_proj.weight"),
                    vec![h, inter],
                    bf,
                    fan_in(inter),
                );
            }
        }
    }
    add("model.norm.weight".into(), vec![h], bf, norm);
    if !spec.tie_embeddings {
        add("lm_head.weight".into(), vec![v, h], bf, fan_in(h));
    }
    out
}

/// Total parameters of a tensor list.
pub fn parameter_count(tensors: &[SynthTensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values of one tensor, in parallel blocks that each have their own RNG stream.
fn fill(t: &SynthTensor, seed: u64) -> Vec<u8> {
    const BLOCK: usize = 1 << 16;
    let n: usize = t.shape.iter().product();
    let base = seed ^ name_hash(&t.name);
    let mut bytes = vec![0u8; n * t.dtype.size()];
    bytes
        .par_chunks_mut(BLOCK * t.dtype.size())
        .enumerate()
        .for_each(|(b, out)| {
            let mut state = base.wrapping_add((b as u64).wrapping_mul(0xd134_2543_de82_ef95));
            let mut unit = || (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            for chunk in out.chunks_exact_mut(t.dtype.size()) {
                let x = match t.init {
                    Init::Normal(std) => (unit() * 2.0 - 1.0) * 3f32.sqrt() * std,
                    Init::ALog => (0.05 + 0.95 * unit()).ln(),
                    Init::AroundOne => 1.0 + 0.1 * (unit() * 2.0 - 1.0),
                };
                match t.dtype {
                    DType::F32 => chunk.copy_from_slice(&x.to_le_bytes()),
                    DType::BF16 => chunk.copy_from_slice(&f32_to_bf16(x).to_le_bytes()),
                    DType::F16 => {
                        chunk.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes())
                    }
                    // No preset stores int8 (it is made at load); raw steps of 1/127.
                    DType::I8 => chunk[0] = (x * 127.0).round().clamp(-127.0, 127.0) as i8 as u8,
                }
            }
        });
    bytes
}

/// Writes the whole checkpoint of `preset` into `dir`. `progress(done, total)` per tensor.
pub fn write_checkpoint(
    preset: Preset,
    dir: &Path,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let config = preset_config(preset);
    let spec = parse_spec(&config)?;
    let list = tensors(&spec);
    let header: Vec<(String, Vec<usize>, DType)> = list
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.dtype))
        .collect();
    let total = list.len();
    let tmp = dir.join("model.safetensors.partial");
    write_safetensors_streamed(&tmp, &header, |i| {
        progress(i + 1, total);
        fill(&list[i], seed)
    })?;
    let final_path = dir.join("model.safetensors");
    std::fs::rename(&tmp, &final_path).map_err(|e| EngineError::io(&final_path, e))?;
    let vocab = spec.vocab;
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"eos_token_id": [vocab - 1, vocab - 3], "pad_token_id": vocab - 3, "bos_token_id": null}),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json(vocab))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "chat_template": CHATML_TEMPLATE,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": null,
            "model_max_length": 32768
        }),
    )
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::MalformedJson {
        path: path.into(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
}

/// ChatML, as Qwen models use it.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// The special tokens, at the top three ids.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte → printable-char map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer with exactly `vocab` ids: 256 byte tokens, merges of common
/// characters into longer pieces, and [`SPECIAL_TOKENS`] at the top.
pub fn tokenizer_json(vocab: usize) -> Value {
    let chars = byte_chars();
    let mut vocab_map = serde_json::Map::new();
    let mut seen = HashSet::new();
    for (i, c) in chars.iter().enumerate() {
        vocab_map.insert(c.to_string(), json!(i));
        seen.insert(c.to_string());
    }
    let alphabet: Vec<String> =
        " etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,'!?-:\n"
            .bytes()
            .map(|b| chars[b as usize].to_string())
            .collect();
    let merges_wanted = vocab.saturating_sub(256 + SPECIAL_TOKENS.len());
    let mut merges: Vec<Value> = Vec::with_capacity(merges_wanted);
    let mut frontier = alphabet.clone();
    while merges.len() < merges_wanted {
        let mut next = Vec::new();
        'outer: for left in &frontier {
            for right in &alphabet {
                if merges.len() == merges_wanted {
                    break 'outer;
                }
                let token = format!("{left}{right}");
                if seen.insert(token.clone()) {
                    vocab_map.insert(token.clone(), json!(256 + merges.len()));
                    merges.push(json!([left, right]));
                    next.push(token);
                }
            }
        }
        frontier = next;
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": vocab - SPECIAL_TOKENS.len() + i, "content": t, "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab_map, "merges": merges
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_preset_is_the_shared_bench_architecture() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/config.json");
        let shared: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ours = preset_config(Preset::Bench);
        assert_eq!(parse_spec(&shared).unwrap(), parse_spec(&ours).unwrap());
        // PEERS.md: 1.49 B parameters in all.
        let n = parameter_count(&tensors(&parse_spec(&ours).unwrap()));
        assert!((1.485e9..1.495e9).contains(&(n as f64)), "{n}");
    }

    #[test]
    fn tokenizer_has_exactly_the_vocab_and_specials_on_top() {
        let t = tokenizer_json(1024);
        let model_vocab = t["model"]["vocab"].as_object().unwrap().len();
        assert_eq!(model_vocab + SPECIAL_TOKENS.len(), 1024);
        assert_eq!(t["added_tokens"][2]["id"], 1023);
        assert_eq!(t["added_tokens"][2]["content"], "<|im_end|>");
    }
}
