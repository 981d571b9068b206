//! The reconciler: validate → apply every child with server-side apply → delete children the
//! spec no longer asks for → report readiness. Deletion runs through a finalizer that removes
//! the children in order (router first, etcd last) before the `SluiceCluster` goes.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::crd::{RoleStatus, SluiceCluster, SluiceClusterStatus};
use crate::error::{Error, Result};
use crate::render::{self, Child, Component, MANAGER, child_name};
use crate::validate::validate;

pub const FINALIZER: &str = "sluice.dev/cleanup";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
}

pub async fn reconcile(cluster: Arc<SluiceCluster>, ctx: Arc<Context>) -> Result<Action> {
    let ns = cluster.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<SluiceCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let name = cluster.name_any();
    let has_finalizer = cluster.finalizers().iter().any(|f| f == FINALIZER);

    if cluster.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            delete_children(&ctx.client, &ns, &name, &[]).await?;
            let rest: Vec<&String> = cluster
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .collect();
            set_finalizers(&api, &cluster, json!(rest)).await?;
            tracing::info!(cluster = %name, namespace = %ns, "deleted");
        }
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut all: Vec<String> = cluster.finalizers().to_vec();
        all.push(FINALIZER.into());
        set_finalizers(&api, &cluster, json!(all)).await?;
    }

    let generation = cluster.meta().generation;
    if let Err(problems) = validate(&cluster.spec) {
        // A bad edit of a running cluster leaves what runs alone; a new one gets nothing.
        let message = problems.join("; ");
        tracing::warn!(cluster = %name, namespace = %ns, "invalid spec: {message}");
        let mut status = cluster.status.clone().unwrap_or_default();
        status.observed_generation = generation;
        set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            "InvalidSpec",
            &message,
            generation,
        );
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "InvalidSpec",
            "the spec is invalid",
            generation,
        );
        patch_status(&api, &name, &status).await?;
        return Ok(Action::await_change());
    }

    let children = render::render(&cluster)?;
    for child in &children {
        apply_child(&ctx.client, &ns, child).await?;
    }
    delete_children(&ctx.client, &ns, &name, &children).await?;

    let status = observe(&ctx.client, &ns, &cluster, generation).await?;
    patch_status(&api, &name, &status).await?;
    // Children's changes wake the controller (it watches what it owns); this is a backstop.
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn error_policy(cluster: Arc<SluiceCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cluster = %cluster.name_any(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(15))
}

/// Merge-patches the finalizer list, guarded by the resource version we read.
async fn set_finalizers(
    api: &Api<SluiceCluster>,
    cluster: &SluiceCluster,
    finalizers: serde_json::Value,
) -> Result<()> {
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": cluster.resource_version(),
    }});
    api.patch(
        &cluster.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn patch_status(
    api: &Api<SluiceCluster>,
    name: &str,
    status: &SluiceClusterStatus,
) -> Result<()> {
    let patch = json!({"status": status});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn apply<K>(client: &Client, ns: &str, object: &K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await?;
    Ok(())
}

async fn apply_child(client: &Client, ns: &str, child: &Child) -> Result<()> {
    match child {
        Child::ConfigMap(o) => apply(client, ns, o).await,
        Child::Service(o) => apply(client, ns, o).await,
        Child::Deployment(o) => apply(client, ns, o).await,
        Child::StatefulSet(o) => apply(client, ns, o).await,
        Child::Pdb(o) => apply(client, ns, o).await,
    }
}

async fn delete<K>(client: &Client, ns: &str, name: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every child the cluster could have that is not in `keep`, in the order of
/// `possible_children` (router before workers, etcd last).
async fn delete_children(client: &Client, ns: &str, cluster: &str, keep: &[Child]) -> Result<()> {
    for (kind, name) in render::possible_children(cluster) {
        if keep.iter().any(|c| c.kind() == kind && c.name() == name) {
            continue;
        }
        match kind {
            "ConfigMap" => delete::<ConfigMap>(client, ns, &name).await?,
            "Service" => delete::<Service>(client, ns, &name).await?,
            "Deployment" => delete::<Deployment>(client, ns, &name).await?,
            "StatefulSet" => delete::<StatefulSet>(client, ns, &name).await?,
            "PodDisruptionBudget" => delete::<PodDisruptionBudget>(client, ns, &name).await?,
            _ => {}
        }
    }
    Ok(())
}

/// Replicas wanted and ready per role, and the `Ready` / `Degraded` conditions.
async fn observe(
    client: &Client,
    ns: &str,
    cluster: &SluiceCluster,
    generation: Option<i64>,
) -> Result<SluiceClusterStatus> {
    let name = cluster.name_any();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let deployment = |c| {
        let deployments = deployments.clone();
        let n = child_name(&name, c);
        async move {
            let d = deployments.get_opt(&n).await?;
            let spec = d.as_ref().and_then(|d| d.spec.as_ref()?.replicas);
            Ok::<_, Error>(role_status(spec, d.and_then(|d| d.status?.ready_replicas)))
        }
    };
    let set = |c| {
        let sets = sets.clone();
        let n = child_name(&name, c);
        async move {
            let s = sets.get_opt(&n).await?;
            let spec = s.as_ref().and_then(|s| s.spec.as_ref()?.replicas);
            Ok::<_, Error>(role_status(spec, s.and_then(|s| s.status?.ready_replicas)))
        }
    };
    let mut status = cluster.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.router = deployment(Component::Router).await?;
    status.prefill = deployment(Component::Prefill).await?;
    status.decode = deployment(Component::Decode).await?;
    status.experts = match cluster.spec.experts {
        Some(_) => Some(set(Component::Experts).await?),
        None => None,
    };
    let etcd = match cluster.spec.etcd.managed {
        true => Some(set(Component::Etcd).await?),
        false => None,
    };
    let mut waiting = Vec::new();
    let roles = [
        ("router", Some(&status.router)),
        ("prefill", Some(&status.prefill)),
        ("decode", Some(&status.decode)),
        ("experts", status.experts.as_ref()),
        ("etcd", etcd.as_ref()),
    ];
    for (role, s) in roles {
        if let Some(s) = s
            && s.ready_replicas < s.replicas
        {
            waiting.push(format!("{role} {}/{} ready", s.ready_replicas, s.replicas));
        }
    }
    let ready = waiting.is_empty();
    let (reason, message) = if ready {
        (
            "AllReplicasReady",
            "every role has all its replicas ready".to_string(),
        )
    } else {
        ("ReplicasNotReady", waiting.join(", "))
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        &message,
        generation,
    );
    set_condition(
        &mut status.conditions,
        "Degraded",
        false,
        "AsExpected",
        "the spec is valid and applied",
        generation,
    );
    Ok(status)
}

/// Replicas wanted and ready, as a workload reports them (absent: none).
fn role_status(replicas: Option<i32>, ready: Option<i32>) -> RoleStatus {
    RoleStatus {
        replicas: replicas.unwrap_or(0),
        ready_replicas: ready.unwrap_or(0),
    }
}

/// Sets condition `kind`, keeping its transition time when its status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if on { "True" } else { "False" };
    let now = Time(jiff_now());
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
