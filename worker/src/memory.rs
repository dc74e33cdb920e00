//! What a rank must hold in memory, computed from the config alone.
//!
//! Used to judge measured peak memory (`switchyard bench layer`) and, later,
//! by the simulator. Counts fp32 values: parameters, gradients, the two
//! AdamW moments, and the activations one micro-batch saves for backward.

use crate::config::JobConfig;
use model::BlockKind;

/// Bytes of parameters + gradients + optimizer state + saved activations
/// of a single-rank job (all experts local).
pub fn analytic_bytes(job: &JobConfig) -> u64 {
    let cfg = &job.model;
    let params = cfg.num_params() as u64;
    // weights, gradients, exp_avg, exp_avg_sq
    let state = 4 * params;
    (state + activation_values(job)) * 4
}

/// fp32 values saved by one micro-batch's forward pass for its backward pass.
pub fn activation_values(job: &JobConfig) -> u64 {
    let cfg = &job.model;
    let b = job.train.micro_batch_size as u64;
    let s = cfg.seq_len as u64;
    let t = b * s;
    let (d, f, v, e, k) =
        (cfg.d_model as u64, cfg.ffn_hidden as u64, cfg.vocab as u64, cfg.n_experts as u64, cfg.top_k as u64);
    let hd = cfg.head_dim() as u64;
    let q = cfg.n_heads as u64 * hd;
    let g = cfg.n_kv_heads as u64 * hd;
    let sequential = cfg.block == BlockKind::Sequential;
    // x, normalised input, q, k, v, attention output, probabilities
    let attention = t * (2 * d + 2 * q + 2 * g) + b * cfg.n_heads as u64 * s * s;
    // h and its normalisation (sequential), or a copy of the shared input (parallel)
    let residual = if sequential { 2 * t * d } else { t * d };
    // router logits and probabilities, dispatched inputs and outputs, SwiGLU h1 and h3
    let moe = 2 * t * e + 2 * t * k * d + 2 * t * k * f + 2 * t * f * cfg.n_shared_experts as u64;
    let per_layer = attention + residual + moe;
    // final normalised states, logits and their gradient
    let head = t * d + 2 * t * v;
    cfg.n_layers as u64 * per_layer + head
}
