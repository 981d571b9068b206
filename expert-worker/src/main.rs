//! `sluice-expert`: an expert worker process.

use std::sync::Arc;

use clap::Parser;
use sluice_engine::{ExpertShard, shard_range};
use sluice_expert::{ExpertConfig, parse_shard, shard_from_placement};
use sluice_runtime::Role;
use sluice_runtime::cli::run_service;
use sluice_runtime::model_host::model_name;
use sluice_runtime::service_args::ServiceArgs;

#[derive(Parser)]
#[command(name = "sluice-expert", version, about = "Sluice expert worker")]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// The shard to host, INDEX/COUNT (experts split evenly and contiguously); default: this
    /// worker's entry in the cluster's expert placement.
    #[arg(long, env = "SLUICE_SHARD", value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Threads for the experts' kernels (default: all cores).
    #[arg(long, env = "SLUICE_THREADS")]
    threads: Option<usize>,
    /// `checkpoint` or `int8`: must match the prefill and decode workers' `--weights`.
    #[arg(long, env = "SLUICE_WEIGHTS", default_value = "checkpoint")]
    weights: sluice_engine::WeightFormat,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = &args.service;
    run_service("sluice-expert", &s.telemetry, args.threads, async {
        let start = s.start(50081).await?;
        let worker_id = s.worker_id(Role::Expert)?;
        let shard = match args.shard {
            Some(shard) => shard,
            None => shard_from_placement(start.membership.placement().await?.as_ref(), &worker_id)?,
        };
        let dir = s.model.clone();
        let experts = sluice_engine::config::load_spec(&dir)?
            .moe
            .map(|m| m.experts)
            .ok_or_else(|| {
                anyhow::anyhow!("{} has no MoE layers: no experts to host", dir.display())
            })?;
        let range = shard_range(experts, shard.0, shard.1)?;
        let weights = args.weights;
        let backend = sluice_engine::backend::CpuBackend::new(sluice_engine::backend::CpuOptions {
            threads: args.threads,
            ..Default::default()
        });
        let loaded = tokio::task::spawn_blocking(move || -> sluice_engine::Result<ExpertShard> {
            let mut shard = ExpertShard::load_on(backend, &dir, range)?;
            shard.set_weight_format(weights);
            Ok(shard)
        })
        .await??;
        let config = ExpertConfig {
            worker_id,
            advertise: s.advertise.clone(),
            model_name: model_name(&s.model),
            shard,
        };
        sluice_expert::run(
            start.listener,
            Arc::new(loaded),
            start.membership,
            config,
            start.shutdown,
        )
        .await?;
        anyhow::Ok(())
    })
}
