//! Where a command's model comes from: `--model DIR`, or a synthetic preset generated once into
//! the cache directory (the default, so every command runs on a machine with no model).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sluice_engine::backend::{CpuBackend, CpuOptions};
use sluice_engine::synth::write_checkpoint;
use sluice_engine::{ExpertResidency, Model, Preset};

use crate::progress::Progress;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "SLUICE_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A built-in synthetic model (tiny, small, bench), used when --model is not given.
    #[arg(long, env = "SLUICE_PRESET", default_value = "tiny")]
    pub preset: Preset,
    /// Seed of the synthetic model.
    #[arg(long = "synth-seed", default_value_t = 0)]
    pub synth_seed: u64,
    /// Compute device: cpu or cuda:N.
    #[arg(long, env = "SLUICE_DEVICE", default_value = "cpu")]
    pub device: sluice_engine::Device,
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
}

impl ModelArgs {
    /// The checkpoint directory, synthesising the preset first if needed.
    pub fn resolve(&self) -> Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => cached_preset(self.preset, self.synth_seed),
        }
    }

    /// Opens the backend `--device`, `--threads` and `--precision` ask for (once per process:
    /// it sizes the loading threads too), saying so when fast precision is not available.
    pub fn open_backend(&self) -> Result<CpuBackend> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            sluice_engine::backend::cpu::set_load_threads(n)
                .map_err(|e| anyhow::anyhow!("setting up the loading threads: {e}"))?;
        }
        let backend = self.device.open(CpuOptions {
            threads: self.threads,
            precision: self.precision,
        })?;
        if backend.precision() != self.precision {
            eprintln!(
                "note: --precision {} needs AVX-512 BF16, which this CPU lacks; using {}",
                self.precision,
                backend.precision()
            );
        }
        Ok(backend)
    }

    /// Opens the backend, then loads the model onto it.
    pub fn load(&self) -> Result<(PathBuf, Model)> {
        let backend = self.open_backend()?;
        let dir = self.resolve()?;
        let mut bar = Progress::new("loading");
        let mut model = Model::load_on(backend, &dir, &ExpertResidency::All, |done, total| {
            bar.update(done, total)
        })
        .with_context(|| format!("loading the model from {}", dir.display()))?;
        model.set_weight_format(self.weights);
        Ok((dir, model))
    }
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("sluice");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/sluice"),
        None => std::env::temp_dir().join("sluice-cache"),
    }
}

/// The preset's directory in the cache, written on first use (atomically: a half-written
/// checkpoint is never picked up).
fn cached_preset(preset: Preset, seed: u64) -> Result<PathBuf> {
    let dir = cache_root()
        .join("synth")
        .join(format!("{preset}-seed{seed}"));
    if dir.join("tokenizer_config.json").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().context("cache directory has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{preset}-seed{seed}.{}", std::process::id()));
    synth(preset, &tmp, seed)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished first: use its copy.
        Err(_) if dir.join("tokenizer_config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            Err(e).with_context(|| format!("moving the synthetic model to {}", dir.display()))
        }
    }
}

pub fn synth(preset: Preset, out: &Path, seed: u64) -> Result<()> {
    let mut bar = Progress::new("synth");
    write_checkpoint(preset, out, seed, |done, total| bar.update(done, total))
        .with_context(|| format!("writing the {preset} preset to {}", out.display()))
}
