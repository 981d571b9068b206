//! `sluice-prefill`: a prefill worker process.

use clap::Parser;
use sluice_runtime::Role;
use sluice_runtime::cli::run_service;
use sluice_runtime::model_host::{ModelWorkerArgs, model_name};
use sluice_runtime::service_args::ServiceArgs;

#[derive(Parser)]
#[command(name = "sluice-prefill", version, about = "Sluice prefill worker")]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    model: ModelWorkerArgs,
    /// Prompt tokens per batch.
    #[arg(long, env = "SLUICE_MAX_BATCH_TOKENS", default_value_t = sluice_prefill::DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Prompts queued here; beyond it a new one is refused with RESOURCE_EXHAUSTED and the
    /// router tries another prefill worker.
    #[arg(long, env = "SLUICE_PREFILL_MAX_WAITING", default_value_t = sluice_prefill::DEFAULT_MAX_WAITING)]
    max_waiting: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = &args.service;
    run_service("sluice-prefill", &s.telemetry, args.model.threads, async {
        let plan = args.model.transport_plan()?;
        let start = s.start(50061).await?;
        let model = args
            .model
            .load(&s.model, start.membership.clone(), start.shutdown.clone())
            .await?;
        let mut config =
            sluice_prefill::PrefillConfig::new(s.worker_id(Role::Prefill)?, model_name(&s.model));
        config.advertise = s.advertise.clone();
        config.grammars = Some(sluice_runtime::grammar::GrammarCompiler::for_checkpoint(
            &s.model,
        )?);
        config.node = s.node();
        config.drain_timeout = s.drain_timeout();
        config.max_batch_tokens = args.max_batch_tokens;
        config.max_waiting = args.max_waiting;
        config.max_context = args.model.max_context;
        let transports = plan.senders(config.worker_id.as_str());
        sluice_prefill::run(
            start.listener,
            model,
            start.membership,
            transports,
            config,
            start.shutdown,
        )
        .await?;
        anyhow::Ok(())
    })
}
