//! A stand-in for the model that computes nothing: each forward step takes a configured time
//! and the next token is a fixed function of the previous one. Its cache is real (one tiny
//! attention layer and one tiny linear-attention layer), so workers batch, preempt, export and
//! transfer it exactly as they do a real model's. Used to test and load the serving path at
//! rates the CPU engine cannot reach.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cache::{CacheConfig, ModelCache};
use crate::config::{
    AttentionSpec, FfnKind, LayerSpec, LinearSpec, MixerKind, ModelFamily, ModelSpec,
};
use crate::error::Result;
use crate::model::{LanguageModel, LogitsMode, SeqChunk, plan_batch};
use crate::tensor::DType;

/// How long the mock's forward steps take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MockTiming {
    /// Time of one step, whatever the number of sequences in it (decode is bound by reading
    /// the weights once per step, not by the batch).
    pub step: Duration,
    /// Prompt tokens per second on top of the step: a step with `n` tokens beyond one per
    /// sequence takes `step + n / prefill_tokens_per_s`.
    pub prefill_tokens_per_s: f64,
}

impl MockTiming {
    /// The duration of a step over `tokens` tokens of `sequences` sequences.
    pub fn step_time(&self, tokens: usize, sequences: usize) -> Duration {
        let extra = tokens.saturating_sub(sequences) as f64;
        let prefill = if self.prefill_tokens_per_s > 0.0 {
            extra / self.prefill_tokens_per_s
        } else {
            0.0
        };
        self.step + Duration::from_secs_f64(prefill)
    }
}

/// When a step of `duration` asked for at `now` ends, the previous one having ended at
/// `last_end`: on the cadence if the previous step ended less than a step ago, else
/// `duration` from now (so never in the past).
fn step_end(last_end: Option<Instant>, now: Instant, duration: Duration) -> Instant {
    let begin = match last_end {
        Some(end) if now.saturating_duration_since(end) < duration => end,
        _ => now,
    };
    begin + duration
}

/// Logit of the mock's chosen token; every other token gets 0, so even sampling at
/// temperature 1 picks it (the others share e^-30 of the mass).
const CHOSEN_LOGIT: f32 = 30.0;

/// One mock per worker: its steps keep their own cadence.
pub struct MockModel {
    spec: ModelSpec,
    timing: MockTiming,
    fingerprint: u64,
    /// When the previous step ended.
    last_end: Mutex<Option<Instant>>,
    /// Fault injection: the step after this many panics, as an engine bug would.
    panic_after_steps: Option<u64>,
    steps: std::sync::atomic::AtomicU64,
}

impl MockModel {
    /// A mock with the vocabulary, eos ids and type of `real` (so the router's tokenizer and
    /// checks apply unchanged) and a minimal hybrid cache.
    pub fn new(real: &ModelSpec, timing: MockTiming) -> MockModel {
        let spec = ModelSpec {
            family: ModelFamily::Qwen35Dense,
            model_type: format!("mock/{}", real.model_type),
            hidden: 4,
            vocab: real.vocab,
            eps: real.eps,
            layers: vec![
                LayerSpec {
                    mixer: MixerKind::LinearAttention,
                    ffn: FfnKind::Dense,
                },
                LayerSpec {
                    mixer: MixerKind::FullAttention,
                    ffn: FfnKind::Dense,
                },
            ],
            attention: AttentionSpec {
                heads: 1,
                kv_heads: 1,
                head_dim: 4,
                rotary_dim: 4,
                rope_theta: 10_000.0,
            },
            linear: LinearSpec {
                key_heads: 1,
                value_heads: 1,
                key_dim: 4,
                value_dim: 4,
                conv_kernel: 4,
            },
            moe: None,
            dense_intermediate: 4,
            tie_embeddings: true,
            eos_token_ids: real.eos_token_ids.clone(),
            wrapped: false,
        };
        let fingerprint = crate::model::fingerprint(&spec, DType::F32);
        MockModel {
            spec,
            timing,
            fingerprint,
            last_end: Mutex::new(None),
            panic_after_steps: None,
            steps: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Fault injection for tests: every step after the first `steps` panics.
    pub fn with_panic_after_steps(mut self, steps: Option<u64>) -> Self {
        self.panic_after_steps = steps;
        self
    }

    /// Waits out a step of `duration`. Back-to-back steps keep a fixed cadence: the worker's
    /// own time between them (sampling, bookkeeping) counts towards the next step, as host
    /// work overlaps the device on a GPU; after an idle gap the step starts now.
    fn take(&self, duration: Duration) {
        let now = Instant::now();
        let mut last_end = self.last_end.lock().unwrap_or_else(|e| e.into_inner());
        let end = step_end(*last_end, now, duration);
        std::thread::sleep(end - now);
        *last_end = Some(end);
    }

    pub fn timing(&self) -> MockTiming {
        self.timing
    }

    /// The token the mock emits after `previous` at `position`: spread over the vocabulary,
    /// never an eos id, so generations run to `max_tokens`.
    pub fn next_token(&self, previous: u32, position: usize) -> u32 {
        let vocab = self.spec.vocab as u64;
        let mut next = (previous as u64)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(position as u64 + 1)
            % vocab;
        while self.spec.eos_token_ids.contains(&(next as u32)) && vocab > 1 {
            next = (next + 1) % vocab;
        }
        next as u32
    }
}

impl LanguageModel for MockModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn new_cache(&self, config: CacheConfig) -> Result<ModelCache> {
        ModelCache::new(&self.spec, config)
    }

    fn forward_into(
        &self,
        cache: &mut ModelCache,
        batch: &[SeqChunk<'_>],
        mode: LogitsMode,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let mut segments = Vec::new();
        plan_batch(&self.spec, cache, batch, &mut segments)?;
        let tokens: usize = segments.iter().map(|s| s.len).sum();
        let step = self
            .steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.panic_after_steps.is_some_and(|n| step >= n) {
            panic!("mock engine: fault injected after {step} steps (--mock-panic-after-steps)");
        }
        self.take(self.timing.step_time(tokens, segments.len()));
        for seg in &segments {
            cache.advance(seg.seq, seg.len)?;
        }
        // (token, position) of each row that gets logits.
        let rows: Vec<(u32, usize)> = match mode {
            LogitsMode::LastPerSequence => batch
                .iter()
                .zip(&segments)
                .map(|(c, s)| (c.tokens[s.len - 1], s.start_pos + s.len - 1))
                .collect(),
            LogitsMode::AllTokens => batch
                .iter()
                .zip(&segments)
                .flat_map(|(c, s)| {
                    c.tokens
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| (t, s.start_pos + i))
                })
                .collect(),
        };
        let vocab = self.spec.vocab;
        logits.clear();
        logits.resize(rows.len() * vocab, 0.0); // [rows, vocab]
        for (r, &(token, position)) in rows.iter().enumerate() {
            logits[r * vocab + self.next_token(token, position) as usize] = CHOSEN_LOGIT;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;

    fn real() -> ModelSpec {
        let config = crate::synth::preset_config(crate::synth::Preset::Tiny);
        let mut spec = crate::config::parse_spec(&config).unwrap();
        spec.eos_token_ids = vec![7];
        spec.vocab = 16;
        spec
    }

    #[test]
    fn step_time_charges_prompt_tokens_beyond_one_per_sequence() {
        let t = MockTiming {
            step: Duration::from_millis(10),
            prefill_tokens_per_s: 1000.0,
        };
        assert_eq!(t.step_time(4, 4), Duration::from_millis(10));
        assert_eq!(t.step_time(104, 4), Duration::from_millis(110));
    }

    #[test]
    fn back_to_back_steps_keep_the_cadence() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let step = ms(20);
        // Idle: the step starts now.
        assert_eq!(step_end(None, t0, step), t0 + step);
        assert_eq!(step_end(Some(t0), t0 + ms(50), step), t0 + ms(70));
        // 5 ms of work after a step: absorbed, the next ends one step after the last.
        assert_eq!(step_end(Some(t0), t0 + ms(5), step), t0 + ms(20));
        // A gap of a step or more is idle time: the step starts now.
        assert_eq!(step_end(Some(t0), t0 + ms(19), ms(10)), t0 + ms(29));
    }

    #[test]
    fn the_chosen_token_is_the_argmax_and_never_eos() {
        let timing = MockTiming {
            step: Duration::ZERO,
            prefill_tokens_per_s: 0.0,
        };
        let mock = MockModel::new(&real(), timing);
        let mut cache = mock.new_cache(CacheConfig::for_sequences(2, 64)).unwrap();
        let a = cache.lease().unwrap();
        let b = cache.lease().unwrap();
        let batch = [
            SeqChunk {
                seq: a.id(),
                tokens: &[1, 2, 3],
            },
            SeqChunk {
                seq: b.id(),
                tokens: &[5],
            },
        ];
        let logits = mock
            .forward(&mut cache, &batch, LogitsMode::LastPerSequence)
            .unwrap();
        assert_eq!(logits.len(), 2 * 16);
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0 as u32
        };
        assert_eq!(argmax(&logits[..16]), mock.next_token(3, 2));
        assert_eq!(argmax(&logits[16..]), mock.next_token(5, 0));
        assert_eq!(cache.seq_len(a.id()).unwrap(), 3);
        for previous in 0..16 {
            for position in 0..40 {
                assert_ne!(mock.next_token(previous, position), 7);
            }
        }
    }
}
