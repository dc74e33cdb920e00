//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, row by row.

use rayon::prelude::*;

/// Columns of `dw` handled by one task in the backward pass. Splitting the
/// weight gradient by columns (every task walks all rows) keeps the sum
/// order fixed, so results do not depend on the thread count.
const DW_COLUMNS_PER_TASK: usize = 256;

fn check_shapes(x_len: usize, d: usize, other: usize, rows: usize) {
    assert!(d > 0, "rmsnorm: empty weight");
    assert_eq!(x_len % d, 0, "rmsnorm: x has {x_len} values, not a multiple of d = {d}");
    assert_eq!(other, x_len, "rmsnorm: x and y/dy lengths differ");
    assert_eq!(rows, x_len / d, "rmsnorm: rstd has {rows} values, need {}", x_len / d);
}

/// Normalises each row of `x_td` (rows of `w_d.len()` values) into `y_td`
/// and stores each row's `1/sqrt(mean(x^2)+eps)` in `rstd_t`.
pub fn rmsnorm_forward(x_td: &[f32], w_d: &[f32], eps: f32, y_td: &mut [f32], rstd_t: &mut [f32]) {
    let d = w_d.len();
    check_shapes(x_td.len(), d, y_td.len(), rstd_t.len());
    y_td.par_chunks_mut(d).zip(rstd_t.par_iter_mut()).zip(x_td.par_chunks(d)).for_each(|((y, rstd), x)| {
        let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let r = (1.0 / (sum_sq / d as f64 + eps as f64).sqrt()) as f32;
        *rstd = r;
        for ((yo, &xv), &wv) in y.iter_mut().zip(x).zip(w_d) {
            *yo = xv * r * wv;
        }
    });
}

/// Backward of [`rmsnorm_forward`]: adds into `dx_td` and `dw_d`.
pub fn rmsnorm_backward(x_td: &[f32], w_d: &[f32], rstd_t: &[f32], dy_td: &[f32], dx_td: &mut [f32], dw_d: &mut [f32]) {
    let d = w_d.len();
    check_shapes(x_td.len(), d, dy_td.len(), rstd_t.len());
    assert_eq!(dx_td.len(), x_td.len(), "rmsnorm: dx length");
    assert_eq!(dw_d.len(), d, "rmsnorm: dw length");

    // y_j = x_j r w_j with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / d:
    // dx_j = r w_j dy_j - x_j r^3 mean_k(x_k w_k dy_k).
    dx_td.par_chunks_mut(d).zip(x_td.par_chunks(d)).zip(dy_td.par_chunks(d)).zip(rstd_t.par_iter()).for_each(
        |(((dx, x), dy), &r)| {
            let dot: f64 = x.iter().zip(w_d).zip(dy).map(|((&xv, &wv), &g)| xv as f64 * wv as f64 * g as f64).sum();
            let coef = (dot / d as f64) as f32 * r * r * r;
            for (((o, &xv), &wv), &g) in dx.iter_mut().zip(x).zip(w_d).zip(dy) {
                *o += r * wv * g - xv * coef;
            }
        },
    );

    // dw_j += sum_t dy_tj x_tj r_t.
    dw_d.par_chunks_mut(DW_COLUMNS_PER_TASK).enumerate().for_each(|(block, dw)| {
        let c0 = block * DW_COLUMNS_PER_TASK;
        let c1 = c0 + dw.len();
        for ((x, dy), &r) in x_td.chunks(d).zip(dy_td.chunks(d)).zip(rstd_t) {
            for ((o, &xv), &g) in dw.iter_mut().zip(&x[c0..c1]).zip(&dy[c0..c1]) {
                *o += g * xv * r;
            }
        }
    });
}
