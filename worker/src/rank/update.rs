//! The optimizer step: clip to the global norm, then AdamW on this rank's
//! tensors (dense replicas update identically everywhere).

use crate::config::JobConfig;
use crate::state::TrainState;
use model::optim::{adamw_update, clip_factor, takes_weight_decay, AdamwStep, AdamwTensor};
use model::ModelWeights;

/// Clips `grads` to `[optim] grad_clip` given their global norm and
/// applies AdamW with learning rate `lr`.
pub(crate) fn optimizer_step(
    job: &JobConfig,
    state: &mut TrainState,
    grads: &mut ModelWeights,
    lr: f32,
    grad_norm: f64,
) {
    let factor = clip_factor(grad_norm, job.optim.grad_clip);
    let t = state.step + 1;
    let params = state.weights.tensors_mut();
    let moments = state.exp_avg.tensors_mut().into_iter().zip(state.exp_avg_sq.tensors_mut());
    for (((name, p), (_, g)), ((_, m), (_, v))) in params.into_iter().zip(grads.tensors_mut()).zip(moments) {
        if factor < 1.0 {
            g.iter_mut().for_each(|x| *x *= factor);
        }
        let tensor = AdamwTensor { param: p, exp_avg: m, exp_avg_sq: v };
        adamw_update(AdamwStep { cfg: &job.optim, lr, t }, takes_weight_decay(&name), tensor, g);
    }
}
