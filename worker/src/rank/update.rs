//! The optimizer step: clip to the global norm, then AdamW on this rank's
//! tensors (dense replicas update identically everywhere); then the
//! aux-loss-free expert bias, which is not a parameter, from the loads.

use crate::config::JobConfig;
use crate::state::TrainState;
use model::moe::update_expert_bias;
use model::optim::{adamw_update, clip_factor, takes_weight_decay, AdamwStep, AdamwTensor};
use model::{DenseWeights, ModelWeights};

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

/// With `expert_bias`: moves every layer's bias by the global `loads` of
/// the step (identical on every rank, so the bias is too); returns the
/// biases for the step's metrics.
pub(crate) fn expert_bias_step(job: &JobConfig, state: &mut TrainState, loads: &[Vec<usize>]) -> Vec<Vec<f32>> {
    if !job.model.expert_bias {
        return Vec::new();
    }
    // Dense layers (`first_dense_layers`) have no bias: an empty row.
    let layers = state.weights.dense.layers.iter_mut().zip(loads);
    layers
        .map(|(layer, load)| match layer.expert_bias.as_mut() {
            Some(bias) => {
                let load: Vec<f64> = load.iter().map(|&c| c as f64).collect();
                update_expert_bias(&job.model, bias, &load);
                bias.clone()
            }
            None => Vec::new(),
        })
        .collect()
}

/// FNV-1a over the bits of every layer's expert bias, as an exact f64
/// (0 when the model has none): what ranks compare to prove they route alike.
pub(crate) fn expert_bias_hash(dense: &DenseWeights) -> f64 {
    let buffers = dense.buffers();
    if buffers.is_empty() {
        return 0.0;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for byte in buffers.iter().flat_map(|(_, b)| b.iter()).flat_map(|v| v.to_bits().to_le_bytes()) {
        hash = (hash ^ byte as u32).wrapping_mul(0x0100_0193);
    }
    // Never 0, which means "no bias".
    hash.max(1) as f64
}
