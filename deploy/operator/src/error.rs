use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering the cluster's objects: {0}")]
    Render(String),
    #[error("the SluiceCluster has no namespace")]
    NoNamespace,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
