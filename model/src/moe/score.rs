//! Router scoring: how one token's router logits become the scores that
//! pick its experts and give their gates. This is the router's one seam.
//!
//! The router (`router.rs`) reaches the scoring function only through
//! [`RouterScore`]: [`RouterScore::forward_row`] turns logits into scores
//! and [`RouterScore::backward_row`] carries score gradients back to the
//! logits. The choice of experts (`select.rs`), the gates (the chosen
//! scores, renormalised when `norm_topk_prob`, times
//! `routed_scaling_factor`), capacity drops, the balance losses (over the
//! scores normalised per token) and the z-loss (over the logits) are
//! computed from what these return, for every scoring alike.
//!
//! To add a scoring function:
//! 1. write its math, config key and new tensors in docs/model.md (DESIGN 5a);
//! 2. add a variant to [`RouterScore`] and choose it in [`RouterScore::of`];
//! 3. give the variant an arm in `forward_row`, `sums_to_one` and
//!    `backward_row` (with its derivative in a comment);
//! 4. add its finite-difference case to `tests/grad_moe.rs`.
//!
//! Legend: `e` experts, `k` top-k slots (one token's row throughout).

use crate::config::{ModelConfig, RouterScoreKind};

/// A router scoring function (docs/model.md: softmax, or DeepSeek-V3's sigmoid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterScore {
    /// `s = softmax(logits)`.
    #[default]
    Softmax,
    /// `s_e = sigmoid(logit_e)`.
    Sigmoid,
}

impl RouterScore {
    /// The scoring function `cfg` asks for (`router_score`).
    pub fn of(cfg: &ModelConfig) -> Self {
        match cfg.router_score {
            RouterScoreKind::Softmax => RouterScore::Softmax,
            RouterScoreKind::Sigmoid => RouterScore::Sigmoid,
        }
    }

    /// Writes one token's scores `scores_e` from its `logits_e`; returns
    /// `logsumexp(logits_e)`, the token's z-loss term (softmax has it for free).
    pub fn forward_row(self, logits_e: &[f32], scores_e: &mut [f32]) -> f32 {
        match self {
            RouterScore::Softmax => softmax_row(logits_e, scores_e),
            RouterScore::Sigmoid => {
                for (s, &l) in scores_e.iter_mut().zip(logits_e) {
                    *s = sigmoid(l);
                }
                logsumexp(logits_e)
            }
        }
    }

    /// Whether the scores already sum to 1 per token (then the balance
    /// probabilities `q` are the scores themselves).
    pub fn sums_to_one(self) -> bool {
        self == RouterScore::Softmax
    }

    /// Backward of [`RouterScore::forward_row`]: from the loss gradients
    /// w.r.t. the scores (`dscores_e`) and w.r.t. the returned logsumexp
    /// (`dlse`), overwrites `dlogits_e`.
    pub fn backward_row(self, logits_e: &[f32], scores_e: &[f32], dscores_e: &[f32], dlse: f32, dlogits_e: &mut [f32]) {
        match self {
            RouterScore::Softmax => {
                // Softmax: dl_e = p_e (dp_e - sum_i p_i dp_i); d lse / dl_e = p_e.
                let p = scores_e;
                let dot: f32 = p.iter().zip(dscores_e).map(|(a, b)| a * b).sum();
                for ((dl, &pe), &dpe) in dlogits_e.iter_mut().zip(p).zip(dscores_e) {
                    *dl = pe * (dpe - dot) + dlse * pe;
                }
            }
            RouterScore::Sigmoid => {
                // Sigmoid: dl_e = s_e (1 - s_e) ds_e; d lse / dl_e = softmax(l)_e.
                for ((dl, &se), &dse) in dlogits_e.iter_mut().zip(scores_e).zip(dscores_e) {
                    *dl = se * (1.0 - se) * dse;
                }
                if dlse != 0.0 {
                    let lse = logsumexp(logits_e);
                    for (dl, &l) in dlogits_e.iter_mut().zip(logits_e) {
                        *dl += dlse * (l - lse).exp();
                    }
                }
            }
        }
    }
}

fn sigmoid(l: f32) -> f32 {
    1.0 / (1.0 + (-l).exp())
}

/// Softmax of one row of logits into `p`; returns `logsumexp(l)`.
fn softmax_row(l: &[f32], p: &mut [f32]) -> f32 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (pe, &le) in p.iter_mut().zip(l) {
        *pe = (le - max).exp();
        sum += *pe;
    }
    p.iter_mut().for_each(|pe| *pe /= sum);
    max + sum.ln()
}

/// `logsumexp(l)` of one row: the z-loss's term, recomputed in the backward
/// pass rather than stored per token.
pub(super) fn logsumexp(l: &[f32]) -> f32 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + l.iter().map(|&le| (le - max).exp()).sum::<f32>().ln()
}
