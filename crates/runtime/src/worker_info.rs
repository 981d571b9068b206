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

/// The kernel's name for this host (empty when unreadable).
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
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
    /// The host it runs on: `cuda-ipc` pairs only workers on the same one. Empty: unknown
    /// (never paired over a same-node transport).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    pub expert_shard: Option<ExpertShardInfo>,
}

impl WorkerInfo {
    /// The transport a prefill worker (`self`) and a decode worker use, preferring `order`'s
    /// earlier entries; same-node transports only on one node.
    pub fn shared_transport(
        &self,
        decode: &WorkerInfo,
        order: &[TransportKind],
    ) -> Option<TransportKind> {
        let same_node = !self.node.is_empty() && self.node == decode.node;
        order.iter().copied().find(|t| {
            self.transports.contains(t)
                && decode.transports.contains(t)
                && (same_node || !t.same_node_only())
        })
    }

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
            node: "node-a".into(),
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

    #[test]
    fn same_node_transports_pair_only_workers_on_one_node() {
        use TransportKind::{CudaIpc, InProcess, Nccl, Tcp};
        let order = [InProcess, CudaIpc, Nccl, Tcp];
        let worker = |role, node: &str, transports: &[TransportKind]| WorkerInfo {
            worker_id: WorkerId::new("w").unwrap(),
            role,
            address: "http://127.0.0.1:1".into(),
            model_fingerprint: WorkerInfo::fingerprint_hex(1),
            model: "m".into(),
            capacity: 1,
            transports: transports.to_vec(),
            node: node.into(),
            expert_shard: None,
        };
        let prefill = worker(Role::Prefill, "a", &[CudaIpc, Nccl, Tcp]);
        let shared = |node: &str, transports: &[TransportKind]| {
            prefill.shared_transport(&worker(Role::Decode, node, transports), &order)
        };
        assert_eq!(shared("a", &[CudaIpc, Nccl, Tcp]), Some(CudaIpc));
        assert_eq!(shared("b", &[CudaIpc, Nccl, Tcp]), Some(Nccl));
        assert_eq!(shared("b", &[CudaIpc, Tcp]), Some(Tcp));
        assert_eq!(
            shared("", &[CudaIpc]),
            None,
            "unknown nodes are never one node"
        );
        assert_eq!(shared("a", &[InProcess]), None);
        let in_process = worker(Role::Prefill, "", &[InProcess, Tcp]);
        assert_eq!(
            in_process.shared_transport(&worker(Role::Decode, "", &[InProcess, Tcp]), &order),
            Some(InProcess)
        );
        let local = worker(Role::Prefill, "", &[CudaIpc, Tcp]);
        assert_eq!(
            local.shared_transport(&worker(Role::Decode, "", &[CudaIpc, Tcp]), &order),
            Some(Tcp)
        );
    }
}
