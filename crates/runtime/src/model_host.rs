//! Loading the model for a prefill or decode worker, with its routed experts here or on
//! expert workers (`--experts local|remote`), or the mock engine (`--engine mock`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::backend::{CpuBackend, CpuOptions};
use sluice_engine::{ExpertResidency, LanguageModel, MockModel, MockTiming, Model};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineKind {
    /// Run the checkpoint's weights.
    #[default]
    Model,
    /// Compute nothing: steps take `--mock-step-ms` (+ prompt tokens at `--mock-prefill-tps`)
    /// and emit a fixed sequence of tokens; only the checkpoint's config.json is read.
    Mock,
}

/// Which engine a worker runs, and the mock's timing.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    #[arg(long, env = "SLUICE_ENGINE", value_enum, default_value_t = EngineKind::Model)]
    pub engine: EngineKind,
    /// With `--engine mock`: milliseconds one forward step takes, whatever its batch.
    #[arg(long, env = "SLUICE_MOCK_STEP_MS", default_value_t = 20.0)]
    pub mock_step_ms: f64,
    /// With `--engine mock`: prompt tokens per second a step adds on top (0 = free).
    #[arg(long, env = "SLUICE_MOCK_PREFILL_TPS", default_value_t = 50_000.0)]
    pub mock_prefill_tps: f64,
    /// With `--engine mock`, fault injection: every forward step after the first N panics,
    /// as an engine bug would (the worker must leave the cluster and its requests migrate).
    #[arg(long, env = "SLUICE_MOCK_PANIC_AFTER_STEPS")]
    pub mock_panic_after_steps: Option<u64>,
}

impl EngineArgs {
    /// The mock's timing, checked.
    pub fn mock_timing(&self) -> Result<MockTiming> {
        if !(self.mock_step_ms.is_finite() && self.mock_step_ms >= 0.0) {
            return Err(crate::RuntimeError::invalid(
                "mock-step-ms",
                "must be a number of milliseconds, at least 0",
            ));
        }
        if !(self.mock_prefill_tps.is_finite() && self.mock_prefill_tps >= 0.0) {
            return Err(crate::RuntimeError::invalid(
                "mock-prefill-tps",
                "must be a rate, at least 0",
            ));
        }
        Ok(MockTiming {
            step: Duration::from_secs_f64(self.mock_step_ms / 1000.0),
            prefill_tokens_per_s: self.mock_prefill_tps,
        })
    }

    /// The mock for the checkpoint in `dir` (its config.json only).
    pub fn mock(&self, dir: &Path) -> Result<Arc<dyn LanguageModel>> {
        let spec = sluice_engine::config::load_spec(dir)?;
        Ok(Arc::new(
            MockModel::new(&spec, self.mock_timing()?)
                .with_panic_after_steps(self.mock_panic_after_steps),
        ))
    }
}

/// Flags of the workers that run the model (prefill and decode).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelWorkerArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Run the routed experts here (`local`) or on expert workers (`remote`).
    #[arg(long, env = "SLUICE_EXPERTS", value_enum, default_value_t = ExpertsMode::Local)]
    pub experts: ExpertsMode,
    /// With `--experts remote`: seconds one MoE layer's dispatch to an expert worker may take
    /// before that worker counts as failed and the dispatch goes to a replica of its experts.
    #[arg(long, env = "SLUICE_EXPERT_TIMEOUT", default_value_t = 30)]
    pub expert_timeout: u64,
    /// Longest sequence (prompt + output), in tokens.
    #[arg(long, env = "SLUICE_MAX_CONTEXT", default_value_t = DEFAULT_MAX_CONTEXT)]
    pub max_context: usize,
    /// Threads for the model's kernels, caller included (default: the CPUs this process may
    /// use, cgroup quota included; pinned to cores when the process owns exactly that many).
    #[arg(long, env = "SLUICE_THREADS")]
    pub threads: Option<usize>,
    /// `exact` (f32 activations) or `fast` (bf16 activations into bf16-weight products, f32
    /// accumulation; needs AVX-512 BF16, else exact).
    #[arg(long, env = "SLUICE_PRECISION", default_value = "exact")]
    pub precision: sluice_engine::backend::Precision,
    /// `checkpoint` (as stored) or `int8` (per-row symmetric, quantized at load: half the
    /// bytes per decode step).
    #[arg(long, env = "SLUICE_WEIGHTS", default_value = "checkpoint")]
    pub weights: sluice_engine::WeightFormat,
    /// Compute device: cpu or cuda:N.
    #[arg(long, env = "SLUICE_DEVICE", default_value = "cpu")]
    pub device: sluice_engine::Device,
    #[command(flatten)]
    pub transport: crate::transport::select::TransportArgs,
}

impl ModelWorkerArgs {
    /// Follows the cluster's workers (for remote experts) and loads the model from `dir`; or
    /// makes the mock.
    pub async fn load(
        &self,
        dir: &Path,
        membership: Arc<dyn crate::Membership>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<dyn LanguageModel>> {
        // The mock computes nothing, so it runs "on" any device (the GPU transports can be
        // exercised without the model's kernels).
        if self.engine.engine == EngineKind::Mock {
            return self.engine.mock(dir);
        }
        let backend = self.device.open(CpuOptions {
            threads: self.threads,
            precision: self.precision,
        })?;
        if backend.precision() != self.precision {
            tracing::warn!(requested = %self.precision, effective = %backend.precision(), "fast precision needs AVX-512 BF16");
        }
        let directory = WorkerDirectory::start(membership, shutdown).await?;
        let experts = RemoteExpertsConfig {
            timeout: Duration::from_secs(self.expert_timeout.max(1)),
        };
        Ok(load_model(
            backend,
            dir,
            self.experts,
            self.weights,
            Some((directory, experts)),
        )
        .await?)
    }
}

impl ModelWorkerArgs {
    /// The cache transports this worker offers (`--transport` on `--device`).
    pub fn transport_plan(&self) -> Result<crate::transport::select::TransportPlan> {
        self.transport.plan(self.device)
    }
}

/// `--max-context` unless set: the longest sequence (prompt + output) a worker takes.
pub const DEFAULT_MAX_CONTEXT: usize = 8192;

/// How a model worker reaches its remote experts.
#[derive(Debug, Clone, Copy)]
pub struct RemoteExpertsConfig {
    /// One dispatch's limit before its expert worker counts as failed.
    pub timeout: Duration,
}

impl Default for RemoteExpertsConfig {
    fn default() -> Self {
        RemoteExpertsConfig {
            timeout: crate::experts::DEFAULT_DISPATCH_TIMEOUT,
        }
    }
}

/// Loads `dir` onto `backend` on a blocking thread; with `Remote`, wires the expert
/// dispatcher to the directory in `remote` (which must then be given).
pub async fn load_model(
    backend: CpuBackend,
    dir: &Path,
    mode: ExpertsMode,
    weights: sluice_engine::WeightFormat,
    remote: Option<(Arc<WorkerDirectory>, RemoteExpertsConfig)>,
) -> Result<Arc<Model>> {
    let dir = dir.to_path_buf();
    let residency = match mode {
        ExpertsMode::Local => ExpertResidency::All,
        ExpertsMode::Remote => ExpertResidency::Remote,
    };
    let mut model = tokio::task::spawn_blocking(move || -> sluice_engine::Result<Model> {
        let mut model = Model::load_on(backend, &dir, &residency, |_, _| {})?;
        model.set_weight_format(weights);
        Ok(model)
    })
    .await
    .map_err(|e| crate::RuntimeError::Internal(format!("model loading panicked: {e}")))??;
    if mode == ExpertsMode::Remote {
        let (directory, experts) = remote.ok_or_else(|| {
            crate::RuntimeError::invalid("experts", "remote experts need the cluster membership")
        })?;
        let fingerprint = model.fingerprint();
        model.set_expert_executor(Arc::new(
            RemoteExperts::new(directory, fingerprint, tokio::runtime::Handle::current())
                .with_timeout(experts.timeout),
        ));
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
