//! The machine's memory read bandwidth, measured the way a decode step reads weights: every
//! thread of the model's pool streams its share of a buffer far larger than the caches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sluice_engine::backend::cpu::pool::KernelPool;

/// Bytes read per pass; large enough that no cache level holds a meaningful part of it.
pub const DEFAULT_BYTES: usize = 1 << 30;

/// A measurement: the median of its passes (a shared machine has bursts both ways), and the
/// sum of what was read (so the reads cannot be optimised away, and a test can check them).
#[derive(Debug, Clone, Copy)]
pub struct ReadBandwidth {
    pub bytes_per_s: f64,
    pub checksum: u64,
}

/// Sums a chunk with eight independent accumulators (no dependency chain between loads).
fn sum_chunk(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut lanes = words.chunks_exact(8);
    for lane in &mut lanes {
        for (a, w) in acc.iter_mut().zip(lane) {
            *a = a.wrapping_add(*w);
        }
    }
    let tail = lanes
        .remainder()
        .iter()
        .fold(0u64, |s, w| s.wrapping_add(*w));
    acc.iter().fold(tail, |s, a| s.wrapping_add(*a))
}

/// A buffer far larger than the caches, read in timed passes. Its passes can be interleaved
/// with the work they are compared to, so a shared machine's slow and fast phases weigh on
/// both alike.
pub struct BandwidthReader {
    buffer: Vec<u64>,
    seconds: Vec<f64>,
    checksum: u64,
}

impl BandwidthReader {
    /// A buffer of `bytes` (rounded down to 8-byte words, at least 8 words).
    pub fn new(bytes: usize) -> Self {
        let words = (bytes / 8).max(8);
        // Written once so every page is mapped before the timed passes.
        let buffer = (0..words as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        BandwidthReader {
            buffer,
            seconds: Vec::new(),
            checksum: 0,
        }
    }

    /// One timed pass over the whole buffer on the model's kernel pool, one share per thread;
    /// returns its bytes per second.
    pub fn pass(&mut self, pool: &KernelPool) -> f64 {
        let words = self.buffer.len();
        let per_thread = words.div_ceil(pool.threads());
        let buffer = &self.buffer;
        let sum = AtomicU64::new(0);
        let start = Instant::now();
        pool.for_each(words.div_ceil(per_thread), |i| {
            let share = &buffer[i * per_thread..((i + 1) * per_thread).min(words)];
            sum.fetch_add(sum_chunk(share), Ordering::Relaxed);
        });
        let seconds = start.elapsed().as_secs_f64();
        self.seconds.push(seconds);
        self.checksum = sum.into_inner();
        (self.buffer.len() * 8) as f64 / seconds
    }

    /// The median of the passes so far; `None` before the first.
    pub fn result(&self) -> Option<ReadBandwidth> {
        let mut seconds = self.seconds.clone();
        seconds.sort_by(f64::total_cmp);
        let median = *seconds.get(seconds.len() / 2)?;
        Some(ReadBandwidth {
            bytes_per_s: (self.buffer.len() * 8) as f64 / median,
            checksum: self.checksum,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_word_of_the_buffer() {
        let words: u64 = 100_003; // not a multiple of the lanes or the threads
        let expected = (0..words).fold(0u64, |s, i| {
            s.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        });
        let mut reader = BandwidthReader::new(words as usize * 8);
        assert!(reader.result().is_none());
        let pool = KernelPool::new(3);
        reader.pass(&pool);
        reader.pass(&pool);
        let m = reader.result().unwrap();
        assert_eq!(m.checksum, expected);
        assert!(m.bytes_per_s.is_finite() && m.bytes_per_s > 0.0);
    }
}
