//! MoE++'s computation-free experts (arXiv 2410.07348): routed beside the
//! FFN experts, run on the token's own rank, never sent anywhere.
//!
//! - constant expert j: `y = a1 x + a2 v_j`, `[a1, a2] = softmax(W_c,j x)`;
//! - copy expert: `y = x`;
//! - zero expert: `y = 0` (the router forces its gate to 0).
//!
//! The layer adds `gate * y` for every chosen computation-free expert,
//! beside the FFN experts' combine. Legend: `t` tokens, `d` d_model, `k`
//! top-k slots.

use super::router::Routing;
use crate::config::{ModelConfig, RoutedKind};
use crate::weights::{ConstantExpertWeights, DenseLayerWeights};

/// `[a1, a2] = softmax(W_c x)` of one constant expert.
fn mix(c: &ConstantExpertWeights, x: &[f32]) -> [f32; 2] {
    let d = x.len();
    let z0: f32 = c.gate[..d].iter().zip(x).map(|(w, v)| w * v).sum();
    let z1: f32 = c.gate[d..].iter().zip(x).map(|(w, v)| w * v).sum();
    let m = z0.max(z1);
    let (e0, e1) = ((z0 - m).exp(), (z1 - m).exp());
    [e0 / (e0 + e1), e1 / (e0 + e1)]
}

/// The chosen computation-free experts of token `t`: (slot, kind).
fn chosen<'a>(cfg: &'a ModelConfig, routing: &'a Routing, t: usize) -> impl Iterator<Item = (usize, RoutedKind)> + 'a {
    let k = cfg.top_k;
    let ids = &routing.expert_tk[t * k..(t + 1) * k];
    let kinds = ids.iter().map(move |&id| cfg.routed_kind(id as usize));
    kinds.enumerate().filter(|(_, kind)| matches!(kind, RoutedKind::Constant(_) | RoutedKind::Copy))
}

/// Adds `gate * y` of every chosen constant and copy expert into `out_td`.
pub(super) fn forward(cfg: &ModelConfig, w: &DenseLayerWeights, routing: &Routing, x_td: &[f32], out_td: &mut [f32]) {
    if cfg.computation_free_experts() == 0 {
        return;
    }
    let d = cfg.d_model;
    for (t, (x, out)) in x_td.chunks_exact(d).zip(out_td.chunks_exact_mut(d)).enumerate().take(routing.num_tokens) {
        for (slot, kind) in chosen(cfg, routing, t) {
            let g = routing.gate_tk[t * cfg.top_k + slot];
            match kind {
                RoutedKind::Copy => out.iter_mut().zip(x).for_each(|(o, &xi)| *o += g * xi),
                RoutedKind::Constant(j) => {
                    let c = &w.constant[j];
                    let [a1, a2] = mix(c, x);
                    for ((o, &xi), &vi) in out.iter_mut().zip(x).zip(&c.value) {
                        *o += g * (a1 * xi + a2 * vi);
                    }
                }
                RoutedKind::Ffn | RoutedKind::Zero => {}
            }
        }
    }
}

/// Where [`backward`] adds: the layer's gradients (constant experts), the
/// gates' `[t, k]` and the input's `[t, d]`.
pub(super) struct FreeGrads<'g> {
    pub gw: &'g mut DenseLayerWeights,
    pub dgate_tk: &'g mut [f32],
    pub dx_td: &'g mut [f32],
}

/// Backward of [`forward`]: adds the gates' gradients into `dgate_tk`, the
/// input's into `dx_td` and the constant experts' into `gw`.
/// Copy: `dg = dout . x`, `dx += g dout`. Constant: with `dy = g dout`,
/// `dg = dout . y`, `da = (dy . x, dy . v)`, `dz_i = a_i (da_i - a . da)`,
/// `dW_c,i += dz_i x`, `dx += sum_i dz_i W_c,i + a1 dy`, `dv += a2 dy`.
pub(super) fn backward(
    cfg: &ModelConfig,
    w: &DenseLayerWeights,
    routing: &Routing,
    (x_td, dout_td): (&[f32], &[f32]),
    grads: FreeGrads<'_>,
) {
    let FreeGrads { gw, dgate_tk, dx_td } = grads;
    if cfg.computation_free_experts() == 0 {
        return;
    }
    let (d, k) = (cfg.d_model, cfg.top_k);
    let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    for t in 0..routing.num_tokens {
        let (x, dout) = (&x_td[t * d..(t + 1) * d], &dout_td[t * d..(t + 1) * d]);
        for (slot, kind) in chosen(cfg, routing, t) {
            let g = routing.gate_tk[t * k + slot];
            let dx = &mut dx_td[t * d..(t + 1) * d];
            match kind {
                RoutedKind::Copy => {
                    dgate_tk[t * k + slot] += dot(dout, x);
                    dx.iter_mut().zip(dout).for_each(|(a, &o)| *a += g * o);
                }
                RoutedKind::Constant(j) => {
                    let c = &w.constant[j];
                    let [a1, a2] = mix(c, x);
                    let (dout_x, dout_v) = (dot(dout, x), dot(dout, &c.value));
                    dgate_tk[t * k + slot] += a1 * dout_x + a2 * dout_v;
                    let (da1, da2) = (g * dout_x, g * dout_v);
                    let mean = a1 * da1 + a2 * da2;
                    let (dz1, dz2) = (a1 * (da1 - mean), a2 * (da2 - mean));
                    let gc = &mut gw.constant[j];
                    for i in 0..d {
                        gc.gate[i] += dz1 * x[i];
                        gc.gate[d + i] += dz2 * x[i];
                        gc.value[i] += a2 * g * dout[i];
                        dx[i] += dz1 * c.gate[i] + dz2 * c.gate[d + i] + a1 * g * dout[i];
                    }
                }
                RoutedKind::Ffn | RoutedKind::Zero => {}
            }
        }
    }
}
