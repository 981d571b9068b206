//! What a `SluiceCluster` reconciles to: a ConfigMap, the router Deployment and Service, a
//! Deployment and headless Service per worker role, the experts as one StatefulSet (each pod's
//! ordinal is its shard), PodDisruptionBudgets, and optionally a one-member etcd. Everything
//! is owned by the `SluiceCluster`, so deleting it deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::crd::SluiceCluster;
use crate::error::{Error, Result};

pub const MANAGER: &str = "sluice-operator";
const MODEL_MOUNT: &str = "/models";
const DEFAULT_ETCD_IMAGE: &str = "quay.io/coreos/etcd:v3.5.21";
const METRICS_PORT: i32 = 9090;

/// The roles of a cluster, as they appear in names and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Router,
    Prefill,
    Decode,
    Experts,
    Etcd,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Router,
        Component::Prefill,
        Component::Decode,
        Component::Experts,
        Component::Etcd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Router => "router",
            Component::Prefill => "prefill",
            Component::Decode => "decode",
            Component::Experts => "experts",
            Component::Etcd => "etcd",
        }
    }

    /// The binary a worker pod runs, its gRPC port and the health service its readiness
    /// probe asks about.
    fn binary(self) -> (&'static str, i32, &'static str) {
        match self {
            Component::Router => ("sluice-router", 50051, "sluice.v1.Inference"),
            Component::Prefill => ("sluice-prefill", 50061, "sluice.worker.v1.Prefill"),
            Component::Decode => ("sluice-decode", 50071, "sluice.worker.v1.Decode"),
            Component::Experts => ("sluice-expert", 50081, "sluice.worker.v1.Experts"),
            Component::Etcd => ("etcd", 2379, ""),
        }
    }
}

/// One object the cluster consists of.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    ConfigMap(ConfigMap),
    Service(Service),
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    Pdb(PodDisruptionBudget),
}

impl Child {
    pub fn kind(&self) -> &'static str {
        match self {
            Child::ConfigMap(_) => "ConfigMap",
            Child::Service(_) => "Service",
            Child::Deployment(_) => "Deployment",
            Child::StatefulSet(_) => "StatefulSet",
            Child::Pdb(_) => "PodDisruptionBudget",
        }
    }

    pub fn name(&self) -> String {
        match self {
            Child::ConfigMap(o) => o.name_any(),
            Child::Service(o) => o.name_any(),
            Child::Deployment(o) => o.name_any(),
            Child::StatefulSet(o) => o.name_any(),
            Child::Pdb(o) => o.name_any(),
        }
    }

    pub fn to_value(&self) -> Result<Value> {
        let v = match self {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
            Child::Deployment(o) => serde_json::to_value(o),
            Child::StatefulSet(o) => serde_json::to_value(o),
            Child::Pdb(o) => serde_json::to_value(o),
        };
        v.map_err(|e| Error::Render(e.to_string()))
    }
}

/// Name of a child of `cluster` for `component` (`{cluster}-{component}`).
pub fn child_name(cluster: &str, component: Component) -> String {
    format!("{cluster}-{}", component.as_str())
}

pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-config")
}

fn labels(cluster: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sluice".into()),
        ("app.kubernetes.io/instance".into(), cluster.into()),
        (
            "app.kubernetes.io/component".into(),
            component.as_str().into(),
        ),
        ("app.kubernetes.io/managed-by".into(), MANAGER.into()),
    ])
}

fn selector(cluster: &str, component: Component) -> Value {
    json!({
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": component.as_str(),
    })
}

/// A typed object from its JSON form (a test checks that nothing is dropped on the way).
fn typed<K: DeserializeOwned>(value: Value) -> Result<K> {
    serde_json::from_value(value).map_err(|e| Error::Render(e.to_string()))
}

/// The objects `cluster` reconciles to, in the order they should be applied.
pub fn render(cluster: &SluiceCluster) -> Result<Vec<Child>> {
    render_values(cluster)?
        .into_iter()
        .map(|v| {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            Ok(match kind.as_str() {
                "ConfigMap" => Child::ConfigMap(typed(v)?),
                "Service" => Child::Service(typed(v)?),
                "Deployment" => Child::Deployment(typed(v)?),
                "StatefulSet" => Child::StatefulSet(typed(v)?),
                "PodDisruptionBudget" => Child::Pdb(typed(v)?),
                other => return Err(Error::Render(format!("unexpected kind {other}"))),
            })
        })
        .collect()
}

/// The objects as JSON, before typing.
pub fn render_values(cluster: &SluiceCluster) -> Result<Vec<Value>> {
    let r = Renderer::new(cluster)?;
    let spec = &cluster.spec;
    let mut out = vec![r.config_map()];
    if spec.etcd.managed {
        out.push(r.headless_service(Component::Etcd, 2379, "client"));
        out.push(r.etcd());
    }
    let router = &spec.router;
    out.push(r.router_service());
    out.push(r.deployment(
        Component::Router,
        router.replicas,
        &router.flags,
        router.resources.as_ref(),
    ));
    out.push(r.pdb(Component::Router));
    for (component, worker) in [
        (Component::Prefill, &spec.prefill),
        (Component::Decode, &spec.decode),
    ] {
        let (_, port, _) = component.binary();
        out.push(r.headless_service(component, port, "grpc"));
        out.push(r.deployment(
            component,
            worker.replicas,
            &worker.flags,
            worker.resources.as_ref(),
        ));
        out.push(r.pdb(component));
    }
    if let Some(x) = &spec.experts {
        let (_, port, _) = Component::Experts.binary();
        out.push(r.headless_service(Component::Experts, port, "grpc"));
        out.push(r.experts(x.replicas, x.shards, &x.flags, x.resources.as_ref()));
        out.push(r.pdb(Component::Experts));
    }
    Ok(out)
}

struct Renderer<'a> {
    cluster: &'a SluiceCluster,
    name: String,
    namespace: String,
    owner: Value,
    config_hash: String,
}

impl<'a> Renderer<'a> {
    fn new(cluster: &'a SluiceCluster) -> Result<Self> {
        let name = cluster.name_any();
        if name.is_empty() {
            return Err(Error::Render(
                "the SluiceCluster has no metadata.name".into(),
            ));
        }
        let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
        // Without a uid (a spec file, not a live object) there is nothing to own the children.
        let owner = match cluster.controller_owner_ref(&()) {
            Some(o) => json!([o]),
            None => Value::Null,
        };
        let mut r = Renderer {
            cluster,
            name,
            namespace,
            owner,
            config_hash: String::new(),
        };
        r.config_hash = format!("{:016x}", fnv1a(r.config_data().to_string().as_bytes()));
        Ok(r)
    }

    fn metadata(&self, name: &str, component: Component) -> Value {
        let mut m = json!({
            "name": name,
            "namespace": self.namespace,
            "labels": labels(&self.name, component),
        });
        if !self.owner.is_null() {
            m["ownerReferences"] = self.owner.clone();
        }
        m
    }

    fn etcd_endpoints(&self) -> String {
        let etcd = &self.cluster.spec.etcd;
        if etcd.managed {
            format!(
                "http://{}.{}.svc:2379",
                child_name(&self.name, Component::Etcd),
                self.namespace
            )
        } else {
            etcd.endpoints.join(",")
        }
    }

    fn model_path(&self) -> String {
        let model = &self.cluster.spec.model;
        match (&model.pvc, &model.image_path) {
            (Some(pvc), _) if pvc.path.is_empty() => MODEL_MOUNT.to_string(),
            (Some(pvc), _) => format!("{MODEL_MOUNT}/{}", pvc.path.trim_end_matches('/')),
            (None, Some(path)) => path.clone(),
            (None, None) => String::new(),
        }
    }

    fn config_data(&self) -> Value {
        json!({
            "SLUICE_ETCD": self.etcd_endpoints(),
            "SLUICE_CLUSTER": self.name,
            "SLUICE_MODEL": self.model_path(),
            "SLUICE_LOG_FORMAT": "json",
        })
    }

    fn config_map(&self) -> Value {
        let name = config_map_name(&self.name);
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.metadata(&name, Component::Router),
            "data": self.config_data(),
        })
    }

    fn headless_service(&self, component: Component, port: i32, port_name: &str) -> Value {
        let name = child_name(&self.name, component);
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&name, component),
            "spec": {
                "clusterIP": "None",
                "selector": selector(&self.name, component),
                "ports": [{"name": port_name, "port": port, "targetPort": port}],
            },
        })
    }

    fn router_service(&self) -> Value {
        let router = &self.cluster.spec.router;
        let name = child_name(&self.name, Component::Router);
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&name, Component::Router),
            "spec": {
                "type": router.service_type.clone().unwrap_or_else(|| "ClusterIP".into()),
                "selector": selector(&self.name, Component::Router),
                "ports": [
                    {"name": "grpc", "port": router.grpc_port, "targetPort": "grpc", "appProtocol": "grpc"},
                    {"name": "http", "port": router.http_port, "targetPort": "http", "appProtocol": "http"},
                ],
            },
        })
    }

    fn pdb(&self, component: Component) -> Value {
        let name = child_name(&self.name, component);
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.metadata(&name, component),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector(&self.name, component)},
            },
        })
    }

    /// The container of a Sluice role: flags, ports, probes on the gRPC health service.
    fn container(
        &self,
        component: Component,
        extra_args: Vec<String>,
        flags: &[String],
        resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    ) -> Value {
        let (binary, default_port, ready_service) = component.binary();
        let spec = &self.cluster.spec;
        let port = if component == Component::Router {
            spec.router.grpc_port
        } else {
            default_port
        };
        let mut args = vec![format!("--listen=0.0.0.0:{port}")];
        let mut ports = vec![json!({"name": "grpc", "containerPort": port})];
        if component == Component::Router {
            args.push(format!("--http-listen=0.0.0.0:{}", spec.router.http_port));
            ports.push(json!({"name": "http", "containerPort": spec.router.http_port}));
        } else {
            args.push(format!("--advertise=$(POD_IP):{port}"));
            args.push(format!("--metrics-listen=0.0.0.0:{METRICS_PORT}"));
            ports.push(json!({"name": "metrics", "containerPort": METRICS_PORT}));
        }
        args.extend(extra_args);
        args.extend(flags.iter().cloned());
        let mut env = vec![
            json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
            json!({"name": "SLUICE_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            // Same-node cache transports (cuda-ipc) compare nodes, not pod host names.
            json!({"name": "SLUICE_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
        ];
        if component == Component::Experts {
            env.push(json!({"name": "SHARD_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}));
        }
        let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
        if spec.model.pvc.is_some() {
            mounts.push(json!({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": true}));
        }
        let mut c = json!({
            "name": binary,
            "image": spec.image.name,
            "command": [binary],
            "args": args,
            "envFrom": [{"configMapRef": {"name": config_map_name(&self.name)}}],
            "env": env,
            "ports": ports,
            "volumeMounts": mounts,
            // Liveness: the process serves gRPC; readiness: its role's own health service
            // (workers: registered in etcd; router: a prefill and a decode worker known).
            "livenessProbe": {
                "grpc": {"port": port},
                "periodSeconds": 10, "failureThreshold": 6,
            },
            "readinessProbe": {
                "grpc": {"port": port, "service": ready_service},
                "periodSeconds": 5,
            },
            "startupProbe": {
                "grpc": {"port": port},
                "periodSeconds": 5, "failureThreshold": 120,
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
        });
        if let Some(p) = &spec.image.pull_policy {
            c["imagePullPolicy"] = json!(p);
        }
        if let Some(r) = resources {
            c["resources"] = json!(r);
        }
        c
    }

    /// A pod spec: one container, non-root, and the cluster's scheduling constraints.
    fn pod_spec(&self, container: Value, volumes: Vec<Value>) -> Value {
        let mut pod = json!({
            "containers": [container],
            "volumes": volumes,
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        });
        if let Some(s) = &self.cluster.spec.scheduling {
            if !s.node_selector.is_empty() {
                pod["nodeSelector"] = json!(s.node_selector);
            }
            if !s.tolerations.is_empty() {
                pod["tolerations"] = json!(s.tolerations);
            }
        }
        pod
    }

    fn pod_template(&self, component: Component, container: Value) -> Value {
        let spec = &self.cluster.spec;
        let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
        if let Some(pvc) = &spec.model.pvc {
            volumes.push(json!({"name": "model", "persistentVolumeClaim": {
                "claimName": pvc.claim_name, "readOnly": true}}));
        }
        let mut pod = self.pod_spec(container, volumes);
        // Workers drain for `--drain-timeout` (30 s by default) after SIGTERM and then exit;
        // the grace period leaves them that and time to exit before Kubernetes kills them.
        pod["terminationGracePeriodSeconds"] = json!(45);
        json!({
            "metadata": {
                "labels": labels(&self.name, component),
                // A changed ConfigMap rolls the pods.
                "annotations": {"sluice.dev/config-hash": self.config_hash},
            },
            "spec": pod,
        })
    }

    fn deployment(
        &self,
        component: Component,
        replicas: i32,
        flags: &[String],
        resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    ) -> Value {
        let experts = if component != Component::Router && self.cluster.spec.experts.is_some() {
            vec!["--experts=remote".to_string()]
        } else {
            Vec::new()
        };
        let container = self.container(component, experts, flags, resources);
        let name = child_name(&self.name, component);
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.metadata(&name, component),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector(&self.name, component)},
                "template": self.pod_template(component, container),
            },
        })
    }

    fn experts(
        &self,
        replicas: i32,
        shards: i32,
        flags: &[String],
        resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    ) -> Value {
        let shard = vec![format!("--shard=$(SHARD_INDEX)/{shards}")];
        let container = self.container(Component::Experts, shard, flags, resources);
        let name = child_name(&self.name, Component::Experts);
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.metadata(&name, Component::Experts),
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                // Shards are independent: start and replace them all at once.
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": selector(&self.name, Component::Experts)},
                "template": self.pod_template(Component::Experts, container),
            },
        })
    }

    fn etcd(&self) -> Value {
        let name = child_name(&self.name, Component::Etcd);
        let image = self
            .cluster
            .spec
            .etcd
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_ETCD_IMAGE.into());
        let advertise = format!("http://{name}.{}.svc:2379", self.namespace);
        let container = json!({
            "name": "etcd",
            "image": image,
            "command": ["etcd"],
            // One member: etcd's default name and peer URL (localhost) form its cluster.
            "args": [
                "--data-dir=/var/lib/etcd",
                "--listen-client-urls=http://0.0.0.0:2379",
                format!("--advertise-client-urls={advertise}"),
            ],
            "ports": [{"name": "client", "containerPort": 2379}],
            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": 2379}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/health", "port": 2379}, "periodSeconds": 10, "failureThreshold": 6},
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
        });
        // Membership is leases: nothing in it must survive a restart.
        let pod = self.pod_spec(container, vec![json!({"name": "data", "emptyDir": {}})]);
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.metadata(&name, Component::Etcd),
            "spec": {
                "replicas": 1,
                "serviceName": name,
                "selector": {"matchLabels": selector(&self.name, Component::Etcd)},
                "template": {"metadata": {"labels": labels(&self.name, Component::Etcd)}, "spec": pod},
            },
        })
    }
}

/// FNV-1a, for the config hash annotation.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Every child kind and name a cluster named `cluster` could have, whether or not its spec
/// asks for it now (so the controller can delete what is no longer wanted).
pub fn possible_children(cluster: &str) -> Vec<(&'static str, String)> {
    let mut all = Vec::new();
    for c in Component::ALL {
        let name = child_name(cluster, c);
        all.push(("Service", name.clone()));
        all.push(match c {
            Component::Experts | Component::Etcd => ("StatefulSet", name.clone()),
            _ => ("Deployment", name.clone()),
        });
        if c != Component::Etcd {
            all.push(("PodDisruptionBudget", name));
        }
    }
    all.push(("ConfigMap", config_map_name(cluster)));
    all
}
