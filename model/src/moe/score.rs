//! Router scoring: how one token's router logits become the scores that
//! pick its experts and give their gates. This is the router's one seam.
//!
//! The router (`router.rs`) reaches the scoring function only through
//! [`RouterScore`]: [`RouterScore::forward_row`] turns logits into scores,
//! [`RouterScore::select_row`] picks the top-k experts from them and
//! [`RouterScore::backward_row`] carries score gradients back to the
//! logits. Gates (the chosen scores, renormalised when `norm_topk_prob`),
//! capacity drops, the aux loss (over the scores) and the z-loss (over the
//! logits) are computed from what these return, for every scoring alike.
//!
//! To add a scoring function (e.g. DeepSeek-V3's sigmoid scores with an
//! expert bias that shifts only the selection):
//! 1. write its math, config key and new tensors in docs/model.md (DESIGN 5a);
//! 2. add a variant to [`RouterScore`] and choose it in [`RouterScore::of`];
//! 3. give the variant an arm in `forward_row`, `select_row` (a selection
//!    bias picks by `score + bias` but the gates still read the scores) and
//!    `backward_row` (with its derivative in a comment);
//! 4. add its finite-difference case to `tests/grad_moe.rs`.
//!
//! Legend: `e` experts, `k` top-k slots (one token's row throughout).

use crate::config::ModelConfig;

/// A router scoring function (DESIGN section 5: softmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterScore {
    /// `s = softmax(logits)`.
    #[default]
    Softmax,
}

impl RouterScore {
    /// The scoring function `cfg` asks for; v1 has only softmax.
    pub fn of(_cfg: &ModelConfig) -> Self {
        RouterScore::Softmax
    }

    /// Writes one token's scores `scores_e` from its `logits_e`; returns
    /// `logsumexp(logits_e)`, the token's z-loss term (softmax has it for free).
    pub fn forward_row(self, logits_e: &[f32], scores_e: &mut [f32]) -> f32 {
        match self {
            RouterScore::Softmax => softmax_row(logits_e, scores_e),
        }
    }

    /// Writes into `experts_k` the token's `experts_k.len()` chosen experts,
    /// highest score first; ties go to the lower expert id.
    pub fn select_row(self, scores_e: &[f32], experts_k: &mut [u32]) {
        match self {
            RouterScore::Softmax => top_k(scores_e, experts_k),
        }
    }

    /// Backward of [`RouterScore::forward_row`]: from the loss gradients
    /// w.r.t. the scores (`dscores_e`) and w.r.t. the returned logsumexp
    /// (`dlse`), overwrites `dlogits_e`.
    pub fn backward_row(self, scores_e: &[f32], dscores_e: &[f32], dlse: f32, dlogits_e: &mut [f32]) {
        match self {
            RouterScore::Softmax => {
                // Softmax: dl_e = p_e (dp_e - sum_i p_i dp_i); d lse / dl_e = p_e.
                let p = scores_e;
                let dot: f32 = p.iter().zip(dscores_e).map(|(a, b)| a * b).sum();
                for ((dl, &pe), &dpe) in dlogits_e.iter_mut().zip(p).zip(dscores_e) {
                    *dl = pe * (dpe - dot) + dlse * pe;
                }
            }
        }
    }
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
