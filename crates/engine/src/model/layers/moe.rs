//! Sparse MoE: softmax router in f32, top-k (renormalised when the config says so), SwiGLU
//! experts run on the rows routed to them, plus a shared expert scaled by sigmoid(gate).
//!
//! The routed experts run here or, when the model was loaded without them, on expert workers
//! through an [`ExpertExecutor`]. Either way each expert returns its rows already weighted and
//! the rows are summed in expert order, so both give bit-identical results.

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::{Backend, scratch};
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

    /// Router logits `[t, experts]` (softmaxed in place) → each token's top-k `experts` and
    /// `weights` `[t, top_k]`, highest probability first, ties to the lower expert index
    /// (renormalised when the config says so).
    pub fn route<B: Backend>(
        &self,
        b: &B,
        logits: &mut [f32],
        experts: &mut [usize],
        weights: &mut [f32],
    ) {
        let (e, k) = (self.spec.experts, self.spec.top_k);
        b.softmax_rows(logits, e);
        for ((probs, ex), ws) in logits
            .chunks_exact_mut(e)
            .zip(experts.chunks_exact_mut(k))
            .zip(weights.chunks_exact_mut(k))
        {
            // Insertion into the best k so far. Scanning upward and moving only past strictly
            // smaller values keeps the lower index first among equals.
            let mut filled = 0;
            for (idx, &p) in probs.iter().enumerate() {
                if filled == k && p.total_cmp(&ws[k - 1]).is_le() {
                    continue;
                }
                let mut at = filled.min(k - 1);
                filled = (filled + 1).min(k);
                while at > 0 && p.total_cmp(&ws[at - 1]).is_gt() {
                    ws[at] = ws[at - 1];
                    ex[at] = ex[at - 1];
                    at -= 1;
                }
                ws[at] = p;
                ex[at] = idx;
            }
            if self.spec.norm_topk {
                let sum: f32 = ws.iter().sum();
                ws.iter_mut().for_each(|w| *w /= sum);
            }
        }
    }

    /// x `[t, hidden]` (normed) → out `[t, hidden]` (overwritten). `layer` and `remote` are
    /// used only when the routed experts are not loaded here.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &[f32],
        out: &mut [f32],
        layer: usize,
        remote: Option<&dyn ExpertExecutor>,
    ) -> Result<()> {
        let hidden = self.router.cols;
        let t = x.len() / hidden;
        let (e, k) = (self.spec.experts, self.spec.top_k);
        let mut logits = scratch::for_overwrite::<f32>(t * e); // [t, experts]
        b.matmul(x, &self.router, &mut logits);
        let mut chosen = scratch::for_overwrite::<usize>(t * k); // [t, top_k]
        let mut weights = scratch::for_overwrite::<f32>(t * k);
        self.route(b, &mut logits, &mut chosen, &mut weights);

        // The t·k picks (token · k + slot) sorted by expert, tokens in order within each:
        // expert `ex` has rows `starts[ex]..starts[ex + 1]` of `order`.
        let mut starts = scratch::zeroed::<usize>(e + 1);
        for &ex in chosen.iter() {
            starts[ex + 1] += 1;
        }
        for i in 0..e {
            starts[i + 1] += starts[i];
        }
        let mut fill = scratch::for_overwrite::<usize>(e);
        fill.copy_from_slice(&starts[..e]);
        let mut order = scratch::for_overwrite::<usize>(t * k);
        for (pick, &ex) in chosen.iter().enumerate() {
            order[fill[ex]] = pick;
            fill[ex] += 1;
        }
        let mut xs = scratch::for_overwrite::<f32>(t * k * hidden); // [t·k, hidden], by expert
        for (row, &pick) in xs.chunks_exact_mut(hidden).zip(order.iter()) {
            let tok = pick / k;
            row.copy_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
        }
        // Each row's expert output, weighted: [t·k, hidden].
        let mut ys = scratch::for_overwrite::<f32>(t * k * hidden);
        if self.experts.is_empty() {
            let executor = remote.ok_or_else(|| {
                EngineError::Experts("the routed experts are remote but no executor is set".into())
            })?;
            self.run_remote(executor, layer, &starts, &order, &weights, &xs, &mut ys)?;
        } else {
            self.run_local(b, &starts, &xs, &mut ys);
            for (row, &pick) in ys.chunks_exact_mut(hidden).zip(order.iter()) {
                let w = weights[pick];
                row.iter_mut().for_each(|v| *v *= w);
            }
        }
        // Accumulate in expert order, so the sum does not depend on scheduling or placement.
        out.fill(0.0);
        for (y, &pick) in ys.chunks_exact(hidden).zip(order.iter()) {
            let tok = pick / k;
            for (o, v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(y) {
                *o += v;
            }
        }
        if let (Some(shared), Some(gate)) = (&self.shared, &self.shared_gate) {
            let mut ys = scratch::for_overwrite::<f32>(t * hidden); // [t, hidden]
            shared.forward(b, x, &mut ys);
            let mut g = scratch::for_overwrite::<f32>(t); // [t, 1]
            b.matmul(x, gate, &mut g);
            b.add_gated(out, &ys, &g);
        }
        Ok(())
    }

    /// Runs the locally loaded experts on their rows of `xs` (`starts` as in `forward`) into
    /// `ys`, unweighted.
    fn run_local<B: Backend>(&self, b: &B, starts: &[usize], xs: &[f32], ys: &mut [f32]) {
        let e = self.spec.experts;
        let active = (0..e).filter(|&ex| starts[ex + 1] > starts[ex]).count();
        let mut ids = scratch::with_capacity::<usize>(active);
        let mut bounds = scratch::with_capacity::<usize>(active + 1); // in rows
        for ex in (0..e).filter(|&ex| starts[ex + 1] > starts[ex]) {
            ids.push(ex);
            bounds.push(starts[ex]);
        }
        bounds.push(starts[e]);
        b.expert_groups(&|ex| self.experts[ex].weights(), &ids, &bounds, xs, ys);
    }

    /// Sends each expert's rows to `executor` (one call for the layer) and copies the weighted
    /// outputs into `ys`. Allocates: the rows travel by RPC anyway.
    #[allow(clippy::too_many_arguments)]
    fn run_remote(
        &self,
        executor: &dyn ExpertExecutor,
        layer: usize,
        starts: &[usize],
        order: &[usize],
        weights: &[f32],
        xs: &[f32],
        ys: &mut [f32],
    ) -> Result<()> {
        let hidden = self.router.cols;
        let groups: Vec<ExpertGroup> = (0..self.spec.experts)
            .filter(|&ex| starts[ex + 1] > starts[ex])
            .map(|ex| {
                let rows = starts[ex]..starts[ex + 1];
                ExpertGroup {
                    expert: ex,
                    weights: order[rows.clone()].iter().map(|&p| weights[p]).collect(),
                    x: xs[rows.start * hidden..rows.end * hidden].to_vec(),
                }
            })
            .collect();
        let outputs = executor.run(layer, &groups)?;
        if outputs.len() != groups.len() {
            return Err(EngineError::Experts(format!(
                "layer {layer}: {} outputs returned for {} expert groups",
                outputs.len(),
                groups.len()
            )));
        }
        for (g, y) in groups.iter().zip(&outputs) {
            if y.len() != g.x.len() {
                return Err(EngineError::Experts(format!(
                    "layer {layer} expert {}: {} values returned, expected {}",
                    g.expert,
                    y.len(),
                    g.x.len()
                )));
            }
            let at = starts[g.expert] * hidden;
            ys[at..at + y.len()].copy_from_slice(y);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::backend::cpu::tests::lcg;
    use crate::backend::cpu::vector::softmax;

    fn moe(experts: usize, top_k: usize, norm_topk: bool) -> SparseMoe {
        SparseMoe {
            spec: MoeSpec {
                experts,
                top_k,
                norm_topk,
                intermediate: 1,
                shared_intermediate: 0,
            },
            router: Weight {
                rows: experts,
                cols: 1,
                data: crate::tensor::WeightData::F32(vec![0.0; experts]),
            },
            experts: Vec::new(),
            shared: None,
            shared_gate: None,
        }
    }

    /// Top-k by insertion equals a full stable sort (highest first, ties to the lower index),
    /// including rows full of ties.
    #[test]
    fn routing_picks_the_top_k_as_a_full_sort_would() {
        let mut seed = 9;
        for &(e, k, norm) in &[(8, 2, true), (16, 4, false), (5, 5, true), (64, 8, true)] {
            let m = moe(e, k, norm);
            let t = 6;
            let mut logits: Vec<f32> = (0..t * e).map(|_| 3.0 * lcg(&mut seed)).collect();
            // Ties: a row of equal logits, and a row with a repeated maximum.
            logits[..e].fill(0.5);
            logits[e + 1] = 9.0;
            logits[e + e - 1] = 9.0;
            let mut probs = logits.clone();
            let (mut ex, mut ws) = (vec![0; t * k], vec![0.0; t * k]);
            m.route(&CpuBackend::default(), &mut logits, &mut ex, &mut ws);
            for tok in 0..t {
                let row = &mut probs[tok * e..(tok + 1) * e];
                softmax(row);
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                order.truncate(k);
                let mut want: Vec<f32> = order.iter().map(|&i| row[i]).collect();
                if norm {
                    let sum: f32 = want.iter().sum();
                    want.iter_mut().for_each(|w| *w /= sum);
                }
                assert_eq!(
                    &ex[tok * k..(tok + 1) * k],
                    &order[..],
                    "e={e} k={k} tok={tok}"
                );
                assert_eq!(
                    &ws[tok * k..(tok + 1) * k],
                    &want[..],
                    "e={e} k={k} tok={tok}"
                );
            }
        }
    }
}
