//! What a worker publishes about itself under its key.

use serde::{Deserialize, Serialize};

use crate::keys::{Role, WorkerId, WorkerKey};
use crate::transport::TransportKind;

/// The experts an expert worker hosts: `first..end` of `experts` per MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertShardInfo {
    pub index: usize,
    pub count: usize,
    pub first: usize,
    pub end: usize,
}

impl ExpertShardInfo {
    pub fn contains(&self, expert: usize) -> bool {
        (self.first..self.end).contains(&expert)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: WorkerId,
    pub role: Role,
    /// gRPC endpoint, `http://host:port`.
    pub address: String,
    /// [`sluice_engine::Model::fingerprint`] as 16 hex digits: workers exchange caches and
    /// expert rows only with equal fingerprints.
    pub model_fingerprint: String,
    /// Model name (its directory name) for `ListModels`.
    pub model: String,
    /// Sequences it can hold at once (decode), prompts per batch (prefill), 0 for experts.
    pub capacity: usize,
    /// Cache transports it can receive (decode) or send (prefill) with.
    pub transports: Vec<TransportKind>,
    pub expert_shard: Option<ExpertShardInfo>,
}

impl WorkerInfo {
    pub fn key(&self, cluster: &str) -> WorkerKey {
        WorkerKey {
            cluster: cluster.to_string(),
            role: self.role,
            worker: self.worker_id.clone(),
        }
    }

    pub fn fingerprint_hex(fingerprint: u64) -> String {
        format!("{fingerprint:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_info_round_trips_through_json() {
        let info = WorkerInfo {
            worker_id: WorkerId::new("expert-1").unwrap(),
            role: Role::Expert,
            address: "http://10.0.0.3:50061".into(),
            model_fingerprint: WorkerInfo::fingerprint_hex(0xdead_beef),
            model: "tiny".into(),
            capacity: 0,
            transports: vec![TransportKind::Tcp],
            expert_shard: Some(ExpertShardInfo {
                index: 1,
                count: 2,
                first: 4,
                end: 8,
            }),
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains("\"role\":\"expert\""), "{json}");
        assert_eq!(serde_json::from_str::<WorkerInfo>(&json).unwrap(), info);
        assert_eq!(
            info.key("c").to_string(),
            "/sluice/c/workers/expert/expert-1"
        );
        assert!(info.expert_shard.unwrap().contains(7));
        assert!(!info.expert_shard.unwrap().contains(8));
    }
}
