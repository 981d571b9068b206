//! `sluice-prefill`: a prefill worker process.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use sluice_runtime::model_host::{ExpertsMode, load_model, model_name};
use sluice_runtime::service_args::ServiceArgs;
use sluice_runtime::transport::TcpTransport;
use sluice_runtime::{CacheTransport, Role, WorkerDirectory, WorkerId, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sluice-prefill", version, about = "Sluice prefill worker")]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Run the routed experts here (`local`) or on expert workers (`remote`).
    #[arg(long, env = "SLUICE_EXPERTS", value_enum, default_value_t = ExpertsMode::Local)]
    experts: ExpertsMode,
    /// Prompt tokens per batch.
    #[arg(long, env = "SLUICE_MAX_BATCH_TOKENS", default_value_t = 4096)]
    max_batch_tokens: usize,
    /// Longest prompt accepted, in tokens.
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
            None => WorkerId::generate(Role::Prefill),
        };
        let mut config = sluice_prefill::PrefillConfig::new(worker_id, model_name(&s.model));
        config.advertise = s.advertise.clone();
        config.max_batch_tokens = args.max_batch_tokens;
        config.max_context = args.max_context;
        let listen = s.listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 50061)));
        let listener = sluice_runtime::serve::bind(listen).await?;
        let transports: Vec<Arc<dyn CacheTransport>> = vec![Arc::new(TcpTransport::default())];
        sluice_prefill::run(listener, model, membership, transports, config, shutdown).await?;
        anyhow::Ok(())
    })
}
