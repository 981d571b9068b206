//! `sluice up`: router, prefill, decode and expert workers in one process, each role on its own
//! loopback gRPC port, with embedded membership and in-process cache transfer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice_engine::{ExpertShard, LanguageModel, shard_range};
use sluice_runtime::model_host::{EngineArgs, EngineKind, ExpertsMode, load_model, model_name};
use sluice_runtime::telemetry::{self, TelemetryArgs};
use sluice_runtime::transport::{InProcessHub, InProcessTransport, TcpTransport};
use sluice_runtime::{
    CacheTransport, EmbeddedMembership, Membership, Role, WorkerDirectory, WorkerId,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::model_source::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// Expert workers (shards of the MoE experts); 0 keeps the experts in the model workers.
    #[arg(long, default_value_t = 0)]
    pub experts: usize,
    /// Address of the public gRPC API.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API, /health and /metrics.
    #[arg(long, env = "SLUICE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Serve gRPC only.
    #[arg(long, env = "SLUICE_NO_HTTP")]
    pub no_http: bool,
    /// Serve no gRPC server reflection.
    #[arg(long, env = "SLUICE_NO_REFLECTION")]
    pub no_reflection: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub router: sluice_router::args::RouterArgs,
    #[command(flatten)]
    pub decode_batching: sluice_decode::DecodeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

pub fn run(args: UpArgs) -> Result<()> {
    if args.prefill == 0 || args.decode == 0 {
        bail!("--prefill and --decode must each be at least 1");
    }
    let mock = args.engine.engine == EngineKind::Mock;
    if mock && args.experts > 0 {
        bail!("--engine mock has no experts to place: drop --experts");
    }
    if args.no_reflection {
        sluice_runtime::serve::disable_reflection();
    }
    let backend = args.model.open_backend()?;
    let dir = args.model.resolve()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let telemetry = {
        let _context = runtime.enter();
        telemetry::init(&args.telemetry, "sluice")?
    };
    let outcome = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        sluice_runtime::cli::cancel_on_signal(shutdown.clone());
        let membership: Arc<dyn Membership> = Arc::new(EmbeddedMembership::new("local"));
        let hub = Arc::new(InProcessHub::default());
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        let name = model_name(&dir);

        if args.experts > 0 {
            let spec = sluice_engine::config::load_spec(&dir)?;
            let total = spec.moe.map(|m| m.experts).context("--experts needs a MoE model")?;
            for i in 0..args.experts {
                let range = shard_range(total, i, args.experts)?;
                let d = dir.clone();
                let weights = args.model.weights;
                let backend = backend.clone();
                let shard = tokio::task::spawn_blocking(move || -> sluice_engine::Result<ExpertShard> {
                    let mut shard = ExpertShard::load_on(backend, &d, range)?;
                    shard.set_weight_format(weights);
                    Ok(shard)
                })
                .await??;
                let config = sluice_expert::ExpertConfig {
                    worker_id: WorkerId::generate(Role::Expert),
                    advertise: None,
                    model_name: name.clone(),
                    shard: (i, args.experts),
                };
                let listener = sluice_runtime::serve::bind(SocketAddr::from(LOOPBACK)).await?;
                let (m, s) = (membership.clone(), shutdown.clone());
                tasks.spawn(async move { Ok(sluice_expert::run(listener, Arc::new(shard), m, config, s).await?) });
            }
        }
        let directory = WorkerDirectory::start(membership.clone(), shutdown.clone()).await?;
        let mode = if args.experts > 0 { ExpertsMode::Remote } else { ExpertsMode::Local };
        // One copy of the weights serves every prefill and decode worker of the process; a
        // mock per worker, since each keeps its own step cadence.
        let real = if mock { None } else { Some(load_model(backend, &dir, mode, args.model.weights, Some((directory.clone(), Default::default()))).await?) };
        let model_for_worker = || -> Result<Arc<dyn LanguageModel>> {
            Ok(match &real {
                Some(m) => m.clone(),
                None => args.engine.mock(&dir)?,
            })
        };
        // One compiler (one vocabulary trie) for every worker of the process.
        let grammars = sluice_runtime::grammar::GrammarCompiler::for_checkpoint(&dir)?;
        for _ in 0..args.decode {
            let mut config = sluice_decode::DecodeConfig::new(WorkerId::generate(Role::Decode), name.clone());
            config.grammars = Some(grammars.clone());
            args.decode_batching.apply(&mut config);
            config.max_context = args.router.max_context;
            let listener = sluice_runtime::serve::bind(SocketAddr::from(LOOPBACK)).await?;
            let (m, s, h, md) = (membership.clone(), shutdown.clone(), hub.clone(), model_for_worker()?);
            tasks.spawn(async move { Ok(sluice_decode::run(listener, md, m, Some(h), config, s).await?) });
        }
        for _ in 0..args.prefill {
            let mut config = sluice_prefill::PrefillConfig::new(WorkerId::generate(Role::Prefill), name.clone());
            config.grammars = Some(grammars.clone());
            config.max_context = args.router.max_context;
            let listener = sluice_runtime::serve::bind(SocketAddr::from(LOOPBACK)).await?;
            let transports: Vec<Arc<dyn CacheTransport>> = vec![
                Arc::new(InProcessTransport::new(hub.clone())),
                Arc::new(TcpTransport::default()),
            ];
            let (m, s, md) = (membership.clone(), shutdown.clone(), model_for_worker()?);
            tasks.spawn(async move { Ok(sluice_prefill::run(listener, md, m, transports, config, s).await?) });
        }
        let listener = sluice_runtime::serve::bind(args.listen).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let http = if args.no_http { None } else { Some(sluice_runtime::serve::bind(args.http_listen).await?) };
        let http_endpoint = match &http {
            Some(l) => Some(format!("http://{}/v1", l.local_addr()?)),
            None => None,
        };
        let mut router_config = sluice_router::RouterConfig::new(dir.clone());
        args.router.apply(&mut router_config);
        router_config.api_keys = args.router.api_keys()?;
        router_config.grammars = Some(grammars.clone());
        {
            let (m, s) = (membership.clone(), shutdown.clone());
            // The internal status service on a loopback port of its own.
            let status = sluice_runtime::serve::bind(SocketAddr::from(LOOPBACK)).await?;
            tasks.spawn(async move { Ok(sluice_router::run(listener, http, status, m, router_config, s).await?) });
        }
        wait_for_workers(&directory, &args, &mut tasks).await?;
        let engine = if mock { ", mock engine" } else { "" };
        println!(
            "sluice up: serving {name} at {endpoint} (gRPC; {} prefill, {} decode, {} expert workers{engine}); Ctrl-C to stop",
            args.prefill, args.decode, args.experts
        );
        if let Some(http) = http_endpoint {
            println!("sluice up: OpenAI-compatible HTTP at {http} (/health and /metrics beside it)");
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                done = tasks.join_next() => match done {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => { shutdown.cancel(); return Err(e); }
                    Some(Err(e)) => { shutdown.cancel(); bail!("a role panicked: {e}"); }
                    None => break,
                },
            }
        }
        // Let every role finish its calls in flight and deregister.
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        eprintln!("sluice up: stopped");
        Ok(())
    });
    drop(telemetry);
    outcome
}

async fn wait_for_workers(
    directory: &WorkerDirectory,
    args: &UpArgs,
    tasks: &mut JoinSet<Result<()>>,
) -> Result<()> {
    let mut changes = directory.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if directory.workers(Role::Prefill).len() >= args.prefill
            && directory.workers(Role::Decode).len() >= args.decode
            && directory.workers(Role::Expert).len() >= args.experts
        {
            return Ok(());
        }
        tokio::select! {
            _ = changes.changed() => {}
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => bail!("a role stopped during start-up"),
                Ok(Err(e)) => return Err(e),
                Err(e) => bail!("a role panicked during start-up: {e}"),
            },
            () = tokio::time::sleep_until(deadline) => bail!("the workers did not register within 2 minutes"),
        }
    }
}
