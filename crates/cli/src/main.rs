//! `sluice`: the command-line front door. `up` runs a whole cluster in one process;
//! `generate` runs the engine in-process or calls an endpoint; `load` load-tests a router;
//! `logits`, `synth` and `bench` work on the engine directly.

mod bench;
mod generate;
mod load;
mod logits;
mod model_source;
mod progress;
mod read_bandwidth;
mod remote;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_engine::Preset;

#[global_allocator]
static ALLOCATOR: sluice_engine::allocation_count::CountingAllocator =
    sluice_engine::allocation_count::CountingAllocator;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Serve Qwen3.5-class models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run router, prefill, decode and expert workers in one process until Ctrl-C.
    Up(up::UpArgs),
    /// Generate tokens for one prompt (locally, or through --endpoint).
    Generate(generate::GenerateArgs),
    /// Load-test a router: TTFT, inter-token latency, throughput, errors and goodput.
    Load(load::LoadArgs),
    /// Print the logits of every position of one forward pass.
    Logits(logits::LogitsArgs),
    /// Write a deterministic synthetic checkpoint in the Hugging Face layout.
    Synth(SynthArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct SynthArgs {
    /// tiny, small or bench.
    #[arg(long, env = "SLUICE_PRESET")]
    preset: Preset,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The API key `sluice generate --endpoint` and `sluice load` send, from `SLUICE_API_KEY`
/// (an environment variable only, so that no key shows in a process list).
fn api_key() -> Option<String> {
    std::env::var("SLUICE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Load(args) => load::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Synth(args) => model_source::synth(args.preset, &args.out, args.seed),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`sluice logits ... | head`) is the reader's choice, not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
