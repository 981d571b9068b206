//! `sluice-decode`: a decode worker process.

use std::net::SocketAddr;

use clap::Parser;
use sluice_runtime::model_host::{ExpertsMode, load_model, model_name};
use sluice_runtime::service_args::ServiceArgs;
use sluice_runtime::{Role, WorkerDirectory, WorkerId, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sluice-decode", version, about = "Sluice decode worker")]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Run the routed experts here (`local`) or on expert workers (`remote`).
    #[arg(long, env = "SLUICE_EXPERTS", value_enum, default_value_t = ExpertsMode::Local)]
    experts: ExpertsMode,
    /// Sequences decoded at once.
    #[arg(long, env = "SLUICE_MAX_SEQUENCES", default_value_t = 32)]
    max_sequences: usize,
    /// Longest sequence (prompt + output), in tokens.
    #[arg(long, env = "SLUICE_MAX_CONTEXT", default_value_t = 8192)]
    max_context: usize,
    /// Threads for the model's kernels (default: all cores).
    #[arg(long, env = "SLUICE_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.service.log_format);
    sluice_runtime::cli::configure_threads(args.threads)?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        let s = &args.service;
        let membership = s.membership().await?;
        let shutdown = CancellationToken::new();
        sluice_runtime::cli::cancel_on_signal(shutdown.clone());
        let directory = WorkerDirectory::start(membership.clone(), shutdown.clone()).await?;
        let model = load_model(&s.model, args.experts, Some(directory)).await?;
        let worker_id = match &s.worker_id {
            Some(id) => WorkerId::new(id.clone())?,
            None => WorkerId::generate(Role::Decode),
        };
        let mut config = sluice_decode::DecodeConfig::new(worker_id, model_name(&s.model));
        config.advertise = s.advertise.clone();
        config.max_sequences = args.max_sequences;
        config.max_context = args.max_context;
        let listen = s.listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 50071)));
        let listener = sluice_runtime::serve::bind(listen).await?;
        sluice_decode::run(listener, model, membership, None, config, shutdown).await?;
        anyhow::Ok(())
    })
}
