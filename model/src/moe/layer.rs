//! The MoE sub-layer assembled from its stages: route → gather → experts →
//! combine, plus shared experts — forward and backward.

use super::ExpertKind;
use super::Rows;
use super::{route_backward, route_sharded, DispatchPlan, ExpertExecutor, Routing, Started};
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
    /// Expert outputs per dispatched row (combine's backward needs them).
    pub y_ad: Vec<f32>,
    pub shared: Vec<SwigluCache>,
}

/// The routed part of an MoE forward pass whose expert rows are in flight.
pub struct MoeForwardStarted {
    routing: Routing,
    plan: DispatchPlan,
    experts: Started,
}

/// `out_td = sum_chosen gate * Expert(x) + sum_shared Shared(x)` for the
/// `num_tokens` rows of `x_td`; returns the output and the cache. With
/// attention shards, `x_td` is this shard's tokens and `shards` sums the
/// router statistics over the micro-batch.
pub fn moe_forward(
    cfg: &ModelConfig,
    layer: usize,
    w: &DenseLayerWeights,
    x_td: &[f32],
    num_tokens: usize,
    experts: &mut dyn ExpertExecutor,
    shards: &mut dyn TokenShards,
) -> Result<(Vec<f32>, MoeCache), ModelError> {
    let started = moe_forward_start(cfg, layer, w, x_td, num_tokens, experts, shards)?;
    moe_forward_finish(cfg, layer, w, x_td, started, experts)
}

/// First half of [`moe_forward`]: routes and hands the rows to the experts
/// (which may start sending them to other ranks).
pub fn moe_forward_start(
    cfg: &ModelConfig,
    layer: usize,
    w: &DenseLayerWeights,
    x_td: &[f32],
    num_tokens: usize,
    experts: &mut dyn ExpertExecutor,
    shards: &mut dyn TokenShards,
) -> Result<MoeForwardStarted, ModelError> {
    let routing = route_sharded(cfg, x_td, &w.router, num_tokens, shards)?;
    let plan = DispatchPlan::from_routing(&routing, cfg.n_experts, cfg.top_k);
    let x_ad = plan.gather(x_td, cfg.d_model);
    let started = experts.start_forward(layer, &plan, &x_ad)?;
    Ok(MoeForwardStarted { routing, plan, experts: started })
}

/// Second half of [`moe_forward`]: the shared experts run while the routed
/// rows may still travel, then the routed outputs are combined.
pub fn moe_forward_finish(
    cfg: &ModelConfig,
    layer: usize,
    w: &DenseLayerWeights,
    x_td: &[f32],
    started: MoeForwardStarted,
    experts: &mut dyn ExpertExecutor,
) -> Result<(Vec<f32>, MoeCache), ModelError> {
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
    for y_td in &shared_outputs {
        out_td.iter_mut().zip(y_td).for_each(|(o, y)| *o += y);
    }
    Ok((out_td, MoeCache { routing, plan, y_ad, shared: shared_caches }))
}

/// Backward of [`moe_forward`]: adds into `dx_td` and the layer's gradients
/// `gw` (router, shared experts); routed experts' gradients go wherever
/// `experts` keeps them. `aux_scale`/`z_scale` weight the router losses.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    cfg: &ModelConfig,
    layer: usize,
    w: &DenseLayerWeights,
    gw: &mut DenseLayerWeights,
    x_td: &[f32],
    cache: &MoeCache,
    aux_scale: f32,
    z_scale: f32,
    dout_td: &[f32],
    dx_td: &mut [f32],
    experts: &mut dyn ExpertExecutor,
) -> Result<(), ModelError> {
    let started = moe_backward_start(cfg, layer, cache, dout_td, experts)?;
    let scales = (aux_scale, z_scale);
    moe_backward_finish(cfg, layer, w, gw, x_td, cache, scales, dout_td, dx_td, started, experts)
}

/// The routed part of an MoE backward pass whose rows are in flight.
pub struct MoeBackwardStarted {
    dgate_tk: Vec<f32>,
    experts: Started,
}

/// First half of [`moe_backward`]: combine's backward, and the output
/// gradients handed to the experts (which may start sending them). Touches
/// no gradient, so the caller may run other backward work before finishing.
pub fn moe_backward_start(
    cfg: &ModelConfig,
    layer: usize,
    cache: &MoeCache,
    dout_td: &[f32],
    experts: &mut dyn ExpertExecutor,
) -> Result<MoeBackwardStarted, ModelError> {
    let mut dgate_tk = vec![0.0; cache.routing.num_tokens * cfg.top_k];
    let dy_ad = cache.plan.combine_backward(&cache.routing, &cache.y_ad, dout_td, cfg.d_model, &mut dgate_tk);
    let started = experts.start_backward(layer, &cache.plan, &dy_ad)?;
    Ok(MoeBackwardStarted { dgate_tk, experts: started })
}

/// Second half of [`moe_backward`]: shared experts (while routed rows may
/// still travel), then the routed input gradients and the router's.
/// `scales` are the aux and z loss weights.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward_finish(
    cfg: &ModelConfig,
    layer: usize,
    w: &DenseLayerWeights,
    gw: &mut DenseLayerWeights,
    x_td: &[f32],
    cache: &MoeCache,
    scales: (f32, f32),
    dout_td: &[f32],
    dx_td: &mut [f32],
    started: MoeBackwardStarted,
    experts: &mut dyn ExpertExecutor,
) -> Result<(), ModelError> {
    let (t, d, swiglu) = (cache.routing.num_tokens, cfg.d_model, SwiGlu::of(cfg));
    for ((shared, gshared), sc) in w.shared.iter().zip(gw.shared.iter_mut()).zip(&cache.shared) {
        swiglu.backward(shared, Rows { x_rd: x_td, rows: t }, sc, dout_td, dx_td, gshared);
    }
    let dx_ad = experts.finish_backward(layer, started.experts)?;
    cache.plan.gather_backward(&dx_ad, d, dx_td);
    let (aux_scale, z_scale) = scales;
    route_backward(cfg, x_td, &w.router, &cache.routing, &started.dgate_tk, aux_scale, z_scale, dx_td, &mut gw.router);
    Ok(())
}
