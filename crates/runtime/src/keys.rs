//! Typed etcd keys (DESIGN.md §4). Each `Display`s to its key and parses back with `FromStr`.
//!
//! `/sluice/{cluster}/workers/{role}/{worker_id}` → `WorkerInfo` (on the worker's lease)
//! `/sluice/{cluster}/experts/placement` → `ExpertPlacement`

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    Expert,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Expert];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Expert => "expert",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                RuntimeError::invalid("role", format!("`{s}` is not prefill, decode or expert"))
            })
    }
}

/// A worker's name in the cluster: non-empty, no `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(id: impl Into<String>) -> Result<Self, RuntimeError> {
        let id = id.into();
        if id.is_empty() || id.contains('/') || id.chars().any(char::is_whitespace) {
            return Err(RuntimeError::invalid(
                "worker_id",
                format!("`{id}` must be non-empty, without `/` or spaces"),
            ));
        }
        Ok(WorkerId(id))
    }

    /// `{role}-{host}-{pid}-{n}`: unique per process without coordination.
    pub fn generate(role: Role) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        WorkerId(format!("{role}-{host}-{}-{n}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_cluster(cluster: &str) -> Result<(), RuntimeError> {
    if cluster.is_empty() || cluster.contains('/') {
        return Err(RuntimeError::invalid(
            "cluster",
            format!("`{cluster}` must be non-empty, without `/`"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerKey {
    pub cluster: String,
    pub role: Role,
    pub worker: WorkerId,
}

impl WorkerKey {
    /// The prefix under which every worker of `cluster` lives (what the router watches).
    pub fn prefix(cluster: &str) -> String {
        format!("/sluice/{cluster}/workers/")
    }
}

impl fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/sluice/{}/workers/{}/{}",
            self.cluster, self.role, self.worker
        )
    }
}

impl FromStr for WorkerKey {
    type Err = RuntimeError;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let bad = |reason| RuntimeError::MalformedKey {
            key: key.to_string(),
            reason,
        };
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            ["", "sluice", cluster, "workers", role, worker] => {
                check_cluster(cluster).map_err(|_| bad("bad cluster name"))?;
                Ok(WorkerKey {
                    cluster: cluster.to_string(),
                    role: role.parse().map_err(|_| bad("unknown role"))?,
                    worker: WorkerId::new(*worker).map_err(|_| bad("bad worker id"))?,
                })
            }
            _ => Err(bad("expected /sluice/{cluster}/workers/{role}/{worker_id}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlacementKey {
    pub cluster: String,
}

impl fmt::Display for PlacementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/sluice/{}/experts/placement", self.cluster)
    }
}

impl FromStr for PlacementKey {
    type Err = RuntimeError;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        match key.split('/').collect::<Vec<_>>().as_slice() {
            ["", "sluice", cluster, "experts", "placement"] if check_cluster(cluster).is_ok() => {
                Ok(PlacementKey {
                    cluster: cluster.to_string(),
                })
            }
            _ => Err(RuntimeError::MalformedKey {
                key: key.to_string(),
                reason: "expected /sluice/{cluster}/experts/placement",
            }),
        }
    }
}

/// Validates a cluster name given on the command line.
pub fn validate_cluster(cluster: &str) -> Result<(), RuntimeError> {
    check_cluster(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for role in Role::ALL {
            let key = WorkerKey {
                cluster: "prod-eu".into(),
                role,
                worker: WorkerId::new("w-1.a").unwrap(),
            };
            let text = key.to_string();
            assert_eq!(text, format!("/sluice/prod-eu/workers/{role}/w-1.a"));
            assert!(text.starts_with(&WorkerKey::prefix("prod-eu")));
            assert_eq!(text.parse::<WorkerKey>().unwrap(), key);
        }
        let p = PlacementKey {
            cluster: "default".into(),
        };
        assert_eq!(p.to_string(), "/sluice/default/experts/placement");
        assert_eq!(p.to_string().parse::<PlacementKey>().unwrap(), p);
        let generated = WorkerId::generate(Role::Decode);
        let key = WorkerKey {
            cluster: "c".into(),
            role: Role::Decode,
            worker: generated.clone(),
        };
        assert_eq!(
            key.to_string().parse::<WorkerKey>().unwrap().worker,
            generated
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "/sluice/c/workers/router/w",
            "/sluice/c/workers/decode",
            "/sluice//workers/decode/w",
            "sluice/c/workers/decode/w",
            "/sluice/c/workers/decode/w/extra",
        ] {
            assert!(bad.parse::<WorkerKey>().is_err(), "{bad}");
        }
        assert!("/sluice/c/experts/other".parse::<PlacementKey>().is_err());
        assert!(WorkerId::new("a/b").is_err());
        assert!(WorkerId::new("").is_err());
    }
}
