//! Causal attention in tiles with an online softmax (FlashAttention-2's
//! algorithm on the CPU): the same function as [`super::attention`], but
//! it never holds a `seq x seq` matrix. The forward keeps, per query row,
//! the running maximum `m` and sum `l` of `exp(score - m)` over the key
//! tiles seen so far, rescaling its partial output when `m` grows, and
//! saves only the output and `lse = m + ln l` per row; the backward
//! recomputes each tile's probabilities `P = exp(S - lse)` from them.
//!
//! Backward (per head, with `D_i = sum_d dO_id O_id`):
//! `dV_j = sum_i P_ij^T dO_i`, `dP_ij = dO_i V_j^T`,
//! `dS_ij = P_ij (dP_ij - D_i) / sqrt(hd)`, `dQ_i = sum_j dS_ij K_j`,
//! `dK_j = sum_i dS_ij^T Q_i`, over the tiles `i >= j` a causal mask
//! leaves.
//!
//! Memory: `O(seq x head_dim)` per (batch, head) task, against the saved
//! `batch x n_heads x seq x seq` probabilities of the plain version.
//! Legend: `br`/`bc` rows of a query/key tile, `hd` head_dim.

use super::attention::{
    add_kv_heads, check_backward_shapes, check_shapes, gather_head, scatter_query_heads, AttentionShape, Qkv, QkvGrads,
};
use super::fast_exp::exp_in_place;
use crate::gemm::{matmul_nn, matmul_nt, matmul_tn};
use rayon::prelude::*;

/// Rows of a query tile and of a key tile.
const TILE: usize = 128;

/// Values in the saved log-sum-exp buffer: `batch * n_heads * seq`.
pub fn lse_len(shape: &AttentionShape) -> usize {
    shape.batch * shape.n_heads * shape.seq
}

/// `q_th`: `[batch*seq, n_heads*head_dim]`, `k_tg`/`v_tg`:
/// `[batch*seq, n_kv_heads*head_dim]`. Writes `out_th` (overwritten) and
/// `lse` (`[batch, n_heads, seq]`) for the backward pass.
pub fn tiled_attention_forward(shape: AttentionShape, qkv: Qkv<'_>, out_th: &mut [f32], lse: &mut [f32]) {
    let Qkv { q_th, k_tg, v_tg } = qkv;
    check_shapes(&shape, q_th.len(), k_tg.len(), v_tg.len());
    let AttentionShape { seq, n_heads, n_kv_heads, head_dim: hd, .. } = shape;
    assert_eq!(out_th.len(), q_th.len(), "attention: out length");
    assert_eq!(lse.len(), lse_len(&shape), "attention: lse length");
    if q_th.is_empty() || seq == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out_bhsd = vec![0.0f32; q_th.len()];
    out_bhsd.par_chunks_mut(seq * hd).zip(lse.par_chunks_mut(seq)).enumerate().for_each_init(
        || Head::new(seq, hd),
        |head, (bh, (o, lse))| {
            let (b, h) = (bh / n_heads, bh % n_heads);
            head.gather(Qkv { q_th, k_tg, v_tg }, b, (h, qw), (h / group, kw));
            let mut s = vec![0.0f32; TILE * TILE];
            let (mut m, mut l) = ([0.0f32; TILE], [0.0f32; TILE]);
            for i0 in (0..seq).step_by(TILE) {
                let br = TILE.min(seq - i0);
                let q = &head.q[i0 * hd..(i0 + br) * hd];
                let acc = &mut o[i0 * hd..(i0 + br) * hd];
                acc.fill(0.0);
                m[..br].fill(f32::NEG_INFINITY);
                l[..br].fill(0.0);
                // Key tiles up to the last row's position.
                for j0 in (0..i0 + br).step_by(TILE) {
                    let bc = TILE.min(seq - j0);
                    let s = &mut s[..br * bc];
                    matmul_nt(br, hd, bc, q, &head.k[j0 * hd..(j0 + bc) * hd], s, false);
                    for (r, row) in s.chunks_mut(bc).enumerate() {
                        // Keys after the row's own position are masked.
                        let live = (i0 + r + 1).saturating_sub(j0).min(bc);
                        let tile_max = row[..live].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) * scale;
                        let m_new = m[r].max(tile_max);
                        row[..live].iter_mut().for_each(|x| *x = *x * scale - m_new);
                        exp_in_place(&mut row[..live]);
                        let sum: f32 = row[..live].iter().sum();
                        row[live..].fill(0.0);
                        // Earlier tiles' terms were relative to the old maximum.
                        let rescale = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - m_new).exp() };
                        l[r] = l[r] * rescale + sum;
                        acc[r * hd..(r + 1) * hd].iter_mut().for_each(|a| *a *= rescale);
                        m[r] = m_new;
                    }
                    matmul_nn(br, bc, hd, &*s, &head.v[j0 * hd..(j0 + bc) * hd], acc, true);
                }
                for r in 0..br {
                    let inv = 1.0 / l[r];
                    acc[r * hd..(r + 1) * hd].iter_mut().for_each(|a| *a *= inv);
                    lse[i0 + r] = m[r] + l[r].ln();
                }
            }
        },
    );
    scatter_query_heads(shape, &out_bhsd, out_th, false);
}

/// Backward of [`tiled_attention_forward`] from its output `out_th` and
/// `lse`: adds into `grads`.
pub fn tiled_attention_backward(
    shape: AttentionShape,
    qkv: Qkv<'_>,
    out_th: &[f32],
    lse: &[f32],
    dout_th: &[f32],
    grads: QkvGrads<'_>,
) {
    check_backward_shapes(&shape, &qkv, dout_th, &grads);
    let (Qkv { q_th, k_tg, v_tg }, QkvGrads { dq_th, dk_tg, dv_tg }) = (qkv, grads);
    let AttentionShape { seq, n_heads, n_kv_heads, head_dim: hd, .. } = shape;
    assert_eq!(lse.len(), lse_len(&shape), "attention: lse length");
    assert_eq!(out_th.len(), q_th.len(), "attention: out length");
    if q_th.is_empty() || seq == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    // Per (batch, query head) contributions, summed per kv head afterwards
    // in a fixed order, as the plain version does.
    let n = q_th.len();
    let (mut dq_b, mut dk_b, mut dv_b) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    dq_b.par_chunks_mut(seq * hd)
        .zip(dk_b.par_chunks_mut(seq * hd))
        .zip(dv_b.par_chunks_mut(seq * hd))
        .zip(lse.par_chunks(seq))
        .enumerate()
        .for_each_init(
            || (Head::new(seq, hd), vec![0.0f32; seq * hd], vec![0.0f32; seq * hd], vec![0.0f32; seq]),
            |(head, o, d_o, dot), (bh, (((dq, dk), dv), lse))| {
                let (b, h) = (bh / n_heads, bh % n_heads);
                head.gather(Qkv { q_th, k_tg, v_tg }, b, (h, qw), (h / group, kw));
                gather_head(out_th, b * seq, seq, qw, h, hd, o);
                gather_head(dout_th, b * seq, seq, qw, h, hd, d_o);
                // D_i = dO_i . O_i: the softmax backward's row term.
                for (r, d) in dot.iter_mut().enumerate() {
                    *d = d_o[r * hd..(r + 1) * hd].iter().zip(&o[r * hd..(r + 1) * hd]).map(|(a, b)| a * b).sum();
                }
                dq.fill(0.0);
                let (mut p, mut ds) = (vec![0.0f32; TILE * TILE], vec![0.0f32; TILE * TILE]);
                for j0 in (0..seq).step_by(TILE) {
                    let bc = TILE.min(seq - j0);
                    let (kj, vj) = (&head.k[j0 * hd..(j0 + bc) * hd], &head.v[j0 * hd..(j0 + bc) * hd]);
                    let (dk_j, dv_j) = (&mut dk[j0 * hd..(j0 + bc) * hd], &mut dv[j0 * hd..(j0 + bc) * hd]);
                    dk_j.fill(0.0);
                    dv_j.fill(0.0);
                    // Query tiles with a row at or after the key tile's first position.
                    for i0 in (j0 / TILE * TILE..seq).step_by(TILE) {
                        let br = TILE.min(seq - i0);
                        let (qi, doi) = (&head.q[i0 * hd..(i0 + br) * hd], &d_o[i0 * hd..(i0 + br) * hd]);
                        let (p, ds) = (&mut p[..br * bc], &mut ds[..br * bc]);
                        matmul_nt(br, hd, bc, qi, kj, p, false);
                        for (r, row) in p.chunks_mut(bc).enumerate() {
                            let live = (i0 + r + 1).saturating_sub(j0).min(bc);
                            let row_lse = lse[i0 + r];
                            row[..live].iter_mut().for_each(|x| *x = *x * scale - row_lse);
                            exp_in_place(&mut row[..live]);
                            row[live..].fill(0.0);
                        }
                        matmul_tn(bc, br, hd, &*p, doi, dv_j, true);
                        matmul_nt(br, hd, bc, doi, vj, ds, false);
                        for (r, (ds_row, p_row)) in ds.chunks_mut(bc).zip(p.chunks(bc)).enumerate() {
                            let d = dot[i0 + r];
                            ds_row.iter_mut().zip(p_row).for_each(|(x, &pv)| *x = pv * (*x - d) * scale);
                        }
                        matmul_nn(br, bc, hd, &*ds, kj, &mut dq[i0 * hd..(i0 + br) * hd], true);
                        matmul_tn(bc, br, hd, &*ds, qi, dk_j, true);
                    }
                }
            },
        );
    scatter_query_heads(shape, &dq_b, dq_th, true);
    add_kv_heads(shape, &dk_b, dk_tg);
    add_kv_heads(shape, &dv_b, dv_tg);
}

/// One (batch, head) task's contiguous `[seq, hd]` q, k and v.
struct Head {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    seq: usize,
    hd: usize,
}

impl Head {
    fn new(seq: usize, hd: usize) -> Self {
        Self { q: vec![0.0; seq * hd], k: vec![0.0; seq * hd], v: vec![0.0; seq * hd], seq, hd }
    }

    /// Query head `qh` (rows `qw` wide) and kv head `kh` (rows `kw` wide) of sequence `b`.
    fn gather(&mut self, qkv: Qkv<'_>, b: usize, (qh, qw): (usize, usize), (kh, kw): (usize, usize)) {
        let (seq, hd) = (self.seq, self.hd);
        gather_head(qkv.q_th, b * seq, seq, qw, qh, hd, &mut self.q);
        gather_head(qkv.k_tg, b * seq, seq, kw, kh, hd, &mut self.k);
        gather_head(qkv.v_tg, b * seq, seq, kw, kh, hd, &mut self.v);
    }
}
