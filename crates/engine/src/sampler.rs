//! Token sampling: penalties, temperature, top-k, top-p, min-p, per-request seed, logprobs.
//!
//! Each request owns a [`Sampler`] with its own RNG, so its tokens depend only on its logits
//! and its seed, never on which other requests share the batch.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{EngineError, Result};

/// Most top-n logprobs a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// Drop tokens below `min_p · p_max`; 0 disables.
    pub min_p: f32,
    /// > 1 discourages tokens already in the prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    pub frequency_penalty: f32,
    /// Fixed seed for reproducible sampling; `None` draws one.
    pub seed: Option<u64>,
    /// Number of most likely alternatives to report with each token (0 = none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its allowed range, naming the first that is out of it.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: f32, allowed| {
            Err(EngineError::InvalidSampling {
                field,
                value: value.to_string(),
                allowed,
            })
        };
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad(
                "temperature",
                self.temperature,
                "0 ≤ temperature ≤ 100 (0 = greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "0 < top_p ≤ 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "0 ≤ min_p ≤ 1");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "0 < repetition_penalty ≤ 10",
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                self.presence_penalty,
                "-2 ≤ presence_penalty ≤ 2",
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                self.frequency_penalty,
                "-2 ≤ frequency_penalty ≤ 2",
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(EngineError::InvalidSampling {
                field: "top_logprobs",
                value: self.top_logprobs.to_string(),
                allowed: "0 ≤ top_logprobs ≤ 20",
            });
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and good enough to draw one uniform number per token.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A sampled token with its log-probability under the model and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log p(token) under the model's distribution (before penalties and truncation).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Tokens of the prompt and output (repetition penalty).
    seen: HashMap<u32, u32>,
    /// Times each token was generated (presence / frequency penalties).
    generated: HashMap<u32, u32>,
    scratch: Vec<f32>,
    order: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0x5eed, |d| d.as_nanos() as u64)
        });
        let mut seen = HashMap::new();
        for &t in prompt {
            *seen.entry(t).or_insert(0) += 1;
        }
        Ok(Sampler {
            params,
            rng: Rng(seed),
            seen,
            generated: HashMap::new(),
            scratch: Vec::new(),
            order: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The RNG state: with [`Sampler::resume`] another process continues this request's
    /// sampling exactly where this one stopped.
    pub fn rng_state(&self) -> u64 {
        self.rng.0
    }

    /// A sampler in the state this request's sampler reached after `generated`, given the
    /// state [`Sampler::rng_state`] returned then.
    pub fn resume(
        params: SamplingParams,
        prompt: &[u32],
        generated: &[u32],
        rng_state: u64,
    ) -> Result<Self> {
        let mut sampler = Sampler::new(params, prompt)?;
        sampler.rng = Rng(rng_state);
        for &t in generated {
            *sampler.seen.entry(t).or_insert(0) += 1;
            *sampler.generated.entry(t).or_insert(0) += 1;
        }
        Ok(sampler)
    }

    /// Picks the next token from one row of logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let mut work = std::mem::take(&mut self.scratch);
        work.clear();
        work.extend_from_slice(logits);
        self.apply_penalties(&mut work);
        let token = if self.params.temperature == 0.0 {
            argmax(&work)
        } else {
            self.draw(&mut work)
        };
        self.scratch = work;
        let (logprob, top) = self.logprobs(logits, token);
        *self.seen.entry(token).or_insert(0) += 1;
        *self.generated.entry(token).or_insert(0) += 1;
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Temperature, then top-k / min-p / top-p truncation, then one draw.
    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let truncate = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        if truncate {
            let by_logit = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            if p.top_k > 0 && p.top_k < self.order.len() {
                self.order.select_nth_unstable_by(p.top_k - 1, by_logit);
                self.order.truncate(p.top_k);
            }
            self.order.sort_unstable_by(by_logit);
        }
        // Softmax over the candidates (max first when sorted; found otherwise).
        let max = self
            .order
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = self
            .order
            .iter()
            .map(|&i| (((logits[i as usize] - max) * inv_t) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = probs.first().copied().unwrap_or(0.0) * p.min_p as f64;
            keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for q in &probs[..keep] {
                mass += q;
                n += 1;
                if mass >= p.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * kept;
        for (i, q) in probs[..keep].iter().enumerate() {
            if u < *q {
                return self.order[i];
            }
            u -= q;
        }
        self.order[keep - 1]
    }

    fn logprobs(&self, logits: &[f32], token: u32) -> (f32, Vec<(u32, f32)>) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max
            + logits
                .iter()
                .map(|l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
        let logprob = logits[token as usize] - lse;
        let n = self.params.top_logprobs;
        if n == 0 {
            return (logprob, Vec::new());
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, cmp);
            idx.truncate(n);
        }
        idx.sort_unstable_by(cmp);
        (
            logprob,
            idx.into_iter()
                .map(|i| (i, logits[i as usize] - lse))
                .collect(),
        )
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(params(|p| p.top_logprobs = 2), &[]).unwrap();
        let out = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(out.token, 1);
        let z: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| l.exp()).sum();
        assert!((out.logprob - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_the_distribution() {
        let logits = [1.0f32, 0.0, 2.0, -1.0];
        let run = |seed| {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 1.0;
                    p.seed = Some(seed)
                }),
                &[],
            )
            .unwrap();
            (0..4000)
                .map(|_| s.sample(&logits).token)
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (tok, l) in logits.iter().enumerate() {
            let freq = a.iter().filter(|&&t| t == tok as u32).count() as f32 / a.len() as f32;
            assert!((freq - l.exp() / z).abs() < 0.03, "token {tok}: {freq}");
        }
    }

    #[test]
    fn truncation_keeps_only_allowed_tokens() {
        let logits = [3.0f32, 2.9, 0.0, -5.0, 2.8];
        for (p, allowed) in [
            (
                params(|p| {
                    p.temperature = 1.0;
                    p.top_k = 2
                }),
                vec![0, 1],
            ),
            (
                params(|p| {
                    p.temperature = 1.0;
                    p.min_p = 0.5
                }),
                vec![0, 1, 4],
            ),
            (
                params(|p| {
                    p.temperature = 1.0;
                    p.top_p = 0.5
                }),
                vec![0, 1],
            ),
        ] {
            let mut s = Sampler::new(p, &[]).unwrap();
            for _ in 0..300 {
                let t = s.sample(&logits).token;
                assert!(allowed.contains(&t), "{t} not in {allowed:?}");
            }
        }
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let logits = [2.0f32, 1.9, 0.0];
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 1.2), &[0]).unwrap();
        assert_eq!(s.sample(&logits).token, 1); // 2.0 / 1.2 < 1.9
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 1.0), &[]).unwrap();
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 1); // 0 now has 2.0 - 1.0
        let mut s = Sampler::new(params(|p| p.presence_penalty = 2.0), &[]).unwrap();
        let logits = [2.0f32, 1.9, 0.5];
        let seq: Vec<u32> = (0..3).map(|_| s.sample(&logits).token).collect();
        assert_eq!(seq, vec![0, 1, 2]);
    }

    #[test]
    fn out_of_range_parameters_name_the_field() {
        for (p, field) in [
            (params(|p| p.temperature = -1.0), "temperature"),
            (params(|p| p.temperature = f32::NAN), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.min_p = 1.5), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.presence_penalty = 3.0), "presence_penalty"),
            (params(|p| p.frequency_penalty = -3.0), "frequency_penalty"),
            (params(|p| p.top_logprobs = 21), "top_logprobs"),
        ] {
            let err = Sampler::new(p, &[]).err().unwrap().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_stream() {
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            repetition_penalty: 1.3,
            frequency_penalty: 0.4,
            seed: Some(99),
            ..Default::default()
        };
        let logits: Vec<Vec<f32>> = (0..12)
            .map(|i| {
                (0..40)
                    .map(|j| ((i * 7 + j * 13) % 17) as f32 * 0.3)
                    .collect()
            })
            .collect();
        let prompt = [3, 4, 5];
        let mut whole = Sampler::new(params.clone(), &prompt).unwrap();
        let expected: Vec<u32> = logits.iter().map(|l| whole.sample(l).token).collect();

        let mut first = Sampler::new(params.clone(), &prompt).unwrap();
        let head: Vec<u32> = logits[..4].iter().map(|l| first.sample(l).token).collect();
        let mut rest = Sampler::resume(params, &prompt, &head, first.rng_state()).unwrap();
        let tail: Vec<u32> = logits[4..].iter().map(|l| rest.sample(l).token).collect();
        assert_eq!([head, tail].concat(), expected);
    }
}
