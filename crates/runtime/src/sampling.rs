//! The public `SamplingParams` message → the engine's validated [`SamplingParams`] plus the
//! stop rules (at the router, once). Unset optional fields take documented defaults; set ones
//! are range-checked and refused naming the field. Workers get only what their sampler uses
//! (`WorkerSampling`: [`to_worker`] at the router, [`from_worker`] at the worker).

use sluice_engine::{Sampled, SamplingParams};
use sluice_proto::v1 as pb;
use sluice_proto::worker::v1 as wpb;

use crate::error::{Result, RuntimeError};
use crate::grammar::Constraint;

/// `temperature` when neither the request nor the checkpoint sets one (as OpenAI-style
/// servers do).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// The checkpoint's recommended sampling (`generation_config.json`: `temperature`, `top_p`,
/// `top_k`). It applies as a whole to a request that sets none of the three: the values are
/// tuned together, and a request's `top_k` of 0 (off) cannot be told from unset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

impl SamplingDefaults {
    /// Reads `generation_config.json` in `dir` (absent: no defaults).
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(SamplingDefaults::default());
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RuntimeError::Engine(sluice_engine::EngineError::io(&path, e)))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            RuntimeError::Engine(sluice_engine::EngineError::MalformedJson {
                path: path.clone(),
                message: e.to_string(),
            })
        })?;
        let number = |key: &str| v.get(key).and_then(serde_json::Value::as_f64);
        Ok(SamplingDefaults {
            temperature: number("temperature").map(|t| t as f32),
            top_p: number("top_p").map(|t| t as f32),
            top_k: number("top_k").filter(|k| *k > 0.0).map(|k| k as usize),
        })
    }
}

/// What `from_pb` checks a request against and fills its unset fields from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Most `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// `max_tokens` when unset: what is left of the context after the prompt (OpenAI's rule),
    /// at most `max_tokens_limit`.
    pub default_max_tokens: usize,
    pub defaults: SamplingDefaults,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestSampling {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Tokens that end the sequence like a stop string (`finish_reason = stop`).
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report each token's log-probability and the top `n` of its step.
    pub logprobs: Option<usize>,
    /// Prepend the prompt's text to the output.
    pub echo: bool,
    /// What the output must match (checked against the tokenizer by the router).
    pub constraint: Option<Constraint>,
}

/// Most alternatives a request may ask log-probabilities for (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 20;

/// The engine parameters of `p` (absent = all defaults), validated.
pub fn params_from_pb(
    p: Option<&pb::SamplingParams>,
    defaults: &SamplingDefaults,
) -> Result<SamplingParams> {
    let d = pb::SamplingParams::default();
    let p = p.unwrap_or(&d);
    let defaults = if p.temperature.is_none() && p.top_p.is_none() && p.top_k == 0 {
        *defaults
    } else {
        SamplingDefaults::default()
    };
    let params = SamplingParams {
        temperature: p
            .temperature
            .or(defaults.temperature)
            .unwrap_or(DEFAULT_TEMPERATURE),
        top_p: p.top_p.or(defaults.top_p).unwrap_or(1.0),
        top_k: defaults.top_k.unwrap_or(p.top_k as usize),
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        top_logprobs: p.logprobs.unwrap_or(0) as usize,
        logprobs: p.logprobs.is_some(),
        logit_bias: sorted_bias(&p.logit_bias),
    };
    if let Some(n) = p.logprobs
        && n > MAX_LOGPROBS
    {
        return Err(RuntimeError::invalid(
            "logprobs",
            format!("{n} is above the limit of {MAX_LOGPROBS}"),
        ));
    }
    params.validate()?;
    Ok(params)
}

/// A wire bias map as the sampler takes it: ids ascending (a map's order is arbitrary).
fn sorted_bias(bias: &std::collections::HashMap<u32, f32>) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = bias.iter().map(|(&t, &b)| (t, b)).collect();
    v.sort_unstable_by_key(|&(t, _)| t);
    v
}

/// The sampling a worker runs for the validated request `s`.
pub fn to_worker(s: &RequestSampling) -> wpb::WorkerSampling {
    let p = &s.params;
    wpb::WorkerSampling {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        min_p: p.min_p,
        seed: p.seed,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        logprobs: s.logprobs.map(|n| n as u32),
        logit_bias: p.logit_bias.iter().copied().collect(),
        constraint: s.constraint.as_ref().map(Constraint::to_pb),
    }
}

/// The constraint a worker's request carries (`None`: free text).
pub fn constraint_from_worker(w: Option<&wpb::WorkerSampling>) -> Result<Option<Constraint>> {
    Constraint::from_pb(w.and_then(|w| w.constraint.as_ref()), "constraint")
}

/// A worker's sampler parameters (unset: the engine's defaults, greedy) and whether it
/// reports log-probabilities. Not validated again here: the router did, and the engine's
/// sampler refuses parameters out of range when it is made.
pub fn from_worker(w: Option<&wpb::WorkerSampling>) -> (SamplingParams, bool) {
    let Some(w) = w else {
        return (SamplingParams::default(), false);
    };
    let params = SamplingParams {
        temperature: w.temperature,
        top_p: w.top_p,
        top_k: w.top_k as usize,
        min_p: w.min_p,
        repetition_penalty: w.repetition_penalty,
        presence_penalty: w.presence_penalty,
        frequency_penalty: w.frequency_penalty,
        seed: w.seed,
        top_logprobs: w.logprobs.unwrap_or(0) as usize,
        logprobs: w.logprobs.is_some(),
        logit_bias: sorted_bias(&w.logit_bias),
    };
    (params, w.logprobs.is_some())
}

/// How a worker ends a sequence at a token it sampled: a stop token id → `Stop`, an
/// end-of-sequence id → `Eos`, the last of its budget → `Length`. The worker that samples a
/// token is the one owner of these; the router ends a request only at a stop string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinishRule {
    /// End-of-sequence ids (empty when the request ignores them).
    pub eos: Vec<u32>,
    /// The request's stop token ids.
    pub stop: Vec<u32>,
}

impl FinishRule {
    /// The finish reason of `token` with `remaining` tokens of the budget left after it
    /// (`Unspecified`: the sequence goes on).
    pub fn judge(&self, token: u32, remaining: usize) -> pb::FinishReason {
        if self.stop.contains(&token) {
            pb::FinishReason::Stop
        } else if self.eos.contains(&token) {
            pb::FinishReason::Eos
        } else if remaining == 0 {
            pb::FinishReason::Length
        } else {
            pb::FinishReason::Unspecified
        }
    }

    /// As `judge`, for a constrained sequence: one whose grammar is complete after `token`
    /// stops there (`Stop`), as if at a stop token.
    pub fn judge_guided(
        &self,
        token: u32,
        remaining: usize,
        grammar_complete: bool,
    ) -> pb::FinishReason {
        match self.judge(token, remaining) {
            pb::FinishReason::Unspecified | pb::FinishReason::Length if grammar_complete => {
                pb::FinishReason::Stop
            }
            reason => reason,
        }
    }
}

/// Refuses `ids` (the request field `field`) when one is not below `vocab`.
pub fn check_token_ids(field: &str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(id) => Err(RuntimeError::invalid(
            field,
            format!("token id {id} is not below the vocabulary size {vocab}"),
        )),
        None => Ok(()),
    }
}

/// The wire form of a sampled token's log-probabilities.
pub fn token_logprobs(sampled: &Sampled) -> pb::TokenLogprobs {
    pb::TokenLogprobs {
        token_id: sampled.token,
        // Computed whenever the request asked for log-probabilities, the only time a worker
        // reports them.
        logprob: sampled.logprob.unwrap_or(f32::NAN),
        top: sampled
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// Everything a request asks of sampling, checked against `limits` and completed from them.
pub fn from_pb(p: Option<&pb::SamplingParams>, limits: &RequestLimits) -> Result<RequestSampling> {
    let params = params_from_pb(p, &limits.defaults)?;
    let max_tokens_limit = limits.max_tokens_limit;
    let max_tokens = match p.and_then(|p| p.max_tokens) {
        None => limits.default_max_tokens.clamp(1, max_tokens_limit),
        Some(0) => {
            return Err(RuntimeError::invalid("max_tokens", "must be at least 1"));
        }
        Some(n) if n as usize > max_tokens_limit => {
            return Err(RuntimeError::invalid(
                "max_tokens",
                format!("{n} is above this server's limit of {max_tokens_limit}"),
            ));
        }
        Some(n) => n as usize,
    };
    let stop = p.map(|p| p.stop.clone()).unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(RuntimeError::invalid(
            "stop",
            "stop strings must not be empty",
        ));
    }
    Ok(RequestSampling {
        params,
        max_tokens,
        stop,
        ignore_eos: p.is_some_and(|p| p.ignore_eos),
        stop_token_ids: p.map(|p| p.stop_token_ids.clone()).unwrap_or_default(),
        logprobs: p.and_then(|p| p.logprobs).map(|n| n as usize),
        echo: p.is_some_and(|p| p.echo),
        constraint: Constraint::from_pb(p.and_then(|p| p.constraint.as_ref()), "constraint")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limit of 100 tokens, 100 left in the context, no checkpoint defaults.
    const LIMITS: RequestLimits = RequestLimits {
        max_tokens_limit: 100,
        default_max_tokens: 100,
        defaults: SamplingDefaults {
            temperature: None,
            top_p: None,
            top_k: None,
        },
    };

    fn field_of(p: pb::SamplingParams) -> String {
        from_pb(Some(&p), &LIMITS).unwrap_err().to_string()
    }

    #[test]
    fn unset_fields_take_the_room_left_and_the_checkpoint_defaults_together() {
        let limits = RequestLimits {
            default_max_tokens: 37,
            defaults: SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.95),
                top_k: Some(20),
            },
            ..LIMITS
        };
        let s = from_pb(None, &limits).unwrap();
        assert_eq!(s.max_tokens, 37);
        let p = &s.params;
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.95, 20));
        // Setting any of the three leaves the others at Sluice's own defaults.
        let s = from_pb(
            Some(&pb::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            &limits,
        )
        .unwrap();
        let p = &s.params;
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.0, 1.0, 0));
        // The room left never exceeds the limit.
        let wide = RequestLimits {
            default_max_tokens: 1000,
            ..LIMITS
        };
        assert_eq!(from_pb(None, &wide).unwrap().max_tokens, 100);
    }

    #[test]
    fn defaults_and_ranges() {
        let s = from_pb(None, &LIMITS).unwrap();
        assert_eq!(s.max_tokens, 100);
        assert_eq!(s.params.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(s.params.top_p, 1.0);
        let greedy = pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(5),
            ..Default::default()
        };
        assert_eq!(
            from_pb(Some(&greedy), &LIMITS).unwrap().params.temperature,
            0.0
        );

        let msg = field_of(pb::SamplingParams {
            temperature: Some(-0.5),
            ..Default::default()
        });
        assert!(msg.contains("temperature"), "{msg}");
        for top_p in [0.0, 1.5, -1.0] {
            let msg = field_of(pb::SamplingParams {
                top_p: Some(top_p),
                ..Default::default()
            });
            assert!(msg.contains("top_p"), "{msg}");
        }
        for n in [0, 101] {
            let msg = field_of(pb::SamplingParams {
                max_tokens: Some(n),
                ..Default::default()
            });
            assert!(msg.contains("max_tokens"), "{msg}");
        }
        let msg = field_of(pb::SamplingParams {
            logprobs: Some(21),
            ..Default::default()
        });
        assert!(msg.contains("logprobs"), "{msg}");
        let s = from_pb(
            Some(&pb::SamplingParams {
                logprobs: Some(3),
                ..Default::default()
            }),
            &LIMITS,
        )
        .unwrap();
        assert_eq!((s.logprobs, s.params.top_logprobs), (Some(3), 3));
    }

    #[test]
    fn finish_rule_prefers_stop_tokens_then_eos_then_length() {
        let rule = FinishRule {
            eos: vec![1, 2],
            stop: vec![2, 3],
        };
        assert_eq!(rule.judge(2, 5), pb::FinishReason::Stop);
        assert_eq!(rule.judge(1, 5), pb::FinishReason::Eos);
        assert_eq!(rule.judge(3, 0), pb::FinishReason::Stop);
        assert_eq!(rule.judge(9, 0), pb::FinishReason::Length);
        assert_eq!(rule.judge(9, 1), pb::FinishReason::Unspecified);
    }

    /// What the router sends is what the worker's sampler runs.
    #[test]
    fn worker_sampling_round_trips() {
        let s = from_pb(
            Some(&pb::SamplingParams {
                temperature: Some(0.7),
                top_p: Some(0.9),
                top_k: 40,
                min_p: 0.05,
                seed: Some(11),
                repetition_penalty: Some(1.1),
                presence_penalty: 0.3,
                frequency_penalty: -0.2,
                logprobs: Some(2),
                stop: vec!["x".into()],
                ..Default::default()
            }),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(from_worker(Some(&to_worker(&s))), (s.params.clone(), true));
        let plain = from_pb(None, &LIMITS).unwrap();
        assert_eq!(from_worker(Some(&to_worker(&plain))), (plain.params, false));
        assert_eq!(from_worker(None), (SamplingParams::default(), false));
    }
}
