//! SwiGLU expert FFN: `y = W2 (silu(W1 x) * (W3 x))`, for routed and shared experts.

use crate::weights::ExpertWeights;

/// What the backward pass needs from the forward pass of one expert call.
#[derive(Debug, Default, Clone)]
pub struct SwigluCache {
    /// `[rows, f]`: `W1 x`.
    pub h1: Vec<f32>,
    /// `[rows, f]`: `W3 x`.
    pub h3: Vec<f32>,
}

/// Runs one expert on `rows` input rows `x_rd` (`[rows, d]`), writing
/// `y_rd` (overwritten) and filling `cache` (resized as needed).
pub fn swiglu_forward(
    w: &ExpertWeights,
    d: usize,
    f: usize,
    x_rd: &[f32],
    rows: usize,
    y_rd: &mut [f32],
    cache: &mut SwigluCache,
) {
    todo!()
}

/// Backward of [`swiglu_forward`]: adds into `dx_rd` and into `grads`
/// (`w1`, `w3`, `w2`).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(
    w: &ExpertWeights,
    d: usize,
    f: usize,
    x_rd: &[f32],
    rows: usize,
    cache: &SwigluCache,
    dy_rd: &[f32],
    dx_rd: &mut [f32],
    grads: &mut ExpertWeights,
) {
    todo!()
}
