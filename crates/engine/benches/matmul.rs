//! `cargo bench -p sluice-engine --bench matmul [-- --threads N]`: GFLOP/s of the CPU matmul
//! for decode (1 token) and prefill (many tokens) shapes, bf16 and f32 weights.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use sluice_engine::backend::cpu::aligned::AlignedBuffer;
use sluice_engine::backend::{Backend, CpuBackend, CpuOptions};
use sluice_engine::tensor::{Weight, WeightData, f32_to_bf16};

fn weight(rows: usize, cols: usize, bf16: bool) -> Weight {
    let mut s = 1u64;
    let vals: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let data = if bf16 {
        WeightData::BF16(vals.iter().map(|v| f32_to_bf16(*v)).collect())
    } else {
        WeightData::F32(vals)
    };
    Weight { rows, cols, data }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .map(|i| args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(2));
    let backend = CpuBackend::new(CpuOptions {
        threads,
        ..CpuOptions::default()
    });
    let matmul = |x: &[f32], w: &Weight, y: &mut [f32]| backend.matmul(x, w, y);
    println!("{}", backend.describe());
    // Decode from DRAM: cycle through 256 MiB of weights so no cache holds them.
    let ws: Vec<Weight> = (0..8).map(|_| weight(4096, 4096, true)).collect();
    let x = vec![0.25f32; 4096];
    let mut y = vec![0.0f32; 4096];
    let reps = 64;
    let start = Instant::now();
    for i in 0..reps {
        matmul(&x, &ws[i % ws.len()], &mut y);
    }
    let s = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "t=   1  4096x4096  bf16 × 8 (DRAM): {:8.3} ms  {:6.1} GB/s of weights",
        s * 1e3,
        ws[0].bytes() as f64 / s / 1e9
    );
    drop(ws);
    for &(t, rows, cols, bf16) in &[
        (1, 4096, 1024, true),
        (1, 1024, 4096, true),
        (32, 4096, 1024, true),
        (64, 4096, 1024, true),
        (512, 1024, 1024, true),
        (512, 4096, 1024, true),
        (512, 1024, 1024, false),
    ] {
        let w = weight(rows, cols, bf16);
        // Activations start on a cache line, as the model's (scratch) buffers do.
        let mut x = AlignedBuffer::zeroed(t * cols);
        x.fill(0.25);
        let mut y = vec![0.0f32; t * rows];
        matmul(&x, &w, &mut y);
        let reps = (2e9 / (2.0 * (t * rows * cols) as f64)).clamp(3.0, 2000.0) as usize;
        let start = Instant::now();
        for _ in 0..reps {
            matmul(&x, &w, &mut y);
        }
        let s = start.elapsed().as_secs_f64() / reps as f64;
        let gflops = 2.0 * (t * rows * cols) as f64 / s / 1e9;
        let gbs = w.bytes() as f64 / s / 1e9;
        println!(
            "t={t:4} {rows:5}x{cols:<5} {}: {:8.3} ms  {gflops:7.1} GFLOP/s  {gbs:6.1} GB/s of weights",
            if bf16 { "bf16" } else { "f32 " },
            s * 1e3
        );
    }
}
