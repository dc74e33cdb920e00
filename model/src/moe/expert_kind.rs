//! Expert kinds: the math of one routed expert on a block of rows. This is
//! the expert compute's one seam.
//!
//! [`LocalExperts`](super::LocalExperts) runs every expert through an
//! [`ExpertKind`]: it cuts the dispatch buffer into one block of rows per
//! expert and calls [`ExpertKind::forward`] and [`ExpertKind::backward`]
//! on each, possibly on parallel rayon tasks. v1's only kind is
//! [`SwiGlu`] (`ops/swiglu.rs`, DESIGN section 5).
//!
//! To add an expert kind that runs where the experts are placed (MoE++'s
//! computation-free experts run where the token is instead: `free_experts.rs`):
//! 1. write its math, config key and tensors in docs/model.md (DESIGN 5a);
//! 2. implement [`ExpertKind`] for it: its cache, `tensor_shape` for the
//!    tensors it owns (none for a zero or copy expert), forward and backward
//!    (with the derivative in a comment);
//! 3. run it with `LocalExperts::with_kind`; a kind whose tensors are not
//!    SwiGLU's also needs its weights in `weights.rs`;
//! 4. add its finite-difference test to `tests/grad_moe.rs`.
//!
//! Legend: `r` rows of one expert's block, `d` d_model.

use crate::weights::ExpertWeights;

/// One expert's block of input rows: `x_rd` holds `rows` rows of `d` values.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub x_rd: &'a [f32],
    pub rows: usize,
}

/// The math of one kind of routed expert.
pub trait ExpertKind: Sync {
    /// What the backward pass needs from one forward call.
    type Cache: Default + Clone + Send + Sync;

    /// Shape of the expert's tensor `part` (`layers.{l}.moe.experts.{e}.{part}.weight`),
    /// or None when this kind has no such tensor.
    fn tensor_shape(&self, part: &str) -> Option<Vec<usize>>;

    /// Multiply-adds per row of its largest matrix product (`d * f` for
    /// SwiGLU): sizes the choice between parallel and serial experts.
    fn work_per_row(&self) -> usize;

    /// Writes `y_rd = Expert(x)` for the block's rows (overwritten) and fills `cache`.
    fn forward(&self, w: &ExpertWeights, x: Rows<'_>, y_rd: &mut [f32], cache: &mut Self::Cache);

    /// Backward of [`ExpertKind::forward`] on the same `rows`: `x_dx_rd`
    /// holds the rows' input `x` on entry and their input gradient `dx` on
    /// return (overwritten), and the weight gradients are added into
    /// `grads`. It spends the cache and the input, so a kind may reuse
    /// their buffers as its scratch (the forward pass's values are not
    /// needed after this): the pass then holds one `[rows, d]` less at its
    /// peak, which is in the experts' backward.
    fn backward(
        &self,
        w: &ExpertWeights,
        x_dx_rd: &mut [f32],
        rows: usize,
        cache: Self::Cache,
        dy_rd: &[f32],
        grads: &mut ExpertWeights,
    );
}
