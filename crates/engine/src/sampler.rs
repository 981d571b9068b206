//! Token sampling: penalties, temperature, top-k, top-p, min-p, per-request seed, logprobs.
//!
//! Each request owns a [`Sampler`] with its own RNG, so its tokens depend only on its logits
//! and its seed, never on which other requests share the batch.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::cpu::sampling as scan;
use crate::error::{EngineError, Result};

/// Most top-n logprobs a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The largest `logit_bias` magnitude (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// The tokens a step may pick, as a bitset over the vocabulary: token `t` is allowed when
/// bit `t % 32` of word `t / 32` is set (the layout guided-decoding engines produce).
#[derive(Debug, Clone, Copy)]
pub struct TokenMask<'a>(pub &'a [u32]);

impl TokenMask<'_> {
    pub fn allows(&self, token: u32) -> bool {
        self.0
            .get(token as usize / 32)
            .is_some_and(|w| w >> (token % 32) & 1 == 1)
    }
}

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
    /// Report the sampled token's log-probability (implied by `top_logprobs > 0`). Off, the
    /// sampler never normalises over the whole vocabulary.
    pub logprobs: bool,
    /// Added to these tokens' logits before penalties (OpenAI's `logit_bias`), ids ascending.
    pub logit_bias: Vec<(u32, f32)>,
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
            logprobs: false,
            logit_bias: Vec::new(),
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
        if let Some(&(token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return Err(EngineError::InvalidSampling {
                field: "logit_bias",
                value: format!("{bias} (token {token})"),
                allowed: "-100 ≤ bias ≤ 100",
            });
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
    /// log p(token) under the model's distribution (before penalties and truncation), when
    /// the parameters ask for log-probabilities.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts for the repetition, presence and frequency penalties, sorted by token: a
/// binary search counts a token, one walk in id order applies them. Only a request with such
/// a penalty keeps one (no hashing, nothing per token for the rest).
#[derive(Debug, Clone, Default)]
struct TokenCounts(Vec<TokenCount>);

#[derive(Debug, Clone, Copy)]
struct TokenCount {
    token: u32,
    /// Times in the prompt and the output (repetition penalty).
    seen: u32,
    /// Times in the output (presence and frequency penalties).
    generated: u32,
}

impl TokenCounts {
    /// The prompt's counts, by one sort (not one insertion per token).
    fn of_prompt(prompt: &[u32]) -> Self {
        let mut sorted = prompt.to_vec();
        sorted.sort_unstable();
        let mut counts: Vec<TokenCount> = Vec::new();
        for t in sorted {
            match counts.last_mut() {
                Some(last) if last.token == t => last.seen += 1,
                _ => counts.push(TokenCount {
                    token: t,
                    seen: 1,
                    generated: 0,
                }),
            }
        }
        TokenCounts(counts)
    }

    fn count_generated(&mut self, token: u32) {
        match self.0.binary_search_by_key(&token, |c| c.token) {
            Ok(i) => {
                self.0[i].seen += 1;
                self.0[i].generated += 1;
            }
            Err(i) => self.0.insert(
                i,
                TokenCount {
                    token,
                    seen: 1,
                    generated: 1,
                },
            ),
        }
    }
}

/// What truncation left to draw from.
enum Kept {
    /// `candidates[..n]`, heaviest first.
    Candidates(usize),
    /// Every token, by `weights` (zero for those ruled out), summed per block in
    /// `block_sums`.
    Weights,
}

/// Thresholds on the weights (the favourite's is 1) tried for top-p, largest first: the
/// nucleus lies among the tokens at or above the largest whose mass reaches it, so only those
/// are gathered and sorted.
const NUCLEUS_THRESHOLDS: [f32; 8] = [
    0.25,
    1.0 / 16.0,
    1.0 / 64.0,
    1.0 / 256.0,
    1.0 / 2048.0,
    1.0 / 16384.0,
    1.0 / 262_144.0,
    1.0 / 16_777_216.0,
];

/// Top-k up to this size is picked by one scan that keeps a sorted short list; larger k by a
/// partial selection over every candidate.
const SCAN_TOP_K: usize = 256;

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Counts for the penalties (only when one is set).
    counts: Option<TokenCounts>,
    /// Adjusted logits (only when a bias, penalty or mask changes them).
    scratch: Vec<f32>,
    /// e^((logit − max) / T) over the vocabulary, and its sums per block.
    weights: Vec<f32>,
    block_sums: Vec<f64>,
    /// Candidates truncation keeps and their weights: reused, so a draw allocates nothing.
    candidates: Vec<(u32, f32)>,
    /// The ids a sparse mask allows, in order (`scratch` then holds their logits).
    allowed_ids: Vec<u32>,
}

/// A mask allowing at most one token in this many is sampled over its allowed tokens alone
/// (gathered in id order) instead of over the whole vocabulary with the rest at −∞. A
/// grammar's mask usually allows a few hundred of Qwen3.5's 248 320 tokens.
const SPARSE_MASK_RATIO: usize = 8;

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0x5eed, |d| d.as_nanos() as u64)
        });
        let counts = params
            .counts_tokens()
            .then(|| TokenCounts::of_prompt(prompt));
        Ok(Sampler {
            params,
            rng: Rng(seed),
            counts,
            scratch: Vec::new(),
            weights: Vec::new(),
            block_sums: Vec::new(),
            candidates: Vec::new(),
            allowed_ids: Vec::new(),
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
        if let Some(counts) = sampler.counts.as_mut() {
            for &t in generated {
                counts.count_generated(t);
            }
        }
        Ok(sampler)
    }

    /// Picks the next token from one row of logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_within(logits, None)
    }

    /// As `sample`, picking only among the tokens `allowed` lets through (all when `None`).
    /// A mask that allows nothing picks the best token regardless: the caller that made the
    /// mask is the one to notice a dead end, and it does so before sampling.
    pub fn sample_within(&mut self, logits: &[f32], allowed: Option<TokenMask<'_>>) -> Sampled {
        if let Some(mask) = allowed
            && !self.has_adjustments()
        {
            let n: usize = mask.0.iter().map(|w| w.count_ones() as usize).sum();
            if n > 0 && n <= logits.len() / SPARSE_MASK_RATIO {
                let token = self.pick_among(logits, mask);
                return self.record(logits, token);
            }
        }
        // The logits are copied only when a bias, a penalty or a mask has to change them.
        let mut adjusted = std::mem::take(&mut self.scratch);
        let work: &[f32] = if self.has_adjustments() || allowed.is_some() {
            adjusted.clear();
            adjusted.extend_from_slice(logits);
            self.apply_penalties(&mut adjusted);
            if let Some(mask) = allowed {
                apply_mask(&mut adjusted, mask);
            }
            &adjusted
        } else {
            logits
        };
        let token = if self.params.temperature == 0.0 {
            scan::argmax(work)
        } else {
            self.draw(work)
        };
        self.scratch = adjusted;
        self.record(logits, token)
    }

    /// Picks among the tokens of a sparse `mask` only: their logits gathered in id order and
    /// sampled as a vocabulary of their own (every truncation rule gives the same candidates
    /// as on the whole masked vocabulary; only the block sums' rounding differs).
    fn pick_among(&mut self, logits: &[f32], mask: TokenMask<'_>) -> u32 {
        let mut compact = std::mem::take(&mut self.scratch);
        let mut ids = std::mem::take(&mut self.allowed_ids);
        compact.clear();
        ids.clear();
        for (w, &word) in mask.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let id = w * 32 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(&l) = logits.get(id) {
                    ids.push(id as u32);
                    compact.push(l);
                }
            }
        }
        let at = if compact.is_empty() {
            // Only ids past the logits were set: as a mask allowing nothing.
            scan::argmax(logits)
        } else if self.params.temperature == 0.0 {
            scan::argmax(&compact)
        } else {
            self.draw(&compact)
        };
        let token = ids.get(at as usize).copied().unwrap_or(at);
        self.scratch = compact;
        self.allowed_ids = ids;
        token
    }

    /// The log-probabilities asked for (of the model's own `logits`) and the penalties'
    /// counts, for the picked `token`.
    fn record(&mut self, logits: &[f32], token: u32) -> Sampled {
        let (logprob, top) = if self.params.logprobs || self.params.top_logprobs > 0 {
            let (logprob, top) = self.logprobs(logits, token);
            (Some(logprob), top)
        } else {
            (None, Vec::new())
        };
        if let Some(counts) = self.counts.as_mut() {
            counts.count_generated(token);
        }
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn has_adjustments(&self) -> bool {
        self.counts.is_some() || !self.params.logit_bias.is_empty()
    }

    /// Bias first (as OpenAI and vLLM apply it, to the raw logits), then the penalties.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let Some(counts) = &self.counts else {
            return;
        };
        for c in &counts.0 {
            let Some(l) = logits.get_mut(c.token as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            if c.generated > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * c.generated as f32;
            }
        }
    }

    /// Temperature, then top-k / min-p / top-p truncation, then one draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let best = scan::max(logits);
        if best == f32::NEG_INFINITY || best.is_nan() {
            return scan::argmax(logits);
        }
        match self.truncate(logits, best) {
            Kept::Candidates(n) => {
                let kept = &self.candidates[..n.max(1)];
                let mass: f64 = kept.iter().map(|c| c.1 as f64).sum();
                let mut u = self.rng.next_f64() * mass;
                for c in kept {
                    if u < c.1 as f64 {
                        return c.0;
                    }
                    u -= c.1 as f64;
                }
                kept[kept.len() - 1].0
            }
            Kept::Weights => {
                let total: f64 = self.block_sums.iter().sum();
                let u = self.rng.next_f64() * total;
                draw_by_blocks(&self.weights, &self.block_sums, u)
                    .unwrap_or_else(|| scan::argmax(logits))
            }
        }
    }

    /// Truncation selects rather than sorts: top-k by one scan (or a partial selection),
    /// min-p by a threshold on the weights (p ≥ min_p · p_max is w ≥ min_p, the top weight
    /// being 1), top-p by gathering only the tokens above a threshold its mass allows and
    /// sorting those. Kept tokens are ordered by weight, then by lower id.
    fn truncate(&mut self, logits: &[f32], best: f32) -> Kept {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < logits.len() {
            top_k(logits, p.top_k, &mut self.candidates);
            let mut total = 0.0f64;
            for c in self.candidates.iter_mut() {
                c.1 = scan::exp_nonpositive((c.1 - best) * inv_t);
                total += c.1 as f64;
            }
            if p.min_p > 0.0 {
                let floor = p.min_p;
                self.candidates.retain(|c| c.1 >= floor);
            }
            self.candidates.sort_unstable_by(by_weight);
            return Kept::Candidates(prefix_reaching(
                &self.candidates,
                p.top_p as f64 * total,
                p.top_p,
            ));
        }
        let total = scan::exp_weights(logits, best, inv_t, &mut self.weights, &mut self.block_sums);
        if p.min_p > 0.0 {
            scan::floor_weights(&mut self.weights, p.min_p, &mut self.block_sums);
        }
        if p.top_p >= 1.0 {
            return Kept::Weights;
        }
        let need = p.top_p as f64 * total;
        let weights = &self.weights;
        let threshold = NUCLEUS_THRESHOLDS
            .iter()
            .copied()
            .find(|&t| scan::mass_at_or_above(weights, t) >= need);
        self.candidates.clear();
        match threshold {
            Some(t) => self.candidates.extend(
                (0..weights.len() as u32)
                    .filter(|&i| weights[i as usize] >= t)
                    .map(|i| (i, weights[i as usize])),
            ),
            // Every token still in the running (a finite logit, above any min-p floor).
            None => self.candidates.extend(
                (0..weights.len() as u32)
                    .filter(|&i| {
                        logits[i as usize] > f32::NEG_INFINITY
                            && (p.min_p == 0.0 || weights[i as usize] > 0.0)
                    })
                    .map(|i| (i, weights[i as usize])),
            ),
        }
        self.candidates.sort_unstable_by(by_weight);
        Kept::Candidates(prefix_reaching(&self.candidates, need, p.top_p))
    }

    fn logprobs(&self, logits: &[f32], token: u32) -> (f32, Vec<(u32, f32)>) {
        let max = scan::max(logits);
        let lse = max + scan::sum_exp(logits, max).ln() as f32;
        let logprob = logits[token as usize] - lse;
        let n = self.params.top_logprobs;
        if n == 0 {
            return (logprob, Vec::new());
        }
        let mut top = Vec::with_capacity(n);
        top_k(logits, n, &mut top);
        for t in top.iter_mut() {
            t.1 -= lse;
        }
        (logprob, top)
    }
}

impl SamplingParams {
    /// Whether a penalty needs the tokens' counts.
    fn counts_tokens(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// Sets every token the mask rules out to −∞, a word of 32 at a time. An empty mask changes
/// nothing (see [`Sampler::sample_within`]).
fn apply_mask(logits: &mut [f32], mask: TokenMask<'_>) {
    if mask.0.iter().all(|&w| w == 0) {
        return;
    }
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        match mask.0.get(i).copied().unwrap_or(0) {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            word => {
                for (b, l) in chunk.iter_mut().enumerate() {
                    if word >> b & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// The `k` largest logits (finite ones only) into `out` as (id, logit), largest first, ties to
/// the lower id.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k > SCAN_TOP_K {
        out.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, l)| (i as u32, *l)),
        );
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, by_logit);
            out.truncate(k);
        }
        out.sort_unstable_by(by_logit);
        return;
    }
    // A sorted short list; a later token enters only when strictly larger than its last
    // (an equal one has a higher id and loses the tie), so blocks whose max is not above it
    // are skipped whole.
    let mut floor = f32::NEG_INFINITY;
    for (b, block) in logits.chunks(64).enumerate() {
        if out.len() == k && scan::max(block) <= floor {
            continue;
        }
        for (j, &l) in block.iter().enumerate() {
            if l <= floor || l == f32::NEG_INFINITY || l.is_nan() {
                continue;
            }
            let id = (b * 64 + j) as u32;
            let at = out.partition_point(|c| c.1 >= l);
            if out.len() == k {
                out.pop();
            }
            out.insert(at, (id, l));
            if out.len() == k {
                floor = out[k - 1].1;
            }
        }
    }
}

/// How many of `kept` (heaviest first) reach `need` of weight (all when `top_p` is 1).
fn prefix_reaching(kept: &[(u32, f32)], need: f64, top_p: f32) -> usize {
    if top_p >= 1.0 {
        return kept.len();
    }
    let mut mass = 0.0f64;
    for (j, c) in kept.iter().enumerate() {
        mass += c.1 as f64;
        if mass >= need {
            return j + 1;
        }
    }
    kept.len()
}

/// The token the draw `u` lands on, walking the block sums and then one block; `None` when
/// nothing has weight.
fn draw_by_blocks(weights: &[f32], block_sums: &[f64], mut u: f64) -> Option<u32> {
    let mut last = None;
    for (b, &sum) in block_sums.iter().enumerate() {
        if sum <= 0.0 {
            continue;
        }
        let start = b * scan::WEIGHT_BLOCK;
        let block = &weights[start..(start + scan::WEIGHT_BLOCK).min(weights.len())];
        if u < sum {
            let mut within = u;
            for (j, &w) in block.iter().enumerate() {
                if w > 0.0 {
                    if within < w as f64 {
                        return Some((start + j) as u32);
                    }
                    within -= w as f64;
                    last = Some((start + j) as u32);
                }
            }
            // Rounding between the block's lane sums and this walk: its last weighted token.
            return last;
        }
        u -= sum;
        last = block
            .iter()
            .rposition(|&w| w > 0.0)
            .map(|j| (start + j) as u32);
    }
    last
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    scan::argmax(logits)
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
        assert!((out.logprob.unwrap() - (2.0 - z.ln())).abs() < 1e-6);
        // Not asked for: not computed.
        let mut s = Sampler::new(params(|_| {}), &[]).unwrap();
        assert_eq!(s.sample(&[0.0, 2.0, 1.0]).logprob, None);
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

    /// The candidates a reference keeps: all tokens sorted by logit (ties: lower id), the
    /// first `top_k`, weights e^((l − max)/T) (the sampler's exponential, checked against f64
    /// in the scan's tests), those with w ≥ min_p, then, sorted by weight, the shortest prefix
    /// whose mass reaches `top_p` of the top-k's.
    fn reference_candidates(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        if p.top_k > 0 {
            ids.truncate(p.top_k);
        }
        let max = logits[ids[0] as usize];
        let w: Vec<f32> = ids
            .iter()
            .map(|&i| scan::exp_nonpositive((logits[i as usize] - max) * (1.0 / p.temperature)))
            .collect();
        let total: f64 = w.iter().map(|w| *w as f64).sum();
        let mut kept: Vec<(u32, f32)> = ids
            .iter()
            .zip(&w)
            .filter(|(_, w)| **w >= p.min_p)
            .map(|(i, w)| (*i, *w))
            .collect();
        kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let n = kept
                .iter()
                .position(|(_, w)| {
                    mass += *w as f64;
                    mass >= p.top_p as f64 * total
                })
                .map_or(kept.len(), |j| j + 1);
            kept.truncate(n);
        }
        let mut out: Vec<u32> = kept.into_iter().map(|(i, _)| i).collect();
        out.sort_unstable();
        out
    }

    /// The tokens truncation leaves for the draw.
    fn kept(s: &mut Sampler, logits: &[f32]) -> Vec<u32> {
        let best = scan::max(logits);
        let mut got: Vec<u32> = match s.truncate(logits, best) {
            Kept::Candidates(n) => s.candidates[..n].iter().map(|c| c.0).collect(),
            Kept::Weights => (0..logits.len() as u32)
                .filter(|&i| s.weights[i as usize] > 0.0)
                .collect(),
        };
        got.sort_unstable();
        got
    }

    #[test]
    fn truncation_keeps_exactly_the_reference_candidates() {
        // Deterministic pseudo-random logits over a 5000-token vocabulary, peaked and flat.
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        };
        for spread in [0.5f32, 4.0, 12.0] {
            let mut logits: Vec<f32> = (0..5000).map(|_| next() * spread).collect();
            logits[17] = logits[18]; // a tie
            for (top_k, top_p, min_p, temperature) in [
                (0, 0.9, 0.0, 1.0),
                (0, 0.5, 0.0, 0.7),
                (0, 0.999, 0.0, 1.3),
                (40, 0.95, 0.0, 1.0),
                (0, 1.0, 0.05, 1.0),
                (20, 1.0, 0.0, 1.0),
                (100, 0.8, 0.1, 0.6),
                (0, 0.3, 0.5, 2.0),
                (300, 0.9, 0.0, 1.0),
                (0, 0.999_999_9, 0.0, 1.0),
                (0, 0.95, 0.02, 0.8),
            ] {
                let p = params(|p| {
                    p.temperature = temperature;
                    p.top_k = top_k;
                    p.top_p = top_p;
                    p.min_p = min_p;
                });
                let expected = reference_candidates(&logits, &p);
                let mut s = Sampler::new(p.clone(), &[]).unwrap();
                assert_eq!(kept(&mut s, &logits), expected, "{p:?} spread {spread}");
                for _ in 0..50 {
                    let t = s.sample(&logits).token;
                    assert!(
                        expected.binary_search(&t).is_ok(),
                        "{t} drawn outside {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_nucleus_past_every_threshold_is_still_exact() {
        // One favourite and a tail each below the smallest threshold that together carry
        // more than 1 − top_p of the mass: the nucleus reaches into the tail.
        let mut logits = vec![-17.0f32; 5000];
        logits[0] = 0.0;
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.9999;
        });
        let expected = reference_candidates(&logits, &p);
        assert!(
            expected.len() > 1000 && expected.len() < 5000,
            "{}",
            expected.len()
        );
        let mut s = Sampler::new(p, &[]).unwrap();
        assert_eq!(kept(&mut s, &logits), expected);
    }

    #[test]
    fn draws_across_blocks_follow_the_weights() {
        // Four live tokens in different blocks of the sum (and the last, partial, one).
        let mut logits = vec![-200.0f32; 5000];
        let live = [(10usize, 1.0f64), (1500, 2.0), (3000, 3.0), (4999, 4.0)];
        for (t, w) in live {
            logits[t] = w.ln() as f32;
        }
        let mut s = Sampler::new(params(|p| p.temperature = 1.0), &[]).unwrap();
        let mut hits = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            let t = s.sample(&logits).token as usize;
            let k = live.iter().position(|l| l.0 == t).expect("a live token");
            hits[k] += 1;
        }
        for (k, (_, w)) in live.iter().enumerate() {
            let freq = hits[k] as f64 / n as f64;
            assert!((freq - w / 10.0).abs() < 0.015, "token {k}: {freq}");
        }
    }

    #[test]
    fn top_k_by_scan_matches_a_sort() {
        let logits: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 997) as f32 * 0.01)
            .collect();
        for k in [1, 5, 20, 256, 257, 1000] {
            let mut got = Vec::new();
            top_k(&logits, k, &mut got);
            let mut ids: Vec<u32> = (0..3000).collect();
            ids.sort_by(|a, b| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            });
            let want: Vec<u32> = ids[..k].to_vec();
            assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), want, "k {k}");
        }
        // Tokens ruled out (−∞) are never among them.
        let mut masked = vec![f32::NEG_INFINITY; 100];
        masked[7] = 1.0;
        let mut got = Vec::new();
        top_k(&masked, 5, &mut got);
        assert_eq!(got, vec![(7, 1.0)]);
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

    /// A bitset allowing `tokens` out of `vocab`.
    fn mask_of(tokens: &[u32], vocab: usize) -> Vec<u32> {
        let mut words = vec![0u32; vocab.div_ceil(32)];
        for &t in tokens {
            words[t as usize / 32] |= 1 << (t % 32);
        }
        words
    }

    #[test]
    fn a_mask_confines_every_mode_to_its_tokens() {
        let vocab = 100;
        // Logits that favour the masked-out tokens strongly.
        let logits: Vec<f32> = (0..vocab).map(|i| (i % 7) as f32).collect();
        let allowed = [3u32, 40, 77];
        let words = mask_of(&allowed, vocab);
        let modes = [
            params(|_| {}),
            params(|p| p.temperature = 1.0),
            params(|p| {
                p.temperature = 1.5;
                p.top_k = 5;
            }),
            params(|p| {
                p.temperature = 1.0;
                p.top_p = 0.5;
                p.min_p = 0.1;
            }),
            params(|p| {
                p.temperature = 1.0;
                p.repetition_penalty = 1.3;
                p.top_logprobs = 3;
            }),
        ];
        for p in modes {
            let mut s = Sampler::new(p.clone(), &[3]).unwrap();
            for _ in 0..200 {
                let out = s.sample_within(&logits, Some(TokenMask(&words)));
                assert!(allowed.contains(&out.token), "{p:?} picked {}", out.token);
            }
        }
        // Greedy under the mask is the argmax among the allowed: 40 % 7 = 5 is the largest.
        let mut s = Sampler::new(params(|_| {}), &[]).unwrap();
        assert_eq!(s.sample_within(&logits, Some(TokenMask(&words))).token, 40);
        // The log-probability stays the model's (unmasked) one, as documented.
        let mut s = Sampler::new(params(|p| p.logprobs = true), &[]).unwrap();
        let out = s.sample_within(&logits, Some(TokenMask(&words)));
        let lse = logits.iter().map(|l| (*l as f64).exp()).sum::<f64>().ln();
        assert!((out.logprob.unwrap() as f64 - (5.0 - lse)).abs() < 1e-4);
    }

    #[test]
    fn a_sparse_mask_draws_what_the_masked_vocabulary_draws() {
        // The reference: the whole vocabulary with every token the mask refuses at −∞.
        let vocab = 5000;
        let mut rng = Rng(99);
        for round in 0..4u64 {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| (rng.next_f64() * 12.0 - 6.0) as f32)
                .collect();
            let allowed: Vec<u32> = (0..vocab as u32)
                .filter(|_| rng.next_f64() < 0.02)
                .collect();
            let words = mask_of(&allowed, vocab);
            let refused: Vec<f32> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    if allowed.contains(&(i as u32)) {
                        l
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            for p in [
                params(|_| {}),
                params(|p| p.temperature = 1.0),
                params(|p| {
                    p.temperature = 0.7;
                    p.top_k = 20;
                    p.top_p = 0.9;
                }),
                params(|p| {
                    p.temperature = 1.0;
                    p.top_p = 0.5;
                }),
                params(|p| {
                    p.temperature = 1.2;
                    p.min_p = 0.05;
                    p.top_logprobs = 2;
                }),
            ] {
                let p = SamplingParams {
                    seed: Some(round),
                    ..p
                };
                let mut sparse = Sampler::new(p.clone(), &[]).unwrap();
                let mut dense = Sampler::new(p.clone(), &[]).unwrap();
                for _ in 0..300 {
                    let a = sparse.sample_within(&logits, Some(TokenMask(&words)));
                    let b = dense.sample(&refused);
                    assert_eq!(a.token, b.token, "{p:?}");
                    assert!(allowed.contains(&a.token));
                }
            }
        }
    }

    #[test]
    fn logit_bias_moves_the_choice_and_is_range_checked() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut s = Sampler::new(params(|p| p.logit_bias = vec![(0, 2.5)]), &[]).unwrap();
        assert_eq!(s.sample(&logits).token, 0); // 1 + 2.5 > 3
        let mut s = Sampler::new(params(|p| p.logit_bias = vec![(1, -100.0)]), &[]).unwrap();
        assert_eq!(s.sample(&logits).token, 2);
        // With temperature, a -100 bias all but bans: never drawn in 2000 draws.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 1.0;
                p.logit_bias = vec![(1, -100.0)];
            }),
            &[],
        )
        .unwrap();
        assert!((0..2000).all(|_| s.sample(&logits).token != 1));
        let err = Sampler::new(params(|p| p.logit_bias = vec![(2, 100.5)]), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("logit_bias"), "{err}");
    }
}
