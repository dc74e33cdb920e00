//! The MoE sub-layer assembled from its stages: route → gather → experts →
//! combine, plus shared experts — forward and backward.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::moe::{route_backward, route_sharded, DispatchPlan, ExpertExecutor, Routing};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward, SwigluCache};
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
    let (t, d, f) = (num_tokens, cfg.d_model, cfg.ffn_hidden);
    let routing = route_sharded(cfg, x_td, &w.router, t, shards)?;
    let plan = DispatchPlan::from_routing(&routing, cfg.n_experts, cfg.top_k);
    let x_ad = plan.gather(x_td, d);
    let y_ad = experts.forward(layer, &plan, &x_ad)?;
    drop(x_ad);
    let mut out_td = vec![0.0; t * d];
    plan.combine(&routing, &y_ad, d, &mut out_td);
    let mut shared_caches = Vec::with_capacity(w.shared.len());
    let mut y_td = vec![0.0; if w.shared.is_empty() { 0 } else { t * d }];
    for shared in &w.shared {
        let mut cache = SwigluCache::default();
        swiglu_forward(shared, d, f, x_td, t, &mut y_td, &mut cache);
        out_td.iter_mut().zip(&y_td).for_each(|(o, y)| *o += y);
        shared_caches.push(cache);
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
    let (t, d, f) = (cache.routing.num_tokens, cfg.d_model, cfg.ffn_hidden);
    for ((shared, gshared), sc) in w.shared.iter().zip(gw.shared.iter_mut()).zip(&cache.shared) {
        swiglu_backward(shared, d, f, x_td, t, sc, dout_td, dx_td, gshared);
    }
    let mut dgate_tk = vec![0.0; t * cfg.top_k];
    let dy_ad = cache.plan.combine_backward(&cache.routing, &cache.y_ad, dout_td, d, &mut dgate_tk);
    let dx_ad = experts.backward(layer, &cache.plan, &dy_ad)?;
    cache.plan.gather_backward(&dx_ad, d, dx_td);
    route_backward(cfg, x_td, &w.router, &cache.routing, &dgate_tk, aux_scale, z_scale, dx_td, &mut gw.router);
    Ok(())
}
