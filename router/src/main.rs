//! `sluice-router`: the router process.

use std::time::Duration;

use clap::Parser;
use sluice_router::RouterConfig;
use sluice_runtime::cli::run_service;
use sluice_runtime::service_args::ServiceArgs;

#[derive(Parser)]
#[command(
    name = "sluice-router",
    version,
    about = "Sluice router: the public gRPC API"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Requests running at once; more wait in the queue.
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// Requests waiting; beyond this they are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLUICE_MAX_QUEUE", default_value_t = 1024)]
    max_queue: usize,
    /// Prompt + output tokens accepted.
    #[arg(long, env = "SLUICE_MAX_CONTEXT", default_value_t = 8192)]
    max_context: usize,
    /// Most `max_tokens` a request may ask for.
    #[arg(long, env = "SLUICE_MAX_TOKENS_LIMIT", default_value_t = 4096)]
    max_tokens_limit: usize,
    /// Deadline (seconds) for requests whose caller sets none.
    #[arg(long, env = "SLUICE_DEFAULT_DEADLINE", default_value_t = 600)]
    default_deadline: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = &args.service;
    run_service(s.log_format, None, async {
        let start = s.start(50051).await?;
        let mut config = RouterConfig::new(s.model.clone());
        config.max_in_flight = args.max_in_flight;
        config.max_queue = args.max_queue;
        config.max_context = args.max_context;
        config.max_tokens_limit = args.max_tokens_limit;
        config.default_deadline = Duration::from_secs(args.default_deadline);
        sluice_router::run(start.listener, start.membership, config, start.shutdown).await?;
        anyhow::Ok(())
    })
}
