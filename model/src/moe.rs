//! The MoE layer as stages: route → dispatch → expert compute → combine.
//!
//! `route` decides, per token, its top-k experts, their gates and (with a
//! capacity factor) which assignments are dropped. A [`DispatchPlan`] lists
//! the kept assignments grouped by expert. The expert compute stage is an
//! [`ExpertExecutor`]: [`LocalExperts`] runs every expert on this rank (the
//! EP=1 reference); the worker's expert-parallel executor sends the rows to
//! the experts' owners with all-to-all instead. `combine` weights the expert
//! outputs by their gates and sums them back per token.
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots, `a` kept
//! assignments (rows of the dispatch buffer).

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gemm::{matmul_nn, matmul_nt, matmul_tn};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward, SwigluCache};
use crate::shards::{NoShards, TokenShards};
use crate::weights::{ExpertStore, ExpertWeights};
use rayon::prelude::*;
use std::collections::BTreeMap;

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

/// `logsumexp(l)` of one row.
fn logsumexp(l: &[f32]) -> f32 {
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

/// Below this many multiply-adds per SwiGLU product (`rows * d * f`
/// summed over the call's experts) the experts run one after another.
const RAYON_MIN_WORK: usize = 1 << 18;

/// Whether to run the experts of one call as parallel rayon tasks (each
/// with a single-threaded gemm) rather than one after another (each gemm
/// free to use every thread). Measured on the 2-core development machine,
/// forward + backward of `LocalExperts`: E=8, d=512, f=1024, 4096 rows:
/// about equal (rayon ~0.65 s, serial ~0.75 s, noisy); E=8, d=64, f=128,
/// 512 rows: rayon 1.5x faster (each gemm is below gemm's own parallel
/// threshold); E=4, d=6, f=5, 32 rows: serial 4x faster (task overhead).
fn use_rayon(rows: usize, d: usize, f: usize, active_experts: usize) -> bool {
    active_experts > 1 && rows * d * f >= RAYON_MIN_WORK
}

/// The router's decisions for one micro-batch on one rank.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub num_tokens: usize,
    /// `[t, e]` router logits `x W_r^T`.
    pub logits_te: Vec<f32>,
    /// `[t, e]` softmax of the logits.
    pub probs_te: Vec<f32>,
    /// `[t, k]` chosen expert ids, highest probability first (ties → lower id).
    pub expert_tk: Vec<u32>,
    /// `[t, k]` gates (top-k probabilities, renormalised when `norm_topk_prob`).
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
    let mut probs_te = vec![0.0f32; n * e_n];
    let mut z_sum = 0.0f64;
    for (l, p) in logits_te.chunks_exact(e_n).zip(probs_te.chunks_exact_mut(e_n)) {
        let lse = softmax_row(l, p);
        z_sum += (lse as f64) * (lse as f64);
    }
    let mut expert_tk = vec![0u32; n * k];
    let mut gate_tk = vec![0.0f32; n * k];
    for ((p, ex), g) in probs_te.chunks_exact(e_n).zip(expert_tk.chunks_exact_mut(k)).zip(gate_tk.chunks_exact_mut(k)) {
        top_k(p, ex);
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
    for p in probs_te.chunks_exact(e_n) {
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
        probs_te,
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

/// Backward of [`route`]. `dgate_tk` is the loss gradient w.r.t. the gates
/// (zero for dropped assignments); `aux_scale` and `z_scale` multiply the
/// aux and z losses in the total loss. Adds into `dx_td` and `drouter_ed`.
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    cfg: &ModelConfig,
    x_td: &[f32],
    router_ed: &[f32],
    routing: &Routing,
    dgate_tk: &[f32],
    aux_scale: f32,
    z_scale: f32,
    dx_td: &mut [f32],
    drouter_ed: &mut [f32],
) {
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
    let mut dlogits_te = vec![0.0f32; n * e_n];
    let mut dp = vec![0.0f32; e_n];
    for t in 0..n {
        let p = &routing.probs_te[t * e_n..(t + 1) * e_n];
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
        // Softmax: dl_e = p_e (dp_e - sum_i p_i dp_i); z-loss: 2 lse p_e / N.
        let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        let zc = if z_scale != 0.0 { z_coef * logsumexp(l) } else { 0.0 };
        for ((dl, &pe), &dpe) in dlogits_te[t * e_n..(t + 1) * e_n].iter_mut().zip(p).zip(&dp) {
            *dl = pe * (dpe - dot) + zc * pe;
        }
    }
    // dx += dlogits W_r; dW_r += dlogits^T x.
    matmul_nn(n, e_n, d, &dlogits_te, router_ed, dx_td, true);
    matmul_tn(e_n, n, d, &dlogits_te, x_td, drouter_ed, true);
}

/// The kept assignments grouped by expert: rows of expert 0 first (in
/// token order), then expert 1, and so on. This order is the contract
/// between the MoE layer and every [`ExpertExecutor`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchPlan {
    pub num_experts: usize,
    pub top_k: usize,
    /// Rows per expert (len E).
    pub counts_e: Vec<usize>,
    /// Start row of each expert's block (len E + 1).
    pub offsets_e: Vec<usize>,
    /// Per row: the flat `[t, k]` index `token * top_k + slot` it came from.
    pub source_a: Vec<u32>,
}

impl DispatchPlan {
    /// Groups the kept assignments of `routing` by expert.
    pub fn from_routing(routing: &Routing, num_experts: usize, top_k: usize) -> Self {
        let k = top_k;
        let mut counts_e = vec![0usize; num_experts];
        for (&e, &kept) in routing.expert_tk.iter().zip(&routing.kept_tk) {
            if kept {
                counts_e[e as usize] += 1;
            }
        }
        let mut offsets_e = Vec::with_capacity(num_experts + 1);
        offsets_e.push(0);
        for &c in &counts_e {
            offsets_e.push(offsets_e.last().copied().unwrap_or(0) + c);
        }
        let total = offsets_e[num_experts];
        let mut cursor = offsets_e.clone();
        let mut source_a = vec![0u32; total];
        for (i, (&e, &kept)) in routing.expert_tk.iter().zip(&routing.kept_tk).enumerate().take(routing.num_tokens * k)
        {
            if kept {
                let c = &mut cursor[e as usize];
                source_a[*c] = i as u32;
                *c += 1;
            }
        }
        Self { num_experts, top_k, counts_e, offsets_e, source_a }
    }

    /// A grouping of rows that arrived from other ranks: `counts_e[e]` rows
    /// of expert e, expert by expert. It has no token sources, so only an
    /// [`ExpertExecutor`] may use it (not gather or combine).
    pub fn grouped(counts_e: Vec<usize>, top_k: usize) -> Self {
        let mut offsets_e = Vec::with_capacity(counts_e.len() + 1);
        offsets_e.push(0);
        for &c in &counts_e {
            offsets_e.push(offsets_e.last().copied().unwrap_or(0) + c);
        }
        let rows = offsets_e[counts_e.len()];
        Self { num_experts: counts_e.len(), top_k, counts_e, offsets_e, source_a: vec![u32::MAX; rows] }
    }

    /// Number of rows (kept assignments).
    pub fn num_rows(&self) -> usize {
        self.source_a.len()
    }

    /// Copies each row's token vector: `x_ad[a] = x_td[source_a[a] / k]`.
    pub fn gather(&self, x_td: &[f32], d: usize) -> Vec<f32> {
        let k = self.top_k;
        let mut x_ad = vec![0.0f32; self.num_rows() * d];
        for (row, &src) in x_ad.chunks_exact_mut(d).zip(&self.source_a) {
            let t = src as usize / k;
            row.copy_from_slice(&x_td[t * d..(t + 1) * d]);
        }
        x_ad
    }

    /// Backward of [`DispatchPlan::gather`]: adds each row's gradient into its token.
    pub fn gather_backward(&self, dx_ad: &[f32], d: usize, dx_td: &mut [f32]) {
        let k = self.top_k;
        for (row, &src) in dx_ad.chunks_exact(d).zip(&self.source_a) {
            let t = src as usize / k;
            for (o, &v) in dx_td[t * d..(t + 1) * d].iter_mut().zip(row) {
                *o += v;
            }
        }
    }

    /// Combine: `out_td[t] += gate[t,k] * y_ad[a]` for every row `a` from `(t, k)`.
    pub fn combine(&self, routing: &Routing, y_ad: &[f32], d: usize, out_td: &mut [f32]) {
        let k = self.top_k;
        for (row, &src) in y_ad.chunks_exact(d).zip(&self.source_a) {
            let t = src as usize / k;
            let g = routing.gate_tk[src as usize];
            for (o, &v) in out_td[t * d..(t + 1) * d].iter_mut().zip(row) {
                *o += g * v;
            }
        }
    }

    /// Backward of [`DispatchPlan::combine`]: returns `dy_ad`
    /// (`gate * dout[t]`) and adds `dot(dout[t], y_ad[a])` into `dgate_tk`.
    pub fn combine_backward(
        &self,
        routing: &Routing,
        y_ad: &[f32],
        dout_td: &[f32],
        d: usize,
        dgate_tk: &mut [f32],
    ) -> Vec<f32> {
        let k = self.top_k;
        let mut dy_ad = vec![0.0f32; self.num_rows() * d];
        for ((dy, y), &src) in dy_ad.chunks_exact_mut(d).zip(y_ad.chunks_exact(d)).zip(&self.source_a) {
            let t = src as usize / k;
            let g = routing.gate_tk[src as usize];
            let dout = &dout_td[t * d..(t + 1) * d];
            let mut dot = 0.0f32;
            for ((dyj, &yj), &oj) in dy.iter_mut().zip(y).zip(dout) {
                *dyj = g * oj;
                dot += oj * yj;
            }
            dgate_tk[src as usize] += dot;
        }
        dy_ad
    }
}

/// Where expert compute happens. Rows arrive in [`DispatchPlan`] order;
/// the executor returns each row's (ungated) expert output, and in
/// `backward` each row's input gradient, accumulating the experts' weight
/// gradients wherever the experts live. Calls come as all forwards of a
/// micro-batch (layer 0..L) then all backwards (layer L-1..0).
pub trait ExpertExecutor {
    /// `y_ad = Expert_e(x_ad)` row by row.
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// `dx_ad` from `dy_ad`, adding weight gradients.
    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError>;

    /// Starts [`ExpertExecutor::forward`]; the caller may compute something
    /// else (attention, shared experts) before [`ExpertExecutor::finish_forward`].
    /// An executor that sends rows to other ranks starts sending here.
    fn start_forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Started, ModelError> {
        self.forward(layer, plan, x_ad).map(Started::Done)
    }
    /// The result of the forward pass `started` by [`ExpertExecutor::start_forward`].
    fn finish_forward(&mut self, layer: usize, started: Started) -> Result<Vec<f32>, ModelError> {
        started.into_done(layer)
    }
    /// Starts [`ExpertExecutor::backward`] (see [`ExpertExecutor::start_forward`]).
    fn start_backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Started, ModelError> {
        self.backward(layer, plan, dy_ad).map(Started::Done)
    }
    /// The result of the backward pass `started` by [`ExpertExecutor::start_backward`].
    fn finish_backward(&mut self, layer: usize, started: Started) -> Result<Vec<f32>, ModelError> {
        started.into_done(layer)
    }
}

/// A started expert pass: done already, or still in flight inside the
/// executor (its finish call completes it).
#[derive(Debug)]
pub enum Started {
    Done(Vec<f32>),
    InFlight,
}

impl Started {
    fn into_done(self, layer: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            Started::Done(rows) => Ok(rows),
            Started::InFlight => {
                Err(ModelError::Executor(format!("layer {layer}: this executor left no pass in flight to finish")))
            }
        }
    }
}

/// Runs every expert on this rank: the EP=1 executor and the reference.
pub struct LocalExperts<'a> {
    d: usize,
    f: usize,
    weights: &'a ExpertStore,
    grads: &'a mut ExpertStore,
    n_layers: usize,
    /// Per (slot, layer): the forward input rows and per-expert caches.
    saved: Vec<Option<(Vec<f32>, Vec<SwigluCache>)>>,
}

impl<'a> LocalExperts<'a> {
    /// Experts from `weights` (which must hold every expert id the plans
    /// use); gradients are added into `grads`.
    pub fn new(cfg: &ModelConfig, weights: &'a ExpertStore, grads: &'a mut ExpertStore) -> Self {
        Self {
            d: cfg.d_model,
            f: cfg.ffn_hidden,
            weights,
            grads,
            n_layers: cfg.n_layers,
            saved: vec![None; cfg.n_layers],
        }
    }

    /// Room for `slots` forward passes per layer whose backward passes are
    /// still to come (a pipelined executor runs each layer's rows in pieces).
    pub fn with_slots(mut self, slots: usize) -> Self {
        self.saved = vec![None; self.n_layers * slots.max(1)];
        self
    }

    fn slot_index(&self, slot: usize, layer: usize) -> Result<usize, ModelError> {
        let index = slot * self.n_layers + layer;
        if layer >= self.n_layers || index >= self.saved.len() {
            return Err(ModelError::Executor(format!(
                "layer {layer}, slot {slot}: out of range ({} layers, {} slots)",
                self.n_layers,
                self.saved.len() / self.n_layers.max(1)
            )));
        }
        Ok(index)
    }
}

impl ExpertExecutor for LocalExperts<'_> {
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.forward_in(0, layer, plan, x_ad)
    }

    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.backward_in(0, layer, plan, dy_ad)
    }
}

impl LocalExperts<'_> {
    /// [`ExpertExecutor::forward`] keeping its cache in `slot` (see [`LocalExperts::with_slots`]).
    pub fn forward_in(
        &mut self,
        slot: usize,
        layer: usize,
        plan: &DispatchPlan,
        x_ad: &[f32],
    ) -> Result<Vec<f32>, ModelError> {
        let (d, f) = (self.d, self.f);
        let index = self.slot_index(slot, layer)?;
        let rows = plan.num_rows();
        if x_ad.len() != rows * d {
            return Err(ModelError::Executor(format!(
                "layer {layer}: dispatch buffer has {} values, the plan needs {rows}x{d}",
                x_ad.len()
            )));
        }
        let weights = layer_experts(self.weights, self.n_layers, layer, plan)?;
        let mut y_ad = vec![0.0f32; rows * d];
        let mut caches = vec![SwigluCache::default(); plan.num_experts];
        {
            // Per expert with rows: (weights, input rows, output rows, cache), all disjoint.
            let mut tasks = Vec::with_capacity(weights.len());
            let mut y_rest: &mut [f32] = &mut y_ad;
            for ((e, cache), w) in caches.iter_mut().enumerate().zip(weights) {
                let (lo, hi) = (plan.offsets_e[e], plan.offsets_e[e + 1]);
                let (y_e, y_next) = std::mem::take(&mut y_rest).split_at_mut((hi - lo) * d);
                y_rest = y_next;
                if let Some(w) = w {
                    tasks.push((w, &x_ad[lo * d..hi * d], hi - lo, y_e, cache));
                }
            }
            let run = |(w, x, r, y, c): (&ExpertWeights, &[f32], usize, &mut [f32], &mut SwigluCache)| {
                swiglu_forward(w, d, f, x, r, y, c)
            };
            if use_rayon(rows, d, f, tasks.len()) {
                tasks.into_par_iter().for_each(run);
            } else {
                tasks.into_iter().for_each(run);
            }
        }
        self.saved[index] = Some((x_ad.to_vec(), caches));
        Ok(y_ad)
    }

    /// [`ExpertExecutor::backward`] of the forward pass kept in `slot`.
    pub fn backward_in(
        &mut self,
        slot: usize,
        layer: usize,
        plan: &DispatchPlan,
        dy_ad: &[f32],
    ) -> Result<Vec<f32>, ModelError> {
        let (d, f) = (self.d, self.f);
        let index = self.slot_index(slot, layer)?;
        let rows = plan.num_rows();
        if dy_ad.len() != rows * d {
            return Err(ModelError::Executor(format!(
                "layer {layer}: output gradient has {} values, the plan needs {rows}x{d}",
                dy_ad.len()
            )));
        }
        let weights = layer_experts(self.weights, self.n_layers, layer, plan)?;
        let (x_ad, caches) = self
            .saved
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| ModelError::Executor(format!("layer {layer}: backward without a saved forward")))?;
        if x_ad.len() != rows * d || caches.len() != plan.num_experts {
            return Err(ModelError::Executor(format!("layer {layer}: backward plan does not match the forward plan")));
        }
        let grads_layer = self
            .grads
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Executor(format!("layer {layer}: no gradient store for this layer")))?;
        // Disjoint &mut to every gradient entry the plan uses.
        let mut grad_of: BTreeMap<usize, &mut ExpertWeights> = grads_layer
            .iter_mut()
            .filter(|(e, _)| plan.counts_e.get(**e).is_some_and(|&c| c > 0))
            .map(|(e, g)| (*e, g))
            .collect();
        let mut dx_ad = vec![0.0f32; rows * d];
        {
            let mut tasks = Vec::with_capacity(weights.len());
            let mut dx_rest: &mut [f32] = &mut dx_ad;
            for (e, w) in weights.into_iter().enumerate() {
                let (lo, hi) = (plan.offsets_e[e], plan.offsets_e[e + 1]);
                let (dx_e, dx_next) = std::mem::take(&mut dx_rest).split_at_mut((hi - lo) * d);
                dx_rest = dx_next;
                let Some(w) = w else { continue };
                let g = grad_of.remove(&e).ok_or_else(|| {
                    ModelError::Executor(format!("layer {layer}: expert {e} has no gradient entry on this rank"))
                })?;
                tasks.push((w, &x_ad[lo * d..hi * d], hi - lo, &caches[e], &dy_ad[lo * d..hi * d], dx_e, g));
            }
            type Task<'t> =
                (&'t ExpertWeights, &'t [f32], usize, &'t SwigluCache, &'t [f32], &'t mut [f32], &'t mut ExpertWeights);
            let run = |(w, x, r, c, dy, dx, g): Task<'_>| swiglu_backward(w, d, f, x, r, c, dy, dx, g);
            if use_rayon(rows, d, f, tasks.len()) {
                tasks.into_par_iter().for_each(run);
            } else {
                tasks.into_iter().for_each(run);
            }
        }
        Ok(dx_ad)
    }
}

/// Per expert id `0..E`: its weights when the plan gives it rows, or an
/// error naming the first such expert missing from the store.
fn layer_experts<'w>(
    weights: &'w ExpertStore,
    n_layers: usize,
    layer: usize,
    plan: &DispatchPlan,
) -> Result<Vec<Option<&'w ExpertWeights>>, ModelError> {
    if layer >= n_layers {
        return Err(ModelError::Executor(format!("layer {layer} out of range: model has {n_layers} layers")));
    }
    let consistent = plan.counts_e.len() == plan.num_experts
        && plan.offsets_e.len() == plan.num_experts + 1
        && plan.offsets_e[0] == 0
        && plan.offsets_e[plan.num_experts] == plan.num_rows()
        && (0..plan.num_experts).all(|e| plan.offsets_e[e] + plan.counts_e[e] == plan.offsets_e[e + 1]);
    if !consistent {
        return Err(ModelError::Executor(format!("layer {layer}: malformed dispatch plan")));
    }
    let store = weights
        .layers
        .get(layer)
        .ok_or_else(|| ModelError::Executor(format!("layer {layer}: the expert store has no such layer")))?;
    (0..plan.num_experts)
        .map(|e| {
            if plan.counts_e[e] == 0 {
                return Ok(None);
            }
            store.get(&e).map(Some).ok_or_else(|| {
                ModelError::Executor(format!(
                    "layer {layer}: expert {e} has {} rows but is not held on this rank",
                    plan.counts_e[e]
                ))
            })
        })
        .collect()
}
