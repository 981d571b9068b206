//! `sluice-router`: the router process.

use clap::Parser;
use sluice_router::RouterConfig;
use sluice_router::args::{HttpArgs, RouterArgs};
use sluice_runtime::cli::run_service;
use sluice_runtime::service_args::ServiceArgs;

#[derive(Parser)]
#[command(
    name = "sluice-router",
    version,
    about = "Sluice router: the public gRPC API and the OpenAI-compatible HTTP API"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    router: RouterArgs,
    #[command(flatten)]
    http: HttpArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = &args.service;
    run_service("sluice-router", &s.telemetry, None, async {
        let start = s.start(50051).await?;
        let mut config = RouterConfig::new(s.model.clone());
        args.router.apply(&mut config);
        config.api_keys = args.router.api_keys()?;
        // With `--metrics-listen`, metrics are served there only, not on the public port.
        config.metrics_on_http = s.metrics_listen.is_none();
        let http = if args.http.no_http {
            None
        } else {
            Some(sluice_runtime::serve::bind(args.http.http_listen).await?)
        };
        let status = sluice_runtime::serve::bind(args.http.status_listen).await?;
        sluice_router::run(
            start.listener,
            http,
            status,
            start.membership,
            config,
            start.shutdown,
        )
        .await?;
        anyhow::Ok(())
    })
}
