//! Flags every service binary takes (each also an env var `SLUICE_*`), and the membership
//! they select.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, RuntimeError};
use crate::keys::{Role, WorkerId};
use crate::membership::{EtcdMembership, Membership};
use crate::telemetry::TelemetryArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Address to serve gRPC on (port 0 picks a free port). Default per role.
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address other processes use to reach this one (default: the listen address).
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    /// etcd endpoints, comma-separated (http://host:2379,...).
    #[arg(long, env = "SLUICE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name: the etcd prefix `/sluice/{cluster}/`.
    #[arg(long, env = "SLUICE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "SLUICE_MODEL")]
    pub model: PathBuf,
    /// Membership lease TTL in seconds: a worker that dies disappears within it.
    #[arg(long, env = "SLUICE_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Name in the cluster (default: role-host-pid).
    #[arg(long, env = "SLUICE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// The host this worker runs on, for same-node cache transports (cuda-ipc). Default: the
    /// kernel's host name (on Kubernetes pass the node's name, e.g. from `spec.nodeName`).
    #[arg(long, env = "SLUICE_NODE")]
    pub node: Option<String>,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`); off when unset.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds a prefill or decode worker keeps serving its calls in flight after SIGTERM
    /// (it deregisters first, so nothing new comes); what is left then is cut off and
    /// migrates. Keep it below the pod's termination grace period.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Serve no gRPC server reflection (grpcurl and ghz then need the proto files).
    #[arg(long, env = "SLUICE_NO_REFLECTION")]
    pub no_reflection: bool,
}

impl ServiceArgs {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }
}

pub const NO_ETCD: &str = "no etcd endpoints: pass --etcd http://HOST:2379 (or SLUICE_ETCD). \
To start one locally: `apt-get install etcd-server && etcd --data-dir /tmp/sluice-etcd` \
(then --etcd http://127.0.0.1:2379); or run every role in one process with `sluice up`";

/// What every service's `main` sets up before its role starts.
pub struct ServiceStart {
    pub membership: Arc<dyn Membership>,
    /// Cancelled by SIGTERM or Ctrl-C.
    pub shutdown: CancellationToken,
    pub listener: TcpListener,
}

impl ServiceArgs {
    /// Connects to etcd, arms the shutdown signals and binds `--listen` (`0.0.0.0:default_port`
    /// when absent).
    pub async fn start(&self, default_port: u16) -> Result<ServiceStart> {
        if self.no_reflection {
            crate::serve::disable_reflection();
        }
        let membership = self.membership().await?;
        let shutdown = CancellationToken::new();
        crate::cli::cancel_on_signal(shutdown.clone());
        let listen = self
            .listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], default_port)));
        let listener = crate::serve::bind(listen).await?;
        if let Some(address) = self.metrics_listen {
            let metrics = crate::serve::bind(address).await?;
            tracing::info!(address = %metrics.local_addr()?, "metrics at /metrics");
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(metrics, shutdown).await {
                    tracing::warn!("metrics endpoint stopped: {e}");
                }
            });
        }
        Ok(ServiceStart {
            membership,
            shutdown,
            listener,
        })
    }

    /// `--worker-id`, or a generated one for `role`.
    pub fn node(&self) -> String {
        self.node
            .clone()
            .unwrap_or_else(crate::worker_info::this_host)
    }

    pub fn worker_id(&self, role: Role) -> Result<WorkerId> {
        match &self.worker_id {
            Some(id) => WorkerId::new(id.clone()),
            None => Ok(WorkerId::generate(role)),
        }
    }

    /// etcd membership from `--etcd`; a clear error when none is given.
    pub async fn membership(&self) -> Result<Arc<dyn Membership>> {
        if self.etcd.is_empty() {
            return Err(RuntimeError::invalid("etcd", NO_ETCD));
        }
        if self.lease_ttl == 0 {
            return Err(RuntimeError::invalid(
                "lease_ttl",
                "must be at least 1 second",
            ));
        }
        crate::keys::validate_cluster(&self.cluster)?;
        let m = EtcdMembership::connect(
            &self.etcd,
            &self.cluster,
            Duration::from_secs(self.lease_ttl),
        )
        .await?;
        Ok(Arc::new(m))
    }
}
