//! HF `config.json` → a validated [`ModelSpec`].
//!
//! Accepted forms: the VL wrapper (`qwen3_5_moe` / `qwen3_5` with a `text_config`), the bare
//! text forms (`qwen3_5_moe_text`, `qwen3_5_text`) and `qwen3_next`. Everything downstream reads
//! only the typed spec, never the JSON.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Which reference implementation the checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Qwen3.5 sparse MoE (`qwen3_5_moe[_text]`): every layer is MoE, top-k always renormalised.
    Qwen35Moe,
    /// Qwen3.5 dense (`qwen3_5[_text]`): SwiGLU MLP in every layer.
    Qwen35Dense,
    /// Qwen3-Next: fused `in_proj_qkvz` / `in_proj_ba`, MoE or dense per layer.
    Qwen3Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixerKind {
    FullAttention,
    LinearAttention,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    pub mixer: MixerKind,
    pub ffn: FfnKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Leading dims of each head that RoPE rotates (`head_dim · partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rope_theta: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_kernel: usize,
}

impl LinearSpec {
    /// Channels of the causal conv: [q | k | v].
    pub fn conv_dim(&self) -> usize {
        2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub shared_intermediate: usize,
    pub norm_topk: bool,
}

/// Everything the engine needs to know about a model's architecture, validated once.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub family: ModelFamily,
    pub model_type: String,
    pub hidden: usize,
    pub vocab: usize,
    pub eps: f32,
    pub layers: Vec<LayerSpec>,
    pub attention: AttentionSpec,
    pub linear: LinearSpec,
    pub moe: Option<MoeSpec>,
    /// Intermediate size of dense SwiGLU layers (0 when no layer is dense).
    pub dense_intermediate: usize,
    pub tie_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    /// True for the VL wrapper config (`text_config` present).
    pub wrapped: bool,
}

#[derive(Debug, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawTextConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    tie_word_embeddings: Option<bool>,
    rope_parameters: Option<RawRope>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    layer_types: Option<Vec<String>>,
    full_attention_interval: Option<usize>,
    linear_conv_kernel_dim: usize,
    linear_key_head_dim: usize,
    linear_value_head_dim: usize,
    linear_num_key_heads: usize,
    linear_num_value_heads: usize,
    intermediate_size: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    eos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-6
}

/// Reads and validates `config.json` in `dir`.
pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| EngineError::MalformedJson {
        path: path.clone(),
        message: e.to_string(),
    })?;
    parse_spec(&value).map_err(|e| match e {
        EngineError::MalformedJson { message, .. } => EngineError::MalformedJson { path, message },
        other => other,
    })
}

/// Parses a config already read as JSON (the wrapper or the text form).
pub fn parse_spec(value: &Value) -> Result<ModelSpec> {
    let top_type = value
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| EngineError::config("model_type", "missing or not a string"))?;
    let (text, wrapped) = match value.get("text_config") {
        Some(text) if text.is_object() => (text, true),
        Some(_) => return Err(EngineError::config("text_config", "must be an object")),
        None => (value, false),
    };
    let family = match top_type {
        "qwen3_5_moe" | "qwen3_5_moe_text" => ModelFamily::Qwen35Moe,
        "qwen3_5" | "qwen3_5_text" => ModelFamily::Qwen35Dense,
        "qwen3_next" => ModelFamily::Qwen3Next,
        other => return Err(EngineError::UnknownModelType(other.to_string())),
    };
    let raw: RawTextConfig =
        serde_json::from_value(text.clone()).map_err(|e| EngineError::MalformedJson {
            path: "config.json".into(),
            message: e.to_string(),
        })?;
    // The wrapper may carry tie_word_embeddings at the top level only.
    let tie = raw
        .tie_word_embeddings
        .or_else(|| value.get("tie_word_embeddings").and_then(Value::as_bool))
        .unwrap_or(false);
    let eos = parse_token_ids(
        raw.eos_token_id
            .as_ref()
            .or_else(|| value.get("eos_token_id")),
    )?;
    let model_type = raw_type(&raw, top_type);
    build_spec(family, model_type, raw, tie, eos, wrapped)
}

fn raw_type(raw: &RawTextConfig, top: &str) -> String {
    raw.model_type.clone().unwrap_or_else(|| top.to_string())
}

/// `eos_token_id` may be one id, a list, or null.
pub(crate) fn parse_token_ids(value: Option<&Value>) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| EngineError::config("eos_token_id", format!("`{v}` is not a token id")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn positive(field: &str, value: usize) -> Result<usize> {
    if value == 0 {
        return Err(EngineError::config(field, "must be at least 1"));
    }
    Ok(value)
}

fn build_spec(
    family: ModelFamily,
    model_type: String,
    raw: RawTextConfig,
    tie_embeddings: bool,
    eos_token_ids: Vec<u32>,
    wrapped: bool,
) -> Result<ModelSpec> {
    let hidden = positive("hidden_size", raw.hidden_size)?;
    let n_layers = positive("num_hidden_layers", raw.num_hidden_layers)?;
    let heads = positive("num_attention_heads", raw.num_attention_heads)?;
    let kv_heads = positive("num_key_value_heads", raw.num_key_value_heads)?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(EngineError::config(
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads {heads}"),
        ));
    }
    let head_dim = positive("head_dim", raw.head_dim.unwrap_or(hidden / heads))?;
    let rope = raw.rope_parameters.as_ref();
    let rope_theta = rope
        .and_then(|r| r.rope_theta)
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let factor = rope
        .and_then(|r| r.partial_rotary_factor)
        .or(raw.partial_rotary_factor)
        .unwrap_or(0.25);
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(EngineError::config(
            "partial_rotary_factor",
            format!("{factor} not in (0, 1]"),
        ));
    }
    let rotary_dim = (head_dim as f64 * factor) as usize;
    if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
        return Err(EngineError::config(
            "partial_rotary_factor",
            format!("rotates {rotary_dim} dims of {head_dim}; must be a positive even number"),
        ));
    }
    let linear = LinearSpec {
        key_heads: positive("linear_num_key_heads", raw.linear_num_key_heads)?,
        value_heads: positive("linear_num_value_heads", raw.linear_num_value_heads)?,
        key_dim: positive("linear_key_head_dim", raw.linear_key_head_dim)?,
        value_dim: positive("linear_value_head_dim", raw.linear_value_head_dim)?,
        conv_kernel: positive("linear_conv_kernel_dim", raw.linear_conv_kernel_dim)?,
    };
    if !linear.value_heads.is_multiple_of(linear.key_heads) {
        return Err(EngineError::config(
            "linear_num_value_heads",
            format!(
                "{} is not a multiple of linear_num_key_heads {}",
                linear.value_heads, linear.key_heads
            ),
        ));
    }
    let mixers = layer_mixers(&raw, n_layers)?;
    let moe = match family {
        ModelFamily::Qwen35Dense => None,
        _ if raw.num_experts.unwrap_or(0) == 0 => None,
        _ => {
            let experts = raw.num_experts.unwrap_or(0);
            let top_k = positive("num_experts_per_tok", raw.num_experts_per_tok.unwrap_or(0))?;
            if top_k > experts {
                return Err(EngineError::config(
                    "num_experts_per_tok",
                    format!("{top_k} exceeds num_experts {experts}"),
                ));
            }
            Some(MoeSpec {
                experts,
                top_k,
                intermediate: positive(
                    "moe_intermediate_size",
                    raw.moe_intermediate_size.unwrap_or(0),
                )?,
                shared_intermediate: raw.shared_expert_intermediate_size.unwrap_or(0),
                // Qwen3.5 always renormalises; Qwen3-Next follows its flag.
                norm_topk: match family {
                    ModelFamily::Qwen3Next => raw.norm_topk_prob.unwrap_or(true),
                    _ => true,
                },
            })
        }
    };
    if family == ModelFamily::Qwen35Moe && moe.is_none() {
        return Err(EngineError::config(
            "num_experts",
            "a qwen3_5_moe model needs experts",
        ));
    }
    let sparse_step = raw.decoder_sparse_step.unwrap_or(1).max(1);
    let mlp_only = raw.mlp_only_layers.clone().unwrap_or_default();
    let layers: Vec<LayerSpec> = mixers
        .into_iter()
        .enumerate()
        .map(|(i, mixer)| {
            let ffn = match family {
                ModelFamily::Qwen35Moe => FfnKind::Moe,
                ModelFamily::Qwen35Dense => FfnKind::Dense,
                ModelFamily::Qwen3Next => {
                    if moe.is_some() && !mlp_only.contains(&i) && (i + 1) % sparse_step == 0 {
                        FfnKind::Moe
                    } else {
                        FfnKind::Dense
                    }
                }
            };
            LayerSpec { mixer, ffn }
        })
        .collect();
    let dense_intermediate = if layers.iter().any(|l| l.ffn == FfnKind::Dense) {
        positive("intermediate_size", raw.intermediate_size.unwrap_or(0))?
    } else {
        0
    };
    let eps = raw.rms_norm_eps;
    if !(eps > 0.0 && eps < 1.0) {
        return Err(EngineError::config(
            "rms_norm_eps",
            format!("{eps} not in (0, 1)"),
        ));
    }
    Ok(ModelSpec {
        family,
        model_type,
        hidden,
        vocab: positive("vocab_size", raw.vocab_size)?,
        eps: eps as f32,
        layers,
        attention: AttentionSpec {
            heads,
            kv_heads,
            head_dim,
            rotary_dim,
            rope_theta,
        },
        linear,
        moe,
        dense_intermediate,
        tie_embeddings,
        eos_token_ids,
        wrapped,
    })
}

fn layer_mixers(raw: &RawTextConfig, n_layers: usize) -> Result<Vec<MixerKind>> {
    match &raw.layer_types {
        Some(types) => {
            if types.len() != n_layers {
                return Err(EngineError::config(
                    "layer_types",
                    format!("has {} entries for {n_layers} layers", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(MixerKind::FullAttention),
                    "linear_attention" => Ok(MixerKind::LinearAttention),
                    other => Err(EngineError::config(
                        "layer_types",
                        format!("unknown layer type `{other}`"),
                    )),
                })
                .collect()
        }
        None => {
            let interval = positive(
                "full_attention_interval",
                raw.full_attention_interval.unwrap_or(4),
            )?;
            Ok((0..n_layers)
                .map(|i| {
                    if (i + 1) % interval == 0 {
                        MixerKind::FullAttention
                    } else {
                        MixerKind::LinearAttention
                    }
                })
                .collect())
        }
    }
}

impl ModelSpec {
    pub fn full_attention_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.mixer == MixerKind::FullAttention)
            .count()
    }

    pub fn linear_attention_layers(&self) -> usize {
        self.layers.len() - self.full_attention_layers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text() -> Value {
        json!({
            "model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 100, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8,
            "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 8, "eos_token_id": [7, 9],
            "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25}
        })
    }

    #[test]
    fn text_form_parses_with_default_layer_pattern() {
        let spec = parse_spec(&text()).unwrap();
        assert_eq!(spec.family, ModelFamily::Qwen35Moe);
        assert_eq!(spec.attention.rotary_dim, 4);
        assert_eq!(spec.eos_token_ids, vec![7, 9]);
        let mixers: Vec<_> = spec.layers.iter().map(|l| l.mixer).collect();
        assert_eq!(mixers[3], MixerKind::FullAttention);
        assert!(mixers[..3].iter().all(|m| *m == MixerKind::LinearAttention));
        assert!(!spec.wrapped);
    }

    #[test]
    fn wrapper_form_reads_text_config() {
        let wrapper = json!({"model_type": "qwen3_5_moe", "text_config": text(),
                             "tie_word_embeddings": true});
        let spec = parse_spec(&wrapper).unwrap();
        assert!(spec.wrapped);
        assert!(spec.tie_embeddings);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let mut cfg = text();
        cfg["model_type"] = json!("llama");
        let err = parse_spec(&cfg).unwrap_err().to_string();
        assert!(err.contains("`llama`"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let mut cfg = text();
        cfg.as_object_mut().unwrap().remove("hidden_size");
        let err = parse_spec(&cfg).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn impossible_head_counts_are_rejected() {
        let mut cfg = text();
        cfg["num_key_value_heads"] = json!(3);
        let err = parse_spec(&cfg).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut cfg = text();
        cfg["layer_types"] = json!(["full_attention"]);
        assert!(
            parse_spec(&cfg)
                .unwrap_err()
                .to_string()
                .contains("layer_types")
        );
    }

    #[test]
    fn next_marks_mlp_only_layers_dense() {
        let mut cfg = text();
        cfg["model_type"] = json!("qwen3_next");
        cfg["mlp_only_layers"] = json!([1]);
        cfg["intermediate_size"] = json!(32);
        cfg["norm_topk_prob"] = json!(false);
        let spec = parse_spec(&cfg).unwrap();
        assert_eq!(spec.layers[1].ffn, FfnKind::Dense);
        assert_eq!(spec.layers[0].ffn, FfnKind::Moe);
        assert!(!spec.moe.unwrap().norm_topk);
        assert_eq!(spec.dense_intermediate, 32);
    }
}
