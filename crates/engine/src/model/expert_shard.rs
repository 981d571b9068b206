//! The routed experts of a contiguous expert range, every MoE layer: what an expert worker
//! holds. It computes exactly what [`SparseMoe`](super::layers::moe::SparseMoe) computes for
//! the same rows, so remote and local experts give bit-identical outputs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use super::layers::mlp::Mlp;
use super::layers::moe::{ExpertGroup, load_experts, scale_rows};
use super::qwen35::{fingerprint, tensor_prefix};
use crate::backend::{Backend, CpuBackend};
use crate::config::{FfnKind, load_spec};
use crate::error::{EngineError, Result};
use crate::tensor::DType;
use crate::weights::WeightStore;

pub struct ExpertShard<B: Backend = CpuBackend> {
    backend: B,
    range: Range<usize>,
    experts: usize,
    hidden: usize,
    /// MoE layer index → experts `range`, in order.
    layers: BTreeMap<usize, Vec<Mlp>>,
    spec: crate::config::ModelSpec,
    fingerprint: u64,
}

/// Experts of shard `index` of `count`: contiguous, sizes differing by at most one.
pub fn shard_range(experts: usize, index: usize, count: usize) -> Result<Range<usize>> {
    if count == 0 || index >= count || count > experts {
        return Err(EngineError::InvalidArgument {
            field: "shard",
            message: format!(
                "shard {index}/{count} is impossible for {experts} experts \
                 (need index < count <= experts)"
            ),
        });
    }
    Ok(index * experts / count..(index + 1) * experts / count)
}

impl ExpertShard<CpuBackend> {
    /// Loads experts `range` of every MoE layer of `dir` onto the default CPU backend.
    pub fn load(dir: &Path, range: Range<usize>) -> Result<Self> {
        ExpertShard::load_on(CpuBackend::default(), dir, range)
    }
}

impl<B: Backend> ExpertShard<B> {
    /// As `load`, on `backend`.
    pub fn load_on(backend: B, dir: &Path, range: Range<usize>) -> Result<Self> {
        let spec = load_spec(dir)?;
        let moe = spec
            .moe
            .clone()
            .ok_or_else(|| EngineError::InvalidArgument {
                field: "model",
                message: "the model has no MoE layers: there are no experts to host".into(),
            })?;
        if range.is_empty() || range.end > moe.experts {
            return Err(EngineError::InvalidArgument {
                field: "shard",
                message: format!("experts {range:?} outside 0..{}", moe.experts),
            });
        }
        let store = WeightStore::open(dir)?;
        let prefix = tensor_prefix(&store);
        let mut layers = BTreeMap::new();
        for (i, layer) in spec.layers.iter().enumerate() {
            if layer.ffn == FfnKind::Moe {
                let p = format!("{prefix}.layers.{i}.mlp");
                layers.insert(
                    i,
                    load_experts(&store, &p, &moe, spec.hidden, range.clone())?,
                );
            }
        }
        let embed = format!("{prefix}.embed_tokens.weight");
        let (dtype_name, _, _) = store.raw(&embed)?;
        let dtype =
            DType::from_safetensors(dtype_name).ok_or_else(|| EngineError::TensorDType {
                name: embed.clone(),
                actual: dtype_name.to_string(),
                expected: "F32, BF16 or F16",
            })?;
        Ok(ExpertShard {
            backend,
            range,
            experts: moe.experts,
            hidden: spec.hidden,
            layers,
            fingerprint: fingerprint(&spec, dtype),
            spec,
        })
    }

    /// As [`Model::set_weight_format`](super::qwen35::Model::set_weight_format) for these
    /// experts: a decode worker with int8 weights dispatches only to int8 expert workers.
    pub fn set_weight_format(&mut self, format: crate::tensor::WeightFormat) {
        if format != crate::tensor::WeightFormat::Int8 {
            return;
        }
        self.layers
            .values_mut()
            .flat_map(|experts| experts.iter_mut())
            .par_bridge()
            .for_each(Mlp::quantize_int8);
        self.fingerprint = fingerprint(&self.spec, DType::I8);
    }

    /// The experts this shard hosts.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Number of experts per layer in the whole model.
    pub fn total_experts(&self) -> usize {
        self.experts
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Same value as [`Model::fingerprint`](super::Model::fingerprint) for the same checkpoint.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Weighted outputs `weights[i] · expert(x[i])`, one `[rows, hidden]` per group.
    pub fn run(&self, layer: usize, groups: &[ExpertGroup]) -> Result<Vec<Vec<f32>>> {
        let experts = self
            .layers
            .get(&layer)
            .ok_or_else(|| EngineError::InvalidArgument {
                field: "layer",
                message: format!("layer {layer} is not a MoE layer of this model"),
            })?;
        let mut picked = Vec::with_capacity(groups.len());
        for g in groups {
            if !self.range.contains(&g.expert) {
                return Err(EngineError::InvalidArgument {
                    field: "expert",
                    message: format!(
                        "expert {} is not in this shard ({:?})",
                        g.expert, self.range
                    ),
                });
            }
            if g.x.len() != g.weights.len() * self.hidden {
                return Err(EngineError::InvalidArgument {
                    field: "rows",
                    message: format!(
                        "expert {}: {} values for {} rows of width {}",
                        g.expert,
                        g.x.len(),
                        g.weights.len(),
                        self.hidden
                    ),
                });
            }
            picked.push(&experts[g.expert - self.range.start]);
        }
        // The groups' rows packed `[rows, hidden]`, run as one call of the backend.
        let mut bounds = Vec::with_capacity(groups.len() + 1);
        bounds.push(0);
        let mut xs = Vec::new();
        for g in groups {
            xs.extend_from_slice(&g.x);
            bounds.push(bounds[bounds.len() - 1] + g.weights.len());
        }
        let ids: Vec<usize> = (0..groups.len()).collect();
        let mut ys = vec![0.0; xs.len()];
        self.backend
            .expert_groups(&|j| picked[j].weights(), &ids, &bounds, &xs, &mut ys);
        Ok(groups
            .iter()
            .enumerate()
            .map(|(j, g)| {
                let mut y = ys[bounds[j] * self.hidden..bounds[j + 1] * self.hidden].to_vec();
                scale_rows(&mut y, &g.weights);
                y
            })
            .collect())
    }
}
