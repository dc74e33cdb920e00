//! bf16 products against fp32: the whole model's loss and every
//! parameter's gradient, on both block styles, within stated bounds (the
//! per-product bounds are in gemm_kernels.rs). Precision is process-wide,
//! so the cases take turns.

use model::gemm::{self, Precision};
use model::model::{forward_backward, LossScales, MicroBatch};
use model::moe::LocalExperts;
use model::ops::rope::RopeTable;
use model::{BlockKind, ModelConfig, ModelWeights};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The loss and every tensor's gradient in `precision`.
fn loss_and_grads(
    cfg: &ModelConfig,
    w: &ModelWeights,
    toks: &[u32],
    precision: Precision,
) -> (f64, Vec<(String, Vec<f32>)>) {
    gemm::set_precision(precision);
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let mut grads = w.zeros_like();
    let scales = LossScales { ce: 1.0 / toks.len() as f32, aux: 0.01, z: 0.001, seq: 0.0, attn_aux: 0.0 };
    let stats = {
        let mut experts = LocalExperts::new(cfg, &w.experts, &mut grads.experts);
        let batch = MicroBatch { tokens: toks, batch: 4, modality: &[] };
        forward_backward(cfg, &rope, &w.dense, &mut grads.dense, &mut experts, batch, scales).unwrap()
    };
    gemm::set_precision(Precision::Fp32);
    let loss = stats.ce_sum / (4 * cfg.seq_len) as f64;
    (loss, grads.tensors_mut().into_iter().map(|(n, g)| (n, g.clone())).collect())
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// The tiny example's shapes at a realistic init (std 0.02).
fn check(block: BlockKind) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = ModelConfig {
        vocab: 64,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_hidden: 128,
        n_experts: 4,
        top_k: 2,
        seq_len: 32,
        block,
        ..ModelConfig::default()
    };
    cfg.validate().unwrap();
    let w = ModelWeights::init(&cfg, 11);
    let mut rng = model::rng::Rng::new(3);
    let toks: Vec<u32> = (0..4 * (cfg.seq_len + 1)).map(|_| rng.below(cfg.vocab as u64) as u32).collect();
    let (loss32, grads32) = loss_and_grads(&cfg, &w, &toks, Precision::Fp32);
    let (loss16, grads16) = loss_and_grads(&cfg, &w, &toks, Precision::Bf16);
    // The loss: bf16 factors move it by far less than a training step does.
    let loss_err = (loss16 - loss32).abs() / loss32;
    assert!(loss_err < 1e-3, "{block:?}: loss {loss16} in bf16 against {loss32} ({loss_err:e})");
    assert!(loss16 != loss32, "{block:?}: bf16 changed nothing: were the products bf16?");
    let mut worst = (0.0, String::new());
    for ((name, g32), (_, g16)) in grads32.iter().zip(&grads16) {
        let scale = norm(g32);
        if scale == 0.0 {
            continue;
        }
        let diff: Vec<f32> = g32.iter().zip(g16).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / scale;
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        // Per tensor: the relative error of the gradient (L2) stays under 3%.
        assert!(rel < 3e-2, "{block:?} {name}: bf16 gradient {rel:e} from fp32");
    }
    println!("{block:?}: loss rel. error {loss_err:.2e}, worst gradient rel. error {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn bf16_gradients_of_the_sequential_block_stay_within_3_percent_of_fp32() {
    check(BlockKind::Sequential);
}

#[test]
fn bf16_gradients_of_the_parallel_block_stay_within_3_percent_of_fp32() {
    check(BlockKind::Parallel);
}

/// Mixture-of-Transformers in bf16: each modality's rows of a factor
/// converted once (`prepare`) give, bit for bit, the products of that
/// modality's rows alone, whose f32 factors each product rounds itself.
#[test]
fn bf16_products_per_modality_are_each_modality_alone() {
    use model::gemm::{matmul_nn, matmul_nt, matmul_tn, prepare};
    use model::modality::ModalityRows;
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (r, k, n) = (37, 24, 16);
    let mut rng = model::rng::Rng::new(5);
    let mut values = |len: usize| (0..len).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect::<Vec<f32>>();
    let (x_rk, dy_rn) = (values(r * k), values(r * n));
    let (w0, w1) = (values(n * k), values(n * k));
    let ids: Vec<u8> = (0..r).map(|i| (i % 3 == 0) as u8).collect();
    let rows = ModalityRows::new(&ids, r, 2);
    let of = |m: u8, v: &[f32], width: usize| -> Vec<f32> {
        (0..r).filter(|&i| ids[i] == m).flat_map(|i| v[i * width..(i + 1) * width].to_vec()).collect()
    };
    gemm::set_precision(Precision::Bf16);
    let (x, dy) = (prepare(&x_rk), prepare(&dy_rn));
    let mut y = vec![0.0; r * n];
    rows.matmul_nt(&x, &[&w0, &w1], (k, n), &mut y, false);
    let mut dx = vec![0.0; r * k];
    rows.input_grads(&dy, &[&w0, &w1], (k, n), &mut dx);
    let (mut g0, mut g1) = (vec![0.0; n * k], vec![0.0; n * k]);
    rows.weight_grads(&dy, &x, (k, n), &mut [&mut g0, &mut g1]);
    for (m, w, g) in [(0u8, &w0, &g0), (1, &w1, &g1)] {
        let (xm, dym) = (of(m, &x_rk, k), of(m, &dy_rn, n));
        let count = xm.len() / k;
        let mut want_y = vec![0.0; count * n];
        matmul_nt(count, k, n, &xm, w.as_slice(), &mut want_y, false);
        assert_eq!(of(m, &y, n), want_y, "forward, modality {m}");
        let mut want_dx = vec![0.0; count * k];
        matmul_nn(count, n, k, &dym, w.as_slice(), &mut want_dx, false);
        assert_eq!(of(m, &dx, k), want_dx, "input gradient, modality {m}");
        let mut want_g = vec![0.0; n * k];
        matmul_tn(n, count, k, &dym, &xm, &mut want_g, true);
        assert_eq!(g, &want_g, "weight gradient, modality {m}");
    }
    gemm::set_precision(Precision::Fp32);
}
