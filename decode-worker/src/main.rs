//! `sluice-decode`: a decode worker process.

use clap::Parser;
use sluice_runtime::Role;
use sluice_runtime::cli::run_service;
use sluice_runtime::model_host::{ModelWorkerArgs, model_name};
use sluice_runtime::service_args::ServiceArgs;

#[derive(Parser)]
#[command(name = "sluice-decode", version, about = "Sluice decode worker")]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    model: ModelWorkerArgs,
    #[command(flatten)]
    decode: sluice_decode::DecodeArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = &args.service;
    run_service("sluice-decode", &s.telemetry, args.model.threads, async {
        let transport = args.model.transport_plan()?;
        let start = s.start(50071).await?;
        let model = args
            .model
            .load(&s.model, start.membership.clone(), start.shutdown.clone())
            .await?;
        let mut config =
            sluice_decode::DecodeConfig::new(s.worker_id(Role::Decode)?, model_name(&s.model));
        config.advertise = s.advertise.clone();
        config.grammars = Some(sluice_runtime::grammar::GrammarCompiler::for_checkpoint(
            &s.model,
        )?);
        config.node = s.node();
        config.drain_timeout = s.drain_timeout();
        args.decode.apply(&mut config);
        config.max_context = args.model.max_context;
        config.transport = transport;
        sluice_decode::run(
            start.listener,
            model,
            start.membership,
            None,
            config,
            start.shutdown,
        )
        .await?;
        anyhow::Ok(())
    })
}
