//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, row by row.

/// Normalises each row of `x_td` (rows of `w_d.len()` values) into `y_td`
/// and stores each row's `1/sqrt(mean(x^2)+eps)` in `rstd_t`.
pub fn rmsnorm_forward(x_td: &[f32], w_d: &[f32], eps: f32, y_td: &mut [f32], rstd_t: &mut [f32]) {
    todo!()
}

/// Backward of [`rmsnorm_forward`]: adds into `dx_td` and `dw_d`.
pub fn rmsnorm_backward(
    x_td: &[f32],
    w_d: &[f32],
    rstd_t: &[f32],
    dy_td: &[f32],
    dx_td: &mut [f32],
    dw_d: &mut [f32],
) {
    todo!()
}
