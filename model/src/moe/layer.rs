//! The MoE sub-layer assembled from its stages: route → gather → experts →
//! combine, plus shared experts — forward and backward. Each stage pair is
//! split into a start and a finish so the caller can run other work (the
//! shared experts here, attention in the block) while expert rows travel.
//!
//! Legend: `t` tokens, `d` d_model, `k` top-k slots, `a` rows of the
//! dispatch buffer.

use super::free_experts;
use super::{
    route_backward, route_sharded, DispatchPlan, ExpertExecutor, ExpertKind, GatingResidual, RouterGrads,
    RouterLossScales, RouterWeights, Routing, Rows, Started,
};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::ops::swiglu::{SwiGlu, SwigluCache};
use crate::shards::TokenShards;
use crate::weights::DenseLayerWeights;

/// What the MoE backward pass needs from its forward pass.
#[derive(Debug, Clone, Default)]
pub struct MoeCache {
    pub routing: Routing,
    pub plan: DispatchPlan,
    /// Expert outputs per dispatched row (combine's backward needs them,
    /// and takes them out of the cache: see [`moe_backward_start`]).
    pub y_ad: Vec<f32>,
    pub shared: Vec<SwigluCache>,
    /// With `shared_expert_gate`: the shared experts' summed output `[t, d]`
    /// and the gate per token `sigmoid(x . w_g)` `[t]`.
    pub shared_sum_td: Vec<f32>,
    pub shared_gate_t: Vec<f32>,
}

/// The routed part of an MoE forward pass whose expert rows are in flight.
pub struct MoeForwardStarted {
    routing: Routing,
    plan: DispatchPlan,
    experts: Started,
}

/// Which MoE sub-layer a call is about: the model, the layer index (the
/// executor's key) and the layer's dense weights (router, shared experts),
/// and with MoE++'s gating residuals the previous MoE layer's logits.
#[derive(Debug, Clone, Copy)]
pub struct MoeLayer<'w> {
    pub cfg: &'w ModelConfig,
    pub layer: usize,
    pub w: &'w DenseLayerWeights,
    /// `[t, e]` the previous MoE layer's router logits (gating residuals only).
    pub prev_logits_te: Option<&'w [f32]>,
    /// Mixture-of-Transformers: `[t]` each token's modality, whose block of
    /// experts it routes among (empty: every expert).
    pub modality_t: &'w [u8],
}

impl<'w> MoeLayer<'w> {
    /// The router's tensors, and its gating residual when it has one.
    fn router(&self) -> RouterWeights<'w> {
        let residual = match (&self.w.router_residual, self.prev_logits_te) {
            (Some(map_ee), Some(prev_logits_te)) => Some(GatingResidual { map_ee, prev_logits_te }),
            _ => None,
        };
        RouterWeights {
            weight_ed: &self.w.router,
            expert_bias_e: self.w.expert_bias.as_deref(),
            residual,
            hidden_hd: self.w.router_hidden.as_deref(),
            modality_t: self.modality_t,
        }
    }
}

/// What the MoE backward pass reads: the forward pass's input and cache,
/// and the gradient of the sub-layer's output.
#[derive(Debug, Clone, Copy)]
pub struct MoeBackwardInput<'a> {
    /// `[t, d]` the input the forward pass routed.
    pub x_td: &'a [f32],
    pub cache: &'a MoeCache,
    /// `[t, d]` d loss / d out.
    pub dout_td: &'a [f32],
}

/// Where the MoE backward pass adds its gradients.
#[derive(Debug)]
pub struct MoeGrads<'g> {
    /// The layer's dense gradients (router, shared experts).
    pub gw: &'g mut DenseLayerWeights,
    /// `[t, d]` the input's gradient.
    pub dx_td: &'g mut [f32],
    /// Gating residuals: the gradient of this layer's logits from the next
    /// layer (an input), and where the previous layer's logits' gradient goes.
    pub dlogits_in_te: Option<&'g [f32]>,
    pub dprev_logits_te: Option<&'g mut [f32]>,
}

/// `out_td = sum_chosen gate * Expert(x) + sum_shared Shared(x)` for the
/// `num_tokens` rows of `x_td`; returns the output and the cache. With
/// attention shards, `x_td` is this shard's tokens and `shards` sums the
/// router statistics over the micro-batch.
pub fn moe_forward(
    moe: MoeLayer<'_>,
    x_td: &[f32],
    num_tokens: usize,
    experts: &mut dyn ExpertExecutor,
    shards: &mut dyn TokenShards,
) -> Result<(Vec<f32>, MoeCache), ModelError> {
    let started = moe_forward_start(moe, x_td, num_tokens, experts, shards)?;
    moe_forward_finish(moe, x_td, started, experts)
}

/// First half of [`moe_forward`]: routes and hands the rows to the experts
/// (which may start sending them to other ranks).
pub fn moe_forward_start(
    moe: MoeLayer<'_>,
    x_td: &[f32],
    num_tokens: usize,
    experts: &mut dyn ExpertExecutor,
    shards: &mut dyn TokenShards,
) -> Result<MoeForwardStarted, ModelError> {
    let MoeLayer { cfg, layer, .. } = moe;
    let routing = route_sharded(cfg, x_td, moe.router(), num_tokens, shards)?;
    let plan = DispatchPlan::from_routing(&routing, cfg.n_experts, cfg.top_k);
    let x_ad = plan.gather(x_td, cfg.d_model);
    let started = experts.start_forward(layer, &plan, x_ad)?;
    Ok(MoeForwardStarted { routing, plan, experts: started })
}

/// Second half of [`moe_forward`]: the shared experts run while the routed
/// rows may still travel, then the routed outputs are combined.
pub fn moe_forward_finish(
    moe: MoeLayer<'_>,
    x_td: &[f32],
    started: MoeForwardStarted,
    experts: &mut dyn ExpertExecutor,
) -> Result<(Vec<f32>, MoeCache), ModelError> {
    let MoeLayer { cfg, layer, w, .. } = moe;
    let MoeForwardStarted { routing, plan, experts: in_flight } = started;
    let (t, d, swiglu) = (routing.num_tokens, cfg.d_model, SwiGlu::of(cfg));
    let mut shared_caches = Vec::with_capacity(w.shared.len());
    let mut shared_outputs = Vec::with_capacity(w.shared.len());
    for shared in &w.shared {
        let mut cache = SwigluCache::default();
        let mut y_td = vec![0.0; t * d];
        swiglu.forward(shared, Rows { x_rd: x_td, rows: t }, &mut y_td, &mut cache);
        shared_outputs.push(y_td);
        shared_caches.push(cache);
    }
    let y_ad = experts.finish_forward(layer, in_flight)?;
    let mut out_td = vec![0.0; t * d];
    plan.combine(&routing, &y_ad, d, &mut out_td);
    free_experts::forward(cfg, w, &routing, x_td, &mut out_td);
    let (mut shared_sum_td, mut shared_gate_t) = (Vec::new(), Vec::new());
    match &w.shared_gate {
        None => {
            for y_td in &shared_outputs {
                out_td.iter_mut().zip(y_td).for_each(|(o, y)| *o += y);
            }
        }
        Some(w_g) => {
            // Qwen2-MoE: out += sigmoid(x . w_g) * sum_s Shared_s(x), per token.
            shared_sum_td = vec![0.0; t * d];
            for y_td in &shared_outputs {
                shared_sum_td.iter_mut().zip(y_td).for_each(|(o, y)| *o += y);
            }
            shared_gate_t = x_td.chunks_exact(d).map(|x| sigmoid(dot(x, w_g))).collect();
            for ((o, y), &g) in out_td.chunks_exact_mut(d).zip(shared_sum_td.chunks_exact(d)).zip(&shared_gate_t) {
                o.iter_mut().zip(y).for_each(|(oi, yi)| *oi += g * yi);
            }
        }
    }
    let cache = MoeCache { routing, plan, y_ad, shared: shared_caches, shared_sum_td, shared_gate_t };
    Ok((out_td, cache))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Backward of the shared experts' gate: returns the gradient of the
/// shared experts' summed output `g_t dout_t`, and adds the gate's own
/// gradients: with `z_t = x_t . w_g`, `dz_t = (dout_t . y_t) g_t (1 - g_t)`,
/// `dw_g += sum_t dz_t x_t`, `dx_t += dz_t w_g`.
fn shared_gate_backward(
    x_td: &[f32],
    w_g: &[f32],
    cache: &MoeCache,
    dout_td: &[f32],
    dw_g: &mut [f32],
    dx_td: &mut [f32],
) -> Vec<f32> {
    let d = w_g.len();
    let mut dshared_td = dout_td.to_vec();
    let rows = dshared_td.chunks_exact_mut(d).zip(dout_td.chunks_exact(d)).zip(cache.shared_sum_td.chunks_exact(d));
    for (t, ((dshared, dout), y)) in rows.enumerate() {
        let g = cache.shared_gate_t[t];
        dshared.iter_mut().for_each(|v| *v *= g);
        let dz = dot(dout, y) * g * (1.0 - g);
        let x = &x_td[t * d..(t + 1) * d];
        dw_g.iter_mut().zip(x).for_each(|(dw, &xi)| *dw += dz * xi);
        dx_td[t * d..(t + 1) * d].iter_mut().zip(w_g).for_each(|(dx, &wi)| *dx += dz * wi);
    }
    dshared_td
}

/// Backward of [`moe_forward`]: adds into `grads` (the input's gradient and
/// the layer's router and shared experts); routed experts' gradients go
/// wherever `experts` keeps them. `scales` weigh the router losses.
pub fn moe_backward(
    moe: MoeLayer<'_>,
    (input, y_ad): (MoeBackwardInput<'_>, Vec<f32>),
    scales: RouterLossScales,
    grads: MoeGrads<'_>,
    experts: &mut dyn ExpertExecutor,
) -> Result<(), ModelError> {
    let started = moe_backward_start(moe, input, y_ad, experts)?;
    moe_backward_finish(moe, input, scales, grads, started, experts)
}

/// The routed part of an MoE backward pass whose rows are in flight.
pub struct MoeBackwardStarted {
    dgate_tk: Vec<f32>,
    experts: Started,
}

/// First half of [`moe_backward`]: combine's backward, and the output
/// gradients handed to the experts (which may start sending them). Touches
/// no gradient, so the caller may run other backward work before finishing.
/// `y_ad` is the cache's expert outputs, taken out of it
/// ([`MoeCache::y_ad`]): spent, its buffer carries the output gradients.
pub fn moe_backward_start(
    moe: MoeLayer<'_>,
    input: MoeBackwardInput<'_>,
    y_ad: Vec<f32>,
    experts: &mut dyn ExpertExecutor,
) -> Result<MoeBackwardStarted, ModelError> {
    let (MoeLayer { cfg, layer, .. }, MoeBackwardInput { cache, dout_td, .. }) = (moe, input);
    let mut dgate_tk = vec![0.0; cache.routing.num_tokens * cfg.top_k];
    let mut dy_ad = y_ad;
    cache.plan.combine_backward_in_place(&cache.routing, &mut dy_ad, dout_td, cfg.d_model, &mut dgate_tk);
    let started = experts.start_backward(layer, &cache.plan, &dy_ad)?;
    Ok(MoeBackwardStarted { dgate_tk, experts: started })
}

/// Second half of [`moe_backward`]: shared experts (while routed rows may
/// still travel), then the routed input gradients and the router's.
pub fn moe_backward_finish(
    moe: MoeLayer<'_>,
    input: MoeBackwardInput<'_>,
    scales: RouterLossScales,
    grads: MoeGrads<'_>,
    started: MoeBackwardStarted,
    experts: &mut dyn ExpertExecutor,
) -> Result<(), ModelError> {
    let (MoeLayer { cfg, layer, w, .. }, MoeBackwardInput { x_td, cache, dout_td }) = (moe, input);
    let MoeGrads { gw, dx_td, dlogits_in_te, dprev_logits_te } = grads;
    let MoeBackwardStarted { mut dgate_tk, experts: in_flight } = started;
    let (t, d, swiglu) = (cache.routing.num_tokens, cfg.d_model, SwiGlu::of(cfg));
    let gated;
    let dshared_td = match (&w.shared_gate, gw.shared_gate.as_mut()) {
        (Some(w_g), Some(dw_g)) if !w.shared.is_empty() => {
            gated = shared_gate_backward(x_td, w_g, cache, dout_td, dw_g, dx_td);
            &gated[..]
        }
        _ => dout_td,
    };
    // The cache is borrowed (both halves of the backward read it), so each
    // shared expert spends a copy of its own.
    for ((shared, gshared), sc) in w.shared.iter().zip(gw.shared.iter_mut()).zip(&cache.shared) {
        swiglu.backward_into(shared, Rows { x_rd: x_td, rows: t }, sc.clone(), dshared_td, dx_td, gshared);
    }
    let dx_ad = experts.finish_backward(layer, in_flight)?;
    cache.plan.gather_backward(&dx_ad, d, dx_td);
    let free_grads = free_experts::FreeGrads { gw: &mut *gw, dgate_tk: &mut dgate_tk, dx_td: &mut *dx_td };
    free_experts::backward(cfg, w, &cache.routing, (x_td, dout_td), free_grads);
    let router_grads = RouterGrads {
        dx_td,
        drouter_ed: &mut gw.router,
        dlogits_in_te,
        dmap_ee: gw.router_residual.as_deref_mut(),
        dprev_logits_te,
        dhidden_hd: gw.router_hidden.as_deref_mut(),
    };
    route_backward(cfg, x_td, moe.router(), &cache.routing, &dgate_tk, scales, router_grads);
    Ok(())
}
