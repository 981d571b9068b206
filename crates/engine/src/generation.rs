//! One request from prompt to finished output on a single model: prefill (in chunks), then
//! decode with the request's sampler until a stop rule fires. The services batch many requests;
//! this is the reference loop they must agree with.

use std::path::Path;

use serde_json::Value;

use crate::cache::{CacheConfig, ModelCache};
use crate::config::{ModelSpec, parse_token_ids};
use crate::error::{EngineError, Result};
use crate::model::{LogitsMode, Model, SeqChunk};
use crate::prefill_plan::PrefillPlan;
use crate::sampler::{Sampled, Sampler, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// An end-of-sequence token was generated.
    Eos,
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub tokens: Vec<Sampled>,
    pub finish: FinishReason,
}

/// End-of-sequence ids: `generation_config.json` when it names any, else `config.json`.
pub fn eos_token_ids(dir: &Path, spec: &ModelSpec) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| EngineError::MalformedJson {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let ids = parse_token_ids(value.get("eos_token_id"))?;
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(spec.eos_token_ids.clone())
}

/// Runs one request to completion; `on_token` sees each token as it is sampled.
pub fn generate(
    model: &Model,
    request: &GenerationRequest,
    eos: &[u32],
    mut on_token: impl FnMut(&Sampled) -> Result<()>,
) -> Result<GenerationOutput> {
    if request.prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if request.max_tokens == 0 {
        return Err(EngineError::InvalidArgument {
            field: "max_tokens",
            message: "must be at least 1".into(),
        });
    }
    let mut sampler = Sampler::new(request.sampling.clone(), &request.prompt)?;
    let total = request.prompt.len() + request.max_tokens;
    let mut cache: ModelCache = model.new_cache(CacheConfig::for_sequences(1, total))?;
    let seq = cache.add_sequence()?;
    let mut logits = Vec::new();
    for part in PrefillPlan::new(request.prefill_chunk).chunks(&request.prompt) {
        model.forward_into(
            &mut cache,
            &[SeqChunk { seq, tokens: part }],
            LogitsMode::LastPerSequence,
            &mut logits,
        )?;
    }
    let mut tokens = Vec::with_capacity(request.max_tokens);
    loop {
        let sampled = sampler.sample(&logits);
        on_token(&sampled)?;
        let token = sampled.token;
        tokens.push(sampled);
        if !request.ignore_eos && eos.contains(&token) {
            return Ok(GenerationOutput {
                tokens,
                finish: FinishReason::Eos,
            });
        }
        if tokens.len() >= request.max_tokens {
            return Ok(GenerationOutput {
                tokens,
                finish: FinishReason::Length,
            });
        }
        model.forward_into(
            &mut cache,
            &[SeqChunk {
                seq,
                tokens: &[token],
            }],
            LogitsMode::LastPerSequence,
            &mut logits,
        )?;
    }
}
