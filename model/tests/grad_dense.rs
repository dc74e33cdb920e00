//! Finite-difference checks for the dense ops: RMSNorm, RoPE, attention
//! core and cross-entropy (DESIGN section 5 and 9.1).

mod common;

use common::{check_gradient, probe_loss, values};
use model::ops::attention::{
    attention_backward, attention_backward_gated, attention_forward, attention_forward_gated, AttentionShape, Qkv,
    QkvGrads,
};
use model::ops::loss::{cross_entropy_forward_backward, cross_entropy_sum};
use model::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use model::ops::rope::RopeTable;

fn assert_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{name}[{i}]: got {g:e}, want {w:e}");
    }
}

/// Backward ops add into their outputs: running one twice doubles it.
fn assert_doubled(name: &str, once: &[f32], twice: &[f32]) {
    for (i, (&a, &b)) in once.iter().zip(twice).enumerate() {
        assert!((2.0 * a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{name}[{i}]: {a} then {b}: not accumulated");
    }
}

// ---------------------------------------------------------------- RMSNorm

const T: usize = 5;
const D: usize = 16;
const EPS: f32 = 1e-5;

fn rmsnorm_y(x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    let mut rstd = vec![0.0; x.len() / w.len()];
    rmsnorm_forward(x, w, EPS, &mut y, &mut rstd);
    y
}

#[test]
fn rmsnorm_forward_matches_definition() {
    let x = values(T * D, 1);
    let w = values(D, 2);
    let mut y = vec![0.0; T * D];
    let mut rstd = vec![0.0; T];
    rmsnorm_forward(&x, &w, EPS, &mut y, &mut rstd);
    let mut want_y = vec![0.0f64; T * D];
    let mut want_r = vec![0.0f64; T];
    for t in 0..T {
        let row = &x[t * D..(t + 1) * D];
        let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / D as f64;
        want_r[t] = 1.0 / (ms + EPS as f64).sqrt();
        for j in 0..D {
            want_y[t * D + j] = row[j] as f64 * want_r[t] * w[j] as f64;
        }
    }
    assert_close("rstd", &rstd, &want_r, 1e-6);
    assert_close("y", &y, &want_y, 1e-6);
}

#[test]
fn rmsnorm_gradients_match_finite_differences() {
    let x = values(T * D, 3);
    let w = values(D, 4);
    let probe = values(T * D, 5);
    let mut y = vec![0.0; T * D];
    let mut rstd = vec![0.0; T];
    rmsnorm_forward(&x, &w, EPS, &mut y, &mut rstd);
    let mut dx = vec![0.0; T * D];
    let mut dw = vec![0.0; D];
    rmsnorm_backward(&x, &w, &rstd, &probe, &mut dx, &mut dw);

    // r = (mean(x^2)+eps)^(-1/2):
    // dL/dx_j = r*w_j*dy_j - x_j*r^3*mean_k(x_k*w_k*dy_k)
    check_gradient("rmsnorm dx", &x, &dx, |x| probe_loss(&rmsnorm_y(x, &w), &probe));
    // dL/dw_j = sum_t dy_tj * x_tj * r_t
    check_gradient("rmsnorm dw", &w, &dw, |w| probe_loss(&rmsnorm_y(&x, w), &probe));

    let (mut dx2, mut dw2) = (dx.clone(), dw.clone());
    rmsnorm_backward(&x, &w, &rstd, &probe, &mut dx2, &mut dw2);
    assert_doubled("rmsnorm dx", &dx, &dx2);
    assert_doubled("rmsnorm dw", &dw, &dw2);
}

// ------------------------------------------------------------------- RoPE

const THETA: f32 = 10000.0;

#[test]
fn rope_matches_rotate_half_definition() {
    let (batch, seq, heads, hd) = (2, 6, 3, 8);
    let table = RopeTable::new(seq, hd, THETA);
    let x = values(batch * seq * heads * hd, 6);
    let mut got = x.clone();
    table.apply(&mut got, batch, seq, heads);
    let half = hd / 2;
    let mut want = vec![0.0f64; x.len()];
    for b in 0..batch {
        for s in 0..seq {
            for h in 0..heads {
                let base = ((b * seq + s) * heads + h) * hd;
                for j in 0..hd {
                    let i = j % half;
                    let angle = s as f64 * (THETA as f64).powf(-2.0 * i as f64 / hd as f64);
                    // rotate_half([a, b]) = [-b, a]
                    let rot = if j < half { -(x[base + j + half] as f64) } else { x[base + j - half] as f64 };
                    want[base + j] = x[base + j] as f64 * angle.cos() + rot * angle.sin();
                }
            }
        }
    }
    assert_close("rope", &got, &want, 1e-6);
    // A table longer than the sequence gives the same result.
    let mut longer = x.clone();
    RopeTable::new(seq + 9, hd, THETA).apply(&mut longer, batch, seq, heads);
    assert_eq!(longer, got);
}

#[test]
fn rope_is_a_rotation_and_identity_at_position_zero() {
    let (batch, seq, heads, hd) = (2, 7, 2, 8);
    let table = RopeTable::new(seq, hd, THETA);
    let x = values(batch * seq * heads * hd, 7);
    let mut y = x.clone();
    table.apply(&mut y, batch, seq, heads);
    let row = heads * hd;
    for b in 0..batch {
        // Positions restart at 0 in every sequence: the first token of each is unchanged.
        let r0 = b * seq * row;
        assert_eq!(&y[r0..r0 + row], &x[r0..r0 + row], "sequence {b}: position 0 must be the identity");
        // ... and later positions do move.
        let r1 = r0 + row;
        assert_ne!(&y[r1..r1 + row], &x[r1..r1 + row], "sequence {b}: position 1 unchanged");
    }
    // Norm of every head vector is preserved.
    for (a, b) in x.chunks(hd).zip(y.chunks(hd)) {
        let na: f64 = a.iter().map(|&v| (v as f64).powi(2)).sum();
        let nb: f64 = b.iter().map(|&v| (v as f64).powi(2)).sum();
        assert!((na - nb).abs() < 1e-5 * (1.0 + na), "norm {na} became {nb}");
    }
    // The backward is the inverse rotation.
    table.apply_backward(&mut y, batch, seq, heads);
    let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    assert_close("rope^T rope x", &y, &want, 1e-6);
}

#[test]
fn rope_gradient_matches_finite_differences() {
    let (batch, seq, heads, hd) = (2, 5, 2, 8);
    // theta 10 turns even the slowest pair noticeably within 5 positions.
    for theta in [THETA, 10.0] {
        let table = RopeTable::new(seq, hd, theta);
        let x = values(batch * seq * heads * hd, 8);
        let probe = values(x.len(), 9);
        let mut dx = probe.clone();
        table.apply_backward(&mut dx, batch, seq, heads);
        // y = R x with R orthogonal per (pos, pair): dL/dx = R^T dy (rotation by -angle)
        check_gradient("rope dx", &x, &dx, |x| {
            let mut y = x.to_vec();
            table.apply(&mut y, batch, seq, heads);
            probe_loss(&y, &probe)
        });
    }
}

// -------------------------------------------------------------- Attention

fn attn_out(shape: AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; q.len()];
    let mut probs = vec![0.0; shape.probs_len()];
    attention_forward(shape, q, k, v, &mut out, &mut probs);
    out
}

/// Straightforward f64 causal GQA attention.
fn attn_reference(shape: AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let AttentionShape { batch, seq, n_heads, n_kv_heads, head_dim: hd } = shape;
    let group = n_heads / n_kv_heads;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let mut out = vec![0.0f64; q.len()];
    for b in 0..batch {
        for h in 0..n_heads {
            let g = h / group;
            for i in 0..seq {
                let qi = &q[(b * seq + i) * qw + h * hd..][..hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(b * seq + j) * kw + g * hd..][..hd];
                        qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    let vj = &v[(b * seq + j) * kw + g * hd..][..hd];
                    for c in 0..hd {
                        out[(b * seq + i) * qw + h * hd + c] += p * vj[c] as f64;
                    }
                }
            }
        }
    }
    out
}

fn attention_inputs(shape: AttentionShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = shape.batch * shape.seq;
    // q scaled up so the softmax is far from uniform.
    let q: Vec<f32> = values(t * shape.n_heads * shape.head_dim, seed).iter().map(|x| 2.0 * x).collect();
    let k = values(t * shape.n_kv_heads * shape.head_dim, seed + 1);
    let v = values(t * shape.n_kv_heads * shape.head_dim, seed + 2);
    (q, k, v)
}

const SHAPES: [AttentionShape; 3] = [
    // MHA
    AttentionShape { batch: 2, seq: 6, n_heads: 2, n_kv_heads: 2, head_dim: 4 },
    // GQA, 2 query heads per kv head
    AttentionShape { batch: 2, seq: 5, n_heads: 4, n_kv_heads: 2, head_dim: 8 },
    // MQA
    AttentionShape { batch: 2, seq: 7, n_heads: 3, n_kv_heads: 1, head_dim: 4 },
];

#[test]
fn attention_forward_matches_reference() {
    for (n, shape) in SHAPES.iter().enumerate() {
        let (q, k, v) = attention_inputs(*shape, 10 + n as u64);
        let mut out = vec![f32::NAN; q.len()];
        let mut probs = vec![f32::NAN; shape.probs_len()];
        attention_forward(*shape, &q, &k, &v, &mut out, &mut probs);
        assert_close("attention out", &out, &attn_reference(*shape, &q, &k, &v), 1e-5);
        let s = shape.seq;
        for (r, row) in probs.chunks(s).enumerate() {
            let i = r % s;
            let sum: f32 = row[..=i].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "probs row {r} sums to {sum}");
            assert!(row[..=i].iter().all(|&p| p > 0.0), "probs row {r}: {row:?}");
            assert!(row[i + 1..].iter().all(|&p| p == 0.0), "probs row {r} not causal: {row:?}");
        }
    }
}

#[test]
fn attention_is_causal_and_sequences_are_independent() {
    let shape = SHAPES[1];
    let (q, k, v) = attention_inputs(shape, 20);
    let base = attn_out(shape, &q, &k, &v);
    let (seq, kw, qw) = (shape.seq, shape.n_kv_heads * shape.head_dim, shape.n_heads * shape.head_dim);
    let changed = 3; // token 3 of sequence 0
    let (mut k2, mut v2) = (k.clone(), v.clone());
    for c in 0..kw {
        k2[changed * kw + c] += 0.7;
        v2[changed * kw + c] -= 0.9;
    }
    let out = attn_out(shape, &q, &k2, &v2);
    for t in 0..2 * seq {
        let (a, b) = (&base[t * qw..(t + 1) * qw], &out[t * qw..(t + 1) * qw]);
        if t < changed || t >= seq {
            // Earlier tokens, and every token of the other sequence, cannot see it.
            assert_eq!(a, b, "token {t} saw token {changed}'s k/v");
        } else {
            assert_ne!(a, b, "token {t} did not see token {changed}'s k/v");
        }
    }
}

#[test]
fn attention_gradients_match_finite_differences() {
    for (n, shape) in SHAPES.iter().enumerate() {
        let shape = *shape;
        let (q, k, v) = attention_inputs(shape, 30 + n as u64);
        let probe = values(q.len(), 40 + n as u64);
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; shape.probs_len()];
        attention_forward(shape, &q, &k, &v, &mut out, &mut probs);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };
        attention_backward(shape, qkv, &probs, &probe, QkvGrads { dq_th: &mut dq, dk_tg: &mut dk, dv_tg: &mut dv });

        let name = format!("{}h/{}kv", shape.n_heads, shape.n_kv_heads);
        // S = q k^T / sqrt(hd), P = causal softmax(S), O = P v, dO = probe:
        // dP = dO v^T, dS_ij = P_ij (dP_ij - sum_l P_il dP_il), dq = dS k / sqrt(hd)
        check_gradient(&format!("attention dq {name}"), &q, &dq, |q| probe_loss(&attn_out(shape, q, &k, &v), &probe));
        // dk_j = sum over the query heads i of its group of dS_ij^T q_i / sqrt(hd)
        check_gradient(&format!("attention dk {name}"), &k, &dk, |k| probe_loss(&attn_out(shape, &q, k, &v), &probe));
        // dv_j = sum over the query heads of its group of P^T dO
        check_gradient(&format!("attention dv {name}"), &v, &dv, |v| probe_loss(&attn_out(shape, &q, &k, v), &probe));

        let (mut dq2, mut dk2, mut dv2) = (dq.clone(), dk.clone(), dv.clone());
        let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };
        attention_backward(shape, qkv, &probs, &probe, QkvGrads { dq_th: &mut dq2, dk_tg: &mut dk2, dv_tg: &mut dv2 });
        assert_doubled("attention dq", &dq, &dq2);
        assert_doubled("attention dk", &dk, &dk2);
        assert_doubled("attention dv", &dv, &dv2);
    }
}

/// [`assert_close`] against f32 values.
fn assert_close_f32(name: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_close(name, got, &want.iter().map(|&v| v as f64).collect::<Vec<_>>(), tol);
}

/// MoH's skipped rows: with some gates 0 the gated kernel computes the live
/// rows as the full kernel does, zeros elsewhere, and its backward equals
/// the full backward of the output gradient with the dead rows zeroed.
#[test]
fn gated_attention_skips_dead_rows_exactly() {
    for (n, shape) in SHAPES.iter().enumerate() {
        let shape = *shape;
        let (q, k, v) = attention_inputs(shape, 50 + n as u64);
        let t = shape.batch * shape.seq;
        // Every third (token, head) dead, and one head of sequence 0 wholly dead.
        let gates: Vec<f32> = (0..t * shape.n_heads)
            .map(|i| if i % 3 == 1 || (i / shape.n_heads < shape.seq && i % shape.n_heads == 0) { 0.0 } else { 0.5 })
            .collect();
        let hd = shape.head_dim;
        let (mut full, mut full_probs) = (vec![0.0; q.len()], vec![0.0; shape.probs_len()]);
        attention_forward(shape, &q, &k, &v, &mut full, &mut full_probs);
        let (mut gated, mut probs) = (vec![f32::NAN; q.len()], vec![f32::NAN; shape.probs_len()]);
        let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };
        attention_forward_gated(shape, qkv, Some(&gates), &mut gated, &mut probs);
        for (i, &g) in gates.iter().enumerate() {
            let (ours, reference) = (&gated[i * hd..(i + 1) * hd], &full[i * hd..(i + 1) * hd]);
            if g == 0.0 {
                assert!(ours.iter().all(|&x| x == 0.0), "dead row {i} computed: {ours:?}");
            } else {
                assert_close_f32("live row", ours, reference, 1e-6);
            }
        }
        let mut probe = values(q.len(), 60 + n as u64);
        for (i, &g) in gates.iter().enumerate() {
            if g == 0.0 {
                probe[i * hd..(i + 1) * hd].fill(0.0);
            }
        }
        let grads = |gates: Option<&[f32]>, probs: &[f32]| {
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };
            let out = QkvGrads { dq_th: &mut dq, dk_tg: &mut dk, dv_tg: &mut dv };
            attention_backward_gated(shape, qkv, gates, probs, &probe, out);
            (dq, dk, dv)
        };
        let (a, b) = (grads(None, &full_probs), grads(Some(&gates), &probs));
        assert_close_f32("gated dq", &b.0, &a.0, 1e-5);
        assert_close_f32("gated dk", &b.1, &a.1, 1e-5);
        assert_close_f32("gated dv", &b.2, &a.2, 1e-5);
    }
}

// ---------------------------------------------------------- Cross-entropy

#[test]
fn cross_entropy_hand_computed_values() {
    // Uniform logits: every row costs ln(vocab).
    let vocab = 7;
    let logits = vec![0.25f32; 3 * vocab];
    let targets = [0u32, 3, 6];
    let want = 3.0 * (vocab as f64).ln();
    assert!((cross_entropy_sum(&logits, &targets, vocab) - want).abs() < 1e-9);
    // Gradient of the uniform case: scale * (1/V - onehot).
    let mut d = vec![f32::NAN; logits.len()];
    let got = cross_entropy_forward_backward(&logits, &targets, vocab, 0.5, &mut d);
    assert!((got - want).abs() < 1e-9);
    for (r, row) in d.chunks(vocab).enumerate() {
        for (j, &g) in row.iter().enumerate() {
            let w = 0.5 * (1.0 / vocab as f64 - if j == targets[r] as usize { 1.0 } else { 0.0 });
            assert!((g as f64 - w).abs() < 1e-7, "row {r} col {j}: {g} vs {w}");
        }
    }
    // logits [0, ln 3], target 0: p = 1/4, loss = ln 4. Shifted by 1e4 (f32
    // rounds the gap there, so the expected value uses the stored gap) a
    // naive exp would overflow; max subtraction keeps it exact.
    for shift in [0.0f32, 1e4] {
        let l = [shift, shift + 3f32.ln()];
        let gap = (l[1] - l[0]) as f64;
        let got = cross_entropy_sum(&l, &[0], 2);
        assert!((got - (1.0 + gap.exp()).ln()).abs() < 1e-6, "shift {shift}: {got}");
        assert!((gap - 3f64.ln()).abs() < 1e-3);
    }
    // A very confident wrong prediction stays finite: loss ~= 200.
    let got = cross_entropy_sum(&[100.0, -100.0], &[1], 2);
    assert!((got - 200.0).abs() < 1e-3, "{got}");
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let (rows, vocab) = (6, 11);
    let logits: Vec<f32> = values(rows * vocab, 50).iter().map(|x| 3.0 * x).collect();
    let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 4 + 1) % vocab as u32).collect();
    let scale = 1.0 / rows as f32;
    let mut d = vec![f32::NAN; logits.len()];
    let loss = cross_entropy_forward_backward(&logits, &targets, vocab, scale, &mut d);
    assert_eq!(loss, cross_entropy_sum(&logits, &targets, vocab), "the two entry points disagree");
    // L = scale * sum_t (logsumexp(z_t) - z_t[target_t]): dL/dz_tj = scale * (softmax(z_t)_j - [j == target_t])
    check_gradient("cross-entropy dlogits", &logits, &d, |z| scale as f64 * cross_entropy_sum(z, &targets, vocab));
    // Overwrites rather than adds.
    let mut d2 = d.clone();
    cross_entropy_forward_backward(&logits, &targets, vocab, scale, &mut d2);
    assert_eq!(d, d2);
}
