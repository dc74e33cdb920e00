//! AdamW (decoupled weight decay, bias correction) and global-norm clipping.

use crate::error::ModelError;
use serde::{Deserialize, Serialize};

/// The `[optim]` section of a job config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f32,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f32,
    pub warmup_steps: u64,
    /// Decoupled weight decay, applied to matrices only (not norm weights).
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this value; `<= 0` disables clipping.
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

impl OptimConfig {
    /// Rejects impossible settings with the key at fault.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, reason: String| Err(ModelError::InvalidConfig { key, reason });
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("min_lr", format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr));
        }
        for (key, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, format!("must be in [0, 1), got {beta}"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", format!("must be positive, got {}", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", format!("must be >= 0, got {}", self.weight_decay));
        }
        Ok(())
    }
}

/// One optimizer step's settings, shared by every tensor it updates.
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep<'a> {
    pub cfg: &'a OptimConfig,
    pub lr: f32,
    /// 1-based update count.
    pub t: u64,
}

/// One tensor's parameter and AdamW moments, updated in place.
pub struct AdamwTensor<'a> {
    pub param: &'a mut [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
}

/// One AdamW update of one tensor, PyTorch's `torch.optim.AdamW` semantics:
/// `p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
///  p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)`, with `t` the
/// 1-based update count. `decay` is false for tensors exempt from decay.
pub fn adamw_update(step: AdamwStep, decay: bool, tensor: AdamwTensor, grad: &[f32]) {
    let AdamwStep { cfg, lr, t } = step;
    let AdamwTensor { param, exp_avg, exp_avg_sq } = tensor;
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let bias1 = 1.0 - b1.powi(t as i32);
    let bias2_sqrt = (1.0 - b2.powi(t as i32)).sqrt();
    let step = lr / bias1;
    let shrink = if decay { 1.0 - lr * cfg.weight_decay } else { 1.0 };
    for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(exp_avg.iter_mut()).zip(exp_avg_sq.iter_mut()) {
        *p *= shrink;
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *p -= step * *m / ((*v).sqrt() / bias2_sqrt + cfg.eps);
    }
}

/// Whether a named tensor takes weight decay: matrices yes, norm weights no.
pub fn takes_weight_decay(name: &str) -> bool {
    !name.ends_with("norm.weight")
}

/// Sum of squares of all values, in f64 (one part of a global norm).
pub fn sum_of_squares(values: &[f32]) -> f64 {
    values.iter().map(|&g| g as f64 * g as f64).sum()
}

/// The factor that scales gradients to a global norm of at most `max_norm`
/// (torch's `clip_grad_norm_`: `min(1, max_norm / (norm + 1e-6))`).
pub fn clip_factor(global_norm: f64, max_norm: f32) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm as f64 / (global_norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let cfg = OptimConfig { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, ..Default::default() };
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        // t=1, g=0.5: p = 1*(1-0.01*0.1) = 0.999; m = 0.05, v = 0.0025;
        // mhat = 0.5, vhat = 0.25 → p -= 0.01 * 0.5/0.5 → 0.989.
        adamw_update(
            AdamwStep { cfg: &cfg, lr: 0.01, t: 1 },
            true,
            AdamwTensor { param: &mut p, exp_avg: &mut m, exp_avg_sq: &mut v },
            &[0.5],
        );
        assert!((p[0] - 0.989).abs() < 1e-6, "{}", p[0]);
        assert!((m[0] - 0.05).abs() < 1e-7 && (v[0] - 0.0025).abs() < 1e-8);
        // t=2, g=-1: p = 0.989*0.999 = 0.988011; m = 0.045-0.1 = -0.055;
        // v = 0.002475+0.01 = 0.012475; mhat = -0.055/0.19 = -0.289474;
        // vhat = 0.012475/0.0199 = 0.626884, sqrt = 0.791760;
        // p -= 0.01 * -0.289474/0.791760 → 0.988011 + 0.003656 = 0.991667.
        adamw_update(
            AdamwStep { cfg: &cfg, lr: 0.01, t: 2 },
            true,
            AdamwTensor { param: &mut p, exp_avg: &mut m, exp_avg_sq: &mut v },
            &[-1.0],
        );
        assert!((p[0] - 0.991667).abs() < 2e-6, "{}", p[0]);
        // No decay for exempt tensors: only the Adam step moves p.
        let (mut q, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adamw_update(
            AdamwStep { cfg: &cfg, lr: 0.01, t: 1 },
            false,
            AdamwTensor { param: &mut q, exp_avg: &mut m, exp_avg_sq: &mut v },
            &[0.5],
        );
        assert!((q[0] - 0.99).abs() < 1e-6, "{}", q[0]);
    }

    #[test]
    fn clipping_only_shrinks() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_factor(100.0, 0.0), 1.0);
        assert!((sum_of_squares(&[3.0, 4.0]) - 25.0).abs() < 1e-12);
        assert!(!takes_weight_decay("layers.0.attn_norm.weight") && takes_weight_decay("output.weight"));
    }
}
