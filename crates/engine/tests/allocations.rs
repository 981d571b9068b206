//! A decode step allocates nothing once warmed up: every temporary comes from the per-thread
//! scratch pools and the kernel pool dispatches without allocating. Counted with a counting
//! global allocator that sees every thread, so this binary runs without the test harness
//! (`harness = false`), whose own threads would allocate meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use sluice_engine::allocation_count::{CountingAllocator, counted};
use sluice_engine::backend::{Backend, CpuBackend, CpuOptions, Precision};
use sluice_engine::{CacheConfig, ExpertResidency, LogitsMode, Model, SeqChunk, WeightFormat};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const CASES: [&str; 5] = ["moe", "dense_tied", "next", "vl_fused", "bf16"];

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(case)
}

/// Prefills three sequences, warms up, then counts the allocations of each of `steps` decode
/// steps (block size 4: the counted steps cross block boundaries, which take new blocks).
fn decode_allocations<B: Backend>(model: &Model<B>, steps: usize) -> Vec<u64> {
    let vocab = model.spec().vocab;
    let mut cache = model
        .new_cache(CacheConfig {
            block_size: 4,
            num_blocks: 96,
            max_sequences: 3,
        })
        .unwrap();
    let seqs: Vec<sluice_engine::SeqId> = (0..3).map(|_| cache.add_sequence().unwrap()).collect();
    let prompts: [Vec<u32>; 3] = [
        (0..5).map(|i| (i * 7 % vocab) as u32).collect(),
        (0..9).map(|i| (i * 3 % vocab) as u32).collect(),
        vec![1, 2],
    ];
    let batch: Vec<SeqChunk<'_>> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&seq, p)| SeqChunk { seq, tokens: p })
        .collect();
    let mut logits = Vec::new();
    model
        .forward_into(&mut cache, &batch, LogitsMode::LastPerSequence, &mut logits)
        .unwrap();
    let mut next = vec![0u32; 3];
    let mut counts = Vec::new();
    for step in 0..8 + steps {
        for (n, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
            *n = sluice_engine::sampler::argmax(row);
        }
        let batch: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(&next)
            .map(|(&seq, t)| SeqChunk {
                seq,
                tokens: std::slice::from_ref(t),
            })
            .collect();
        let (out, count) = counted(|| {
            model.forward_into(&mut cache, &batch, LogitsMode::LastPerSequence, &mut logits)
        });
        out.unwrap();
        if step >= 8 {
            counts.push(count.allocations);
        }
    }
    counts
}

fn main() {
    a_warmed_up_decode_step_allocates_nothing();
    println!("a warmed-up decode step allocates nothing: ok");
}

fn a_warmed_up_decode_step_allocates_nothing() {
    // Two threads even on a one-core runner, so the pool's workers take part.
    let backend = |precision| {
        CpuBackend::new(CpuOptions {
            threads: Some(2),
            precision,
        })
    };
    let load = |case: &str, backend: CpuBackend| {
        Model::load_on(backend, &fixture(case), &ExpertResidency::All, |_, _| {}).unwrap()
    };
    let exact = backend(Precision::Exact);
    // rayon's threads (loading, int8 conversion) start now, not while steps are counted.
    rayon::broadcast(|_| ());
    // The counter sees allocations (else the zeros below would prove nothing).
    let (v, seen) = counted(|| std::hint::black_box(Vec::<u64>::with_capacity(100)));
    assert!(seen.allocations >= 1 && seen.bytes >= 800, "{seen:?}");
    drop(v);

    for case in CASES {
        for format in [WeightFormat::Checkpoint, WeightFormat::Int8] {
            let mut model = load(case, exact.clone());
            model.set_weight_format(format);
            let counts = decode_allocations(&model, 8);
            assert!(
                counts.iter().all(|&c| c == 0),
                "{case} ({format:?}): allocations per counted step {counts:?}"
            );
        }
    }
    let fast = backend(Precision::Fast);
    if fast.precision() == Precision::Fast {
        let model = load("bf16", fast);
        let counts = decode_allocations(&model, 8);
        assert!(counts.iter().all(|&c| c == 0), "bf16 fast: {counts:?}");
    } else {
        eprintln!("no AVX-512 BF16 here: fast precision's allocations were NOT checked");
    }
}
