//! SwiGLU MLPs (dense layers, shared experts) and groups of routed experts, each group's rows
//! through its own expert.

use super::pool::KernelPool;
use super::products::matmul;
use super::scratch;
use super::vector::swiglu;
use crate::backend::MlpWeights;

/// `down(silu(gate·x) ⊙ up·x)`: x `[t, hidden]` → out `[t, hidden]`, each product over the
/// pool when `parallel`, else on the calling thread.
pub(super) fn mlp(
    pool: &KernelPool,
    fast: bool,
    w: MlpWeights<'_>,
    x: &[f32],
    out: &mut [f32],
    parallel: bool,
) {
    let inter = w.gate_up.rows / 2;
    let t = x.len() / w.gate_up.cols;
    let mut gate_up = scratch::for_overwrite::<f32>(t * 2 * inter); // [t, 2·inter]
    matmul(pool, fast, x, w.gate_up, &mut gate_up, parallel);
    let mut act = scratch::for_overwrite::<f32>(t * inter); // [t, inter]
    swiglu(&gate_up, inter, &mut act);
    matmul(pool, fast, &act, w.down, out, parallel);
}

/// See [`crate::backend::Backend::expert_groups`].
pub(super) fn expert_groups<'w>(
    pool: &KernelPool,
    fast: bool,
    expert: &(dyn Fn(usize) -> MlpWeights<'w> + Sync),
    ids: &[usize],
    bounds: &[usize],
    xs: &[f32],
    ys: &mut [f32],
) {
    let Some(first) = ids.first() else {
        return;
    };
    let hidden = expert(*first).gate_up.cols;
    // Experts run one per task when there are enough of them to fill the pool (decode: a few
    // rows each); otherwise each product uses the whole pool (prefill).
    if ids.len() >= pool.threads() {
        let mut spans = scratch::with_capacity::<usize>(bounds.len()); // in floats
        spans.extend_from_slice(bounds);
        spans.iter_mut().for_each(|b| *b *= hidden);
        pool.for_each_span_mut(ys, &spans, |j, y| {
            let rows = spans[j]..spans[j + 1];
            mlp(pool, fast, expert(ids[j]), &xs[rows], y, false);
        });
    } else {
        for (j, &id) in ids.iter().enumerate() {
            let rows = bounds[j] * hidden..bounds[j + 1] * hidden;
            if !rows.is_empty() {
                mlp(
                    pool,
                    fast,
                    expert(id),
                    &xs[rows.clone()],
                    &mut ys[rows],
                    true,
                );
            }
        }
    }
}
