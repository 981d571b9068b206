//! Loading the model for a prefill or decode worker, with its routed experts here or on
//! expert workers (`--experts local|remote`).

use std::path::Path;
use std::sync::Arc;

use sluice_engine::{ExpertResidency, Model};

use crate::directory::WorkerDirectory;
use crate::error::Result;
use crate::experts::RemoteExperts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExpertsMode {
    /// Load every expert in this process.
    #[default]
    Local,
    /// Load no routed expert; dispatch MoE rows to the registered expert workers.
    Remote,
}

/// Flags of the workers that run the model (prefill and decode).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelWorkerArgs {
    /// Run the routed experts here (`local`) or on expert workers (`remote`).
    #[arg(long, env = "SLUICE_EXPERTS", value_enum, default_value_t = ExpertsMode::Local)]
    pub experts: ExpertsMode,
    /// Longest sequence (prompt + output), in tokens.
    #[arg(long, env = "SLUICE_MAX_CONTEXT", default_value_t = 8192)]
    pub max_context: usize,
    /// Threads for the model's kernels (default: all cores).
    #[arg(long, env = "SLUICE_THREADS")]
    pub threads: Option<usize>,
}

impl ModelWorkerArgs {
    /// Follows the cluster's workers (for remote experts) and loads the model from `dir`.
    pub async fn load(
        &self,
        dir: &Path,
        membership: Arc<dyn crate::Membership>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Model>> {
        let directory = WorkerDirectory::start(membership, shutdown).await?;
        load_model(dir, self.experts, Some(directory)).await
    }
}

/// Loads `dir` on a blocking thread; with `Remote`, wires the expert dispatcher to
/// `directory` (which must then be given).
pub async fn load_model(
    dir: &Path,
    mode: ExpertsMode,
    directory: Option<Arc<WorkerDirectory>>,
) -> Result<Arc<Model>> {
    let dir = dir.to_path_buf();
    let residency = match mode {
        ExpertsMode::Local => ExpertResidency::All,
        ExpertsMode::Remote => ExpertResidency::Remote,
    };
    let mut model =
        tokio::task::spawn_blocking(move || Model::load_with(&dir, &residency, |_, _| {}))
            .await
            .map_err(|e| crate::RuntimeError::Internal(format!("model loading panicked: {e}")))??;
    if mode == ExpertsMode::Remote {
        let directory = directory.ok_or_else(|| {
            crate::RuntimeError::invalid("experts", "remote experts need the cluster membership")
        })?;
        let fingerprint = model.fingerprint();
        model.set_expert_executor(Arc::new(RemoteExperts::new(
            directory,
            fingerprint,
            tokio::runtime::Handle::current(),
        )));
    }
    Ok(Arc::new(model))
}

/// The model's name as shown to clients: its directory name.
pub fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}
