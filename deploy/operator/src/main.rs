//! `sluice-operator`: `run` the controller, print the `crd`, or `render` what a
//! `SluiceCluster` spec file reconciles to.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use sluice_operator::controller::{Context, error_policy, reconcile};
use sluice_operator::{SluiceCluster, crd_yaml, render, to_yaml_stream};

#[derive(Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Kubernetes operator for Sluice clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in the cluster, or with a kubeconfig).
    Run {
        /// Watch one namespace only (default: all).
        #[arg(long, env = "SLUICE_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
    },
    /// Print the SluiceCluster CRD as YAML.
    Crd,
    /// Print the objects a SluiceCluster (a YAML or JSON file) reconciles to.
    Render {
        #[arg(long)]
        spec: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .json()
        .init();
    match Cli::parse().command {
        Command::Crd => print!("{}", crd_yaml()?),
        Command::Render { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            let cluster: SluiceCluster = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not a SluiceCluster", spec.display()))?;
            if let Err(problems) = sluice_operator::validate::validate(&cluster.spec) {
                anyhow::bail!("{}: invalid spec: {}", spec.display(), problems.join("; "));
            }
            print!("{}", to_yaml_stream(&render::render_values(&cluster)?)?);
        }
        Command::Run { namespace } => tokio::runtime::Runtime::new()?.block_on(run(namespace))?,
    }
    Ok(())
}

async fn run(namespace: Option<String>) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let config = watcher::Config::default();
    let owned =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "sluice-operator watching SluiceClusters"
    );
    Controller::new(api::<SluiceCluster>(&client, &namespace), config)
        .owns(api::<Deployment>(&client, &namespace), owned())
        .owns(api::<StatefulSet>(&client, &namespace), owned())
        .owns(api::<Service>(&client, &namespace), owned())
        .owns(api::<ConfigMap>(&client, &namespace), owned())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned())
        .shutdown_on_signal()
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(cluster = %object.name, "reconciled"),
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
        })
        .await;
    Ok(())
}
