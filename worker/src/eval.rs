//! `switchyard eval`: mean next-token cross-entropy of a checkpoint on a text.
//!
//! Semantics users compare across tools (keep them exactly): the file's
//! tokens; windows of `seq_len + 1` tokens without overlap from the start
//! (window i = tokens[i*T .. i*T+T+1], a short tail ignored); dropless
//! routing; the mean cross-entropy in nats over every predicted position,
//! aux and z losses excluded.

use crate::data::eval_windows;
use crate::error::WorkerError;
use model::model::{forward, forward_logits, MicroBatch};
use model::moe::LocalExperts;
use model::ops::rope::RopeTable;
use model::{ModelConfig, ModelWeights};
use serde::Serialize;

/// The result printed by `switchyard eval --json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// Predicted positions.
    pub tokens: u64,
    pub windows: u64,
}

/// Windows evaluated per forward pass (bounds memory, not the result).
const WINDOWS_PER_BATCH: usize = 16;

/// Each token's modality when the model has several (Mixture-of-Transformers):
/// `modality` for all of them; empty otherwise.
fn modality_of(cfg: &ModelConfig, tokens: usize, modality: u8) -> Vec<u8> {
    if cfg.is_mot() {
        vec![modality; tokens]
    } else {
        Vec::new()
    }
}

/// Evaluates `weights` (all experts) on `tokens`, as `modality`
/// (Mixture-of-Transformers; 0 otherwise).
pub fn evaluate(
    cfg: &ModelConfig,
    weights: &ModelWeights,
    tokens: &[u32],
    modality: u8,
) -> Result<EvalResult, WorkerError> {
    let cfg = ModelConfig { capacity_factor: 0.0, ..cfg.clone() };
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let windows: Vec<&[u32]> = eval_windows(tokens, cfg.seq_len).collect();
    let mut ce_sum = 0.0;
    let mut scratch_grads = weights.experts.zeros_like();
    for chunk in windows.chunks(WINDOWS_PER_BATCH) {
        let batch_tokens: Vec<u32> = chunk.concat();
        let modality = &modality_of(&cfg, batch_tokens.len(), modality);
        let mut experts = LocalExperts::new(&cfg, &weights.experts, &mut scratch_grads);
        let stats = forward(
            &cfg,
            &rope,
            &weights.dense,
            &mut experts,
            MicroBatch { tokens: &batch_tokens, batch: chunk.len(), modality },
        )?;
        ce_sum += stats.ce_sum;
    }
    let predicted = (windows.len() * cfg.seq_len) as u64;
    Ok(EvalResult {
        loss: if predicted == 0 { f64::NAN } else { ce_sum / predicted as f64 },
        tokens: predicted,
        windows: windows.len() as u64,
    })
}

/// The logits `[seq_len, vocab]` of the first evaluation window of
/// `tokens` (dropless) as `modality`, for comparing the model with another tool.
pub fn first_window_logits(
    cfg: &ModelConfig,
    weights: &ModelWeights,
    tokens: &[u32],
    modality: u8,
) -> Result<Vec<f32>, WorkerError> {
    let cfg = ModelConfig { capacity_factor: 0.0, ..cfg.clone() };
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let window = eval_windows(tokens, cfg.seq_len).next().unwrap_or(tokens);
    let mut scratch_grads = weights.experts.zeros_like();
    let mut experts = LocalExperts::new(&cfg, &weights.experts, &mut scratch_grads);
    let modality = &modality_of(&cfg, window.len(), modality);
    Ok(forward_logits(&cfg, &rope, &weights.dense, &mut experts, MicroBatch { tokens: window, batch: 1, modality })?)
}
