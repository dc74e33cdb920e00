//! Aux-loss-free balancing (DeepSeek-V3 section 2.1.2; Wang et al. 2024):
//! after each optimizer step every layer's expert bias moves towards
//! balance by a fixed step, `b_e += gamma * sign(mean load - load_e)`.
//! The loads are the global batch's (summed over every rank), so every
//! rank computes the same bias from the same integers.

use crate::config::ModelConfig;

/// Updates one layer's `bias_e` from the global batch's `load_e` (tokens
/// that chose each expert, before capacity drops). With
/// `bias_update_centered` the update's mean is subtracted, so the bias
/// keeps a zero sum (torchtitan does this).
pub fn update_expert_bias(cfg: &ModelConfig, bias_e: &mut [f32], load_e: &[f64]) {
    assert_eq!(bias_e.len(), load_e.len(), "update_expert_bias: one load per expert");
    let mean = load_e.iter().sum::<f64>() / load_e.len() as f64;
    let gamma = cfg.bias_update_speed;
    let mut delta: Vec<f32> = load_e
        .iter()
        .map(|&load| match mean.partial_cmp(&load) {
            Some(std::cmp::Ordering::Greater) => gamma,
            Some(std::cmp::Ordering::Less) => -gamma,
            _ => 0.0,
        })
        .collect();
    if cfg.bias_update_centered {
        let centre = delta.iter().sum::<f32>() / delta.len() as f32;
        delta.iter_mut().for_each(|v| *v -= centre);
    }
    bias_e.iter_mut().zip(&delta).for_each(|(b, d)| *b += d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_experts_lose_bias_and_idle_ones_gain_it() {
        let cfg = ModelConfig { bias_update_speed: 0.5, ..ModelConfig::default() };
        let mut bias = vec![0.0; 4];
        // Mean load 10: expert 0 is busy, 1 and 3 idle, 2 exactly balanced.
        update_expert_bias(&cfg, &mut bias, &[25.0, 5.0, 10.0, 0.0]);
        assert_eq!(bias, [-0.5, 0.5, 0.0, 0.5]);
        let centered = ModelConfig { bias_update_centered: true, ..cfg };
        let mut bias = vec![0.0; 4];
        update_expert_bias(&centered, &mut bias, &[25.0, 5.0, 10.0, 0.0]);
        assert_eq!(bias, [-0.625, 0.375, -0.125, 0.375]);
        assert_eq!(bias.iter().sum::<f32>(), 0.0);
    }
}
