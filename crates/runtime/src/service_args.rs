//! Flags every service binary takes (each also an env var `SLUICE_*`), and the membership
//! they select.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, RuntimeError};
use crate::membership::{EtcdMembership, Membership};
use crate::telemetry::LogFormat;

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
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub const NO_ETCD: &str = "no etcd endpoints: pass --etcd http://HOST:2379 (or SLUICE_ETCD). \
To start one locally: `apt-get install etcd-server && etcd --data-dir /tmp/sluice-etcd` \
(then --etcd http://127.0.0.1:2379); or run every role in one process with `sluice up`";

impl ServiceArgs {
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
