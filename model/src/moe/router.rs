//! The router: scores each token's experts, picks its top-k with their
//! gates, drops assignments past an expert's capacity, and computes the
//! load-balancing (aux) and z losses — forward and backward. The scoring
//! function itself is [`RouterScore`] (`score.rs`), the router's seam.
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots.

use super::score::{logsumexp, RouterScore};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gemm::{matmul_nn, matmul_nt, matmul_tn};
use crate::shards::{NoShards, TokenShards};

/// The router's decisions for one micro-batch on one rank.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub num_tokens: usize,
    /// `[t, e]` router logits `x W_r^T`.
    pub logits_te: Vec<f32>,
    /// `[t, e]` the scores of [`RouterScore`] (softmax of the logits).
    pub scores_te: Vec<f32>,
    /// `[t, k]` chosen expert ids, highest score first (ties → lower id).
    pub expert_tk: Vec<u32>,
    /// `[t, k]` gates (the chosen scores, renormalised when `norm_topk_prob`).
    pub gate_tk: Vec<f32>,
    /// `[t, k]` false where capacity dropped the assignment.
    pub kept_tk: Vec<bool>,
    /// Switch/GShard load-balancing loss `E * sum_e f_e P_e` (before its coefficient).
    pub aux_loss: f32,
    /// `mean_t logsumexp(logits_t)^2` (before its coefficient).
    pub z_loss: f32,
    /// Kept assignments per expert (len E).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped by capacity.
    pub dropped: usize,
    /// `f_e`: each expert's share of the micro-batch's assignments (all
    /// attention shards' tokens, before drops); the aux loss's gradient uses it.
    pub share_e: Vec<f64>,
    /// Tokens the aux and z losses average over (the whole micro-batch's).
    pub stat_tokens: usize,
}

/// Computes router logits, probabilities, top-k, gates, capacity drops
/// (per DESIGN section 5, capacity from `cfg.capacity(num_tokens)`, token
/// order), the aux loss and the z-loss. `x_td` is `[num_tokens, d]`,
/// `router_ed` is `[E, d]`.
pub fn route(cfg: &ModelConfig, x_td: &[f32], router_ed: &[f32], num_tokens: usize) -> Routing {
    route_sharded(cfg, x_td, router_ed, num_tokens, &mut NoShards).expect("one shard has nothing to fail")
}

/// [`route`] for this shard's tokens of a micro-batch split over attention
/// shards: the aux loss uses the statistics of all of them (summed over the
/// group), so it is the micro-batch's. Each shard reports its part of the
/// losses (`aux / shards`, its tokens' z terms over all tokens), so the
/// parts sum to the one-rank values.
pub fn route_sharded(
    cfg: &ModelConfig,
    x_td: &[f32],
    router_ed: &[f32],
    num_tokens: usize,
    shards: &mut dyn TokenShards,
) -> Result<Routing, ModelError> {
    let (e_n, k, d) = (cfg.n_experts, cfg.top_k, cfg.d_model);
    let n = num_tokens;
    assert!(k <= e_n, "route: top_k {k} exceeds n_experts {e_n}");
    assert!(x_td.len() >= n * d, "route: x has {} values, needs {n}x{d}", x_td.len());
    assert!(router_ed.len() >= e_n * d, "route: router has {} values, needs {e_n}x{d}", router_ed.len());
    let mut logits_te = vec![0.0f32; n * e_n];
    matmul_nt(n, d, e_n, x_td, router_ed, &mut logits_te, false);
    let score = RouterScore::of(cfg);
    let mut scores_te = vec![0.0f32; n * e_n];
    let mut z_sum = 0.0f64;
    for (l, p) in logits_te.chunks_exact(e_n).zip(scores_te.chunks_exact_mut(e_n)) {
        let lse = score.forward_row(l, p);
        z_sum += (lse as f64) * (lse as f64);
    }
    let mut expert_tk = vec![0u32; n * k];
    let mut gate_tk = vec![0.0f32; n * k];
    for ((p, ex), g) in scores_te.chunks_exact(e_n).zip(expert_tk.chunks_exact_mut(k)).zip(gate_tk.chunks_exact_mut(k))
    {
        score.select_row(p, ex);
        for (gj, &e) in g.iter_mut().zip(ex.iter()) {
            *gj = p[e as usize];
        }
        if cfg.norm_topk_prob {
            let sum: f32 = g.iter().sum();
            if sum > 0.0 {
                g.iter_mut().for_each(|gj| *gj /= sum);
            }
        }
    }
    // Capacity: tokens in ascending order; each expert keeps its first `cap`.
    let cap = cfg.capacity(n);
    let mut kept_tk = vec![true; n * k];
    let mut tokens_per_expert = vec![0usize; e_n];
    let mut dropped = 0;
    for (&e, kept) in expert_tk.iter().zip(kept_tk.iter_mut()) {
        let c = &mut tokens_per_expert[e as usize];
        if *c < cap {
            *c += 1;
        } else {
            *kept = false;
            dropped += 1;
        }
    }
    // P_e = mean_t p_te; f_e = share of the N*k assignments (before drops),
    // over every shard's tokens: [sum_t p_te (E), assignments (E), z sum, N].
    let mut stats = vec![0.0f64; 2 * e_n + 2];
    for p in scores_te.chunks_exact(e_n) {
        for (m, &pe) in stats[..e_n].iter_mut().zip(p) {
            *m += pe as f64;
        }
    }
    for &e in &expert_tk {
        stats[e_n + e as usize] += 1.0;
    }
    stats[2 * e_n] = z_sum;
    stats[2 * e_n + 1] = n as f64;
    if shards.count() > 1 {
        shards.sum_stats(&mut stats)?;
    }
    let stat_tokens = stats[2 * e_n + 1] as usize;
    let mut share_e = stats[e_n..2 * e_n].to_vec();
    if stat_tokens > 0 {
        share_e.iter_mut().for_each(|s| *s /= (stat_tokens * k) as f64);
    }
    let (aux_loss, z_loss) = if stat_tokens == 0 {
        (0.0, 0.0)
    } else {
        let aux: f64 = stats[..e_n].iter().zip(&share_e).map(|(m, f)| m / stat_tokens as f64 * f).sum();
        let aux_part = e_n as f64 * aux / shards.count() as f64;
        (aux_part as f32, (z_sum / stat_tokens as f64) as f32)
    };
    Ok(Routing {
        num_tokens: n,
        logits_te,
        scores_te,
        expert_tk,
        gate_tk,
        kept_tk,
        aux_loss,
        z_loss,
        tokens_per_expert,
        dropped,
        share_e,
        stat_tokens,
    })
}

/// How much the router's losses weigh in the total loss: the aux and z
/// losses are multiplied by these (their coefficients, averaged over the
/// micro-batches of a step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouterLossScales {
    pub aux: f32,
    pub z: f32,
}

/// Where [`route_backward`] adds its gradients.
#[derive(Debug)]
pub struct RouterGrads<'g> {
    /// `[t, d]` the router input's gradient.
    pub dx_td: &'g mut [f32],
    /// `[e, d]` the router weight's gradient.
    pub drouter_ed: &'g mut [f32],
}

/// Backward of [`route`]. `dgate_tk` is the loss gradient w.r.t. the gates
/// (zero for dropped assignments); `scales` weigh the aux and z losses.
/// Adds into `grads`.
pub fn route_backward(
    cfg: &ModelConfig,
    x_td: &[f32],
    router_ed: &[f32],
    routing: &Routing,
    dgate_tk: &[f32],
    scales: RouterLossScales,
    grads: RouterGrads<'_>,
) {
    let (RouterLossScales { aux: aux_scale, z: z_scale }, RouterGrads { dx_td, drouter_ed }) = (scales, grads);
    let (e_n, k, d) = (cfg.n_experts, cfg.top_k, cfg.d_model);
    let n = routing.num_tokens;
    if n == 0 {
        return;
    }
    assert!(dgate_tk.len() >= n * k, "route_backward: dgate has {} values, needs {n}x{k}", dgate_tk.len());
    assert!(dx_td.len() >= n * d && x_td.len() >= n * d, "route_backward: x/dx need {n}x{d} values");
    assert!(drouter_ed.len() >= e_n * d, "route_backward: drouter needs {e_n}x{d} values");
    // d aux / d p_te = E f_e / N (f_e constant; N and f_e of the whole micro-batch).
    let n_all = routing.stat_tokens;
    let aux_dp: Vec<f32> =
        routing.share_e.iter().map(|f| (aux_scale as f64 * e_n as f64 * f / n_all as f64) as f32).collect();
    let z_coef = z_scale * 2.0 / n_all as f32;
    let score = RouterScore::of(cfg);
    let mut dlogits_te = vec![0.0f32; n * e_n];
    let mut dp = vec![0.0f32; e_n];
    for t in 0..n {
        let p = &routing.scores_te[t * e_n..(t + 1) * e_n];
        let l = &routing.logits_te[t * e_n..(t + 1) * e_n];
        let ex = &routing.expert_tk[t * k..(t + 1) * k];
        let dg = &dgate_tk[t * k..(t + 1) * k];
        dp.copy_from_slice(&aux_dp);
        if cfg.norm_topk_prob {
            // g_j = p_j / S, S = sum_sel p: dp_j = (dg_j - sum_i dg_i g_i) / S.
            let sum: f32 = ex.iter().map(|&e| p[e as usize]).sum();
            if sum > 0.0 {
                let g = &routing.gate_tk[t * k..(t + 1) * k];
                let dot: f32 = dg.iter().zip(g).map(|(a, b)| a * b).sum();
                for (&e, &dgj) in ex.iter().zip(dg) {
                    dp[e as usize] += (dgj - dot) / sum;
                }
            }
        } else {
            for (&e, &dgj) in ex.iter().zip(dg) {
                dp[e as usize] += dgj;
            }
        }
        // z-loss: d/d lse of z_scale * sum_t lse_t^2 / N is 2 z_scale lse / N.
        let dlse = if z_scale != 0.0 { z_coef * logsumexp(l) } else { 0.0 };
        score.backward_row(p, &dp, dlse, &mut dlogits_te[t * e_n..(t + 1) * e_n]);
    }
    // dx += dlogits W_r; dW_r += dlogits^T x.
    matmul_nn(n, e_n, d, &dlogits_te, router_ed, dx_td, true);
    matmul_tn(e_n, n, d, &dlogits_te, x_td, drouter_ed, true);
}
