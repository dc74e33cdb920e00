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
