//! What the operator renders, the committed CRD, the example and the Dockerfiles.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sluice_operator::render::{render, render_values};
use sluice_operator::validate::validate;
use sluice_operator::{SluiceCluster, crd_yaml};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example() -> SluiceCluster {
    let text =
        std::fs::read_to_string(repo().join("deploy/kubernetes/examples/sluicecluster.yaml"))
            .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn the_committed_crd_is_what_the_types_generate() {
    let committed = std::fs::read_to_string(repo().join("deploy/kubernetes/crd.yaml")).unwrap();
    assert!(
        committed == crd_yaml().unwrap(),
        "deploy/kubernetes/crd.yaml is stale: run `sluice-operator crd > deploy/kubernetes/crd.yaml`"
    );
}

/// Drops nulls, so an object and its typed round trip compare field for field.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

#[test]
fn every_rendered_field_survives_the_typed_objects() {
    // A misspelt field would be dropped silently by the typed k8s objects; this catches it.
    let cluster = example();
    let values = render_values(&cluster).unwrap();
    let typed = render(&cluster).unwrap();
    assert_eq!(values.len(), typed.len());
    for (v, t) in values.iter().zip(&typed) {
        assert_eq!(
            without_nulls(v),
            without_nulls(&t.to_value().unwrap()),
            "{} {}",
            t.kind(),
            t.name()
        );
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_example_renders_roles_shards_gpus_and_scheduling() {
    let cluster = example();
    validate(&cluster.spec).unwrap();
    let objects = render_values(&cluster).unwrap();
    let kinds: BTreeSet<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "ConfigMap/qwen-config",
        "Deployment/qwen-router",
        "Deployment/qwen-prefill",
        "Deployment/qwen-decode",
        "StatefulSet/qwen-experts",
        "StatefulSet/qwen-etcd",
        "Service/qwen-router",
        "PodDisruptionBudget/qwen-decode",
    ] {
        assert!(kinds.contains(want), "{want} missing from {kinds:?}");
    }
    // A spec file has no uid: nothing to own the children yet.
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["ownerReferences"].is_null())
    );
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["namespace"] == "sluice")
    );

    let experts = find(&objects, "StatefulSet", "qwen-experts");
    assert_eq!(experts["spec"]["replicas"], 2);
    let c = &experts["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--shard=$(SHARD_INDEX)/2")),
        "{}",
        c["args"]
    );
    let shard_env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SHARD_INDEX")
        .unwrap();
    assert_eq!(
        shard_env["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );

    let decode = find(&objects, "Deployment", "qwen-decode");
    assert_eq!(decode["spec"]["replicas"], 4);
    let pod = &decode["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["command"], json!(["sluice-decode"]));
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--experts=remote") && args.contains(&"--max-sequences=128"),
        "{args:?}"
    );
    assert!(args.contains(&"--advertise=$(POD_IP):50071"), "{args:?}");
    let node = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SLUICE_NODE")
        .expect("SLUICE_NODE is set");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"],
        "sluice.worker.v1.Decode"
    );
    assert_eq!(c["volumeMounts"][1]["mountPath"], "/models");
    assert_eq!(
        pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
        "models"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    for o in &objects {
        if let Some(pod) = o["spec"]["template"]["spec"].as_object() {
            assert_eq!(
                pod["nodeSelector"]["nvidia.com/gpu.present"], "true",
                "{}",
                o["metadata"]["name"]
            );
            assert_eq!(
                pod["tolerations"][0]["key"], "nvidia.com/gpu",
                "{}",
                o["metadata"]["name"]
            );
        }
    }
    let router = find(&objects, "Service", "qwen-router");
    assert_eq!(router["spec"]["type"], "LoadBalancer");
    let config = find(&objects, "ConfigMap", "qwen-config");
    assert_eq!(
        config["data"]["SLUICE_ETCD"],
        "http://qwen-etcd.sluice.svc:2379"
    );
    assert_eq!(config["data"]["SLUICE_MODEL"], "/models/Qwen3.5-35B-A3B");
    assert_eq!(config["data"]["SLUICE_CLUSTER"], "qwen");
}

#[test]
fn impossible_specs_are_refused_with_every_reason() {
    let mut spec = example().spec;
    spec.decode.replicas = 0;
    spec.experts.as_mut().unwrap().shards = 3;
    spec.etcd.endpoints = vec!["etcd:2379".into()];
    spec.router.flags.push("--listen=0.0.0.0:1".into());
    spec.model.image_path = Some("/m".into());
    let problems = validate(&spec).unwrap_err();
    let all = problems.join("\n");
    for want in [
        "decode.replicas is 0",
        "experts.shards (3) must equal experts.replicas (2)",
        "managed etcd and endpoints are exclusive",
        "`etcd:2379` is not an http(s):// URL",
        "router.flags: `--listen` is set by the operator",
        "either pvc or imagePath, not both",
    ] {
        assert!(all.contains(want), "missing `{want}` in:\n{all}");
    }
}

/// A Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                if let Some((op, rest)) = current.trim().split_once(char::is_whitespace) {
                    out.push((op.to_uppercase(), rest.trim().to_string()));
                }
                current.clear();
            }
        }
    }
    out
}

/// The `[[bin]]` and default binary names of the workspace's service crates.
fn workspace_binaries() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    for manifest in [
        "crates/cli/Cargo.toml",
        "router/Cargo.toml",
        "prefill-worker/Cargo.toml",
        "decode-worker/Cargo.toml",
        "expert-worker/Cargo.toml",
        "deploy/operator/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(repo().join(manifest)).unwrap();
        let mut in_bin = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            }
            if in_bin && let Some(name) = line.strip_prefix("name = ") {
                bins.insert(name.trim_matches('"').to_string());
            }
        }
        // A crate without [[bin]] builds a binary named after itself from src/main.rs.
        if !text.contains("[[bin]]") && repo().join(manifest).with_file_name("src/main.rs").exists()
        {
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .unwrap()
                .trim_matches('"');
            bins.insert(package.to_string());
        }
    }
    bins
}

#[test]
fn the_dockerfiles_are_consistent() {
    let bins = workspace_binaries();
    assert!(
        bins.contains("sluice") && bins.contains("sluice-router"),
        "{bins:?}"
    );
    let packages: BTreeSet<&str> = [
        "sluice-cli",
        "sluice-router",
        "sluice-prefill",
        "sluice-decode",
        "sluice-expert",
        "sluice-operator",
    ]
    .into();
    for (file, with_operator) in [("Dockerfile", true), ("Dockerfile.cuda", false)] {
        let path = repo().join("deploy/docker").join(file);
        let ins = instructions(&path);
        let mut args: BTreeSet<String> = BTreeSet::new();
        let mut stages: Vec<String> = Vec::new();
        let mut copied = BTreeSet::new();
        for (op, rest) in &ins {
            // Every ${VAR} is declared by an ARG before it is used.
            for var in rest.split("${").skip(1).filter_map(|s| s.split('}').next()) {
                let var = var.split(':').next().unwrap();
                assert!(args.contains(var), "{file}: ${{{var}}} used before ARG");
            }
            match op.as_str() {
                "ARG" => {
                    args.insert(rest.split('=').next().unwrap().to_string());
                }
                "FROM" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if let [_, as_, name] = words[..] {
                        assert_eq!(as_.to_uppercase(), "AS");
                        stages.push(name.to_string());
                    }
                }
                "COPY" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if let Some(stage) = words[0].strip_prefix("--from=") {
                        assert!(
                            stages.iter().any(|s| s == stage),
                            "{file}: COPY from unknown stage {stage}"
                        );
                        for src in &words[1..words.len() - 1] {
                            let bin = src
                                .strip_prefix("/src/target/release/")
                                .expect("binaries from the build");
                            assert!(
                                bins.contains(bin),
                                "{file}: {bin} is not a workspace binary"
                            );
                            copied.insert(bin.to_string());
                        }
                    } else {
                        for src in &words[..words.len() - 1] {
                            assert!(
                                repo().join(src).exists(),
                                "{file}: COPY source {src} missing"
                            );
                        }
                    }
                }
                "RUN" if rest.contains("cargo build") => {
                    for p in rest.split_whitespace().collect::<Vec<_>>().windows(2) {
                        if p[0] == "-p" {
                            assert!(packages.contains(p[1]), "{file}: unknown package {}", p[1]);
                        }
                    }
                    assert!(rest.contains("--locked"), "{file}: build from Cargo.lock");
                }
                _ => {}
            }
        }
        let mut want: BTreeSet<String> = [
            "sluice",
            "sluice-router",
            "sluice-prefill",
            "sluice-decode",
            "sluice-expert",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if with_operator {
            want.insert("sluice-operator".into());
        }
        assert_eq!(copied, want, "{file}");
        // The runtime stage: the last FROM; no toolchain, a numeric non-root user.
        let last_from = ins.iter().rposition(|(op, _)| op == "FROM").unwrap();
        assert!(
            !ins[last_from].1.starts_with("rust:"),
            "{file}: runtime stage is a build image"
        );
        let user = ins[last_from..]
            .iter()
            .rev()
            .find(|(op, _)| op == "USER")
            .expect("a USER");
        let uid: u32 = user
            .1
            .split(':')
            .next()
            .unwrap()
            .parse()
            .expect("numeric uid");
        assert_ne!(uid, 0, "{file}: runs as root");
        assert!(
            !ins[last_from..]
                .iter()
                .any(|(op, rest)| op == "RUN" && rest.contains("cargo")),
            "{file}: cargo in the runtime stage"
        );
    }
    assert!(repo().join(".dockerignore").exists());
}
