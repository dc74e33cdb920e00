//! MoH's routed heads (`attention = "moh"`; docs/model.md, "Routed heads"):
//! per token, a gate for every head of the layer's attention. The first
//! `Hs` heads are shared (always on), the other `Hr` routed: `k` of them are
//! chosen per token. The block multiplies each head's output by its gate
//! before the output projection.
//!
//! Legend: `t` tokens, `d` d_model, `h` heads, `r` routed heads, `s` shared
//! heads.

use crate::config::{AttnRouterKind, ModelConfig};
// Routers choose in fp32 whatever the precision of the products around them.
use crate::gemm::fp32::{matmul_nn, matmul_nt, matmul_tn};
use crate::moe::RouterScore;
use crate::weights::DenseLayerWeights;

/// The gates of one micro-batch and what their backward needs.
#[derive(Debug, Clone, Default)]
pub struct HeadGates {
    /// `[t, h]` each head's gate.
    pub gates_th: Vec<f32>,
    /// The learned router's softmax over the routed heads `[t, r]`, which
    /// of them were chosen `[t, r]`, and the chosen ones' sum `[t]`.
    p_tr: Vec<f32>,
    chosen_tr: Vec<bool>,
    chosen_sum_t: Vec<f32>,
    /// The shared heads' softmax `[t, s]` (empty when `Hs <= 1`) and the
    /// two-way softmax `[t, 2]` (empty without shared heads).
    shared_ts: Vec<f32>,
    mix_t2: Vec<f32>,
    /// `c_i`: the share of the tokens that chose routed head i.
    chosen_share_r: Vec<f64>,
    /// MoH's balance loss `Hr sum_i P_i c_i` (before its coefficient).
    pub aux_loss: f32,
    /// Tokens that chose each routed head (learned router: its balance loss).
    chosen_per_head: Vec<usize>,
}

/// `softmax(x W^T)` over the rows of `w` (`[rows, d]`), per token: the
/// router's softmax.
fn router_softmax(x_td: &[f32], w: &[f32], t: usize, d: usize) -> Vec<f32> {
    let rows = w.len() / d;
    let mut logits = vec![0.0; t * rows];
    matmul_nt(t, d, rows, x_td, w, &mut logits, false);
    let mut p = vec![0.0; t * rows];
    for (l, pr) in logits.chunks_exact(rows).zip(p.chunks_exact_mut(rows)) {
        RouterScore::Softmax.forward_row(l, pr);
    }
    p
}

/// Marks the `k` largest of `scores` (ties to the lower index) in `chosen`.
fn choose_top_k(scores: &[f32], k: usize, chosen: &mut [bool]) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    chosen.fill(false);
    order.iter().take(k).for_each(|&i| chosen[i] = true);
}

impl HeadGates {
    /// The gates `[t, h / count]` of the heads of attention shard `index`
    /// of `count` (consecutive blocks of heads).
    pub fn of_shard(&self, n_heads: usize, index: usize, count: usize) -> Vec<f32> {
        let per = n_heads / count;
        self.gates_th.chunks_exact(n_heads).flat_map(|g| g[index * per..(index + 1) * per].iter().copied()).collect()
    }
}

/// The L2 norm of each head row (`hd` values) of `q_th`: `[t, heads]`.
pub fn head_norms(q_th: &[f32], hd: usize) -> Vec<f32> {
    q_th.chunks_exact(hd).map(|head| head.iter().map(|v| v * v).sum::<f32>().sqrt()).collect()
}

/// The gates of every head for the normalised input `x_td` (`[t, d]`);
/// the query-norm router reads `query_norms_th`, every head's query norm
/// (before head norms and RoPE; [`head_norms`]), the learned router `x_td`.
pub fn head_gates(cfg: &ModelConfig, w: &DenseLayerWeights, x_td: &[f32], query_norms_th: &[f32]) -> HeadGates {
    let (d, h, hs, hr, k) = (cfg.d_model, cfg.n_heads, cfg.attn_shared_heads, cfg.routed_heads(), cfg.attn_top_k);
    let t = x_td.len() / d;
    let mut out = HeadGates { gates_th: vec![0.0; t * h], chosen_per_head: vec![0; hr], ..Default::default() };
    let mut chosen = vec![false; hr];
    if cfg.attn_router == AttnRouterKind::QueryNorm {
        for (norms, g) in query_norms_th.chunks_exact(h).zip(out.gates_th.chunks_exact_mut(h)) {
            choose_top_k(&norms[hs..], k, &mut chosen);
            g[..hs].fill(1.0);
            g[hs..].iter_mut().zip(&chosen).for_each(|(gi, &c)| *gi = if c { 1.0 } else { 0.0 });
        }
        return out;
    }
    let routed = w.head_router.as_deref().expect("MoH's learned router has head_router");
    out.p_tr = router_softmax(x_td, routed, t, d);
    out.chosen_tr = vec![false; t * hr];
    out.chosen_sum_t = vec![0.0; t];
    if let Some(shared) = w.shared_head_router.as_deref() {
        out.shared_ts = router_softmax(x_td, shared, t, d);
    }
    if let Some(mix) = w.head_mix.as_deref() {
        out.mix_t2 = router_softmax(x_td, mix, t, d);
    }
    for tok in 0..t {
        let p = &out.p_tr[tok * hr..(tok + 1) * hr];
        let chosen = &mut out.chosen_tr[tok * hr..(tok + 1) * hr];
        choose_top_k(p, k, chosen);
        let sum: f32 = p.iter().zip(chosen.iter()).filter(|(_, &c)| c).map(|(v, _)| v).sum();
        out.chosen_sum_t[tok] = sum;
        let (w_shared, w_routed) = match out.mix_t2.get(2 * tok..2 * tok + 2) {
            Some(m) => (2.0 * m[0], 2.0 * m[1]),
            None => (0.0, 1.0),
        };
        let g = &mut out.gates_th[tok * h..(tok + 1) * h];
        for (i, gi) in g[..hs].iter_mut().enumerate() {
            let shared = if hs > 1 { hs as f32 * out.shared_ts[tok * hs + i] } else { 1.0 };
            *gi = w_shared * shared;
        }
        for (i, gi) in g[hs..].iter_mut().enumerate() {
            *gi = if chosen[i] { w_routed * k as f32 * p[i] / sum } else { 0.0 };
            out.chosen_per_head[i] += chosen[i] as usize;
        }
    }
    // Balance: Hr sum_i P_i c_i, P the mean softmax, c the share choosing i.
    if t > 0 {
        out.chosen_share_r = out.chosen_per_head.iter().map(|&c| c as f64 / t as f64).collect();
        let mean_p = (0..hr).map(|i| out.p_tr.iter().skip(i).step_by(hr).map(|&v| v as f64).sum::<f64>() / t as f64);
        let aux: f64 = mean_p.zip(&out.chosen_share_r).map(|(p, c)| p * c).sum();
        out.aux_loss = (hr as f64 * aux) as f32;
    }
    out
}

/// Backward of `p = softmax(x W^T)` for tokens of width `d` (`W: [rows,
/// d]`, its gradient `gw`): turns `dp` (`[t, rows]`) into the logits'
/// gradient and adds `dW += dl^T x`, `dx += dl W`.
fn router_softmax_backward(
    d: usize,
    p: &[f32],
    dp: Vec<f32>,
    x_td: &[f32],
    (w, gw): (&[f32], &mut [f32]),
    dx_td: &mut [f32],
) {
    let (rows, t) = (w.len() / d, x_td.len() / d);
    // The softmax's backward reads only p (its logits argument is unused).
    let mut dl = vec![0.0; dp.len()];
    for ((pr, dr), out) in p.chunks_exact(rows).zip(dp.chunks_exact(rows)).zip(dl.chunks_exact_mut(rows)) {
        RouterScore::Softmax.backward_row(pr, pr, dr, 0.0, out);
    }
    matmul_tn(rows, t, d, &dl, x_td, gw, true);
    matmul_nn(t, rows, d, &dl, w, dx_td, true);
}

/// Backward of [`head_gates`] for the tokens `tokens` (an attention
/// shard's slice; all of them without shards): from the gates' gradient
/// `dgates_th` (every token and head), adds the routers' weight gradients
/// into `gw` and those tokens' input gradients into `dx_td`; `aux_scale`
/// weighs the balance loss. The query-norm router has no gradient.
#[allow(clippy::too_many_arguments)] // the layer's weights and gradients, the gates, both sides of the gradient
pub fn head_gates_backward(
    cfg: &ModelConfig,
    w: &DenseLayerWeights,
    gw: &mut DenseLayerWeights,
    x_td: &[f32],
    gates: &HeadGates,
    dgates_th: &[f32],
    (aux_scale, tokens): (f32, std::ops::Range<usize>),
    dx_td: &mut [f32],
) {
    if cfg.attn_router == AttnRouterKind::QueryNorm {
        return;
    }
    let (d, h, hs, hr, k) = (cfg.d_model, cfg.n_heads, cfg.attn_shared_heads, cfg.routed_heads(), cfg.attn_top_k);
    let t = x_td.len() / d;
    let mut dp_tr = vec![0.0; t * hr];
    let mut dshared_ts = vec![0.0; gates.shared_ts.len()];
    let mut dmix_t2 = vec![0.0; gates.mix_t2.len()];
    // The balance loss reaches p_i as Hr c_i / N (c a constant).
    let aux_dp: Vec<f32> =
        gates.chosen_share_r.iter().map(|&c| (aux_scale as f64 * hr as f64 * c / t as f64) as f32).collect();
    for tok in tokens {
        let dg = &dgates_th[tok * h..(tok + 1) * h];
        let p = &gates.p_tr[tok * hr..(tok + 1) * hr];
        let chosen = &gates.chosen_tr[tok * hr..(tok + 1) * hr];
        let sum = gates.chosen_sum_t[tok];
        // r_i = k p_i / sum over the chosen (0 elsewhere).
        let r = |i: usize| if chosen[i] { k as f32 * p[i] / sum } else { 0.0 };
        let shared = |i: usize| if hs > 1 { hs as f32 * gates.shared_ts[tok * hs + i] } else { 1.0 };
        // Gates: w_shared * shared_i, w_routed * r_i with w = 2 softmax(W_h x).
        let (w_shared, w_routed) = match gates.mix_t2.get(2 * tok..2 * tok + 2) {
            Some(m) => (2.0 * m[0], 2.0 * m[1]),
            None => (0.0, 1.0),
        };
        if !gates.mix_t2.is_empty() {
            let dm = &mut dmix_t2[2 * tok..2 * tok + 2];
            dm[0] = 2.0 * (0..hs).map(|i| dg[i] * shared(i)).sum::<f32>();
            dm[1] = 2.0 * (0..hr).map(|i| dg[hs + i] * r(i)).sum::<f32>();
        }
        if hs > 1 {
            for i in 0..hs {
                dshared_ts[tok * hs + i] = w_shared * dg[i] * hs as f32;
            }
        }
        // dp_j = (k dr_j - sum_i dr_i r_i) / sum for chosen j, dr = w_routed dg.
        let dr = |i: usize| w_routed * dg[hs + i];
        let dot: f32 = (0..hr).map(|i| dr(i) * r(i)).sum();
        let dp = &mut dp_tr[tok * hr..(tok + 1) * hr];
        for (j, dpj) in dp.iter_mut().enumerate() {
            *dpj = aux_dp[j] + if chosen[j] { (k as f32 * dr(j) - dot) / sum } else { 0.0 };
        }
    }
    let routed = w.head_router.as_deref().expect("MoH's learned router has head_router");
    let grouted = gw.head_router.as_mut().expect("MoH's learned router has head_router");
    router_softmax_backward(d, &gates.p_tr, dp_tr, x_td, (routed, grouted), dx_td);
    if let (Some(sw), Some(gsw)) = (w.shared_head_router.as_deref(), gw.shared_head_router.as_mut()) {
        router_softmax_backward(d, &gates.shared_ts, dshared_ts, x_td, (sw, gsw), dx_td);
    }
    if let (Some(mw), Some(gmw)) = (w.head_mix.as_deref(), gw.head_mix.as_mut()) {
        router_softmax_backward(d, &gates.mix_t2, dmix_t2, x_td, (mw, gmw), dx_td);
    }
}
