//! Softmax cross-entropy over the vocabulary.

use rayon::prelude::*;

fn check_shapes(logits_len: usize, targets: &[u32], vocab: usize) {
    assert!(vocab > 0, "cross-entropy: vocab must be positive");
    assert_eq!(
        logits_len,
        targets.len() * vocab,
        "cross-entropy: logits have {logits_len} values, need {} rows of {vocab}",
        targets.len()
    );
}

/// Row maximum and `sum_j exp(x_j - max)` (each exp in f32, summed in f64).
/// When `exps` is given it receives the f32 exponentials.
fn row_stats(row: &[f32], exps: Option<&mut [f32]>) -> (f32, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f64;
    match exps {
        Some(out) => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o as f64;
            }
        }
        None => {
            for &x in row {
                sum += (x - max).exp() as f64;
            }
        }
    }
    (max, sum)
}

/// `-log softmax(row)[target] = max + ln(sum) - row[target]`.
fn row_loss(row: &[f32], target: u32, max: f32, sum: f64) -> f64 {
    let t = target as usize;
    assert!(t < row.len(), "cross-entropy: target {t} out of range for vocab {}", row.len());
    max as f64 + sum.ln() - row[t] as f64
}

/// Sum over rows of `-log softmax(logits_tv[t])[targets_t[t]]`, in f64.
/// Used by eval (no gradient).
pub fn cross_entropy_sum(logits_tv: &[f32], targets_t: &[u32], vocab: usize) -> f64 {
    check_shapes(logits_tv.len(), targets_t, vocab);
    let per_row: Vec<f64> = logits_tv
        .par_chunks(vocab)
        .zip(targets_t.par_iter())
        .map(|(row, &t)| {
            let (max, sum) = row_stats(row, None);
            row_loss(row, t, max, sum)
        })
        .collect();
    // Summed in row order so the result does not depend on the thread count.
    per_row.iter().sum()
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
    check_shapes(logits_tv.len(), targets_t, vocab);
    assert_eq!(dlogits_tv.len(), logits_tv.len(), "cross-entropy: dlogits length");
    let per_row: Vec<f64> = logits_tv
        .par_chunks(vocab)
        .zip(dlogits_tv.par_chunks_mut(vocab))
        .zip(targets_t.par_iter())
        .map(|((row, drow), &t)| {
            let (max, sum) = row_stats(row, Some(drow));
            let loss = row_loss(row, t, max, sum);
            let factor = (scale as f64 / sum) as f32;
            drow.iter_mut().for_each(|d| *d *= factor);
            drow[t as usize] -= scale;
            loss
        })
        .collect();
    per_row.iter().sum()
}
