//! The Sluice operator: the `SluiceCluster` custom resource (`crd`), what it renders to
//! (`render`), the checks on its spec (`validate`) and the controller (`controller`).

pub mod controller;
pub mod crd;
pub mod error;
pub mod render;
pub mod validate;

pub use crd::{SluiceCluster, SluiceClusterSpec, SluiceClusterStatus};
pub use error::{Error, Result};

use kube::CustomResourceExt;

/// The CRD as YAML, as committed in `deploy/kubernetes/crd.yaml`.
pub fn crd_yaml() -> Result<String> {
    let crd = SluiceCluster::crd();
    serde_yaml::to_string(&crd).map_err(|e| Error::Render(e.to_string()))
}

/// `objects` as one YAML stream (`---` between documents).
pub fn to_yaml_stream(objects: &[serde_json::Value]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o).map_err(|e| Error::Render(e.to_string()))?);
    }
    Ok(out)
}
