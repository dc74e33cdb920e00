//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr`.

use crate::optim::OptimConfig;

/// Learning rate for the update at 0-based `step` of a `total_steps` job:
/// `lr * (step+1)/warmup` during warmup, then
/// `min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2` with progress
/// going from 0 right after warmup to 1 at the last step.
pub fn learning_rate(cfg: &OptimConfig, step: u64, total_steps: u64) -> f32 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f32 / cfg.warmup_steps as f32;
    }
    let decay_steps = total_steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    (cfg.min_lr as f64 + (cfg.lr - cfg.min_lr) as f64 * cosine) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_hand_values() {
        let cfg = OptimConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 4, ..Default::default() };
        // Warmup: 0.25, 0.5, 0.75, 1.0 over steps 0..4.
        for (s, want) in [(0, 0.25), (1, 0.5), (2, 0.75)] {
            assert!((learning_rate(&cfg, s, 14) - want).abs() < 1e-7);
        }
        // Decay over 10 steps: step 4 is the peak, step 9 the midpoint
        // (0.1 + 0.9 * 0.5 = 0.55), step 14 the floor.
        assert!((learning_rate(&cfg, 4, 14) - 1.0).abs() < 1e-7);
        assert!((learning_rate(&cfg, 9, 14) - 0.55).abs() < 1e-6);
        assert!((learning_rate(&cfg, 14, 14) - 0.1).abs() < 1e-7);
        // cos(pi/10): 0.1 + 0.45 * (1 + 0.9510565) = 0.9779754.
        assert!((learning_rate(&cfg, 5, 14) - 0.977_975_4).abs() < 1e-6);
    }
}
