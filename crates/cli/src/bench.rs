//! `sluice bench`: prefill and decode speed on one model, batch 1 or more, against the
//! machine's own read bandwidth and arithmetic peak measured in the same run: prefill as a
//! fraction of the peak, each decode step against its bound, max(bytes ÷ bandwidth, flops ÷
//! peak).

use std::time::Instant;

use anyhow::{Result, ensure};
use serde_json::json;
use sluice_engine::backend::cpu::flop_peak::FlopPeakMeter;
use sluice_engine::backend::{Backend, BackendInfo};
use sluice_engine::sampler::{Sampler, SamplingParams, argmax};
use sluice_engine::{CacheConfig, LogitsMode, Model, ModelCache, PrefillPlan, SeqChunk};

use crate::model_source::ModelArgs;
use sluice_engine::allocation_count as allocations;

/// Decode steps whose allocations are counted, after the timed ones.
const COUNTED_STEPS: usize = 3;
/// A read-bandwidth pass before every this many timed decode steps...
const BANDWIDTH_EVERY: usize = 8;
/// ...and at least this many passes in all.
const MIN_BANDWIDTH_PASSES: usize = 3;
/// Passes of the arithmetic-peak measurement after the prefill (the median is kept; during
/// decode one runs with each bandwidth pass), and each one's length.
const PEAK_PASSES: usize = 7;
const PEAK_PASS_SECONDS: f64 = 0.03;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens per sequence for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded per sequence for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_len: usize,
    /// Context already in the cache when decoding starts.
    #[arg(long, default_value_t = 128)]
    pub decode_context: usize,
    /// Sequences run together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed prefill passes after the first (cold) one; the median is reported, as a server
    /// prefills with its buffers and caches already in use.
    #[arg(long, default_value_t = 3)]
    pub prefill_runs: usize,
    /// Prompt tokens per prefill step of one sequence, as the services cut them.
    #[arg(long, default_value_t = sluice_engine::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// How each decode step picks every sequence's next token; the time it takes is reported
    /// apart, as a share of the step.
    #[arg(long, value_enum, default_value_t = BenchSampling::Greedy)]
    pub sampling: BenchSampling,
    /// Bytes the read-bandwidth measurement streams per pass (0: skip it).
    #[arg(long, default_value_t = crate::read_bandwidth::DEFAULT_BYTES)]
    pub bandwidth_bytes: usize,
    #[arg(long)]
    pub json: bool,
}

/// The samplers `sluice bench --sampling` runs a decode step with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchSampling {
    /// The largest logit (what the services do at temperature 0).
    Greedy,
    /// Qwen3.5's recommended sampling: temperature 0.6, top_p 0.95, top_k 20.
    Qwen,
    /// Temperature 1 and top_p 0.95 without top_k: the nucleus weighed over the whole vocabulary.
    Nucleus,
}

impl BenchSampling {
    fn params(self) -> Option<SamplingParams> {
        let (temperature, top_p, top_k) = match self {
            BenchSampling::Greedy => return None,
            BenchSampling::Qwen => (0.6, 0.95, 20),
            BenchSampling::Nucleus => (1.0, 0.95, 0),
        };
        Some(SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(0),
            ..SamplingParams::default()
        })
    }
}

/// Deterministic pseudo-random prompt tokens, avoiding the special ids at the top.
fn prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1d ^ salt;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (vocab.saturating_sub(3).max(1)) as u64) as u32
        })
        .collect()
}

/// Prefills every prompt, all of them in each step, cut as `plan` says (equal lengths: the
/// prompts finish together); returns the last step's logits, one row per prompt.
fn prefill(
    model: &Model,
    plan: PrefillPlan,
    cache: &mut ModelCache,
    seqs: &[sluice_engine::SeqId],
    prompts: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let len = prompts.first().map_or(0, Vec::len);
    let (mut cached, mut logits) = (0, Vec::new());
    while cached < len {
        let feed = plan.next(cached, len);
        let batch: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(prompts)
            .map(|(&seq, p)| SeqChunk {
                seq,
                tokens: &p[feed.clone()],
            })
            .collect();
        model.forward_into(cache, &batch, LogitsMode::LastPerSequence, &mut logits)?;
        cached = feed.end;
    }
    Ok(logits)
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(
        args.batch > 0 && args.prompt_len > 0 && args.gen_len > 0,
        "lengths and batch must be at least 1"
    );
    let load_start = Instant::now();
    let (dir, model) = args.model.load()?;
    let load_s = load_start.elapsed().as_secs_f64();
    let vocab = model.spec().vocab;
    let b = args.batch;
    let plan = PrefillPlan::new(args.prefill_chunk);
    let tokens = args
        .prompt_len
        .max(args.decode_context + args.gen_len + COUNTED_STEPS + 1);
    let mut cache = model.new_cache(CacheConfig::for_sequences(2 * b, tokens))?;

    // Prefill: b prompts in one step; the first pass is cold (pages of buffers and cache
    // touched for the first time), the next ones are what a running server sees.
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| prompt(args.prompt_len, vocab, i as u64))
        .collect();
    let mut prefill_s = Vec::with_capacity(args.prefill_runs + 1);
    for _ in 0..=args.prefill_runs {
        let seqs: Vec<sluice_engine::SeqId> = (0..b)
            .map(|_| cache.add_sequence())
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        prefill(&model, plan, &mut cache, &seqs, &prompts)?;
        prefill_s.push(start.elapsed().as_secs_f64());
        seqs.iter().for_each(|&s| cache.release(s));
    }
    let cold_prefill_s = prefill_s.remove(0);
    prefill_s.sort_by(f64::total_cmp);
    let warm_prefill_s = prefill_s.get(prefill_s.len() / 2).copied();
    // The arithmetic peak of these minutes, with the instruction this precision's products
    // use, right after the prefill it is compared to.
    let pool = model.backend().pool();
    let mut peak_meter = FlopPeakMeter::new(
        pool,
        model.backend().describe().precision,
        PEAK_PASS_SECONDS,
    );
    for _ in 0..PEAK_PASSES {
        peak_meter.pass(pool);
    }
    let prefill_peak = peak_meter.peak();
    // The decode steps are compared with the passes taken between them (below).
    peak_meter.clear();

    // Decode: b sequences with `decode_context` tokens cached, one token each per step.
    let contexts: Vec<Vec<u32>> = (0..b)
        .map(|i| prompt(args.decode_context.max(1), vocab, 1000 + i as u64))
        .collect();
    let seqs: Vec<sluice_engine::SeqId> = (0..b)
        .map(|_| cache.add_sequence())
        .collect::<Result<_, _>>()?;
    let logits = prefill(&model, plan, &mut cache, &seqs, &contexts)?;
    let mut next: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    let mut logits = Vec::new();
    let mut samplers: Option<Vec<Sampler>> = args
        .sampling
        .params()
        .map(|params| {
            contexts
                .iter()
                .map(|context| Sampler::new(params.clone(), context))
                .collect::<Result<_, _>>()
        })
        .transpose()?;
    // Seconds the timed steps spent picking tokens (part of the step's time).
    let mut sample_s = 0.0;
    // One decode step; with `count`, the model's allocations in it (the bench's own
    // bookkeeping around the step is not counted). Returns the seconds spent sampling.
    let mut step =
        |next: &mut Vec<u32>, count: bool| -> Result<(allocations::AllocationCount, f64)> {
            let batch: Vec<SeqChunk<'_>> = seqs
                .iter()
                .zip(next.iter())
                .map(|(&seq, t)| SeqChunk {
                    seq,
                    tokens: std::slice::from_ref(t),
                })
                .collect();
            let mode = LogitsMode::LastPerSequence;
            let (out, allocated) = if count {
                allocations::counted(|| model.forward_into(&mut cache, &batch, mode, &mut logits))
            } else {
                let out = model.forward_into(&mut cache, &batch, mode, &mut logits);
                (out, allocations::AllocationCount::default())
            };
            out?;
            let sampling = Instant::now();
            match samplers.as_mut() {
                None => {
                    for (n, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
                        *n = argmax(row);
                    }
                }
                Some(samplers) => {
                    for ((n, row), sampler) in next
                        .iter_mut()
                        .zip(logits.chunks_exact(vocab))
                        .zip(samplers.iter_mut())
                    {
                        *n = sampler.sample(row).token;
                    }
                }
            }
            Ok((allocated, sampling.elapsed().as_secs_f64()))
        };
    // The read-bandwidth passes run between decode steps (untimed for decode), so the roofline
    // compares the steps with the bandwidth of the same minutes: this machine's host moves
    // between phases that change both by a third.
    let mut reader = (args.bandwidth_bytes > 0)
        .then(|| crate::read_bandwidth::BandwidthReader::new(args.bandwidth_bytes));
    let mut decode_s = 0.0;
    // Each pass and the steps after it: (bytes/s of the pass, seconds of the steps, steps).
    let mut windows: Vec<(f64, f64, usize)> = Vec::new();
    for i in 0..args.gen_len {
        if i % BANDWIDTH_EVERY == 0
            && let Some(reader) = reader.as_mut()
        {
            windows.push((reader.pass(model.backend().pool()), 0.0, 0));
        }
        if i % BANDWIDTH_EVERY == 0 {
            peak_meter.pass(model.backend().pool());
        }
        let start = Instant::now();
        let (_, sampling) = step(&mut next, false)?;
        let seconds = start.elapsed().as_secs_f64();
        decode_s += seconds;
        sample_s += sampling;
        if let Some(window) = windows.last_mut() {
            window.1 += seconds;
            window.2 += 1;
        }
    }
    if let Some(reader) = reader.as_mut() {
        for _ in 0..MIN_BANDWIDTH_PASSES.saturating_sub(args.gen_len.div_ceil(BANDWIDTH_EVERY)) {
            reader.pass(model.backend().pool());
        }
    }
    // Allocations of a few more steps, counted apart from the timed ones (counting slows a
    // heavily allocating step down).
    let mut allocated = allocations::AllocationCount::default();
    for _ in 0..COUNTED_STEPS {
        let (step, _) = step(&mut next, true)?;
        allocated.allocations += step.allocations;
        allocated.bytes += step.bytes;
    }
    let per_step = Some((
        allocated.allocations as f64 / COUNTED_STEPS as f64,
        allocated.bytes as f64 / COUNTED_STEPS as f64,
    ));
    // What one decode step must read at least: the active weights once, plus each sequence's
    // state (KV of its context, DeltaNet and conv states) — the roofline's numerator.
    let state_bytes: usize = cache
        .layout(args.decode_context + args.gen_len / 2)
        .regions
        .iter()
        .map(|r| r.elements * 4)
        .sum();
    let step_bytes = model.active_weight_bytes() + b * state_bytes;
    let bandwidth = reader.and_then(|r| r.result()).map(|m| {
        std::hint::black_box(m.checksum);
        m.bytes_per_s
    });

    let prefill_tokens = (b * args.prompt_len) as f64;
    let cold_prefill_tps = prefill_tokens / cold_prefill_s;
    let prefill_tps = warm_prefill_s.map_or(cold_prefill_tps, |s| prefill_tokens / s);
    let decode_tps = (b * args.gen_len) as f64 / decode_s;
    let step_ms = decode_s * 1000.0 / args.gen_len as f64;
    let sample_ms = sample_s * 1000.0 / args.gen_len as f64;
    let weight_gbs = model.active_weight_bytes() as f64 / (step_ms / 1000.0) / 1e9;
    let read_gbs = step_bytes as f64 / (step_ms / 1000.0) / 1e9;
    // Decode tok/s as a fraction of what the bandwidth allows for this batch: per window (a
    // pass and the steps right after it, so a change of the host's phase between windows
    // moves both sides), then the median; and over the whole run against the median pass.
    let mut fractions: Vec<f64> = windows
        .iter()
        .map(|&(bw, seconds, steps)| step_bytes as f64 * steps as f64 / seconds / bw)
        .collect();
    fractions.sort_by(f64::total_cmp);
    let roofline = fractions.get(fractions.len() / 2).copied();
    let roofline_whole_run = bandwidth.map(|bw| read_gbs * 1e9 / bw);
    let roofline_tps = bandwidth.map(|bw| bw / step_bytes as f64 * b as f64);
    // Two flops per active weight per token (attention's own flops aside).
    let active_params = (model.active_weight_bytes() / model.dtype().size()) as f64;
    let prefill_gflops = 2.0 * active_params * prefill_tps / 1e9;
    for _ in peak_meter.passes()..MIN_BANDWIDTH_PASSES {
        peak_meter.pass(model.backend().pool());
    }
    let (Some(prefill_peak), Some(decode_peak)) = (prefill_peak, peak_meter.peak()) else {
        anyhow::bail!("no arithmetic-peak pass ran");
    };
    let peak_gflops = prefill_peak.flops_per_s / 1e9;
    let decode_peak_gflops = decode_peak.flops_per_s / 1e9;
    let prefill_peak_fraction = prefill_gflops / peak_gflops;
    // A decode step's bound: what it must read at the measured bandwidth, or what it must
    // compute at the measured peak, whichever takes longer.
    let flop_bound_ms = 2.0 * active_params * b as f64 / decode_peak.flops_per_s * 1e3;
    let byte_bound_ms = bandwidth.map(|bw| step_bytes as f64 / bw * 1e3);
    let bound_ms = byte_bound_ms.map_or(flop_bound_ms, |m| m.max(flop_bound_ms));
    let bound_by = if byte_bound_ms.is_some_and(|m| m >= flop_bound_ms) {
        "bytes"
    } else {
        "flops"
    };
    let rss = peak_rss_bytes();
    let BackendInfo {
        threads,
        kernel,
        precision,
        ..
    } = model.backend().describe();
    if args.json {
        println!(
            "{}",
            json!({
                "model": dir.display().to_string(),
                "dtype": model.dtype().to_string(),
                "threads": threads,
                "kernel": kernel,
                "precision": precision.to_string(),
                "batch": b,
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "decode_context": args.decode_context,
                "load_s": load_s,
                "prefill_tok_s": prefill_tps,
                "prefill_cold_tok_s": cold_prefill_tps,
                "prefill_runs": args.prefill_runs,
                "decode_tok_s": decode_tps,
                "decode_step_ms": step_ms,
                "sampling": format!("{:?}", args.sampling).to_lowercase(),
                "sampling_ms_per_step": sample_ms,
                "sampling_share_of_step": sample_ms / step_ms,
                "active_weight_bytes": model.active_weight_bytes(),
                "weight_read_gb_s": weight_gbs,
                "step_read_bytes": step_bytes,
                "step_read_gb_s": read_gbs,
                "machine_read_gb_s": bandwidth.map(|bw| bw / 1e9),
                "roofline_tok_s": roofline_tps,
                "roofline_fraction": roofline,
                "roofline_windows": fractions.len(),
                "roofline_fraction_whole_run": roofline_whole_run,
                "prefill_gflop_s": prefill_gflops,
                "machine_peak_gflop_s": peak_gflops,
                "machine_peak_gflop_s_decode": decode_peak_gflops,
                "peak_instruction": prefill_peak.instruction,
                "prefill_peak_fraction": prefill_peak_fraction,
                "step_bound_ms": bound_ms,
                "step_bound_by": bound_by,
                "step_byte_bound_ms": byte_bound_ms,
                "step_flop_bound_ms": flop_bound_ms,
                "step_bound_fraction": bound_ms / step_ms,
                "decode_allocations_per_step": per_step.map(|p| p.0),
                "decode_allocated_bytes_per_step": per_step.map(|p| p.1),
                "peak_rss_bytes": rss,
            })
        );
    } else {
        println!(
            "model        {} ({}, {threads} threads, {kernel} kernels, {precision} precision)",
            dir.display(),
            model.dtype()
        );
        println!("load         {load_s:.2} s");
        println!(
            "prefill      {prefill_tps:.1} tok/s ({b} × {} tokens, {prefill_gflops:.1} GFLOP/s; median of {} after a cold pass at {cold_prefill_tps:.1} tok/s)",
            args.prompt_len, args.prefill_runs
        );
        println!(
            "decode       {decode_tps:.2} tok/s ({b} × {} tokens after {}; {step_ms:.1} ms/step)",
            args.gen_len, args.decode_context
        );
        println!(
            "sampling     {sample_ms:.2} ms/step ({:.1}% of the step; {:?}, {b} rows)",
            100.0 * sample_ms / step_ms,
            args.sampling
        );
        println!(
            "weights read {weight_gbs:.1} GB/s per decode step (active weights {:.2} GB)",
            model.active_weight_bytes() as f64 / 1e9
        );
        if let (Some(bw), Some(fraction), Some(whole), Some(tps)) =
            (bandwidth, roofline, roofline_whole_run, roofline_tps)
        {
            println!(
                "roofline     {fraction:.2} of it (median of {} windows; {whole:.2} over the whole run): {read_gbs:.1} of {:.1} GB/s measured here ({:.2} MB per step; {tps:.1} tok/s at the roofline)",
                fractions.len(),
                bw / 1e9,
                step_bytes as f64 / 1e6
            );
        }
        println!(
            "peak         {peak_gflops:.1} GFLOP/s measured here ({}, {threads} threads; {decode_peak_gflops:.1} between the decode steps); prefill is {prefill_peak_fraction:.2} of it",
            prefill_peak.instruction
        );
        println!(
            "bound        {bound_ms:.1} ms/step by {bound_by} (bytes {}, flops {flop_bound_ms:.1} ms); the step is {:.2} of it",
            byte_bound_ms.map_or("not measured".to_string(), |m| format!("{m:.1} ms")),
            bound_ms / step_ms
        );
        if let Some((count, bytes)) = per_step {
            println!(
                "allocations  {count:.0} per decode step after warm-up ({:.2} MB)",
                bytes / 1e6
            );
        }
        if let Some(rss) = rss {
            println!("peak RSS     {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
        }
    }
    Ok(())
}
