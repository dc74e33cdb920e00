//! The router: scores each token's experts, picks its top-k with their
//! gates, drops assignments past an expert's capacity, and computes the
//! load-balancing (aux) and z losses — forward and backward. The scoring
//! function itself is [`RouterScore`] (`score.rs`), the router's seam.
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots.

use super::score::{logsumexp, RouterScore};
use super::select::Selection;
use crate::config::{ModelConfig, RoutedKind};
use crate::error::ModelError;
// Routers choose in fp32 whatever the precision of the products around them.
use crate::gemm::fp32::{matmul_nn, matmul_nt, matmul_tn};
use crate::shards::{NoShards, TokenShards};

/// A layer's router tensors: the weight and, with `expert_bias`, the
/// selection bias; with MoE++'s gating residuals, the map and the previous
/// MoE layer's logits it reads.
#[derive(Debug, Clone, Copy)]
pub struct RouterWeights<'w> {
    /// `[e, d]` (e: every router output, computation-free experts included).
    pub weight_ed: &'w [f32],
    /// `[e]`, added to the scores for the choice only.
    pub expert_bias_e: Option<&'w [f32]>,
    pub residual: Option<GatingResidual<'w>>,
    /// `[h, d]` the MLP router's first layer (`router_mlp`; `weight_ed` is
    /// then `[e, h]`).
    pub hidden_hd: Option<&'w [f32]>,
    /// Mixture-of-Transformers: `[t]` each token's modality; a token's
    /// logits outside its modality's block of experts are -inf, so it
    /// scores and chooses only its own (empty: no blocks).
    pub modality_t: &'w [u8],
}

/// MoE++'s gating residual: `logits += prev_logits W_map^T`.
#[derive(Debug, Clone, Copy)]
pub struct GatingResidual<'w> {
    /// `[e, e]` `W_map`.
    pub map_ee: &'w [f32],
    /// `[t, e]` the previous MoE layer's logits (its residual included).
    pub prev_logits_te: &'w [f32],
}

impl<'w> RouterWeights<'w> {
    /// A router without a selection bias or gating residual.
    pub fn plain(weight_ed: &'w [f32]) -> Self {
        Self { weight_ed, expert_bias_e: None, residual: None, hidden_hd: None, modality_t: &[] }
    }
}

/// The router's decisions for one micro-batch on one rank.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub num_tokens: usize,
    /// `[t, e]` router logits `x W_r^T` (plus the gating residual).
    pub logits_te: Vec<f32>,
    /// `[t, h]` the MLP router's hidden activations `tanh(x W_1^T)` (empty
    /// without `router_mlp`).
    pub hidden_th: Vec<f32>,
    /// `[t, e]` the scores of [`RouterScore`] (softmax or sigmoid of the logits).
    pub scores_te: Vec<f32>,
    /// `[t, k]` chosen expert ids, highest biased score first (ties → lower id).
    pub expert_tk: Vec<u32>,
    /// `[t, k]` gates (the chosen scores, renormalised when `norm_topk_prob`,
    /// times `routed_scaling_factor`; 0 for a zero expert, which the
    /// renormalisation leaves out).
    pub gate_tk: Vec<f32>,
    /// `[t, k]` false where capacity dropped the assignment.
    pub kept_tk: Vec<bool>,
    /// Switch/GShard load-balancing loss `E * sum_e f_e P_e` (before its coefficient).
    pub aux_loss: f32,
    /// `mean_t logsumexp(logits_t)^2` (before its coefficient).
    pub z_loss: f32,
    /// Sequence-wise balance loss (before its coefficient; 0 when off).
    pub seq_aux_loss: f32,
    /// Kept assignments per FFN expert (len `n_experts`).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments per router output before capacity drops (len e): the
    /// load the aux-loss-free bias balances.
    pub chosen_per_expert: Vec<usize>,
    /// Assignments dropped by capacity (FFN experts only: the others never drop).
    pub dropped: usize,
    /// Assignments to MoE++'s computation-free experts.
    pub free_assignments: usize,
    /// `f_e`: each expert's share of the micro-batch's assignments (all
    /// attention shards' tokens, before drops); the aux loss's gradient uses it.
    pub share_e: Vec<f64>,
    /// Tokens the aux and z losses average over (the whole micro-batch's).
    pub stat_tokens: usize,
    /// Sequence-wise loss: `[sequence, e]` its gradient w.r.t. the balance
    /// probabilities `q` of a token of that sequence, `f_qe / (Q T_q)`.
    pub seq_grad_qe: Vec<f64>,
    /// The micro-batch index of this rank's first token (attention shards
    /// hold slices): token `t` is in sequence `(first_token + t) / seq_len`.
    pub first_token: usize,
}

/// Computes router logits, probabilities, top-k, gates, capacity drops
/// (per DESIGN section 5, capacity from `cfg.capacity(num_tokens)`, token
/// order), the aux loss and the z-loss. `x_td` is `[num_tokens, d]`.
pub fn route(cfg: &ModelConfig, x_td: &[f32], router: RouterWeights<'_>, num_tokens: usize) -> Routing {
    route_sharded(cfg, x_td, router, num_tokens, &mut NoShards).expect("one shard has nothing to fail")
}

/// Mixture-of-Transformers: sets each token's logits outside its modality's
/// block of experts to -inf. Softmax and sigmoid then score them 0, the
/// choice never reaches them, and their gradients are 0, exactly as if the
/// modality had a router of its own block's rows.
fn mask_to_modality_blocks(cfg: &ModelConfig, modality_t: &[u8], logits_te: &mut [f32]) {
    let e_n = cfg.n_router_outputs();
    for (row, &m) in logits_te.chunks_exact_mut(e_n).zip(modality_t) {
        let own = cfg.modality_experts(m as usize);
        row[..own.start].fill(f32::NEG_INFINITY);
        row[own.end..].fill(f32::NEG_INFINITY);
    }
}

/// `q = s / sum(s)`: one token's balance probabilities (the scores when
/// they already sum to 1).
fn balance_probs(score: RouterScore, s: &[f32], q: &mut [f32]) {
    if score.sums_to_one() {
        q.copy_from_slice(s);
    } else {
        let sum: f32 = s.iter().sum();
        q.iter_mut().zip(s).for_each(|(qe, &se)| *qe = se / sum);
    }
}

/// [`route`] for this shard's tokens of a micro-batch split over attention
/// shards: the aux loss uses the statistics of all of them (summed over the
/// group), so it is the micro-batch's. Each shard reports its part of the
/// losses (`aux / shards`, its tokens' z terms over all tokens), so the
/// parts sum to the one-rank values.
pub fn route_sharded(
    cfg: &ModelConfig,
    x_td: &[f32],
    router: RouterWeights<'_>,
    num_tokens: usize,
    shards: &mut dyn TokenShards,
) -> Result<Routing, ModelError> {
    let (e_n, k, d) = (cfg.n_router_outputs(), cfg.top_k, cfg.d_model);
    let n = num_tokens;
    assert!(k <= e_n, "route: top_k {k} exceeds the {e_n} router outputs");
    assert!(x_td.len() >= n * d, "route: x has {} values, needs {n}x{d}", x_td.len());
    // The router's input: x, or the MLP router's hidden tanh(x W_1^T).
    let mut hidden_th = Vec::new();
    if let Some(w1) = router.hidden_hd {
        let h = w1.len() / d;
        hidden_th = vec![0.0f32; n * h];
        matmul_nt(n, d, h, x_td, w1, &mut hidden_th, false);
        hidden_th.iter_mut().for_each(|v| *v = v.tanh());
    }
    let (input_ti, width) =
        if router.hidden_hd.is_some() { (&hidden_th[..], hidden_th.len() / n.max(1)) } else { (x_td, d) };
    let router_ed = router.weight_ed;
    assert!(router_ed.len() >= e_n * width, "route: router has {} values, needs {e_n}x{width}", router_ed.len());
    let mut logits_te = vec![0.0f32; n * e_n];
    matmul_nt(n, width, e_n, input_ti, router_ed, &mut logits_te, false);
    if let Some(GatingResidual { map_ee, prev_logits_te }) = router.residual {
        matmul_nt(n, e_n, e_n, prev_logits_te, map_ee, &mut logits_te, true);
    }
    if !router.modality_t.is_empty() {
        mask_to_modality_blocks(cfg, router.modality_t, &mut logits_te);
    }
    let score = RouterScore::of(cfg);
    let mut scores_te = vec![0.0f32; n * e_n];
    let mut z_sum = 0.0f64;
    for (l, p) in logits_te.chunks_exact(e_n).zip(scores_te.chunks_exact_mut(e_n)) {
        let lse = score.forward_row(l, p);
        z_sum += (lse as f64) * (lse as f64);
    }
    let selection = Selection::of(cfg, router.expert_bias_e);
    let mut expert_tk = vec![0u32; n * k];
    let mut gate_tk = vec![0.0f32; n * k];
    let mut choice_e = vec![0.0f32; e_n];
    let rows = scores_te.chunks_exact(e_n).zip(expert_tk.chunks_exact_mut(k)).zip(gate_tk.chunks_exact_mut(k));
    for (t, ((p, ex), g)) in rows.enumerate() {
        let allowed = match router.modality_t.get(t) {
            Some(&m) => cfg.modality_experts(m as usize),
            None => 0..e_n,
        };
        selection.select_row(p, &mut choice_e, ex, allowed);
        for (gj, &e) in g.iter_mut().zip(ex.iter()) {
            // MoE++: a zero expert's gate is 0 and out of the renormalisation.
            *gj = if cfg.routed_kind(e as usize) == RoutedKind::Zero { 0.0 } else { p[e as usize] };
        }
        if cfg.norm_topk_prob {
            let sum: f32 = g.iter().sum();
            if sum > 0.0 {
                g.iter_mut().for_each(|gj| *gj /= sum);
            }
        }
        if cfg.routed_scaling_factor != 1.0 {
            g.iter_mut().for_each(|gj| *gj *= cfg.routed_scaling_factor);
        }
    }
    // Capacity: tokens in ascending order; each FFN expert keeps its first
    // `cap` (computation-free experts never drop).
    let cap = cfg.capacity(n);
    let mut kept_tk = vec![true; n * k];
    let mut tokens_per_expert = vec![0usize; cfg.n_experts];
    let mut chosen_per_expert = vec![0usize; e_n];
    let (mut dropped, mut free_assignments) = (0, 0);
    for (&e, kept) in expert_tk.iter().zip(kept_tk.iter_mut()) {
        chosen_per_expert[e as usize] += 1;
        let Some(c) = tokens_per_expert.get_mut(e as usize) else {
            free_assignments += 1;
            continue;
        };
        if *c < cap {
            *c += 1;
        } else {
            *kept = false;
            dropped += 1;
        }
    }
    // P_e = mean_t q_te; f_e = share of the N*k assignments (before drops),
    // over every shard's tokens: [sum_t q_te (E), assignments (E), z sum, N],
    // then per sequence (with the sequence loss) [T_q, choices (E), sum_t q (E)].
    let first_token = shards.index() * n;
    let seq_stats = SeqStats::new(cfg, n * shards.count());
    let mut stats = vec![0.0f64; 2 * e_n + 2 + seq_stats.len()];
    let (global, per_seq) = stats.split_at_mut(2 * e_n + 2);
    let mut q = vec![0.0f32; e_n];
    for (t, (s, ex)) in scores_te.chunks_exact(e_n).zip(expert_tk.chunks_exact(k)).enumerate() {
        balance_probs(score, s, &mut q);
        for (m, &qe) in global[..e_n].iter_mut().zip(&q) {
            *m += qe as f64;
        }
        if let Some(row) = seq_stats.row(per_seq, first_token + t) {
            row[0] += 1.0;
            for &e in ex {
                row[1 + e as usize] += 1.0;
            }
            row[1 + e_n..].iter_mut().zip(&q).for_each(|(m, &qe)| *m += qe as f64);
        }
    }
    for (c, &chosen) in global[e_n..2 * e_n].iter_mut().zip(&chosen_per_expert) {
        *c = chosen as f64;
    }
    global[2 * e_n] = z_sum;
    global[2 * e_n + 1] = n as f64;
    if shards.count() > 1 {
        shards.sum_stats(&mut stats)?;
    }
    let (global, per_seq) = stats.split_at(2 * e_n + 2);
    let stat_tokens = global[2 * e_n + 1] as usize;
    let mut share_e = global[e_n..2 * e_n].to_vec();
    if stat_tokens > 0 {
        share_e.iter_mut().for_each(|s| *s /= (stat_tokens * k) as f64);
    }
    let (aux_loss, z_loss) = if stat_tokens == 0 {
        (0.0, 0.0)
    } else {
        // MoE++'s heterogeneous weights: 1 for FFN experts, tau for the others.
        let terms = global[..e_n].iter().zip(&share_e).enumerate();
        let aux: f64 = terms.map(|(e, (m, f))| cfg.balance_weight(e) as f64 * m / stat_tokens as f64 * f).sum();
        let aux_part = e_n as f64 * aux / shards.count() as f64;
        (aux_part as f32, (z_sum / stat_tokens as f64) as f32)
    };
    let (seq_loss, seq_grad_qe) = seq_stats.loss(per_seq);
    Ok(Routing {
        num_tokens: n,
        logits_te,
        hidden_th,
        scores_te,
        expert_tk,
        gate_tk,
        kept_tk,
        aux_loss,
        z_loss,
        seq_aux_loss: (seq_loss / shards.count() as f64) as f32,
        tokens_per_expert,
        chosen_per_expert,
        dropped,
        free_assignments,
        share_e,
        stat_tokens,
        seq_grad_qe,
        first_token,
    })
}

/// The layout of the sequence-wise loss's statistics: one row of
/// `[T_q, choices (E), sum_t q (E)]` per sequence of the micro-batch
/// (none when the loss is off).
struct SeqStats {
    sequences: usize,
    seq_len: usize,
    experts: usize,
    top_k: usize,
    /// Per router output, its weight in the loss (MoE++'s tau for
    /// computation-free experts).
    weights: Vec<f64>,
}

impl SeqStats {
    fn new(cfg: &ModelConfig, micro_batch_tokens: usize) -> Self {
        let sequences = if cfg.seq_aux_loss_coef > 0.0 { micro_batch_tokens.div_ceil(cfg.seq_len) } else { 0 };
        let experts = cfg.n_router_outputs();
        let weights = (0..experts).map(|e| cfg.balance_weight(e) as f64).collect();
        Self { sequences, seq_len: cfg.seq_len, experts, top_k: cfg.top_k, weights }
    }

    fn width(&self) -> usize {
        1 + 2 * self.experts
    }

    fn len(&self) -> usize {
        self.sequences * self.width()
    }

    /// The row of the sequence holding micro-batch token `token`.
    fn row<'s>(&self, stats: &'s mut [f64], token: usize) -> Option<&'s mut [f64]> {
        let q = token / self.seq_len;
        (q < self.sequences).then(|| &mut stats[q * self.width()..(q + 1) * self.width()])
    }

    /// The loss `mean_q sum_i eta_i f_qi P_qi` and its gradient per sequence
    /// w.r.t. a token's `q_i`: `eta_i f_qi / (Q T_q)`, `f_qi = E/(k T_q) choices_qi`.
    fn loss(&self, stats: &[f64]) -> (f64, Vec<f64>) {
        let (e_n, seqs) = (self.experts, self.sequences as f64);
        let mut loss = 0.0;
        let mut grad_qe = vec![0.0; self.sequences * e_n];
        for (row, grad) in stats.chunks_exact(self.width()).zip(grad_qe.chunks_exact_mut(e_n)) {
            let tokens = row[0];
            if tokens == 0.0 {
                continue;
            }
            let (choices, q_sums) = row[1..].split_at(e_n);
            for (((g, &c), &qs), &eta) in grad.iter_mut().zip(choices).zip(q_sums).zip(&self.weights) {
                let f = eta * e_n as f64 / (self.top_k as f64 * tokens) * c;
                loss += f * qs / tokens / seqs;
                *g = f / (seqs * tokens);
            }
        }
        (loss, grad_qe)
    }
}

/// How much the router's losses weigh in the total loss: the aux and z
/// losses are multiplied by these (their coefficients, averaged over the
/// micro-batches of a step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouterLossScales {
    pub aux: f32,
    pub z: f32,
    /// The sequence-wise balance loss's weight.
    pub seq: f32,
}

/// Where [`route_backward`] adds its gradients.
#[derive(Debug)]
pub struct RouterGrads<'g> {
    /// `[t, d]` the router input's gradient.
    pub dx_td: &'g mut [f32],
    /// `[e, d]` the router weight's gradient.
    pub drouter_ed: &'g mut [f32],
    /// With gating residuals: the gradient that reached this layer's logits
    /// from the next layer's residual (`[t, e]`, an input) ...
    pub dlogits_in_te: Option<&'g [f32]>,
    /// ... and where this layer's residual adds `dW_map` (`[e, e]`) and the
    /// previous layer's logits' gradient (`[t, e]`).
    pub dmap_ee: Option<&'g mut [f32]>,
    pub dprev_logits_te: Option<&'g mut [f32]>,
    /// The MLP router's `dW_1` (`[h, d]`).
    pub dhidden_hd: Option<&'g mut [f32]>,
}

impl<'g> RouterGrads<'g> {
    /// The input's and the weight's gradients only (no gating residual).
    pub fn plain(dx_td: &'g mut [f32], drouter_ed: &'g mut [f32]) -> Self {
        Self { dx_td, drouter_ed, dlogits_in_te: None, dmap_ee: None, dprev_logits_te: None, dhidden_hd: None }
    }
}

/// Backward of [`route`]. `dgate_tk` is the loss gradient w.r.t. the gates
/// (zero for dropped assignments); `scales` weigh the router's losses.
/// Adds into `grads`.
pub fn route_backward(
    cfg: &ModelConfig,
    x_td: &[f32],
    router: RouterWeights<'_>,
    routing: &Routing,
    dgate_tk: &[f32],
    scales: RouterLossScales,
    grads: RouterGrads<'_>,
) {
    let RouterGrads { dx_td, drouter_ed, dlogits_in_te, dmap_ee, dprev_logits_te, dhidden_hd } = grads;
    let router_ed = router.weight_ed;
    let (e_n, k, d) = (cfg.n_router_outputs(), cfg.top_k, cfg.d_model);
    let n = routing.num_tokens;
    if n == 0 {
        return;
    }
    assert!(dgate_tk.len() >= n * k, "route_backward: dgate has {} values, needs {n}x{k}", dgate_tk.len());
    assert!(dx_td.len() >= n * d && x_td.len() >= n * d, "route_backward: x/dx need {n}x{d} values");
    assert!(drouter_ed.len() == router_ed.len(), "route_backward: drouter needs {} values", router_ed.len());
    // d aux / d q_te = E f_e / N (f_e constant; N and f_e of the whole micro-batch).
    let n_all = routing.stat_tokens;
    let aux_dq: Vec<f32> = (routing.share_e.iter().enumerate())
        .map(|(e, f)| (scales.aux as f64 * cfg.balance_weight(e) as f64 * e_n as f64 * f / n_all as f64) as f32)
        .collect();
    let z_coef = scales.z * 2.0 / n_all as f32;
    let score = RouterScore::of(cfg);
    let rsf = cfg.routed_scaling_factor;
    let mut dlogits_te = vec![0.0f32; n * e_n];
    let (mut dq, mut ds, mut q) = (vec![0.0f32; e_n], vec![0.0f32; e_n], vec![0.0f32; e_n]);
    for t in 0..n {
        let s = &routing.scores_te[t * e_n..(t + 1) * e_n];
        let l = &routing.logits_te[t * e_n..(t + 1) * e_n];
        let ex = &routing.expert_tk[t * k..(t + 1) * k];
        let dg = &dgate_tk[t * k..(t + 1) * k];
        // The balance losses reach q: the aux loss's constant, plus the
        // sequence loss's f_qe / (Q T_q) for this token's sequence.
        dq.copy_from_slice(&aux_dq);
        if scales.seq != 0.0 && !routing.seq_grad_qe.is_empty() {
            let seq = (routing.first_token + t) / cfg.seq_len;
            let grad = &routing.seq_grad_qe[seq * e_n..(seq + 1) * e_n];
            dq.iter_mut().zip(grad).for_each(|(a, &g)| *a += (scales.seq as f64 * g) as f32);
        }
        // q = s / S: ds_j = (dq_j - sum_i q_i dq_i) / S (q = s for softmax).
        if score.sums_to_one() {
            ds.copy_from_slice(&dq);
        } else {
            balance_probs(score, s, &mut q);
            let sum: f32 = s.iter().sum();
            let dot: f32 = q.iter().zip(&dq).map(|(a, b)| a * b).sum();
            ds.iter_mut().zip(&dq).for_each(|(dsj, &dqj)| *dsj = (dqj - dot) / sum);
        }
        // Gates g_j = r s_j / S (S = sum of the chosen s) when normalised,
        // else r s_j, with r = routed_scaling_factor:
        // ds_j += (r dg_j - sum_i dg_i g_i) / S, or r dg_j. A zero expert's
        // gate is the constant 0, outside S.
        let gated = || ex.iter().zip(dg).filter(|(&e, _)| cfg.routed_kind(e as usize) != RoutedKind::Zero);
        if cfg.norm_topk_prob {
            let sum: f32 = gated().map(|(&e, _)| s[e as usize]).sum();
            if sum > 0.0 {
                let g = &routing.gate_tk[t * k..(t + 1) * k];
                let dot: f32 = dg.iter().zip(g).map(|(a, b)| a * b).sum();
                for (&e, &dgj) in gated() {
                    ds[e as usize] += (rsf * dgj - dot) / sum;
                }
            }
        } else {
            for (&e, &dgj) in gated() {
                ds[e as usize] += rsf * dgj;
            }
        }
        // z-loss: d/d lse of z_scale * sum_t lse_t^2 / N is 2 z_scale lse / N.
        let dlse = if scales.z != 0.0 { z_coef * logsumexp(l) } else { 0.0 };
        score.backward_row(l, s, &ds, dlse, &mut dlogits_te[t * e_n..(t + 1) * e_n]);
    }
    // The next layer's residual read these logits: its gradient adds here.
    if let Some(din) = dlogits_in_te {
        dlogits_te.iter_mut().zip(din).for_each(|(a, &b)| *a += b);
    }
    match router.hidden_hd {
        None => {
            // dx += dlogits W_r; dW_r += dlogits^T x.
            matmul_nn(n, e_n, d, &dlogits_te, router_ed, dx_td, true);
            matmul_tn(e_n, n, d, &dlogits_te, x_td, drouter_ed, true);
        }
        Some(w1) => {
            // logits = h W_2^T, h = tanh(x W_1^T): dW_2 += dlogits^T h;
            // dh = dlogits W_2; dpre = dh (1 - h^2); dW_1 += dpre^T x; dx += dpre W_1.
            let h_w = w1.len() / d;
            let h = &routing.hidden_th;
            matmul_tn(e_n, n, h_w, &dlogits_te, h, drouter_ed, true);
            let mut dpre_th = vec![0.0f32; n * h_w];
            matmul_nn(n, e_n, h_w, &dlogits_te, router_ed, &mut dpre_th, false);
            dpre_th.iter_mut().zip(h).for_each(|(g, &hv)| *g *= 1.0 - hv * hv);
            if let Some(dw1) = dhidden_hd {
                matmul_tn(h_w, n, d, &dpre_th, x_td, dw1, true);
            }
            matmul_nn(n, h_w, d, &dpre_th, w1, dx_td, true);
        }
    }
    // logits += prev W_map^T: dW_map += dlogits^T prev; dprev += dlogits W_map.
    if let Some(GatingResidual { map_ee, prev_logits_te }) = router.residual {
        if let Some(dmap) = dmap_ee {
            matmul_tn(e_n, n, e_n, &dlogits_te, prev_logits_te, dmap, true);
        }
        if let Some(dprev) = dprev_logits_te {
            matmul_nn(n, e_n, e_n, &dlogits_te, map_ee, dprev, true);
        }
    }
}
