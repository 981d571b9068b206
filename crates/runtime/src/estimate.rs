//! What admission by time to first token is computed from: each worker's measured cost of a
//! forward step ([`StepCost`]), and the waits its queue implies ([`DecodeQueue`],
//! [`prefill_wait`]). Workers publish them in their load report; routers read them and add
//! the requests they sent since that report (which the worker had not counted yet).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// One forward step's cost as `fixed + per_token × tokens fed`, fitted online by least
/// squares over recent steps (exponentially weighted, so it follows a machine whose speed
/// changes). Hand-written: the fit is five running sums, no crate is worth it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepCost {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

/// The weight an observation keeps after each newer one (≈ the last 50 steps count).
const DECAY: f64 = 0.98;

impl StepCost {
    /// A step that fed `tokens` took `seconds`.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let x = tokens as f64;
        self.w = self.w * DECAY + 1.0;
        self.x = self.x * DECAY + x;
        self.y = self.y * DECAY + seconds;
        self.xx = self.xx * DECAY + x * x;
        self.xy = self.xy * DECAY + x * seconds;
    }

    /// `(fixed seconds, seconds per token)`, both ≥ 0; zeros before any step.
    pub fn coefficients(&self) -> (f64, f64) {
        if self.w <= 0.0 {
            return (0.0, 0.0);
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let cov = self.xy / self.w - mx * my;
        // Steps all of one size say nothing about the slope: the mean is the cost.
        if var <= 1e-9 * (mx * mx + 1.0) {
            return (my, 0.0);
        }
        let slope = cov / var;
        let fixed = my - slope * mx;
        if slope < 0.0 {
            (my, 0.0)
        } else if fixed < 0.0 {
            (0.0, if mx > 0.0 { my / mx } else { 0.0 })
        } else {
            (fixed, slope)
        }
    }
}

/// A step cost as published: seconds for a step feeding `tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostModel {
    pub fixed: f64,
    pub per_token: f64,
}

impl CostModel {
    pub fn seconds(&self, tokens: usize) -> f64 {
        self.fixed + self.per_token * tokens as f64
    }

    /// Seconds to prefill a prompt of `tokens` alone, in chunks of `chunk`.
    pub fn prefill_seconds(&self, tokens: usize, chunk: usize) -> f64 {
        let chunks = tokens.div_ceil(chunk.max(1)).max(1);
        self.fixed * chunks as f64 + self.per_token * tokens as f64
    }
}

impl From<&StepCost> for CostModel {
    fn from(c: &StepCost) -> Self {
        let (fixed, per_token) = c.coefficients();
        CostModel { fixed, per_token }
    }
}

/// A decode worker's slots, as the estimate sees them: how many steps each running sequence
/// still needs, and the steps of each waiting one (in the order they will start).
#[derive(Debug, Clone, Default)]
pub struct DecodeQueue {
    pub capacity: usize,
    pub running_steps: Vec<usize>,
    pub waiting_steps: Vec<usize>,
}

impl DecodeQueue {
    /// Steps until a sequence arriving now gets a slot: the slots free as running sequences
    /// finish, and the waiting ones take them first, oldest first.
    pub fn steps_to_start(&self) -> usize {
        let capacity = self.capacity.max(1);
        let mut free_at: BinaryHeap<Reverse<usize>> = self
            .running_steps
            .iter()
            .take(capacity)
            .map(|&s| Reverse(s))
            .collect();
        while free_at.len() < capacity {
            free_at.push(Reverse(0));
        }
        for &steps in &self.waiting_steps {
            if let Some(Reverse(t)) = free_at.pop() {
                free_at.push(Reverse(t + steps));
            }
        }
        free_at.peek().map_or(0, |Reverse(t)| *t)
    }

    /// Mean steps a sequence holds its slot (waiting ones first: they are what comes next).
    pub fn mean_hold_steps(&self) -> f64 {
        let list = if self.waiting_steps.is_empty() {
            &self.running_steps
        } else {
            &self.waiting_steps
        };
        if list.is_empty() {
            0.0
        } else {
            list.iter().sum::<usize>() as f64 / list.len() as f64
        }
    }
}

/// How long a prompt queued behind `queued_prompts` prompts of `queued_tokens` tokens (the
/// batch running included) waits for a prefill worker that batches `capacity` prompts of at
/// most `max_batch_tokens` tokens a step.
pub fn prefill_wait(
    queued_prompts: usize,
    queued_tokens: usize,
    capacity: usize,
    max_batch_tokens: usize,
    cost: CostModel,
) -> Duration {
    if queued_prompts == 0 {
        return Duration::ZERO;
    }
    let by_prompts = queued_prompts.div_ceil(capacity.max(1));
    let by_tokens = queued_tokens.div_ceil(max_batch_tokens.max(1));
    let batches = by_prompts.max(by_tokens).max(1);
    let seconds = batches as f64 * cost.fixed + cost.per_token * queued_tokens as f64;
    Duration::from_secs_f64(seconds.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_linear_cost_and_falls_back_on_one_size() {
        let mut c = StepCost::default();
        assert_eq!(c.coefficients(), (0.0, 0.0));
        for i in 0..200 {
            let tokens = 1 + (i * 37) % 500;
            c.observe(tokens, 0.020 + tokens as f64 / 50_000.0);
        }
        let (fixed, per_token) = c.coefficients();
        assert!((fixed - 0.020).abs() < 1e-6, "{fixed}");
        assert!((per_token - 1.0 / 50_000.0).abs() < 1e-9, "{per_token}");
        // Every step of one size: the mean, no slope.
        let mut same = StepCost::default();
        for _ in 0..10 {
            same.observe(32, 0.020);
        }
        let (fixed, per_token) = same.coefficients();
        assert!((fixed - 0.020).abs() < 1e-12 && per_token == 0.0);
    }

    #[test]
    fn a_new_sequence_starts_when_the_slots_ahead_of_it_free() {
        // Two slots: one free, one busy for 5 more steps.
        let q = DecodeQueue {
            capacity: 2,
            running_steps: vec![5],
            waiting_steps: vec![],
        };
        assert_eq!(q.steps_to_start(), 0);
        // A waiting sequence of 10 steps takes the free slot: the next waits 5 steps.
        let q = DecodeQueue {
            waiting_steps: vec![10],
            ..q
        };
        assert_eq!(q.steps_to_start(), 5);
        // Two more of 10: they take the slots at 5 and at 10; the next waits until 15.
        let q = DecodeQueue {
            waiting_steps: vec![10, 10, 10],
            ..q
        };
        assert_eq!(q.steps_to_start(), 15);
        assert_eq!(q.mean_hold_steps(), 10.0);
    }

    #[test]
    fn a_prefill_wait_counts_batches_and_tokens() {
        let cost = CostModel {
            fixed: 0.020,
            per_token: 0.001,
        };
        assert_eq!(prefill_wait(0, 0, 8, 4096, cost), Duration::ZERO);
        // 9 prompts of 10 tokens at 8 a batch: 2 batches, 90 tokens.
        let w = prefill_wait(9, 90, 8, 4096, cost).as_secs_f64();
        assert!((w - (0.040 + 0.090)).abs() < 1e-9, "{w}");
        // 2 prompts of 3000 tokens with 4096 tokens a batch: 2 batches by tokens.
        let w = prefill_wait(2, 6000, 8, 4096, cost).as_secs_f64();
        assert!((w - (0.040 + 6.0)).abs() < 1e-9, "{w}");
        assert!((cost.prefill_seconds(1000, 512) - (0.040 + 1.0)).abs() < 1e-9);
    }
}
