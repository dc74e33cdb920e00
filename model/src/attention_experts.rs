//! JetMoE's Mixture of Attention (MoA, `attention = "moa"`; docs/model.md):
//! each of a layer's `Ea` attention experts has its own query and output
//! projection, the keys and values are shared, and a token's `Ka` chosen
//! experts give it `Ka * H` query heads, whose outputs are projected back by
//! their experts and summed with the router's gates, plus a shared bias.
//!
//! The router is the v1 router (softmax, top-k, renormalised, dropless) on
//! [`ModelConfig::attention_router`], and the rows of each expert are found
//! with the same [`DispatchPlan`] as the FFN experts. The shared output
//! bias is the block's to add (after the shards' partial sums are reduced).
//!
//! The expert projections run through the [`ExpertExecutor`]'s attention
//! expert exchanges: with experts replicated (the default) they compute
//! every row here; partitioned over the expert-parallel group, each row's
//! query and output projections run on its expert's owner (the row travels
//! there and back twice per pass), while the attention core stays where
//! the token's keys and values are.
//!
//! With attention shards each rank holds a block of every expert's heads
//! (rows of `W_q,e`, columns of `W_o,e`) and of the kv heads, as for dense
//! attention: it routes its own tokens (statistics summed over the group),
//! gathers every token's choice, runs its heads on all tokens and returns
//! partial output sums; backward, the gates' gradients are summed over the
//! group and each rank runs the router's backward for its own tokens.
//!
//! A token's query row holds its `Ka * H` heads head-major: head `(j, h)`
//! (slot j, the expert's head h) sits at position `h * Ka + j`, so the
//! grouped-query attention core pairs it with kv head `h / (H / G)` (its
//! `n_heads / n_kv_heads` consecutive heads share one kv head), which is
//! JetMoE's pairing.
//!
//! Legend: `t` tokens (all of the micro-batch), `d` d_model, `r` rows (one
//! per token and slot, grouped by expert), `w` one expert's query width
//! `H * hd`, `s` all slots' query width `Ka * H * hd`, `g` the kv width,
//! `o` the rows this rank's experts compute (`r` with replicated experts).

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gemm::{matmul_nn, matmul_nt, matmul_tn};
use crate::model::HeadNorms;
use crate::moe::{
    route_backward, route_sharded, DispatchPlan, ExpertExecutor, RouterGrads, RouterLossScales, RouterWeights, Routing,
};
use crate::ops::attention::{attention_backward, attention_forward, AttentionShape, Qkv, QkvGrads};
use crate::ops::rope::RopeTable;
use crate::shards::{sum_over_group, TokenShards};
use crate::weights::DenseLayerWeights;

/// What the backward pass needs from [`moa_forward`].
#[derive(Debug, Clone, Default)]
pub struct MoaCache {
    /// The router's decisions for this rank's tokens (its losses).
    pub routing: Routing,
    /// With attention shards: every shard's tokens' chosen experts and
    /// gates (None: this rank's routing holds every token).
    gathered: Option<Routing>,
    plan: DispatchPlan,
    /// The rows this rank's experts compute, grouped by expert, and their
    /// inputs `[o, d]`.
    owned: DispatchPlan,
    x_od: Vec<f32>,
    /// `[t, s]` queries after the head norms and RoPE; `[t, g]` keys (the
    /// same) and values.
    q_ts: Vec<f32>,
    k_tg: Vec<f32>,
    v_tg: Vec<f32>,
    /// `qk_norm`: q and k before their head norms.
    head_norms: HeadNorms,
    probs: Vec<f32>,
    /// `[o, w]` the head outputs of the rows computed here, and `[r, d]`
    /// each row's expert projection of them (before the gate).
    a_ow: Vec<f32>,
    y_rd: Vec<f32>,
}

/// The sizes of one MoA call.
#[derive(Debug, Clone, Copy)]
struct MoaDims {
    t: usize,
    d: usize,
    /// Heads per expert, slots per token, head width.
    heads: usize,
    slots: usize,
    hd: usize,
    shape: AttentionShape,
}

impl MoaDims {
    /// The sizes for one rank of `shards` (its block of the heads).
    fn new(cfg: &ModelConfig, batch: usize, shards: usize) -> Self {
        let (heads, slots, hd) = (cfg.n_heads / shards, cfg.attn_top_k, cfg.head_dim());
        let kv = cfg.n_kv_heads / shards;
        let shape = AttentionShape { batch, seq: cfg.seq_len, n_heads: slots * heads, n_kv_heads: kv, head_dim: hd };
        Self { t: batch * cfg.seq_len, d: cfg.d_model, heads, slots, hd, shape }
    }

    fn w(&self) -> usize {
        self.heads * self.hd
    }

    fn s(&self) -> usize {
        self.slots * self.w()
    }

    /// Moves row `a`'s heads (`[w]`, from token `t`, slot `j`) into or out
    /// of the token's head-major row `[s]`: `to_tokens` copies row → token.
    fn move_heads(&self, plan: &DispatchPlan, rows_rw: &mut [f32], tokens_ts: &mut [f32], to_tokens: bool) {
        let (hd, w, s, k) = (self.hd, self.w(), self.s(), self.slots);
        for (row, &src) in rows_rw.chunks_exact_mut(w).zip(&plan.source_a) {
            let (t, j) = (src as usize / k, src as usize % k);
            for (h, head) in row.chunks_exact_mut(hd).enumerate() {
                let at = t * s + (h * k + j) * hd;
                let token = &mut tokens_ts[at..at + hd];
                if to_tokens {
                    token.copy_from_slice(head);
                } else {
                    head.copy_from_slice(token);
                }
            }
        }
    }
}

/// The rows of expert `e` in a `[r, width]` buffer grouped by expert.
fn expert_rows(plan: &DispatchPlan, e: usize, width: usize) -> std::ops::Range<usize> {
    plan.offsets_e[e] * width..plan.offsets_e[e + 1] * width
}

/// Where the attention experts' projections run: the pass's executor, on
/// this layer.
pub struct AttnExperts<'e> {
    pub executor: &'e mut dyn ExpertExecutor,
    pub layer: usize,
}

impl AttnExperts<'_> {
    fn send_to_owners(&mut self, rows: Vec<f32>, width: usize) -> Result<Vec<f32>, ModelError> {
        self.executor.attn_to_owners(self.layer, rows, width)
    }

    fn send_to_sources(&mut self, rows: Vec<f32>, width: usize) -> Result<Vec<f32>, ModelError> {
        self.executor.attn_to_sources(self.layer, rows, width)
    }
}

/// `y_o = W_e x_o` for the rows `owned` groups by expert (`x: [o, k]`,
/// `W_e: [n, k]`, `weights[e]`): each expert's block in one product.
/// Experts with no rows here are skipped (a partitioned expert holds no
/// tensors on the other ranks).
fn project(owned: &DispatchPlan, x_ok: &[f32], (k, n): (usize, usize), weights: &[&Vec<f32>]) -> Vec<f32> {
    let mut y_on = vec![0.0; owned.num_rows() * n];
    for (e, &rows) in owned.counts_e.iter().enumerate().filter(|(_, &rows)| rows > 0) {
        let (x, y) = (&x_ok[expert_rows(owned, e, k)], &mut y_on[expert_rows(owned, e, n)]);
        matmul_nt(rows, k, n, x, weights[e], y, false);
    }
    y_on
}

/// Backward of [`project`]: `dW_e += dy_o^T x_o` into `grads[e]`, returns
/// `dx_o = dy_o W_e`.
fn project_backward(
    owned: &DispatchPlan,
    (x_ok, dy_on): (&[f32], &[f32]),
    (k, n): (usize, usize),
    weights: &[&Vec<f32>],
    grads: &mut [&mut Vec<f32>],
) -> Vec<f32> {
    let mut dx_ok = vec![0.0; owned.num_rows() * k];
    for (e, &rows) in owned.counts_e.iter().enumerate().filter(|(_, &rows)| rows > 0) {
        let (x, dy) = (&x_ok[expert_rows(owned, e, k)], &dy_on[expert_rows(owned, e, n)]);
        matmul_tn(n, rows, k, dy, x, grads[e], true);
        matmul_nn(rows, n, k, dy, weights[e], &mut dx_ok[expert_rows(owned, e, k)], false);
    }
    dx_ok
}

/// The normalised input of the sub-layer: this rank's tokens and, with
/// attention shards, every shard's (the same slice without shards).
#[derive(Debug, Clone, Copy)]
pub struct MoaInput<'a> {
    pub own_td: &'a [f32],
    pub all_td: &'a [f32],
}

impl MoaCache {
    /// Every token's chosen experts and gates.
    fn choices(&self) -> &Routing {
        self.gathered.as_ref().unwrap_or(&self.routing)
    }
}

/// With attention shards, every shard's chosen experts and gates gathered
/// (only what the plan and the gates use); None without shards.
fn gather_choices(routing: &Routing, shards: &mut dyn TokenShards) -> Result<Option<Routing>, ModelError> {
    if shards.count() == 1 {
        return Ok(None);
    }
    // Expert ids travel as f32, exact for any count an f32 holds.
    let ids: Vec<f32> = routing.expert_tk.iter().map(|&e| e as f32).collect();
    let expert_tk: Vec<u32> = shards.gather_rows(&ids)?.into_iter().map(|e| e as u32).collect();
    let gate_tk = shards.gather_rows(&routing.gate_tk)?;
    let kept_tk = vec![true; expert_tk.len()];
    let num_tokens = routing.num_tokens * shards.count();
    Ok(Some(Routing { num_tokens, expert_tk, gate_tk, kept_tk, ..Default::default() }))
}

/// The MoA sub-layer of a micro-batch of `batch` sequences: returns the
/// output `[t, d]` of this rank's heads for every token (without the
/// bias; partial sums with attention shards) and the cache.
pub fn moa_forward(
    cfg: &ModelConfig,
    rope: &RopeTable,
    w: &DenseLayerWeights,
    x: MoaInput<'_>,
    batch: usize,
    shards: &mut dyn TokenShards,
    mut experts: AttnExperts<'_>,
) -> Result<(Vec<f32>, MoaCache), ModelError> {
    let dims = MoaDims::new(cfg, batch, shards.count());
    let (t, d, wd, s, g) = (dims.t, dims.d, dims.w(), dims.s(), dims.shape.n_kv_heads * dims.hd);
    let x_td = x.all_td;
    let router = w.attn_router.as_deref().expect("MoA layers have an attention router");
    let rcfg = cfg.attention_router();
    let own_tokens = x.own_td.len() / d;
    let routing = route_sharded(&rcfg, x.own_td, RouterWeights::plain(router), own_tokens, shards)?;
    let gathered = gather_choices(&routing, shards)?;
    let choices = gathered.as_ref().unwrap_or(&routing);
    let plan = DispatchPlan::from_routing(choices, cfg.attn_experts, dims.slots);

    // Queries: each row through its expert's W_q (where the expert is),
    // then into its token's slot.
    let owned = experts.executor.attn_plan(experts.layer, &plan)?;
    let x_od = experts.send_to_owners(plan.gather(x_td, d), d)?;
    let wq: Vec<_> = w.attn_experts.iter().map(|e| &e.wq).collect();
    let mut q_rw = experts.send_to_sources(project(&owned, &x_od, (d, wd), &wq), wd)?;
    let mut cache = MoaCache { q_ts: vec![0.0; t * s], x_od, ..Default::default() };
    dims.move_heads(&plan, &mut q_rw, &mut cache.q_ts, true);
    cache.k_tg = vec![0.0; t * g];
    cache.v_tg = vec![0.0; t * g];
    matmul_nt(t, d, g, x_td, &w.wk, &mut cache.k_tg, false);
    matmul_nt(t, d, g, x_td, &w.wv, &mut cache.v_tg, false);
    cache.head_norms = HeadNorms::forward(w, cfg.norm_eps, &mut cache.q_ts, &mut cache.k_tg);
    let shape = dims.shape;
    rope.apply(&mut cache.q_ts, shape.batch, shape.seq, shape.n_heads);
    rope.apply(&mut cache.k_tg, shape.batch, shape.seq, shape.n_kv_heads);
    cache.probs = vec![0.0; shape.probs_len()];
    let mut attn_ts = vec![0.0; t * s];
    attention_forward(shape, &cache.q_ts, &cache.k_tg, &cache.v_tg, &mut attn_ts, &mut cache.probs);

    // Outputs: each row's heads through its expert's W_o (where the expert
    // is), gated, summed.
    let mut a_rw = vec![0.0; plan.num_rows() * wd];
    dims.move_heads(&plan, &mut a_rw, &mut attn_ts, false);
    cache.a_ow = experts.send_to_owners(a_rw, wd)?;
    let wo: Vec<_> = w.attn_experts.iter().map(|e| &e.wo).collect();
    cache.y_rd = experts.send_to_sources(project(&owned, &cache.a_ow, (wd, d), &wo), d)?;
    let mut out_td = vec![0.0; t * d];
    plan.combine(choices, &cache.y_rd, d, &mut out_td);
    (cache.routing, cache.gathered, cache.plan, cache.owned) = (routing, gathered, plan, owned);
    Ok((out_td, cache))
}

/// Where [`moa_backward`] adds the input's gradients: this rank's tokens
/// (the router's part) and every shard's tokens (the projections'; the
/// block reduce-scatters them, or adds them to `own_td` without shards).
#[derive(Debug)]
pub struct MoaInputGrads<'a> {
    pub own_td: &'a mut [f32],
    pub all_td: &'a mut [f32],
}

/// Backward of [`moa_forward`] from the output gradient of every token
/// `dout_td` (gathered with shards): adds the input's gradients into `dx`
/// and the weights' into `gw` (the router's losses weighted by `scales`).
#[allow(clippy::too_many_arguments)] // the layer's weights and gradients, the cache, both sides of the gradient, the shards
pub fn moa_backward(
    cfg: &ModelConfig,
    rope: &RopeTable,
    (w, gw): (&DenseLayerWeights, &mut DenseLayerWeights),
    cache: &MoaCache,
    x: MoaInput<'_>,
    dout_td: &[f32],
    scales: RouterLossScales,
    dx: MoaInputGrads<'_>,
    shards: &mut dyn TokenShards,
    mut experts: AttnExperts<'_>,
) -> Result<(), ModelError> {
    let batch = cache.choices().num_tokens / cfg.seq_len;
    let dims = MoaDims::new(cfg, batch, shards.count());
    let (t, d, wd, s, g) = (dims.t, dims.d, dims.w(), dims.s(), dims.shape.n_kv_heads * dims.hd);
    let (plan, x_td, dx_td) = (&cache.plan, x.all_td, dx.all_td);
    // y = sum_j g_j Y_j: dY_j = g_j dy, dg_j = dy . Y_j (Y_j summed over
    // the shards' heads, so the gates' gradients are too).
    let mut dgate_tk = vec![0.0; t * dims.slots];
    let dy_rd = plan.combine_backward(cache.choices(), &cache.y_rd, dout_td, d, &mut dgate_tk);
    sum_over_group(shards, &mut dgate_tk)?;
    // Y = A W_o^T: dW_o += dY^T A, dA = dY W_o (where the expert is).
    let owned = &cache.owned;
    let dy_od = experts.send_to_owners(dy_rd, d)?;
    let wo: Vec<_> = w.attn_experts.iter().map(|e| &e.wo).collect();
    let mut gwo: Vec<_> = gw.attn_experts.iter_mut().map(|e| &mut e.wo).collect();
    let da_ow = project_backward(owned, (&cache.a_ow, &dy_od), (wd, d), &wo, &mut gwo);
    let mut da_rw = experts.send_to_sources(da_ow, wd)?;
    let mut dattn_ts = vec![0.0; t * s];
    dims.move_heads(plan, &mut da_rw, &mut dattn_ts, true);
    let (mut dq_ts, mut dk_tg, mut dv_tg) = (vec![0.0; t * s], vec![0.0; t * g], vec![0.0; t * g]);
    let shape = dims.shape;
    let qkv = Qkv { q_th: &cache.q_ts, k_tg: &cache.k_tg, v_tg: &cache.v_tg };
    let grads = QkvGrads { dq_th: &mut dq_ts, dk_tg: &mut dk_tg, dv_tg: &mut dv_tg };
    attention_backward(shape, qkv, &cache.probs, &dattn_ts, grads);
    rope.apply_backward(&mut dq_ts, shape.batch, shape.seq, shape.n_heads);
    rope.apply_backward(&mut dk_tg, shape.batch, shape.seq, shape.n_kv_heads);
    cache.head_norms.backward(w, gw, &mut dq_ts, &mut dk_tg);
    // Q_row = x W_q,e^T: dW_q,e += dQ^T x, dx_row = dQ W_q,e (where the
    // expert is).
    let mut dq_rw = vec![0.0; plan.num_rows() * wd];
    dims.move_heads(plan, &mut dq_rw, &mut dq_ts, false);
    let dq_ow = experts.send_to_owners(dq_rw, wd)?;
    let wq: Vec<_> = w.attn_experts.iter().map(|e| &e.wq).collect();
    let mut gwq: Vec<_> = gw.attn_experts.iter_mut().map(|e| &mut e.wq).collect();
    let dx_od = project_backward(owned, (&cache.x_od, &dq_ow), (d, wd), &wq, &mut gwq);
    let dx_rd = experts.send_to_sources(dx_od, d)?;
    plan.gather_backward(&dx_rd, d, dx_td);
    // k = x W_k^T, v = x W_v^T.
    for (dp, wp, gp) in [(&dk_tg, &w.wk, &mut gw.wk), (&dv_tg, &w.wv, &mut gw.wv)] {
        matmul_tn(g, t, d, dp, x_td, gp, true);
        matmul_nn(t, g, d, dp, wp, dx_td, true);
    }
    // The router saw this rank's tokens: their slice of the gates' gradient.
    let router = w.attn_router.as_deref().expect("MoA layers have an attention router");
    let grouter = gw.attn_router.as_mut().expect("MoA layers have an attention router");
    let own = cache.routing.num_tokens * dims.slots;
    let dgate_own = &dgate_tk[shards.index() * own..(shards.index() + 1) * own];
    let rgrads = RouterGrads::plain(dx.own_td, grouter);
    let weights = RouterWeights::plain(router);
    route_backward(&cfg.attention_router(), x.own_td, weights, &cache.routing, dgate_own, scales, rgrads);
    Ok(())
}
