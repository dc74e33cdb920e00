//! Softmax cross-entropy over the vocabulary.

/// Sum over rows of `-log softmax(logits_tv[t])[targets_t[t]]`, in f64.
/// Used by eval (no gradient).
pub fn cross_entropy_sum(logits_tv: &[f32], targets_t: &[u32], vocab: usize) -> f64 {
    todo!()
}

/// Returns the same sum as [`cross_entropy_sum`] and OVERWRITES
/// `dlogits_tv` with `scale * (softmax(logits) - onehot(target))`, the
/// gradient of `scale * sum`. Parallel over rows.
pub fn cross_entropy_forward_backward(
    logits_tv: &[f32],
    targets_t: &[u32],
    vocab: usize,
    scale: f32,
    dlogits_tv: &mut [f32],
) -> f64 {
    todo!()
}
