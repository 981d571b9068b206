//! Sparse MoE: softmax router in f32, top-k (renormalised when the config says so), SwiGLU
//! experts run on the rows routed to them, plus a shared expert scaled by sigmoid(gate).

use rayon::prelude::*;

use crate::backend::cpu;
use crate::config::MoeSpec;
use crate::error::Result;
use crate::tensor::Weight;
use crate::weights::WeightStore;

use super::mlp::Mlp;

pub struct SparseMoe {
    spec: MoeSpec,
    /// `[experts, hidden]`.
    router: Weight,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    /// `[1, hidden]`.
    shared_gate: Option<Weight>,
}

/// Top-k routing of one token.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl SparseMoe {
    /// Loads fused (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) or
    /// per-expert (`experts.{e}.{gate,up,down}_proj`) weights.
    pub fn load(store: &WeightStore, prefix: &str, spec: &MoeSpec, hidden: usize) -> Result<Self> {
        let (e, inter) = (spec.experts, spec.intermediate);
        let router = store.matrix(&format!("{prefix}.gate.weight"), e, hidden)?;
        let fused = format!("{prefix}.experts.gate_up_proj");
        let experts = if store.contains(&fused) {
            let down = format!("{prefix}.experts.down_proj");
            (0..e)
                .map(|i| {
                    Ok(Mlp::new(
                        store.matrix_of_stack(&fused, e, i, 2 * inter, hidden)?,
                        store.matrix_of_stack(&down, e, i, hidden, inter)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            (0..e)
                .map(|i| Mlp::load(store, &format!("{prefix}.experts.{i}"), hidden, inter))
                .collect::<Result<Vec<_>>>()?
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
        let expert = self.experts.first().map_or(0, Mlp::weight_bytes);
        self.router.bytes()
            + self.spec.top_k * expert
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
            + self.shared_gate.as_ref().map_or(0, Weight::bytes)
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

    /// x `[t, hidden]` (normed) → out `[t, hidden]` (overwritten).
    pub fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let hidden = self.router.cols;
        let t = x.len() / hidden;
        let mut logits = vec![0.0; t * self.spec.experts]; // [t, experts]
        cpu::matmul(x, &self.router, &mut logits);
        let routes = self.route(&mut logits);

        // Rows routed to each expert, with their weights.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.spec.experts];
        for (tok, r) in routes.iter().enumerate() {
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                assigned[e].push((tok, w));
            }
        }
        // Experts run one per thread when there are enough of them to fill the pool (decode:
        // a few rows each); otherwise each product uses the whole pool (prefill).
        let active: Vec<(usize, &Vec<(usize, f32)>)> = assigned
            .iter()
            .enumerate()
            .filter(|(_, rows)| !rows.is_empty())
            .collect();
        let one_per_thread = active.len() >= rayon::current_num_threads();
        let run = |&(e, rows): &(usize, &Vec<(usize, f32)>)| -> Vec<f32> {
            let mut xe = Vec::with_capacity(rows.len() * hidden); // [n_e, hidden]
            for (tok, _) in rows {
                xe.extend_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
            }
            let mut ye = vec![0.0; rows.len() * hidden]; // [n_e, hidden]
            if one_per_thread {
                self.experts[e].forward_serial(&xe, &mut ye);
            } else {
                self.experts[e].forward(&xe, &mut ye);
            }
            ye
        };
        let outputs: Vec<Vec<f32>> = if one_per_thread {
            active.par_iter().map(run).collect()
        } else {
            active.iter().map(run).collect()
        };
        // Accumulate in expert order, so the sum does not depend on scheduling.
        out.fill(0.0);
        for ((_, rows), ye) in active.iter().zip(&outputs) {
            for ((tok, w), y) in rows.iter().zip(ye.chunks_exact(hidden)) {
                for (o, v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(y) {
                    *o += w * v;
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
}
