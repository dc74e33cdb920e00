//! Expert selection: which `top_k` experts a token chooses from its scores,
//! the same for every scoring function (docs/model.md, "Routers beyond v1").
//!
//! The choice reads `c = score + bias` (the aux-loss-free expert bias, when
//! the layer has one); with `n_groups > 1` only the experts of the token's
//! `topk_groups` best groups compete, a group's score being the sum of its
//! two largest `c` (DeepSeek-V3's group-limited routing). Gates never read
//! the bias: the router takes them from the unbiased scores.
//!
//! Legend: `e` experts, `k` top-k slots (one token's row throughout).

use crate::config::ModelConfig;
use std::ops::Range;

/// How one layer chooses experts: its bias and group limit.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'b> {
    /// `[e]` added to the scores for the choice only.
    pub bias_e: Option<&'b [f32]>,
    pub n_groups: usize,
    pub topk_groups: usize,
}

impl<'b> Selection<'b> {
    /// The selection `cfg` asks for, with the layer's bias.
    pub fn of(cfg: &ModelConfig, bias_e: Option<&'b [f32]>) -> Self {
        Self { bias_e, n_groups: cfg.n_groups, topk_groups: cfg.topk_groups }
    }

    /// Writes into `experts_k` the token's chosen experts among `allowed`
    /// (a modality's block; every expert without modalities), highest `c`
    /// first; ties go to the lower expert id. `choice_e` is scratch of len E.
    pub fn select_row(&self, scores_e: &[f32], choice_e: &mut [f32], experts_k: &mut [u32], allowed: Range<usize>) {
        choice_e.copy_from_slice(scores_e);
        if let Some(bias) = self.bias_e {
            choice_e.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
        }
        choice_e[..allowed.start].fill(f32::NEG_INFINITY);
        choice_e[allowed.end..].fill(f32::NEG_INFINITY);
        if self.n_groups > 1 && self.topk_groups < self.n_groups {
            self.mask_groups(choice_e);
        }
        top_k(choice_e, experts_k);
    }

    /// Sets `c` to -inf outside the `topk_groups` best groups.
    fn mask_groups(&self, choice_e: &mut [f32]) {
        let size = choice_e.len() / self.n_groups;
        let group_scores: Vec<f32> = choice_e
            .chunks_exact(size)
            .map(|group| {
                let mut best = [0u32; 2];
                let best = &mut best[..size.min(2)];
                top_k(group, best);
                best.iter().map(|&i| group[i as usize]).sum()
            })
            .collect();
        let mut kept = vec![0u32; self.topk_groups];
        top_k(&group_scores, &mut kept);
        for (g, group) in choice_e.chunks_exact_mut(size).enumerate() {
            if !kept.contains(&(g as u32)) {
                group.fill(f32::NEG_INFINITY);
            }
        }
    }
}

/// Writes the `out.len()` largest entries of `p` into `out`, highest first;
/// ties go to the lower index. `k * E` comparisons (E is small).
fn top_k(p: &[f32], out: &mut [u32]) {
    for slot in 0..out.len() {
        let mut best: Option<usize> = None;
        for (e, &pe) in p.iter().enumerate() {
            if out[..slot].contains(&(e as u32)) {
                continue;
            }
            // Strict `>`: an equal later expert never displaces a lower id.
            if best.is_none_or(|b| pe > p[b]) {
                best = Some(e);
            }
        }
        out[slot] = best.expect("top_k <= n_experts") as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_the_best_pairs_and_the_bias_moves_only_the_choice() {
        // 3 groups of 2: sums of the pairs are 0.9, 1.0, 0.6; keep 2 groups.
        let scores = [0.5, 0.4, 0.2, 0.8, 0.55, 0.05];
        let sel = Selection { bias_e: None, n_groups: 3, topk_groups: 2 };
        let (mut c, mut out) = (vec![0.0; 6], vec![0u32; 2]);
        sel.select_row(&scores, &mut c, &mut out, 0..6);
        // Expert 4 (0.55) is in the dropped group 2.
        assert_eq!(out, [3, 0]);
        // A bias of +0.6 on expert 5 (c = 0.65) lifts group 2 (sum 1.2) and picks 5.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.6];
        let sel = Selection { bias_e: Some(&bias), ..sel };
        sel.select_row(&scores, &mut c, &mut out, 0..6);
        assert_eq!(out, [3, 5]);
        // Ties go to the lower id, groups and experts alike.
        let sel = Selection { bias_e: None, n_groups: 2, topk_groups: 1 };
        sel.select_row(&[0.5, 0.5, 0.5, 0.5], &mut c[..4], &mut out, 0..4);
        assert_eq!(out, [0, 1]);
    }
}
