//! The router's flags (its binary and `sluice up` share them), each also an env var.

use std::net::SocketAddr;
use std::time::Duration;

use crate::RouterConfig;
use crate::admission::Targets;

#[derive(clap::Args, Debug, Clone)]
pub struct RouterArgs {
    /// Requests running at once; more wait in the admission queue. Unset: the slots plus
    /// waiting room the decode workers report (each one's --max-sequences + --max-waiting).
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Requests waiting for admission; beyond this they are refused at once
    /// (gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After). Unset: as many as may run.
    #[arg(long, env = "SLUICE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Time-to-first-token target, milliseconds: a request the cluster's queues would start
    /// later is refused at once (RESOURCE_EXHAUSTED / HTTP 429 with Retry-After), and one
    /// queued past it is shed. 0 turns the check off.
    #[arg(long, env = "SLUICE_SLO_TTFT", default_value_t = 5000)]
    pub slo_ttft: u64,
    /// Time-per-output-token target, milliseconds: a request whose decode worker would start
    /// it so late after its first token that its tokens average more is refused. Unset:
    /// not checked.
    #[arg(long, env = "SLUICE_SLO_TPOT")]
    pub slo_tpot: Option<u64>,
    /// Prompt + output tokens accepted.
    #[arg(long, env = "SLUICE_MAX_CONTEXT", default_value_t = 8192)]
    pub max_context: usize,
    /// Most `max_tokens` a request may ask for.
    #[arg(long, env = "SLUICE_MAX_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Deadline (seconds) for requests whose caller sets none; it covers queueing too.
    #[arg(long, env = "SLUICE_DEFAULT_DEADLINE", default_value_t = 600)]
    pub default_deadline: u64,
    /// Prompts shorter than this many tokens are prefilled on the decode worker itself
    /// (conditional disaggregation); 0 sends every prompt to a prefill worker.
    #[arg(long, env = "SLUICE_DISAGG_MIN_TOKENS", default_value_t = 0)]
    pub disagg_min_tokens: usize,
    /// Seconds to wait for a decode stream's next token before its worker counts as stalled
    /// and the request migrates to another decode worker.
    #[arg(long, env = "SLUICE_TOKEN_TIMEOUT", default_value_t = 60)]
    pub token_timeout: u64,
    /// Times one request may move to other workers when an attempt fails: paired again before
    /// its first token, migrated (the tokens sent recomputed elsewhere) after it. 0 turns
    /// both off.
    #[arg(long, env = "SLUICE_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: usize,
    /// API keys, one `ID:KEY` per line: with it (or `SLUICE_API_KEYS`, the same entries
    /// inline, comma-separated) every public request needs `authorization: Bearer <KEY>`.
    /// Health stays open.
    #[arg(long, env = "SLUICE_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
}

impl RouterArgs {
    /// The API keys of `--api-keys-file` and `SLUICE_API_KEYS` (an environment variable only,
    /// so that no key shows in a process list); `None`: requests need no key.
    pub fn api_keys(&self) -> Result<Option<crate::api_keys::ApiKeys>, crate::RouterError> {
        let inline = std::env::var("SLUICE_API_KEYS").ok();
        crate::api_keys::ApiKeys::load(self.api_keys_file.as_deref(), inline.as_deref())
    }

    pub fn apply(&self, config: &mut RouterConfig) {
        config.max_in_flight = self.max_in_flight;
        config.max_queue = self.max_queue;
        config.targets = Targets {
            ttft: (self.slo_ttft > 0).then(|| Duration::from_millis(self.slo_ttft)),
            tpot: self.slo_tpot.filter(|&t| t > 0).map(Duration::from_millis),
        };
        config.max_context = self.max_context;
        config.max_tokens_limit = self.max_tokens_limit;
        config.default_deadline = Duration::from_secs(self.default_deadline);
        config.disagg_min_tokens = self.disagg_min_tokens;
        config.token_timeout = Duration::from_secs(self.token_timeout.max(1));
        config.migration_limit = self.migration_limit;
    }
}

/// Where the OpenAI-compatible HTTP API, `/health` and `/metrics` are served.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address of the HTTP API (OpenAI-compatible, /health, /metrics).
    #[arg(long, env = "SLUICE_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// Serve gRPC only.
    #[arg(long, env = "SLUICE_NO_HTTP")]
    pub no_http: bool,
    /// Address of the internal `RouterStatus` service (every worker's address and load):
    /// never on the public port, loopback unless an operator opens it.
    #[arg(long, env = "SLUICE_STATUS_LISTEN", default_value = "127.0.0.1:50052")]
    pub status_listen: SocketAddr,
}
