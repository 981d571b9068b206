//! Specs that cannot work are refused with every reason at once; the controller reports them
//! in the `Degraded` condition and creates nothing.

use crate::crd::SluiceClusterSpec;

/// Flags the operator sets itself; a role's `flags` must not override them.
const MANAGED_FLAGS: &[&str] = &[
    "--listen",
    "--advertise",
    "--etcd",
    "--model",
    "--cluster",
    "--worker-id",
    "--shard",
    "--http-listen",
    "--metrics-listen",
    "--experts",
];

const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];
const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer"];

/// Every problem with `spec`, or `Ok` when it can be deployed.
pub fn validate(spec: &SluiceClusterSpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut check = |ok: bool, problem: String| {
        if !ok {
            problems.push(problem);
        }
    };

    check(
        !spec.image.name.trim().is_empty(),
        "image.name is empty".into(),
    );
    if let Some(p) = &spec.image.pull_policy {
        check(
            PULL_POLICIES.contains(&p.as_str()),
            format!(
                "image.pullPolicy `{p}` is not one of {}",
                PULL_POLICIES.join(", ")
            ),
        );
    }

    match (&spec.model.pvc, &spec.model.image_path) {
        (Some(pvc), None) => {
            check(
                !pvc.claim_name.is_empty(),
                "model.pvc.claimName is empty".into(),
            );
            check(
                !pvc.path.starts_with('/') && !pvc.path.split('/').any(|c| c == ".."),
                format!(
                    "model.pvc.path `{}` must be relative to the volume, without `..`",
                    pvc.path
                ),
            );
        }
        (None, Some(path)) => check(
            path.starts_with('/'),
            format!("model.imagePath `{path}` must be an absolute path"),
        ),
        (Some(_), Some(_)) => check(
            false,
            "model: give either pvc or imagePath, not both".into(),
        ),
        (None, None) => check(false, "model: give pvc or imagePath".into()),
    }

    let etcd = &spec.etcd;
    check(
        etcd.managed == etcd.endpoints.is_empty(),
        if etcd.managed {
            "etcd: managed etcd and endpoints are exclusive".into()
        } else {
            "etcd: give endpoints or set managed: true".into()
        },
    );
    for e in &etcd.endpoints {
        check(
            e.starts_with("http://") || e.starts_with("https://"),
            format!("etcd.endpoints: `{e}` is not an http(s):// URL"),
        );
    }

    let router = &spec.router;
    check(
        router.replicas >= 1,
        format!("router.replicas is {}; at least 1", router.replicas),
    );
    for (name, port) in [
        ("grpcPort", router.grpc_port),
        ("httpPort", router.http_port),
    ] {
        check(
            (1..=65535).contains(&port),
            format!("router.{name} {port} is not a port"),
        );
    }
    check(
        router.grpc_port != router.http_port,
        "router.grpcPort and router.httpPort are the same".into(),
    );
    if let Some(t) = &router.service_type {
        check(
            SERVICE_TYPES.contains(&t.as_str()),
            format!(
                "router.serviceType `{t}` is not one of {}",
                SERVICE_TYPES.join(", ")
            ),
        );
    }
    check(
        spec.prefill.replicas >= 1,
        format!("prefill.replicas is {}; at least 1", spec.prefill.replicas),
    );
    check(
        spec.decode.replicas >= 1,
        format!("decode.replicas is {}; at least 1", spec.decode.replicas),
    );
    if let Some(x) = &spec.experts {
        check(
            x.replicas >= 1,
            format!("experts.replicas is {}; at least 1", x.replicas),
        );
        check(
            x.shards == x.replicas,
            format!(
                "experts.shards ({}) must equal experts.replicas ({}): each replica hosts one shard",
                x.shards, x.replicas
            ),
        );
    }

    let mut flag_lists: Vec<(&str, &[String])> = vec![
        ("router", &router.flags),
        ("prefill", &spec.prefill.flags),
        ("decode", &spec.decode.flags),
    ];
    if let Some(x) = &spec.experts {
        flag_lists.push(("experts", &x.flags));
    }
    for (role, flags) in flag_lists {
        for flag in flags {
            let name = flag.split('=').next().unwrap_or(flag);
            check(
                flag.starts_with("--"),
                format!("{role}.flags: `{flag}` is not a --flag"),
            );
            check(
                !MANAGED_FLAGS.contains(&name),
                format!("{role}.flags: `{name}` is set by the operator"),
            );
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
