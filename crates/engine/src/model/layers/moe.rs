//! Sparse MoE: softmax router in f32, top-k (renormalised when the config says so), SwiGLU
//! experts run on the rows routed to them, plus a shared expert scaled by sigmoid(gate).
//!
//! The routed experts run here or, when the model was loaded without them, on expert workers
//! through an [`ExpertExecutor`]. Either way each expert returns its rows already weighted and
//! the rows are summed in expert order, so both give bit-identical results.

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::cpu;
use crate::config::MoeSpec;
use crate::error::{EngineError, Result};
use crate::tensor::Weight;
use crate::weights::WeightStore;

use super::mlp::Mlp;

/// The rows of one step routed to one expert of one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGroup {
    pub expert: usize,
    /// Routing weight of each row.
    pub weights: Vec<f32>,
    /// `[rows, hidden]`, normed hidden states.
    pub x: Vec<f32>,
}

/// Runs routed experts somewhere else (expert workers). Called from the engine thread, once per
/// MoE layer per step, with every group of that step.
pub trait ExpertExecutor: Send + Sync {
    /// Returns, per group and in order, `weights[i] · expert(x[i])` as `[rows, hidden]`.
    fn run(&self, layer: usize, groups: &[ExpertGroup]) -> Result<Vec<Vec<f32>>>;
}

/// Which routed experts a process loads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExpertResidency {
    /// All of them (a self-contained worker).
    #[default]
    All,
    /// None: every routed expert runs through an [`ExpertExecutor`].
    Remote,
}

pub struct SparseMoe {
    spec: MoeSpec,
    /// `[experts, hidden]`.
    router: Weight,
    /// Empty when the experts are remote.
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    /// `[1, hidden]`.
    shared_gate: Option<Weight>,
}

/// Loads experts `range` of the MoE block at `prefix`, fused or per-expert layout.
pub fn load_experts(
    store: &WeightStore,
    prefix: &str,
    spec: &MoeSpec,
    hidden: usize,
    range: Range<usize>,
) -> Result<Vec<Mlp>> {
    let (e, inter) = (spec.experts, spec.intermediate);
    let fused = format!("{prefix}.experts.gate_up_proj");
    if store.contains(&fused) {
        let down = format!("{prefix}.experts.down_proj");
        range
            .map(|i| {
                Ok(Mlp::new(
                    store.matrix_of_stack(&fused, e, i, 2 * inter, hidden)?,
                    store.matrix_of_stack(&down, e, i, hidden, inter)?,
                ))
            })
            .collect()
    } else {
        range
            .map(|i| Mlp::load(store, &format!("{prefix}.experts.{i}"), hidden, inter))
            .collect()
    }
}

/// `weights[i] · y[i]` for the rows of `y` `[rows, hidden]`, in place.
pub fn scale_rows(y: &mut [f32], weights: &[f32]) {
    let hidden = y.len() / weights.len().max(1);
    for (row, w) in y.chunks_exact_mut(hidden.max(1)).zip(weights) {
        row.iter_mut().for_each(|v| *v *= w);
    }
}

/// Top-k routing of one token.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl SparseMoe {
    /// Loads the router, the shared expert and (per `residency`) the routed experts: fused
    /// (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) or per-expert
    /// (`experts.{e}.{gate,up,down}_proj`).
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        spec: &MoeSpec,
        hidden: usize,
        residency: &ExpertResidency,
    ) -> Result<Self> {
        let e = spec.experts;
        let router = store.matrix(&format!("{prefix}.gate.weight"), e, hidden)?;
        let experts = match residency {
            ExpertResidency::All => load_experts(store, prefix, spec, hidden, 0..e)?,
            ExpertResidency::Remote => Vec::new(),
        };
        let (shared, shared_gate) = if spec.shared_intermediate > 0 {
            (
                Some(Mlp::load(
                    store,
                    &format!("{prefix}.shared_expert"),
                    hidden,
                    spec.shared_intermediate,
                )?),
                Some(store.matrix(&format!("{prefix}.shared_expert_gate.weight"), 1, hidden)?),
            )
        } else {
            (None, None)
        };
        Ok(SparseMoe {
            spec: spec.clone(),
            router,
            experts,
            shared,
            shared_gate,
        })
    }

    /// Bytes of weights one token reads: router, top-k experts, shared expert.
    pub fn active_weight_bytes(&self) -> usize {
        let expert = self.experts.first().map_or(
            3 * self.spec.intermediate * self.router.cols * self.router.dtype().size(),
            Mlp::weight_bytes,
        );
        self.router.bytes()
            + self.spec.top_k * expert
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
            + self.shared_gate.as_ref().map_or(0, Weight::bytes)
    }

    /// Experts (local ones) and the shared expert to int8; the router and the shared
    /// expert's gate stay as stored (they pick and weigh experts; they are small).
    pub fn quantize_int8(&mut self) {
        self.experts.par_iter_mut().for_each(Mlp::quantize_int8);
        if let Some(shared) = &mut self.shared {
            shared.quantize_int8();
        }
    }

    pub fn total_weight_bytes(&self) -> usize {
        self.router.bytes()
            + self.experts.iter().map(Mlp::weight_bytes).sum::<usize>()
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
    }

    /// Router probabilities → top-k experts per token (`logits` `[t, experts]`).
    pub fn route(&self, logits: &mut [f32]) -> Vec<Route> {
        logits
            .chunks_exact_mut(self.spec.experts)
            .map(|probs| {
                cpu::softmax(probs);
                let mut order: Vec<usize> = (0..probs.len()).collect();
                // Highest probability first; ties keep the lower expert index.
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
                order.truncate(self.spec.top_k);
                let mut weights: Vec<f32> = order.iter().map(|&e| probs[e]).collect();
                if self.spec.norm_topk {
                    let sum: f32 = weights.iter().sum();
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                Route {
                    experts: order,
                    weights,
                }
            })
            .collect()
    }

    /// x `[t, hidden]` (normed) → out `[t, hidden]` (overwritten). `layer` and `remote` are
    /// used only when the routed experts are not loaded here.
    pub fn forward(
        &self,
        x: &[f32],
        out: &mut [f32],
        layer: usize,
        remote: Option<&dyn ExpertExecutor>,
    ) -> Result<()> {
        let hidden = self.router.cols;
        let t = x.len() / hidden;
        let mut logits = vec![0.0; t * self.spec.experts]; // [t, experts]
        cpu::matmul(x, &self.router, &mut logits);
        let routes = self.route(&mut logits);

        // Rows routed to each expert, with their weights, in expert order.
        let mut assigned: Vec<(Vec<usize>, Vec<f32>)> = vec![Default::default(); self.spec.experts];
        for (tok, r) in routes.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                assigned[e].0.push(tok);
                assigned[e].1.push(w);
            }
        }
        let mut rows_of = Vec::new();
        let mut groups = Vec::new();
        for (expert, (rows, weights)) in assigned.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let mut xe = Vec::with_capacity(rows.len() * hidden); // [n_e, hidden]
            for tok in &rows {
                xe.extend_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
            }
            rows_of.push(rows);
            groups.push(ExpertGroup {
                expert,
                weights,
                x: xe,
            });
        }
        let outputs = if self.experts.is_empty() {
            let executor = remote.ok_or_else(|| {
                EngineError::Experts("the routed experts are remote but no executor is set".into())
            })?;
            let outputs = executor.run(layer, &groups)?;
            for (g, y) in groups.iter().zip(&outputs) {
                if y.len() != g.x.len() {
                    return Err(EngineError::Experts(format!(
                        "layer {layer} expert {}: {} values returned, expected {}",
                        g.expert,
                        y.len(),
                        g.x.len()
                    )));
                }
            }
            outputs
        } else {
            self.run_local(&groups)
        };
        // Accumulate in expert order, so the sum does not depend on scheduling or placement.
        out.fill(0.0);
        for (rows, ye) in rows_of.iter().zip(&outputs) {
            for (tok, y) in rows.iter().zip(ye.chunks_exact(hidden)) {
                for (o, v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(y) {
                    *o += v;
                }
            }
        }
        if let (Some(shared), Some(gate)) = (&self.shared, &self.shared_gate) {
            let mut ys = vec![0.0; t * hidden]; // [t, hidden]
            shared.forward(x, &mut ys);
            let mut g = vec![0.0; t]; // [t, 1]
            cpu::matmul(x, gate, &mut g);
            for ((o, y), gv) in out
                .chunks_exact_mut(hidden)
                .zip(ys.chunks_exact(hidden))
                .zip(&g)
            {
                let s = cpu::sigmoid(*gv);
                for (ov, yv) in o.iter_mut().zip(y) {
                    *ov += s * yv;
                }
            }
        }
        Ok(())
    }

    /// Weighted outputs of the locally loaded experts, one per group.
    fn run_local(&self, groups: &[ExpertGroup]) -> Vec<Vec<f32>> {
        // Experts run one per thread when there are enough of them to fill the pool (decode:
        // a few rows each); otherwise each product uses the whole pool (prefill).
        let one_per_thread = groups.len() >= rayon::current_num_threads();
        let run = |g: &ExpertGroup| -> Vec<f32> {
            let mut ye = vec![0.0; g.x.len()]; // [n_e, hidden]
            if one_per_thread {
                self.experts[g.expert].forward_serial(&g.x, &mut ye);
            } else {
                self.experts[g.expert].forward(&g.x, &mut ye);
            }
            scale_rows(&mut ye, &g.weights);
            ye
        };
        if one_per_thread {
            groups.par_iter().map(run).collect()
        } else {
            groups.iter().map(run).collect()
        }
    }
}
