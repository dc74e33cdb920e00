//! Mixture-of-Transformers (docs/model.md): every token carries a modality
//! id, and the projections, norms and dense FFNs a token passes through are
//! its modality's. [`ModalityRows`] groups a pass's rows by modality and
//! runs a row-wise op with each group's own weights; with one modality it
//! runs the op once on all rows, exactly the code path without MoT.
//!
//! Legend: `r` rows, `k` input width, `n` output width; weights `[n, k]`
//! (PyTorch `Linear`), one per modality, modality 0 first.

use crate::gemm::{matmul_nn, matmul_nt, matmul_tn, Prepared, Values};
use crate::moe::{ExpertKind, Rows};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::swiglu::{SwiGlu, SwigluCache};
use crate::weights::ExpertWeights;
use std::borrow::Cow;

/// The rows of each modality among `r` rows (a pass's tokens, in order).
#[derive(Debug, Clone, Default)]
pub struct ModalityRows {
    /// Per modality, its rows in ascending order; one entry (every row)
    /// without MoT.
    rows: Vec<Vec<usize>>,
    total: usize,
}

impl ModalityRows {
    /// Groups rows by `ids` (one per row) into `modalities` groups; with
    /// one modality the ids are not read.
    pub fn new(ids: &[u8], total: usize, modalities: usize) -> Self {
        if modalities <= 1 {
            return Self { rows: vec![(0..total).collect()], total };
        }
        assert_eq!(ids.len(), total, "one modality id per row");
        let mut rows = vec![Vec::new(); modalities];
        for (r, &m) in ids.iter().enumerate() {
            rows[m as usize].push(r);
        }
        Self { rows, total }
    }

    fn single(&self) -> bool {
        self.rows.len() == 1
    }

    /// Rows `[rows_m, width]` of modality `m`, copied out of `x`.
    fn gather<T: Copy>(&self, m: usize, x: &[T], width: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.rows[m].len() * width);
        for &r in &self.rows[m] {
            out.extend_from_slice(&x[r * width..(r + 1) * width]);
        }
        out
    }

    /// A product factor's rows of modality `m`, in the factor's own
    /// element type: a factor already in bf16 stays bf16, rather than
    /// being widened to f32 here and rounded again by every product.
    fn gather_factor(&self, m: usize, x: Values<'_>, width: usize) -> Prepared<'static> {
        match x {
            Values::F32(v) => Prepared::F32(Cow::Owned(self.gather(m, v, width))),
            Values::Bf16(v) => Prepared::Bf16(self.gather(m, v, width)),
        }
    }

    /// Writes (or adds) modality `m`'s rows `y` back into `out`.
    fn scatter(&self, m: usize, y: &[f32], out: &mut [f32], width: usize, accumulate: bool) {
        for (&r, row) in self.rows[m].iter().zip(y.chunks_exact(width)) {
            let dst = &mut out[r * width..(r + 1) * width];
            if accumulate {
                dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            } else {
                dst.copy_from_slice(row);
            }
        }
    }

    /// `out = x W_m^T` per row (`+=` when `accumulate`).
    pub fn matmul_nt<'x>(
        &self,
        x_rk: impl Into<Values<'x>>,
        weights: &[&[f32]],
        (k, n): (usize, usize),
        out_rn: &mut [f32],
        acc: bool,
    ) {
        if self.single() {
            return matmul_nt(self.total, k, n, x_rk, weights[0], out_rn, acc);
        }
        let x_rk = x_rk.into();
        for (m, rows) in self.rows.iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
            let mut y = vec![0.0; rows.len() * n];
            matmul_nt(rows.len(), k, n, &self.gather_factor(m, x_rk, k), weights[m], &mut y, false);
            self.scatter(m, &y, out_rn, n, acc);
        }
    }

    /// Backward of [`ModalityRows::matmul_nt`] for the weights:
    /// `dW_m += dy_m^T x_m`.
    pub fn weight_grads<'y, 'x>(
        &self,
        dy_rn: impl Into<Values<'y>>,
        x_rk: impl Into<Values<'x>>,
        (k, n): (usize, usize),
        grads: &mut [&mut [f32]],
    ) {
        if self.single() {
            return matmul_tn(n, self.total, k, dy_rn, x_rk, grads[0], true);
        }
        let (dy_rn, x_rk) = (dy_rn.into(), x_rk.into());
        for (m, rows) in self.rows.iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
            let (dy, x) = (self.gather_factor(m, dy_rn, n), self.gather_factor(m, x_rk, k));
            matmul_tn(n, rows.len(), k, &dy, &x, grads[m], true);
        }
    }

    /// Backward of [`ModalityRows::matmul_nt`] for the input: `dx += dy W_m`.
    pub fn input_grads<'y>(
        &self,
        dy_rn: impl Into<Values<'y>>,
        weights: &[&[f32]],
        (k, n): (usize, usize),
        dx_rk: &mut [f32],
    ) {
        if self.single() {
            return matmul_nn(self.total, n, k, dy_rn, weights[0], dx_rk, true);
        }
        let dy_rn = dy_rn.into();
        for (m, rows) in self.rows.iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
            let mut dx = vec![0.0; rows.len() * k];
            matmul_nn(rows.len(), n, k, &self.gather_factor(m, dy_rn, n), weights[m], &mut dx, false);
            self.scatter(m, &dx, dx_rk, k, true);
        }
    }

    /// RMSNorm of every row with its modality's weight.
    pub fn rmsnorm_forward(&self, x: &[f32], weights: &[&[f32]], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        if self.single() {
            return rmsnorm_forward(x, weights[0], eps, y, rstd);
        }
        let d = weights[0].len();
        for (m, rows) in self.rows.iter().enumerate() {
            for &r in rows {
                let span = r * d..(r + 1) * d;
                rmsnorm_forward(&x[span.clone()], weights[m], eps, &mut y[span], &mut rstd[r..r + 1]);
            }
        }
    }

    /// Backward of [`ModalityRows::rmsnorm_forward`]: adds into `dx` and
    /// each modality's weight gradient.
    pub fn rmsnorm_backward(
        &self,
        (x, rstd): (&[f32], &[f32]),
        weights: &[&[f32]],
        dy: &[f32],
        dx: &mut [f32],
        grads: &mut [&mut [f32]],
    ) {
        if self.single() {
            return rmsnorm_backward(x, weights[0], rstd, dy, dx, grads[0]);
        }
        let d = weights[0].len();
        for (m, rows) in self.rows.iter().enumerate() {
            for &r in rows {
                let span = r * d..(r + 1) * d;
                rmsnorm_backward(
                    &x[span.clone()],
                    weights[m],
                    &rstd[r..r + 1],
                    &dy[span.clone()],
                    &mut dx[span],
                    grads[m],
                );
            }
        }
    }

    /// A dense SwiGLU FFN per modality: `out = FFN_m(x)` per row; the caches
    /// (one per modality) are for [`ModalityRows::swiglu_backward`].
    pub fn swiglu_forward(
        &self,
        ffn: SwiGlu,
        weights: &[&ExpertWeights],
        x_rd: &[f32],
        out_rd: &mut [f32],
    ) -> Vec<SwigluCache> {
        let d = ffn.d;
        let mut caches = vec![SwigluCache::default(); self.rows.len()];
        if self.single() {
            ffn.forward(weights[0], Rows { x_rd, rows: self.total }, out_rd, &mut caches[0]);
            return caches;
        }
        for (m, rows) in self.rows.iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
            let x = self.gather(m, x_rd, d);
            let mut y = vec![0.0; rows.len() * d];
            ffn.forward(weights[m], Rows { x_rd: &x, rows: rows.len() }, &mut y, &mut caches[m]);
            self.scatter(m, &y, out_rd, d, false);
        }
        caches
    }

    /// Backward of [`ModalityRows::swiglu_forward`]: adds into `dx` and
    /// each modality's FFN gradient.
    pub fn swiglu_backward(
        &self,
        (ffn, weights): (SwiGlu, &[&ExpertWeights]),
        (x_rd, caches): (&[f32], Vec<SwigluCache>),
        dout_rd: &[f32],
        dx_rd: &mut [f32],
        grads: &mut [&mut ExpertWeights],
    ) {
        let d = ffn.d;
        if self.single() {
            let rows = Rows { x_rd, rows: self.total };
            let cache = caches.into_iter().next().unwrap_or_default();
            return ffn.backward_into(weights[0], rows, cache, dout_rd, dx_rd, grads[0]);
        }
        for ((m, rows), cache) in self.rows.iter().enumerate().zip(caches).filter(|((_, rows), _)| !rows.is_empty()) {
            let (x, dout) = (self.gather(m, x_rd, d), self.gather(m, dout_rd, d));
            let mut dx = vec![0.0; rows.len() * d];
            ffn.backward_into(weights[m], Rows { x_rd: &x, rows: rows.len() }, cache, &dout, &mut dx, grads[m]);
            self.scatter(m, &dx, dx_rd, d, true);
        }
    }
}
