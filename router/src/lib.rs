//! The router: the cluster's front door. It validates and tokenises requests, admits them
//! within bounded limits, pairs a prefill and a decode worker (least-loaded by default, behind
//! [`pool::SchedulingPolicy`]), and streams each request's tokens back.

pub mod admission;
pub mod api_keys;
pub mod args;
pub mod chat;
pub mod chat_output;
pub mod error;
pub mod generation;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod responses;
pub mod service;
pub mod stop;
pub mod tool_grammar;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::inference_server::InferenceServer;
use sluice_proto::worker::v1::router_status_server::RouterStatusServer;
use sluice_runtime::grammar::GrammarCompiler;
use sluice_runtime::serve::{serve, standard_routes};
use sluice_runtime::{Membership, Role, WorkerDirectory};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

pub use error::RouterError;

use crate::admission::{Admission, Targets};
use crate::generation::Relay;
use crate::metrics::RouterMetrics;
use crate::pool::{LeastLoaded, WorkerPool};
use crate::service::{Frontend, InferenceService, RouterStatusService};
use crate::validate::ModelContext;

/// The time-to-first-token target of a router told none: past it an interactive user has
/// given up, and a queue that long only delays everyone behind it.
pub const DEFAULT_TTFT_TARGET: Duration = Duration::from_secs(5);

/// How often the router asks every worker for its load report.
const LOAD_POLL_PERIOD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Checkpoint directory: its tokenizer, chat template and config.
    pub model: PathBuf,
    /// Requests running at once; `None`: what the decode workers report they hold.
    pub max_in_flight: Option<usize>,
    /// Requests waiting for a place; `None`: as many as may run.
    pub max_queue: Option<usize>,
    /// What requests are admitted against.
    pub targets: Targets,
    pub max_context: usize,
    pub max_tokens_limit: usize,
    /// Deadline of requests whose caller sets none.
    pub default_deadline: Duration,
    /// Longest wait for a decode stream's next token before its worker counts as stalled
    /// (the request then migrates).
    pub token_timeout: Duration,
    /// Moves one request may make to other workers (re-pairings before its first token,
    /// migrations after it).
    pub migration_limit: usize,
    /// Prompts shorter than this many tokens are prefilled on the decode worker; 0 sends
    /// every prompt to a prefill worker.
    pub disagg_min_tokens: usize,
    /// The constraint compiler to share (one vocabulary trie for the workers of the same
    /// process); `None`: the router builds its own from `model`.
    pub grammars: Option<Arc<GrammarCompiler>>,
    /// Keys a public request must present (`None`: none needed).
    pub api_keys: Option<api_keys::ApiKeys>,
    /// Serve `/metrics` on the public HTTP port too (off when metrics have a listener of
    /// their own).
    pub metrics_on_http: bool,
}

impl RouterConfig {
    pub fn new(model: PathBuf) -> Self {
        RouterConfig {
            model,
            max_in_flight: None,
            max_queue: None,
            targets: Targets {
                ttft: Some(DEFAULT_TTFT_TARGET),
                tpot: None,
            },
            max_context: 8192,
            max_tokens_limit: 4096,
            default_deadline: Duration::from_secs(600),
            token_timeout: Duration::from_secs(60),
            migration_limit: 3,
            disagg_min_tokens: 0,
            grammars: None,
            api_keys: None,
            metrics_on_http: true,
        }
    }
}

/// Serves the public gRPC API on `listener`, and the OpenAI-compatible HTTP API with
/// `/health` and `/metrics` on `http` when given, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    http: Option<TcpListener>,
    status: TcpListener,
    membership: Arc<dyn Membership>,
    config: RouterConfig,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let mut model = ModelContext::load(&config.model, config.max_context, config.max_tokens_limit)?;
    if let Some(grammars) = &config.grammars {
        model.grammars = grammars.clone();
    }
    // Constraints are checked on the request threads: the trie is built before any comes.
    model.grammars.warm_up();
    let model = Arc::new(model);
    let directory = WorkerDirectory::start(membership, shutdown.clone()).await?;
    let pool = WorkerPool::new(directory.clone(), Box::new(LeastLoaded));
    let metrics = Arc::new(RouterMetrics::new());
    pool.poll_loads(LOAD_POLL_PERIOD, shutdown.clone(), {
        let metrics = metrics.clone();
        move |w| metrics.ejected(w.info.role.as_str())
    });
    let (health, routes) = standard_routes()?;
    // Ready only while at least one prefill and one decode worker are registered.
    tokio::spawn({
        let directory = directory.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut changes = directory.changes();
            loop {
                let ready = !directory.workers(Role::Prefill).is_empty()
                    && !directory.workers(Role::Decode).is_empty();
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health
                    .set_service_status("sluice.v1.Inference", status)
                    .await;
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            }
        }
    });
    let frontend = Arc::new(Frontend {
        relay: Arc::new(Relay {
            pool: pool.clone(),
            model,
            token_timeout: config.token_timeout,
            disagg_min_tokens: config.disagg_min_tokens,
            migration_limit: config.migration_limit,
            targets: config.targets,
            metrics,
        }),
        admission: Admission::new(),
        default_deadline: config.default_deadline,
        max_in_flight: config.max_in_flight,
        max_queue: config.max_queue,
    });
    let guard = api_keys::KeyGuard {
        keys: config.api_keys.clone().map(Arc::new),
        metrics: frontend.metrics_handle(),
    };
    if let Some(keys) = &guard.keys {
        tracing::info!(?keys, "API keys required on the public API");
    }
    let mut http_server = None;
    if let Some(http) = http {
        let address = http
            .local_addr()
            .map_err(sluice_runtime::RuntimeError::from)?;
        tracing::info!(%address, "router HTTP (OpenAI-compatible) serving");
        let app = http::app(
            frontend.clone(),
            directory.clone(),
            guard.clone(),
            config.metrics_on_http,
        );
        http_server = Some(tokio::spawn(http::serve(http, app, shutdown.clone())));
    }
    let service = InferenceService {
        frontend: frontend.clone(),
    };
    let routes = routes.add_service(InferenceServer::with_interceptor(service, {
        let guard = guard.clone();
        move |request| guard.intercept(request)
    }));
    // The internal plane (worker addresses and loads) has a listener of its own: the public
    // port serves only `Inference`, health and reflection.
    let (_, status_routes) = standard_routes()?;
    let status_routes =
        status_routes.add_service(RouterStatusServer::new(RouterStatusService { pool }));
    let address = |l: &TcpListener| l.local_addr().map_err(sluice_runtime::RuntimeError::from);
    tracing::info!(address = %address(&status)?, "router status (internal) serving");
    let status_server = tokio::spawn(serve(status, status_routes.finish()?, shutdown.clone()));
    tracing::info!(address = %address(&listener)?, "router serving");
    serve(listener, routes.finish()?, shutdown).await?;
    status_server
        .await
        .map_err(|e| RouterError::Internal(format!("status server task: {e}")))??;
    if let Some(server) = http_server {
        server
            .await
            .map_err(|e| RouterError::Internal(format!("HTTP server task: {e}")))??;
    }
    Ok(())
}
