//! Causal grouped-query attention core: softmax(q k^T / sqrt(hd)) v.
//!
//! Projections, RoPE and the output projection live in the block
//! (`model.rs`); this is only the per-head core, so attention shards can
//! call it with a subset of heads.

/// Sizes of one attention call. Query head `i` reads kv head
/// `i / (n_heads / n_kv_heads)`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Values in the saved probability buffer: `batch * n_heads * seq * seq`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.n_heads * self.seq * self.seq
    }
}

/// `q_th`: `[batch*seq, n_heads*head_dim]`, `k_tg`/`v_tg`: `[batch*seq, n_kv_heads*head_dim]`.
/// Writes `out_th` (`[batch*seq, n_heads*head_dim]`, overwritten) and the
/// softmax probabilities `probs` (`[batch, n_heads, seq, seq]`, zero above
/// the diagonal) for the backward pass. Parallel over (batch, head).
pub fn attention_forward(
    shape: AttentionShape,
    q_th: &[f32],
    k_tg: &[f32],
    v_tg: &[f32],
    out_th: &mut [f32],
    probs: &mut [f32],
) {
    todo!()
}

/// Backward of [`attention_forward`]: adds into `dq_th`, `dk_tg`, `dv_tg`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: AttentionShape,
    q_th: &[f32],
    k_tg: &[f32],
    v_tg: &[f32],
    probs: &[f32],
    dout_th: &[f32],
    dq_th: &mut [f32],
    dk_tg: &mut [f32],
    dv_tg: &mut [f32],
) {
    todo!()
}
