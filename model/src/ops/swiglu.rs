//! SwiGLU expert FFN: `y = W2 (silu(W1 x) * (W3 x))`, for routed and shared
//! experts; routed experts reach it as an [`ExpertKind`].
//!
//! Legend: `r` rows, `d` d_model, `f` ffn_hidden.

use crate::config::ModelConfig;
use crate::gemm::{
    factors_in_bf16, matmul_nn, matmul_nn_new, matmul_nt, matmul_nt_new, matmul_tn, precision, prepare, Bf16,
    FactorElement, Precision, Prepared, Values,
};
use crate::moe::{ExpertKind, Rows};
use crate::ops::fast_exp::exp_in_place;
use crate::weights::ExpertWeights;

#[inline]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Values the elementwise loops take at a time (on the stack, in L1).
const CHUNK: usize = 512;

/// `s = sigmoid(h1)` for one chunk. With bf16 products the exponentials
/// come from the vectorised `fast_exp` (within 3e-7 of `exp`, far below
/// bf16's rounding of the products around it); in fp32 from libm's `expf`,
/// so fp32 results stay bit-identical to every earlier version.
fn sigmoids(h1: &[f32], s: &mut [f32]) {
    if precision() == Precision::Bf16 {
        s.iter_mut().zip(h1).for_each(|(s, &h)| *s = -h);
        exp_in_place(s);
        s.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
    } else {
        s.iter_mut().zip(h1).for_each(|(s, &h)| *s = sigmoid(h));
    }
}

/// One element of SwiGLU's backward from `h1`, `h3`, the gradient `g` of
/// `act` and `s = sigmoid(h1)`: `(act, dh3, dh1)` with `act = silu(h1) h3`,
/// `dh3 = g silu(h1)`, `dh1 = g h3 silu'(h1)`, `silu'(z) = s (1 + z (1 - s))`.
#[inline(always)]
fn swiglu_grads(h1: f32, h3: f32, g: f32, s: f32) -> (f32, f32, f32) {
    (h1 * s * h3, g * h1 * s, g * h3 * s * (1.0 + h1 * (1.0 - s)))
}

/// What the backward pass needs from the forward pass of one expert call.
#[derive(Debug, Default, Clone)]
pub struct SwigluCache {
    /// `[rows, f]`: `W1 x`.
    pub h1: Vec<f32>,
    /// `[rows, f]`: `W3 x`.
    pub h3: Vec<f32>,
}

/// The SwiGLU expert of width `f` on `d`-wide rows (DESIGN section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwiGlu {
    pub d: usize,
    pub f: usize,
}

impl SwiGlu {
    /// The routed and shared experts of `cfg`: `d_model` wide, `ffn_hidden` inside.
    pub fn of(cfg: &ModelConfig) -> Self {
        Self { d: cfg.d_model, f: cfg.ffn_hidden }
    }
}

impl ExpertKind for SwiGlu {
    type Cache = SwigluCache;

    fn tensor_shape(&self, part: &str) -> Option<Vec<usize>> {
        let (d, f) = (self.d, self.f);
        match part {
            "w1" | "w3" => Some(vec![f, d]),
            "w2" => Some(vec![d, f]),
            _ => None,
        }
    }

    fn work_per_row(&self) -> usize {
        self.d * self.f
    }

    /// Runs one expert on the block's rows `x_rd` (`[rows, d]`), writing
    /// `y_rd` (overwritten) and filling `cache` (its buffers replaced).
    fn forward(&self, w: &ExpertWeights, x: Rows<'_>, y_rd: &mut [f32], cache: &mut SwigluCache) {
        let (d, f) = (self.d, self.f);
        let Rows { x_rd, rows } = x;
        if rows == 0 {
            cache.h1.clear();
            cache.h3.clear();
            return;
        }
        assert!(x_rd.len() >= rows * d, "SwiGlu::forward: x has {} values, needs {rows}x{d}", x_rd.len());
        assert!(y_rd.len() >= rows * d, "SwiGlu::forward: y has {} values, needs {rows}x{d}", y_rd.len());
        // h1 = x W1^T, h3 = x W3^T: [rows, f].
        let x = prepare(&x_rd[..rows * d]);
        cache.h1 = matmul_nt_new(rows, d, f, &x, &w.w1);
        cache.h3 = matmul_nt_new(rows, d, f, &x, &w.w3);
        drop(x);
        // act = silu(h1) * h3, stored as the W2 product takes it.
        let y_rd = &mut y_rd[..rows * d];
        if factors_in_bf16() {
            self.output::<Bf16>(w, rows, cache, y_rd);
        } else {
            self.output::<f32>(w, rows, cache, y_rd);
        }
    }

    /// Backward of [`ExpertKind::forward`]: `x_dx_rd` goes from `x` to
    /// `dx` (`x` is last read by `dW1`, `dW3`, then its rows take `dx`,
    /// summed onto zeros as into a fresh buffer, so the bits are the same).
    fn backward(
        &self,
        w: &ExpertWeights,
        x_dx_rd: &mut [f32],
        rows: usize,
        cache: SwigluCache,
        dy_rd: &[f32],
        grads: &mut ExpertWeights,
    ) {
        if rows == 0 {
            return;
        }
        let (dh1, dh3) = self.weight_grads(w, Rows { x_rd: x_dx_rd, rows }, cache, dy_rd, grads);
        let dx_rd = &mut x_dx_rd[..rows * self.d];
        dx_rd.fill(0.0);
        self.input_grad(w, rows, (&dh1, &dh3), dx_rd);
    }
}

impl SwiGlu {
    /// Backward of [`ExpertKind::forward`] that keeps `x` and adds the
    /// input gradient into `dx_rd` (the shared experts and dense FFNs,
    /// whose input other branches still read).
    pub fn backward_into(
        &self,
        w: &ExpertWeights,
        x: Rows<'_>,
        cache: SwigluCache,
        dy_rd: &[f32],
        dx_rd: &mut [f32],
        grads: &mut ExpertWeights,
    ) {
        if x.rows == 0 {
            return;
        }
        assert!(dx_rd.len() >= x.rows * self.d, "SwiGlu::backward_into: dx needs {}x{} values", x.rows, self.d);
        let rows = x.rows;
        let (dh1, dh3) = self.weight_grads(w, x, cache, dy_rd, grads);
        self.input_grad(w, rows, (&dh1, &dh3), dx_rd);
    }

    /// Adds `dW2`, `dW1`, `dW3` into `grads` and returns the gradients of
    /// `h1` and `h3` (`[rows, f]` each), stored as the products take them.
    fn weight_grads(
        &self,
        w: &ExpertWeights,
        x: Rows<'_>,
        cache: SwigluCache,
        dy_rd: &[f32],
        grads: &mut ExpertWeights,
    ) -> (Prepared<'static>, Prepared<'static>) {
        let (d, f) = (self.d, self.f);
        let Rows { x_rd, rows } = x;
        let n = rows * f;
        let SwigluCache { h1, h3 } = cache;
        assert!(h1.len() >= n && h3.len() >= n, "SwiGlu::backward: cache holds fewer than {rows} rows");
        assert!(dy_rd.len() >= rows * d && x_rd.len() >= rows * d, "SwiGlu::backward: dy/x need {rows}x{d} values");
        // d_act = dy W2: [rows, f].
        let dy = prepare(&dy_rd[..rows * d]);
        let dact = matmul_nn_new(rows, d, f, &dy, &w.w2);
        let x = &x_rd[..rows * d];
        if factors_in_bf16() {
            // The products take bf16: the three results go straight into it,
            // a chunk at a time through the stack (not zero-filled first).
            let [mut act, mut dh3, mut dh1] = [(); 3].map(|_| Vec::<Bf16>::with_capacity(n));
            let mut s = [0.0f32; CHUNK];
            let mut out = [[0.0f32; CHUNK]; 3];
            for ((h1, h3), g) in h1[..n].chunks(CHUNK).zip(h3[..n].chunks(CHUNK)).zip(dact.chunks(CHUNK)) {
                let len = h1.len();
                sigmoids(h1, &mut s[..len]);
                for i in 0..len {
                    (out[0][i], out[1][i], out[2][i]) = swiglu_grads(h1[i], h3[i], g[i], s[i]);
                }
                for (to, from) in [&mut act, &mut dh3, &mut dh1].into_iter().zip(&out) {
                    to.extend(from[..len].iter().map(|&v| Bf16::from_f32(v)));
                }
            }
            drop((h1, h3, dact));
            self.weight_products(&dy, (&act, &dh1, &dh3), x, rows, grads);
            (Prepared::Bf16(dh1), Prepared::Bf16(dh3))
        } else {
            // In place: act into h3's buffer, dh3 into d_act's, dh1 into
            // h1's (each read before its slot is written), so the pass needs
            // one scratch buffer of `[rows, f]`.
            let (mut h1_dh1, mut h3_act, mut dact_dh3) = (h1, h3, dact);
            let mut s = [0.0f32; CHUNK];
            for ((h1, h3), g) in
                h1_dh1[..n].chunks_mut(CHUNK).zip(h3_act[..n].chunks_mut(CHUNK)).zip(dact_dh3.chunks_mut(CHUNK))
            {
                let s = &mut s[..h1.len()];
                sigmoids(h1, s);
                for i in 0..h1.len() {
                    (h3[i], g[i], h1[i]) = swiglu_grads(h1[i], h3[i], g[i], s[i]);
                }
            }
            h1_dh1.truncate(n);
            let (act, dh1, dh3) = (&h3_act[..n], &h1_dh1, &dact_dh3);
            self.weight_products(&dy, (act, dh1, dh3), x, rows, grads);
            (Prepared::F32(h1_dh1.into()), Prepared::F32(dact_dh3.into()))
        }
    }

    /// `dW2 += dy^T act` (`[d, f]`), `dW1 += dh1^T x`, `dW3 += dh3^T x`
    /// (`[f, d]`).
    fn weight_products<'v>(
        &self,
        dy: impl Into<Values<'v>>,
        (act, dh1, dh3): (impl Into<Values<'v>>, impl Into<Values<'v>>, impl Into<Values<'v>>),
        x_rd: &[f32],
        rows: usize,
        grads: &mut ExpertWeights,
    ) {
        let (d, f) = (self.d, self.f);
        matmul_tn(d, rows, f, dy, act, &mut grads.w2, true);
        let x = prepare(x_rd);
        matmul_tn(f, rows, d, dh1, &x, &mut grads.w1, true);
        matmul_tn(f, rows, d, dh3, &x, &mut grads.w3, true);
    }

    /// `y = act W2^T` (`[rows, d]`) with `act = silu(h1) * h3` stored as `T`.
    fn output<T: FactorElement>(&self, w: &ExpertWeights, rows: usize, cache: &SwigluCache, y_rd: &mut [f32]) {
        let (d, f) = (self.d, self.f);
        let n = rows * f;
        // Extended a chunk at a time, not zero-filled first.
        let mut act = Vec::with_capacity(n);
        let mut s = [0.0f32; CHUNK];
        for (h1, h3) in cache.h1[..n].chunks(CHUNK).zip(cache.h3[..n].chunks(CHUNK)) {
            let s = &mut s[..h1.len()];
            sigmoids(h1, s);
            act.extend(h1.iter().zip(h3).zip(&*s).map(|((&h1, &h3), &s)| T::from_f32(h1 * s * h3)));
        }
        matmul_nt(rows, f, d, T::values(&act), &w.w2, y_rd, false);
    }

    /// `dx += dh1 W1 + dh3 W3`: `[rows, d]`.
    fn input_grad(&self, w: &ExpertWeights, rows: usize, (dh1, dh3): (&Prepared, &Prepared), dx_rd: &mut [f32]) {
        let (d, f) = (self.d, self.f);
        matmul_nn(rows, f, d, dh1, &w.w1, dx_rd, true);
        matmul_nn(rows, f, d, dh3, &w.w3, dx_rd, true);
    }
}
