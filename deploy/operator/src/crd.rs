//! The `SluiceCluster` custom resource (`sluice.dev/v1alpha1`): the types here generate the
//! CRD (`sluice-operator crd`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Sluice serving cluster: a router in front of prefill and decode workers, optionally
/// expert workers hosting the MoE experts, with membership in etcd.
// Each `printcolumn(...)` repeats `type_ = "integer"`, which clippy takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "SluiceCluster",
    namespaced,
    status = "SluiceClusterStatus",
    shortname = "sluice",
    derive = "PartialEq",
    doc = "A Sluice serving cluster (router, prefill, decode and expert workers, etcd membership)",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Router",
        type_ = "integer",
        json_path = ".status.router.readyReplicas"
    ),
    printcolumn(
        name = "Prefill",
        type_ = "integer",
        json_path = ".status.prefill.readyReplicas"
    ),
    printcolumn(
        name = "Decode",
        type_ = "integer",
        json_path = ".status.decode.readyReplicas"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SluiceClusterSpec {
    /// Where the checkpoint is.
    pub model: ModelSource,
    /// The Sluice image (all service binaries).
    pub image: ImageSpec,
    #[serde(default)]
    pub etcd: EtcdSpec,
    #[serde(default)]
    pub router: RouterSpec,
    pub prefill: WorkerSpec,
    pub decode: WorkerSpec,
    /// Expert workers; without them every prefill and decode worker holds all the experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
}

/// The checkpoint: on a PersistentVolumeClaim, or baked into the image. Exactly one.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcModel>,
    /// Absolute path of the checkpoint directory inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcModel {
    pub claim_name: String,
    /// Checkpoint directory relative to the volume's root.
    #[serde(default)]
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// e.g. `ghcr.io/example/sluice:0.1.0` (CPU) or a `-cuda` build.
    pub name: String,
    /// `Always`, `IfNotPresent` or `Never` (Kubernetes' default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSpec {
    /// Endpoints of an existing etcd (`http://host:2379`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Run a one-member etcd StatefulSet for this cluster (membership is ephemeral: leases).
    #[serde(default)]
    pub managed: bool,
    /// Image of the managed etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    #[serde(default = "one")]
    pub replicas: i32,
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    #[serde(default = "grpc_port")]
    pub grpc_port: i32,
    #[serde(default = "http_port")]
    pub http_port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra flags for `sluice-router` (e.g. `--max-in-flight=512`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: 1,
            service_type: None,
            grpc_port: grpc_port(),
            http_port: http_port(),
            resources: None,
            flags: Vec::new(),
        }
    }
}

fn one() -> i32 {
    1
}

fn grpc_port() -> i32 {
    50051
}

fn http_port() -> i32 {
    8080
}

/// A prefill or decode worker role.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    pub replicas: i32,
    /// Requests and limits, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra flags for the worker binary (e.g. `--max-sequences=64`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpertsSpec {
    pub replicas: i32,
    /// Shards the experts are split into; one replica per shard.
    pub shards: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// Where every pod of the cluster may run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SluiceClusterStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub router: RoleStatus,
    #[serde(default)]
    pub prefill: RoleStatus,
    #[serde(default)]
    pub decode: RoleStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<RoleStatus>,
    /// `Ready` (every role has all its replicas ready) and `Degraded` (with a reason).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub replicas: i32,
    pub ready_replicas: i32,
}
