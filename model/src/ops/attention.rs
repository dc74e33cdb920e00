//! Causal grouped-query attention core: softmax(q k^T / sqrt(hd)) v.
//!
//! Projections, RoPE and the output projection live in the block
//! (`model.rs`); this is only the per-head core, so attention shards can
//! call it with a subset of heads.

use rayon::prelude::*;

use crate::gemm::{matmul_nn, matmul_nt, matmul_tn};

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

/// Copies head `head` of rows `[seq, row_width]` (starting at token `t0`)
/// into a contiguous `[seq, hd]` buffer.
pub(crate) fn gather_head(
    src: &[f32],
    t0: usize,
    seq: usize,
    row_width: usize,
    head: usize,
    hd: usize,
    dst: &mut [f32],
) {
    for (s, d) in dst.chunks_mut(hd).take(seq).enumerate() {
        let off = (t0 + s) * row_width + head * hd;
        d.copy_from_slice(&src[off..off + hd]);
    }
}

pub(crate) fn check_shapes(shape: &AttentionShape, q_len: usize, k_len: usize, v_len: usize) {
    let AttentionShape { batch, seq, n_heads, n_kv_heads, head_dim } = *shape;
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: {n_heads} heads not divisible by {n_kv_heads} kv heads"
    );
    assert_eq!(q_len, batch * seq * n_heads * head_dim, "attention: q length");
    assert_eq!(k_len, batch * seq * n_kv_heads * head_dim, "attention: k length");
    assert_eq!(v_len, k_len, "attention: v length");
}

/// [`check_shapes`], and the output gradient and the q, k, v gradients
/// the sizes of their values.
pub(crate) fn check_backward_shapes(shape: &AttentionShape, qkv: &Qkv<'_>, dout_th: &[f32], grads: &QkvGrads<'_>) {
    check_shapes(shape, qkv.q_th.len(), qkv.k_tg.len(), qkv.v_tg.len());
    assert_eq!(dout_th.len(), qkv.q_th.len(), "attention: dout length");
    assert_eq!(grads.dq_th.len(), qkv.q_th.len(), "attention: dq length");
    assert_eq!(grads.dk_tg.len(), qkv.k_tg.len(), "attention: dk length");
    assert_eq!(grads.dv_tg.len(), qkv.v_tg.len(), "attention: dv length");
}

/// The query rows of head `h` in sequence `b` whose gate is not 0 (None:
/// all of them, the common case, computed without gathering).
fn live_rows(gates_th: Option<&[f32]>, b: usize, h: usize, seq: usize, n_heads: usize) -> Option<Vec<usize>> {
    let gates = gates_th?;
    let rows: Vec<usize> = (0..seq).filter(|&s| gates[(b * seq + s) * n_heads + h] != 0.0).collect();
    (rows.len() < seq).then_some(rows)
}

/// Copies rows `rows` of head `head` (rows `[seq, row_width]` from token
/// `t0`) into a contiguous `[rows.len(), hd]` buffer.
fn gather_head_rows(src: &[f32], t0: usize, rows: &[usize], row_width: usize, head: usize, hd: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * hd);
    for &s in rows {
        let off = (t0 + s) * row_width + head * hd;
        out.extend_from_slice(&src[off..off + hd]);
    }
    out
}

/// Causal softmax of score rows in place: row `i` sits at position
/// `pos(i)`, sees keys `0..=pos(i)`, and is scaled by `scale` first.
fn causal_softmax(scores: &mut [f32], seq: usize, scale: f32, pos: impl Fn(usize) -> usize) {
    for (i, row) in scores.chunks_mut(seq).enumerate() {
        let (live, future) = row.split_at_mut(pos(i) + 1);
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) * scale;
        let mut sum = 0.0f32;
        for s in live.iter_mut() {
            *s = (*s * scale - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|s| *s *= inv);
        future.fill(0.0);
    }
}

/// Backward of [`causal_softmax`] in place: `ds` holds `dP` and becomes
/// `dS_ij = P_ij (dP_ij - sum_l P_il dP_il)`, with the scores' `scale`
/// folded in.
fn causal_softmax_backward(p: &[f32], ds: &mut [f32], seq: usize, scale: f32) {
    for (prow, drow) in p.chunks(seq).zip(ds.chunks_mut(seq)) {
        let dot: f32 = prow.iter().zip(drow.iter()).map(|(&a, &b)| a * b).sum();
        for (d, &pv) in drow.iter_mut().zip(prow) {
            *d = pv * (*d - dot) * scale;
        }
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
    attention_forward_gated(shape, Qkv { q_th, k_tg, v_tg }, None, out_th, probs);
}

/// [`attention_forward`] that skips the query rows whose gate in `gates_th`
/// (`[batch*seq, n_heads]`, MoH's head gates) is 0: their output and
/// probabilities are 0, and their scores are never computed.
pub fn attention_forward_gated(
    shape: AttentionShape,
    qkv: Qkv<'_>,
    gates_th: Option<&[f32]>,
    out_th: &mut [f32],
    probs: &mut [f32],
) {
    let Qkv { q_th, k_tg, v_tg } = qkv;
    check_shapes(&shape, q_th.len(), k_tg.len(), v_tg.len());
    let AttentionShape { batch: _, seq, n_heads, n_kv_heads, head_dim: hd } = shape;
    assert_eq!(out_th.len(), q_th.len(), "attention: out length");
    assert_eq!(probs.len(), shape.probs_len(), "attention: probs length");
    if q_th.is_empty() || seq == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();

    // Per-(batch, head) outputs `[batch, n_heads, seq, hd]`, scattered into
    // the token-major layout afterwards.
    let mut out_bhsd = vec![0.0f32; q_th.len()];
    probs.par_chunks_mut(seq * seq).zip(out_bhsd.par_chunks_mut(seq * hd)).enumerate().for_each_init(
        || (vec![0.0f32; seq * hd], vec![0.0f32; seq * hd], vec![0.0f32; seq * hd]),
        |(qs, ks, vs), (bh, (p, o))| {
            let (b, h) = (bh / n_heads, bh % n_heads);
            let g = h / group;
            gather_head(k_tg, b * seq, seq, kw, g, hd, ks);
            gather_head(v_tg, b * seq, seq, kw, g, hd, vs);
            if let Some(rows) = live_rows(gates_th, b, h, seq, n_heads) {
                // Only the live rows: scores [rows, seq], then P v.
                let (n, q_rows) = (rows.len(), gather_head_rows(q_th, b * seq, &rows, qw, h, hd));
                let mut scores = vec![0.0f32; n * seq];
                matmul_nt(n, hd, seq, &q_rows, &*ks, &mut scores, false);
                causal_softmax(&mut scores, seq, scale, |i| rows[i]);
                let mut out_rows = vec![0.0f32; n * hd];
                matmul_nn(n, seq, hd, &scores, &*vs, &mut out_rows, false);
                p.fill(0.0);
                o.fill(0.0);
                for (i, &s) in rows.iter().enumerate() {
                    p[s * seq..(s + 1) * seq].copy_from_slice(&scores[i * seq..(i + 1) * seq]);
                    o[s * hd..(s + 1) * hd].copy_from_slice(&out_rows[i * hd..(i + 1) * hd]);
                }
                return;
            }
            gather_head(q_th, b * seq, seq, qw, h, hd, qs);
            // scores = q k^T (scaled in the softmax below).
            matmul_nt(seq, hd, seq, &*qs, &*ks, p, false);
            causal_softmax(p, seq, scale, |i| i);
            // out = P v.
            matmul_nn(seq, seq, hd, &*p, &*vs, o, false);
        },
    );
    scatter_query_heads(shape, &out_bhsd, out_th, false);
}

/// The forward pass's rotated projections, read by [`attention_backward`].
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a> {
    pub q_th: &'a [f32],
    pub k_tg: &'a [f32],
    pub v_tg: &'a [f32],
}

/// Where [`attention_backward`] adds the gradients of q, k and v.
#[derive(Debug)]
pub struct QkvGrads<'a> {
    pub dq_th: &'a mut [f32],
    pub dk_tg: &'a mut [f32],
    pub dv_tg: &'a mut [f32],
}

/// Backward of [`attention_forward`]: adds into `grads`.
pub fn attention_backward(shape: AttentionShape, qkv: Qkv<'_>, probs: &[f32], dout_th: &[f32], grads: QkvGrads<'_>) {
    attention_backward_gated(shape, qkv, None, probs, dout_th, grads);
}

/// Backward of [`attention_forward_gated`] with the same `gates_th`: the
/// skipped rows (whose output gradient is 0 through their zero gate) are
/// skipped again.
pub fn attention_backward_gated(
    shape: AttentionShape,
    qkv: Qkv<'_>,
    gates_th: Option<&[f32]>,
    probs: &[f32],
    dout_th: &[f32],
    grads: QkvGrads<'_>,
) {
    check_backward_shapes(&shape, &qkv, dout_th, &grads);
    let (Qkv { q_th, k_tg, v_tg }, QkvGrads { dq_th, dk_tg, dv_tg }) = (qkv, grads);
    let AttentionShape { batch: _, seq, n_heads, n_kv_heads, head_dim: hd } = shape;
    assert_eq!(probs.len(), shape.probs_len(), "attention: probs length");
    if q_th.is_empty() || seq == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();

    // Each (batch, query head) task writes its own dq, dk, dv contributions
    // (`[batch, n_heads, seq, hd]`); the query heads that share a kv head
    // are summed afterwards in a fixed order, so there are no races and the
    // result does not depend on the thread count.
    let n = q_th.len();
    let (mut dq_b, mut dk_b, mut dv_b) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    probs
        .par_chunks(seq * seq)
        .zip(dq_b.par_chunks_mut(seq * hd))
        .zip(dk_b.par_chunks_mut(seq * hd))
        .zip(dv_b.par_chunks_mut(seq * hd))
        .enumerate()
        .for_each_init(
            || {
                (
                    vec![0.0f32; seq * hd],
                    vec![0.0f32; seq * hd],
                    vec![0.0f32; seq * hd],
                    vec![0.0f32; seq * hd],
                    vec![0.0f32; seq * seq],
                )
            },
            |(qs, ks, vs, dos, ds), (bh, (((p, dq), dk), dv))| {
                let (b, h) = (bh / n_heads, bh % n_heads);
                let g = h / group;
                gather_head(k_tg, b * seq, seq, kw, g, hd, ks);
                gather_head(v_tg, b * seq, seq, kw, g, hd, vs);
                if let Some(rows) = live_rows(gates_th, b, h, seq, n_heads) {
                    // The live rows only: P and dout of those rows.
                    let n = rows.len();
                    let q_rows = gather_head_rows(q_th, b * seq, &rows, qw, h, hd);
                    let do_rows = gather_head_rows(dout_th, b * seq, &rows, qw, h, hd);
                    let p_rows: Vec<f32> =
                        rows.iter().flat_map(|&s| p[s * seq..(s + 1) * seq].iter().copied()).collect();
                    matmul_tn(seq, n, hd, &p_rows, &do_rows, dv, false);
                    let mut ds_rows = vec![0.0f32; n * seq];
                    matmul_nt(n, hd, seq, &do_rows, &*vs, &mut ds_rows, false);
                    causal_softmax_backward(&p_rows, &mut ds_rows, seq, scale);
                    let mut dq_rows = vec![0.0f32; n * hd];
                    matmul_nn(n, seq, hd, &ds_rows, &*ks, &mut dq_rows, false);
                    dq.fill(0.0);
                    for (i, &s) in rows.iter().enumerate() {
                        dq[s * hd..(s + 1) * hd].copy_from_slice(&dq_rows[i * hd..(i + 1) * hd]);
                    }
                    matmul_tn(seq, n, hd, &ds_rows, &q_rows, dk, false);
                    return;
                }
                gather_head(q_th, b * seq, seq, qw, h, hd, qs);
                gather_head(dout_th, b * seq, seq, qw, h, hd, dos);
                // out = P v: dv = P^T dout, dP = dout v^T.
                matmul_tn(seq, seq, hd, p, &*dos, dv, false);
                matmul_nt(seq, hd, seq, &*dos, &*vs, ds, false);
                // Softmax (the 1/sqrt(hd) of the scores folded in).
                causal_softmax_backward(p, ds, seq, scale);
                // scores = q k^T: dq = dS k, dk = dS^T q.
                matmul_nn(seq, seq, hd, &*ds, &*ks, dq, false);
                matmul_tn(seq, seq, hd, &*ds, &*qs, dk, false);
            },
        );
    scatter_query_heads(shape, &dq_b, dq_th, true);
    add_kv_heads(shape, &dk_b, dk_tg);
    add_kv_heads(shape, &dv_b, dv_tg);
}

/// Per-(batch, query head) rows `src` (`[batch, n_heads, seq, hd]`) into
/// the token-major `dst` (`[batch*seq, n_heads*hd]`), added or written.
pub(crate) fn scatter_query_heads(shape: AttentionShape, src: &[f32], dst: &mut [f32], add: bool) {
    let AttentionShape { seq, n_heads, head_dim: hd, .. } = shape;
    let qw = n_heads * hd;
    dst.par_chunks_mut(seq * qw).enumerate().for_each(|(b, rows)| {
        for (s, row) in rows.chunks_mut(qw).enumerate() {
            for (h, out) in row.chunks_mut(hd).enumerate() {
                let off = ((b * n_heads + h) * seq + s) * hd;
                if add {
                    out.iter_mut().zip(&src[off..off + hd]).for_each(|(o, v)| *o += v);
                } else {
                    out.copy_from_slice(&src[off..off + hd]);
                }
            }
        }
    });
}

/// Adds per-(batch, query head) gradients `src` (`[batch, n_heads, seq,
/// hd]`) into their kv heads' rows of `dst` (`[batch*seq, n_kv_heads*hd]`),
/// the query heads of a group in order (the result does not depend on the
/// thread count).
pub(crate) fn add_kv_heads(shape: AttentionShape, src: &[f32], dst: &mut [f32]) {
    let AttentionShape { seq, n_heads, n_kv_heads, head_dim: hd, .. } = shape;
    let (kw, group) = (n_kv_heads * hd, n_heads / n_kv_heads);
    dst.par_chunks_mut(seq * kw).enumerate().for_each(|(b, rows)| {
        for (s, row) in rows.chunks_mut(kw).enumerate() {
            for (g, out) in row.chunks_mut(hd).enumerate() {
                for h in g * group..(g + 1) * group {
                    let off = ((b * n_heads + h) * seq + s) * hd;
                    out.iter_mut().zip(&src[off..off + hd]).for_each(|(o, v)| *o += v);
                }
            }
        }
    });
}
