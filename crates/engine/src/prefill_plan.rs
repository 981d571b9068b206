//! How prompts are cut into prefill steps: the one plan the generation loop, the prefill
//! worker, the decode worker's local prefill and `sluice bench` all follow. A prompt's cache
//! and logits depend on where its chunks end (the Gated DeltaNet chunked form and blocked
//! attention round per segment), so every path cuts at the same boundaries — multiples of
//! the chunk, counted from the prompt's first token — and a prompt gives the same bits
//! whichever service ran it, and wherever a preempted sequence resumes.

use std::ops::Range;

/// Tokens per prefill step of one prompt, unless a flag says otherwise.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillPlan {
    chunk: usize,
}

impl Default for PrefillPlan {
    fn default() -> Self {
        PrefillPlan::new(DEFAULT_PREFILL_CHUNK)
    }
}

impl PrefillPlan {
    /// Chunks of `chunk` tokens (at least one).
    pub fn new(chunk: usize) -> Self {
        PrefillPlan {
            chunk: chunk.max(1),
        }
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The prompt positions the next step feeds for a sequence with `cached` of its
    /// `prompt_len` prompt tokens cached: up to the next chunk boundary. Empty once the
    /// prompt is cached.
    pub fn next(&self, cached: usize, prompt_len: usize) -> Range<usize> {
        if cached >= prompt_len {
            return cached..cached;
        }
        cached..((cached / self.chunk + 1) * self.chunk).min(prompt_len)
    }

    /// Steps still to run before the prompt is cached.
    pub fn steps_left(&self, cached: usize, prompt_len: usize) -> usize {
        if cached >= prompt_len {
            return 0;
        }
        prompt_len.div_ceil(self.chunk) - cached / self.chunk
    }

    /// The whole prompt's steps, in order.
    pub fn chunks<'a>(&self, prompt: &'a [u32]) -> impl Iterator<Item = &'a [u32]> + 'a {
        prompt.chunks(self.chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stepping with `next` from any starting point lands on the same boundaries as
    /// `chunks` from the start, and takes `steps_left` steps.
    #[test]
    fn every_path_cuts_at_the_same_boundaries() {
        for chunk in [1, 3, 16, 512] {
            let plan = PrefillPlan::new(chunk);
            for len in [1, 2, 15, 16, 17, 40, 1030] {
                let prompt: Vec<u32> = (0..len as u32).collect();
                let mut whole = Vec::new();
                let mut at = 0;
                for part in plan.chunks(&prompt) {
                    at += part.len();
                    whole.push(at);
                }
                for start in [0, 1, chunk.min(len), len / 2, len] {
                    let (mut cached, mut steps, mut ends) = (start, 0, Vec::new());
                    while cached < len {
                        let feed = plan.next(cached, len);
                        assert!(!feed.is_empty() && feed.start == cached);
                        cached = feed.end;
                        ends.push(cached);
                        steps += 1;
                    }
                    assert_eq!(
                        steps,
                        plan.steps_left(start, len),
                        "chunk {chunk} len {len}"
                    );
                    let tail: Vec<usize> = whole.iter().copied().filter(|&e| e > start).collect();
                    assert_eq!(ends, tail, "chunk {chunk} len {len} from {start}");
                    assert!(plan.next(len, len).is_empty());
                }
            }
        }
        assert_eq!(PrefillPlan::new(0).chunk(), 1);
    }
}
