//! The machine's arithmetic peak, measured with the instruction the products' inner loops
//! use — f32 FMA (`vfmadd` on 512- or 256-bit registers) for exact precision, `vdpbf16ps` for
//! fast — on every thread of the kernel pool at once. Measured, never assumed: Zen 4 runs
//! 512-bit FMAs at half the rate Zen 5 does, and a shared host's clock moves.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use super::pool::KernelPool;
use super::{Precision, SimdLevel, fast_available, simd_level};

/// Independent accumulators per thread: enough to cover the FMA latency on two pipes.
const CHAINS: usize = 12;

/// One loop of `iters` steps on one thread; returns a value the loop depends on (so it
/// cannot be optimised away) and the flops it did.
type PeakLoop = fn(u64) -> (f32, f64);

/// A measured peak and the instruction it was measured with.
#[derive(Debug, Clone, Copy)]
pub struct FlopPeak {
    pub flops_per_s: f64,
    pub instruction: &'static str,
}

/// The loop `precision`'s products run on this CPU.
fn peak_loop(precision: Precision) -> (PeakLoop, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if precision == Precision::Fast && fast_available() {
            // SAFETY (of the call inside): `fast_available` checked avx512bf16.
            return (|n| unsafe { x86::dpbf16_512(n) }, "avx512_bf16 vdpbf16ps");
        }
        match simd_level() {
            SimdLevel::Avx512 => return (|n| unsafe { x86::fma_512(n) }, "avx512f fma"),
            SimdLevel::Avx2 => return (|n| unsafe { x86::fma_256(n) }, "avx2 fma"),
            SimdLevel::Portable => {}
        }
    }
    let _ = (precision, fast_available, simd_level);
    (portable, "portable mul+add")
}

/// Timed passes of the peak loop on every thread of a pool. Passes can be interleaved with
/// the work they are compared to (a shared host moves between phases that halve its
/// arithmetic rate); the median of the passes since the last `clear` is the peak.
pub struct FlopPeakMeter {
    run: PeakLoop,
    instruction: &'static str,
    iters: u64,
    rates: Vec<f64>,
    sink: u32,
}

impl FlopPeakMeter {
    /// A meter for `precision`'s instruction whose passes last about `pass_seconds`
    /// (sized from a short probe).
    pub fn new(pool: &KernelPool, precision: Precision, pass_seconds: f64) -> Self {
        let (run, instruction) = peak_loop(precision);
        let mut meter = FlopPeakMeter {
            run,
            instruction,
            iters: 1 << 14,
            rates: Vec::new(),
            sink: 0,
        };
        let probe = meter.pass(pool);
        let per_iter = (run(2).1 - run(1).1) * pool.threads() as f64;
        meter.iters = (probe * pass_seconds / per_iter).max(1.0) as u64;
        meter.rates.clear();
        meter
    }

    /// One timed pass; returns its flops per second.
    pub fn pass(&mut self, pool: &KernelPool) -> f64 {
        let (run, iters) = (self.run, self.iters);
        let sink = AtomicU32::new(0);
        let flops = Mutex::new(0.0f64);
        let start = Instant::now();
        pool.for_each(pool.threads(), |_| {
            let (value, done) = run(iters);
            sink.fetch_add(value.to_bits() & 1, Ordering::Relaxed);
            if let Ok(mut f) = flops.lock() {
                *f += done;
            }
        });
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        self.sink = self.sink.wrapping_add(sink.into_inner());
        let rate = flops.into_inner().unwrap_or(0.0) / seconds;
        self.rates.push(rate);
        rate
    }

    /// The median of the passes since the last `clear`; `None` before the first.
    pub fn peak(&self) -> Option<FlopPeak> {
        std::hint::black_box(self.sink);
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        Some(FlopPeak {
            flops_per_s: *rates.get(rates.len() / 2)?,
            instruction: self.instruction,
        })
    }

    pub fn passes(&self) -> usize {
        self.rates.len()
    }

    pub fn clear(&mut self) {
        self.rates.clear();
    }
}

/// `CHAINS` chains of `a · x + b` on 8-wide arrays (the compiler vectorises what it can).
fn portable(iters: u64) -> (f32, f64) {
    let a = std::hint::black_box(0.999_9f32);
    let b = std::hint::black_box(1e-4f32);
    let mut acc = [[1.0f32; 8]; CHAINS];
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for x in chain.iter_mut() {
                *x = *x * a + b;
            }
        }
    }
    let value = acc.iter().flatten().sum();
    (value, iters as f64 * (CHAINS * 8 * 2) as f64)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// 16 lanes × 2 flops per FMA.
    #[target_feature(enable = "avx512f")]
    pub(super) fn fma_512(iters: u64) -> (f32, f64) {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_9));
        let b = _mm512_set1_ps(std::hint::black_box(1e-4));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        (
            _mm512_reduce_add_ps(sum),
            iters as f64 * (CHAINS * 32) as f64,
        )
    }

    /// 8 lanes × 2 flops per FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma_256(iters: u64) -> (f32, f64) {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_9));
        let b = _mm256_set1_ps(std::hint::black_box(1e-4));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        (lanes.iter().sum(), iters as f64 * (CHAINS * 16) as f64)
    }

    /// 16 lanes × 2 bf16 products × 2 flops per `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) fn dpbf16_512(iters: u64) -> (f32, f64) {
        let x = _mm512_set1_ps(std::hint::black_box(0.5));
        let pairs = _mm512_cvtne2ps_pbh(x, x);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, pairs, pairs);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        (
            _mm512_reduce_add_ps(sum),
            iters as f64 * (CHAINS * 64) as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_loop_counts_its_flops_and_a_peak_is_positive() {
        // The loops' flop counts against their arithmetic: one step more, CHAINS × lanes × 2
        // (× 2 for the bf16 pairs) flops more.
        for precision in [Precision::Exact, Precision::Fast] {
            let (run, name) = peak_loop(precision);
            let per_step = run(2).1 - run(1).1;
            let lanes = match name {
                "avx512f fma" => 16.0 * 2.0,
                "avx2 fma" | "portable mul+add" => 8.0 * 2.0,
                "avx512_bf16 vdpbf16ps" => 16.0 * 4.0,
                other => panic!("{other}"),
            };
            assert_eq!(per_step, CHAINS as f64 * lanes, "{name}");
            assert!(run(3).0.is_finite());
        }
        let pool = KernelPool::new(2);
        let mut meter = FlopPeakMeter::new(&pool, Precision::Exact, 0.002);
        assert!(meter.peak().is_none());
        for _ in 0..3 {
            meter.pass(&pool);
        }
        assert_eq!(meter.passes(), 3);
        let peak = meter.peak().unwrap();
        assert!(peak.flops_per_s.is_finite() && peak.flops_per_s > 0.0);
    }
}
