//! The tiled attention (online softmax, no seq x seq matrix) against the
//! plain one that saves its probabilities: the same outputs and gradients
//! in fp32, over shapes whose sequences are and are not whole tiles, with
//! multi-head and grouped-query heads.

use model::model::{forward, forward_backward, LossScales, MicroBatch};
use model::moe::LocalExperts;
use model::ops::attention::{attention_backward, attention_forward, AttentionShape, Qkv, QkvGrads};
use model::ops::rope::RopeTable;
use model::ops::tiled_attention::{lse_len, tiled_attention_backward, tiled_attention_forward};
use model::rng::Rng;
use model::{ModelConfig, ModelWeights};

/// Largest difference over the largest value.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(batch: usize, seq: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) {
    let shape = AttentionShape { batch, seq, n_heads, n_kv_heads, head_dim };
    let mut rng = Rng::new(seq as u64 * 31 + n_heads as u64);
    let (q_len, k_len) = (batch * seq * n_heads * head_dim, batch * seq * n_kv_heads * head_dim);
    // Scores of a few units: the softmax is neither flat nor one-hot.
    let (q, k, v) = (rng.normal_vec(q_len, 1.5), rng.normal_vec(k_len, 1.5), rng.normal_vec(k_len, 1.0));
    let dout = rng.normal_vec(q_len, 1.0);
    let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };

    let (mut out, mut probs) = (vec![0.0; q_len], vec![0.0; shape.probs_len()]);
    attention_forward(shape, &q, &k, &v, &mut out, &mut probs);
    let (mut tiled, mut lse) = (vec![f32::NAN; q_len], vec![0.0; lse_len(&shape)]);
    tiled_attention_forward(shape, qkv, &mut tiled, &mut lse);
    let what = format!("batch {batch} seq {seq} heads {n_heads}/{n_kv_heads} hd {head_dim}");
    assert!(rel_diff(&tiled, &out) < 2e-6, "{what}: forward {:e}", rel_diff(&tiled, &out));

    // Gradients add into what is there: start both from the same values.
    let start = |len: usize| vec![0.25f32; len];
    let (mut dq, mut dk, mut dv) = (start(q_len), start(k_len), start(k_len));
    attention_backward(shape, qkv, &probs, &dout, QkvGrads { dq_th: &mut dq, dk_tg: &mut dk, dv_tg: &mut dv });
    let (mut tq, mut tk, mut tv) = (start(q_len), start(k_len), start(k_len));
    tiled_attention_backward(
        shape,
        qkv,
        &tiled,
        &lse,
        &dout,
        QkvGrads { dq_th: &mut tq, dk_tg: &mut tk, dv_tg: &mut tv },
    );
    for (name, a, b) in [("dq", &tq, &dq), ("dk", &tk, &dk), ("dv", &tv, &dv)] {
        assert!(rel_diff(a, b) < 1e-5, "{what}: {name} {:e}", rel_diff(a, b));
    }
}

#[test]
fn whole_tiles_match_the_plain_attention() {
    check(1, 128, 2, 2, 16);
}

#[test]
fn a_partial_last_tile_and_grouped_query_heads_match() {
    check(2, 150, 4, 2, 16);
    check(1, 200, 4, 1, 8);
}

#[test]
fn short_sequences_match() {
    check(3, 1, 2, 1, 4);
    check(1, 7, 2, 2, 8);
}

/// A whole model whose sequences are long enough for the tiled core: its
/// attention gradients against central finite differences of its loss.
#[test]
fn a_model_with_long_sequences_runs_the_tiled_core_and_its_gradients_check() {
    let cfg = ModelConfig {
        vocab: 11,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_hidden: 6,
        // One expert: no routing choice a finite-difference step could flip.
        n_experts: 1,
        top_k: 1,
        seq_len: model::config::TILED_ATTENTION_FROM_SEQ + 37,
        init_std: 0.5,
        ..ModelConfig::default()
    };
    assert!(cfg.tiled_attention(), "the test must run the tiled core");
    cfg.validate().unwrap();
    let weights = ModelWeights::init(&cfg, 3);
    let mut rng = Rng::new(9);
    let toks: Vec<u32> = (0..cfg.seq_len + 1).map(|_| rng.below(cfg.vocab as u64) as u32).collect();
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let scales = LossScales { ce: 1.0 / cfg.seq_len as f32, aux: 0.0, z: 0.0, seq: 0.0, attn_aux: 0.0 };
    let batch = || MicroBatch { tokens: &toks, batch: 1, modality: &[] };
    let loss = |w: &ModelWeights| {
        let mut scratch = w.experts.zeros_like();
        let mut experts = LocalExperts::new(&cfg, &w.experts, &mut scratch);
        forward(&cfg, &rope, &w.dense, &mut experts, batch()).unwrap().ce_sum * scales.ce as f64
    };
    let mut grads = weights.zeros_like();
    {
        let mut experts = LocalExperts::new(&cfg, &weights.experts, &mut grads.experts);
        forward_backward(&cfg, &rope, &weights.dense, &mut grads.dense, &mut experts, batch(), scales).unwrap();
    }
    let tensor =
        |w: &mut ModelWeights, name: &str| w.tensors_mut().into_iter().find(|(n, _)| n == name).unwrap().1.clone();
    for name in ["layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight"] {
        let (x, analytic) = (tensor(&mut weights.clone(), name), tensor(&mut grads, name));
        let eps = 2e-3f32;
        for i in (0..x.len()).step_by((x.len() / 12).max(1)) {
            let at = |delta: f32| {
                let mut w = weights.clone();
                w.tensors_mut().into_iter().find(|(n, _)| n == name).unwrap().1[i] = x[i] + delta;
                loss(&w)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let a = analytic[i] as f64;
            assert!((a - numeric).abs() <= 5e-4 + 3e-2 * numeric.abs(), "{name}[{i}]: {a:e} vs {numeric:e}");
        }
    }
}
