//! The public `SamplingParams` message → the engine's validated [`SamplingParams`] plus the
//! stop rules (at the router, once). Unset optional fields take documented defaults; set ones
//! are range-checked and refused naming the field. Workers get only what their sampler uses
//! (`WorkerSampling`: [`to_worker`] at the router, [`from_worker`] at the worker).

use sluice_engine::{Sampled, SamplingParams};
use sluice_proto::v1 as pb;
use sluice_proto::worker::v1 as wpb;

use crate::error::{Result, RuntimeError};

/// `max_tokens` when a request leaves it unset.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// `temperature` when a request leaves it unset (as OpenAI-style servers do).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

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
}

/// Most alternatives a request may ask log-probabilities for (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 20;

/// The engine parameters of `p` (absent = all defaults), validated.
pub fn params_from_pb(p: Option<&pb::SamplingParams>) -> Result<SamplingParams> {
    let d = pb::SamplingParams::default();
    let p = p.unwrap_or(&d);
    let params = SamplingParams {
        temperature: p.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: p.top_p.unwrap_or(1.0),
        top_k: p.top_k as usize,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        top_logprobs: p.logprobs.unwrap_or(0) as usize,
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
    }
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
        logprob: sampled.logprob,
        top: sampled
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// Everything a request asks of sampling, with `max_tokens` checked against `max_tokens_limit`.
pub fn from_pb(p: Option<&pb::SamplingParams>, max_tokens_limit: usize) -> Result<RequestSampling> {
    let params = params_from_pb(p)?;
    let max_tokens = match p.and_then(|p| p.max_tokens) {
        None => DEFAULT_MAX_TOKENS.min(max_tokens_limit),
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(p: pb::SamplingParams) -> String {
        from_pb(Some(&p), 100).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_ranges() {
        let s = from_pb(None, 100).unwrap();
        assert_eq!(s.max_tokens, 100);
        assert_eq!(s.params.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(s.params.top_p, 1.0);
        let greedy = pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(5),
            ..Default::default()
        };
        assert_eq!(from_pb(Some(&greedy), 100).unwrap().params.temperature, 0.0);

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
            100,
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
            100,
        )
        .unwrap();
        assert_eq!(from_worker(Some(&to_worker(&s))), (s.params.clone(), true));
        let plain = from_pb(None, 100).unwrap();
        assert_eq!(from_worker(Some(&to_worker(&plain))), (plain.params, false));
        assert_eq!(from_worker(None), (SamplingParams::default(), false));
    }
}
