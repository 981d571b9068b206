//! The reconciler against an in-process fake API server: create, scale, repair, refuse an
//! invalid spec, clean up on deletion.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_api;

use std::sync::Arc;

use fake_api::FakeApi;
use serde_json::{Value, json};
use sluice_operator::SluiceCluster;
use sluice_operator::controller::{Context, FINALIZER, reconcile};

const NS: &str = "ml";

/// A `SluiceCluster` as a user would write it, changed piece by piece.
struct ClusterBuilder {
    value: Value,
}

impl ClusterBuilder {
    fn new(name: &str) -> Self {
        ClusterBuilder {
            value: json!({
                "apiVersion": "sluice.dev/v1alpha1",
                "kind": "SluiceCluster",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "model": {"pvc": {"claimName": "models", "path": "qwen3.5-35b-a3b"}},
                    "image": {"name": "registry.example/sluice:0.1.0"},
                    "etcd": {"managed": true},
                    "prefill": {"replicas": 1},
                    "decode": {"replicas": 2},
                },
            }),
        }
    }

    fn set(mut self, pointer: &str, value: Value) -> Self {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = self.value.pointer_mut(parent).unwrap();
        target[key] = value;
        self
    }

    fn experts(self, replicas: i32, shards: i32) -> Self {
        self.set(
            "/spec/experts",
            json!({"replicas": replicas, "shards": shards}),
        )
    }

    fn build(self) -> Value {
        self.value
    }
}

fn cr_path(name: &str) -> String {
    format!("/apis/sluice.dev/v1alpha1/namespaces/{NS}/sluiceclusters/{name}")
}

fn deployment_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}")
}

fn statefulset_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}")
}

/// Every object the fake holds for the cluster, by path (the CR itself excluded).
fn children(fake: &FakeApi) -> Vec<String> {
    let mut all = Vec::new();
    for prefix in [
        format!("/api/v1/namespaces/{NS}/"),
        format!("/apis/apps/v1/namespaces/{NS}/"),
        format!("/apis/policy/v1/namespaces/{NS}/"),
    ] {
        all.extend(fake.paths(&prefix));
    }
    all
}

async fn reconcile_once(fake: &FakeApi, name: &str) {
    let cr: SluiceCluster = serde_json::from_value(fake.get(&cr_path(name)).unwrap()).unwrap();
    let ctx = Arc::new(Context {
        client: fake.client(),
    });
    reconcile(Arc::new(cr), ctx).await.unwrap();
}

fn condition(cr: &Value, kind: &str) -> Value {
    cr["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} condition in {}", cr["status"]))
}

#[tokio::test]
async fn create_scale_repair_and_status() {
    let fake = FakeApi::default();
    fake.create(
        &cr_path("demo"),
        ClusterBuilder::new("demo").experts(2, 2).build(),
    );
    reconcile_once(&fake, "demo").await;

    let cr = fake.get(&cr_path("demo")).unwrap();
    let uid = cr["metadata"]["uid"].clone();
    assert_eq!(cr["metadata"]["finalizers"], json!([FINALIZER]));
    let mut got = children(&fake);
    got.sort();
    let mut want: Vec<String> = [
        "/api/v1/namespaces/ml/configmaps/demo-config",
        "/api/v1/namespaces/ml/services/demo-etcd",
        "/api/v1/namespaces/ml/services/demo-router",
        "/api/v1/namespaces/ml/services/demo-prefill",
        "/api/v1/namespaces/ml/services/demo-decode",
        "/api/v1/namespaces/ml/services/demo-experts",
        "/apis/apps/v1/namespaces/ml/statefulsets/demo-etcd",
        "/apis/apps/v1/namespaces/ml/statefulsets/demo-experts",
        "/apis/apps/v1/namespaces/ml/deployments/demo-router",
        "/apis/apps/v1/namespaces/ml/deployments/demo-prefill",
        "/apis/apps/v1/namespaces/ml/deployments/demo-decode",
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo-router",
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo-prefill",
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo-decode",
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo-experts",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(got, want);
    for path in &got {
        let o = fake.get(path).unwrap();
        let owners = o["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(owners.len(), 1, "{path}");
        assert_eq!(owners[0]["uid"], uid, "{path}");
        assert_eq!(owners[0]["kind"], "SluiceCluster", "{path}");
        assert_eq!(owners[0]["controller"], true, "{path}");
    }
    let decode = fake.get(&deployment_path("demo-decode")).unwrap();
    assert_eq!(decode["spec"]["replicas"], 2);
    let config = fake
        .get("/api/v1/namespaces/ml/configmaps/demo-config")
        .unwrap();
    assert_eq!(
        config["data"]["SLUICE_ETCD"],
        "http://demo-etcd.ml.svc:2379"
    );
    assert_eq!(config["data"]["SLUICE_MODEL"], "/models/qwen3.5-35b-a3b");

    // Nothing is ready yet.
    let cr = fake.get(&cr_path("demo")).unwrap();
    assert_eq!(cr["status"]["observedGeneration"], 1);
    let ready = condition(&cr, "Ready");
    assert_eq!(ready["status"], "False");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("decode 0/2 ready"),
        "{ready}"
    );
    assert_eq!(condition(&cr, "Degraded")["status"], "False");

    // Scale decode to 4: the Deployment is patched in place (same uid).
    let decode_uid = decode["metadata"]["uid"].clone();
    fake.edit(
        &cr_path("demo"),
        json!({"spec": {"decode": {"replicas": 4}}}),
    );
    reconcile_once(&fake, "demo").await;
    let decode = fake.get(&deployment_path("demo-decode")).unwrap();
    assert_eq!(decode["spec"]["replicas"], 4);
    assert_eq!(decode["metadata"]["uid"], decode_uid);
    assert_eq!(
        fake.get(&cr_path("demo")).unwrap()["status"]["observedGeneration"],
        2
    );

    // A child deleted behind the operator's back comes back.
    fake.remove(&deployment_path("demo-prefill")).unwrap();
    reconcile_once(&fake, "demo").await;
    assert!(fake.get(&deployment_path("demo-prefill")).is_some());

    // Workloads report ready: the cluster is Ready.
    for (path, n) in [
        (deployment_path("demo-router"), 1),
        (deployment_path("demo-prefill"), 1),
        (deployment_path("demo-decode"), 4),
        (statefulset_path("demo-experts"), 2),
        (statefulset_path("demo-etcd"), 1),
    ] {
        fake.edit(
            &path,
            json!({"status": {"readyReplicas": n, "replicas": n}}),
        );
    }
    reconcile_once(&fake, "demo").await;
    let cr = fake.get(&cr_path("demo")).unwrap();
    assert_eq!(
        condition(&cr, "Ready")["status"],
        "True",
        "{}",
        cr["status"]
    );
    assert_eq!(
        cr["status"]["decode"],
        json!({"replicas": 4, "readyReplicas": 4})
    );
    assert_eq!(
        cr["status"]["experts"],
        json!({"replicas": 2, "readyReplicas": 2})
    );

    // Dropping the experts and the managed etcd removes their objects.
    fake.edit(
        &cr_path("demo"),
        json!({"spec": {"experts": null, "etcd": {"managed": false, "endpoints": ["http://etcd.infra:2379"]}}}),
    );
    reconcile_once(&fake, "demo").await;
    let left = children(&fake);
    assert!(
        !left
            .iter()
            .any(|p| p.ends_with("demo-experts") || p.ends_with("demo-etcd")),
        "{left:?}"
    );
    let config = fake
        .get("/api/v1/namespaces/ml/configmaps/demo-config")
        .unwrap();
    assert_eq!(config["data"]["SLUICE_ETCD"], "http://etcd.infra:2379");
    let decode = fake.get(&deployment_path("demo-decode")).unwrap();
    let args = decode["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        !args
            .as_array()
            .unwrap()
            .contains(&json!("--experts=remote")),
        "{args}"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_and_creates_nothing() {
    let fake = FakeApi::default();
    let bad = ClusterBuilder::new("bad")
        .set("/spec/decode/replicas", json!(0))
        .experts(3, 2)
        .build();
    fake.create(&cr_path("bad"), bad);
    reconcile_once(&fake, "bad").await;
    assert_eq!(children(&fake), Vec::<String>::new());
    let cr = fake.get(&cr_path("bad")).unwrap();
    let degraded = condition(&cr, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    let message = degraded["message"].as_str().unwrap();
    assert!(message.contains("decode.replicas is 0"), "{message}");
    assert!(
        message.contains("experts.shards (2) must equal experts.replicas (3)"),
        "{message}"
    );
    assert_eq!(condition(&cr, "Ready")["status"], "False");

    // Fixed: it is created, and Degraded clears.
    fake.edit(
        &cr_path("bad"),
        json!({"spec": {"decode": {"replicas": 1}, "experts": {"replicas": 2}}}),
    );
    reconcile_once(&fake, "bad").await;
    assert!(fake.get(&deployment_path("bad-decode")).is_some());
    let cr = fake.get(&cr_path("bad")).unwrap();
    assert_eq!(condition(&cr, "Degraded")["status"], "False");
}

#[tokio::test]
async fn deletion_runs_the_finalizer_clean_up() {
    let fake = FakeApi::default();
    fake.create(&cr_path("gone"), ClusterBuilder::new("gone").build());
    reconcile_once(&fake, "gone").await;
    assert!(!children(&fake).is_empty());

    // `kubectl delete`: the API server sets deletionTimestamp and waits for finalizers.
    fake.edit(
        &cr_path("gone"),
        json!({"metadata": {"deletionTimestamp": "2026-11-23T01:00:00Z"}}),
    );
    let before = fake.requests().len();
    reconcile_once(&fake, "gone").await;
    assert_eq!(children(&fake), Vec::<String>::new());
    assert!(
        fake.get(&cr_path("gone")).is_none(),
        "the finalizer was removed, so the object went"
    );
    // The router went before the workers, etcd last.
    let deletes: Vec<String> = fake.requests()[before..]
        .iter()
        .filter(|(m, _)| m == "DELETE")
        .map(|(_, p)| p.rsplit('/').next().unwrap().to_string())
        .collect();
    let first = |name: &str| deletes.iter().position(|d| d == name).unwrap();
    assert!(first("gone-router") < first("gone-decode"), "{deletes:?}");
    assert!(first("gone-decode") < first("gone-etcd"), "{deletes:?}");
}
