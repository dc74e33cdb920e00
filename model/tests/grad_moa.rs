//! JetMoE's attention experts (MoA) against central finite differences:
//! the sub-layer alone (`sum(out * probe)` plus its router's aux and z
//! losses), with top-k and with BAM's soft routing, MHA and GQA, with and
//! without Qwen3's head norms. The whole model with MoA is in `grad_model.rs`.

mod common;

use model::attention_experts::{moa_backward, moa_forward, AttnExperts, MoaInput, MoaInputGrads};
use model::model::{forward_logits, MicroBatch};
use model::moe::{LocalExperts, RouterLossScales};
use model::ops::rope::RopeTable;
use model::shards::NoShards;
use model::weights::ExpertStore;
use model::{AttentionKind, AttnExpertWeights, DenseLayerWeights, ModelConfig, ModelWeights};

const SCALES: RouterLossScales = RouterLossScales { aux: 0.3, z: 0.05, seq: 0.0 };
const BATCH: usize = 2;

fn config(experts: usize, top_k: usize, kv_heads: usize, qk_norm: bool) -> ModelConfig {
    ModelConfig {
        vocab: 7,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: kv_heads,
        seq_len: 4,
        attention: AttentionKind::Moa,
        attn_experts: experts,
        attn_top_k: top_k,
        qk_norm,
        init_std: 0.5,
        ..ModelConfig::default()
    }
}

/// The sub-layer's loss: `sum(out * probe) + aux * a + z * z`.
fn loss(cfg: &ModelConfig, w: &DenseLayerWeights, x: &[f32], probe: &[f32]) -> f64 {
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let (store, mut grads) = (ExpertStore::default(), ExpertStore::default());
    let mut local = LocalExperts::new(cfg, &store, &mut grads);
    let (out, cache) = moa_forward(cfg, &rope, w, input(x), BATCH, &mut NoShards, replicated(&mut local)).unwrap();
    common::probe_loss(&out, probe)
        + SCALES.aux as f64 * cache.routing.aux_loss as f64
        + SCALES.z as f64 * cache.routing.z_loss as f64
}

/// The attention experts of layer 0, every one on this rank (`local` runs
/// no FFN expert).
fn replicated<'e>(local: &'e mut LocalExperts<'_>) -> AttnExperts<'e> {
    AttnExperts { executor: local, layer: 0 }
}

/// One rank's input: its tokens are all of them.
fn input(x: &[f32]) -> MoaInput<'_> {
    MoaInput { own_td: x, all_td: x }
}

fn tensor<'a>(w: &'a mut DenseLayerWeights, name: &str) -> &'a mut Vec<f32> {
    w.params_mut().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1
}

fn check(cfg: ModelConfig, seed: u64) {
    cfg.validate().unwrap();
    let label = format!("{}of{}/{}kv/qk_norm={}", cfg.attn_top_k, cfg.attn_experts, cfg.n_kv_heads, cfg.qk_norm);
    let mut w = ModelWeights::init(&cfg, seed).dense.layers.remove(0);
    // Non-trivial bias and head norms, so their gradients are exercised.
    for norm in [&mut w.q_norm, &mut w.k_norm].into_iter().flatten() {
        norm.iter_mut().enumerate().for_each(|(i, v)| *v = 1.0 + 0.1 * i as f32);
    }
    let t = BATCH * cfg.seq_len;
    let x = common::values(t * cfg.d_model, seed + 10);
    let probe = common::values(t * cfg.d_model, seed + 20);
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let (store, mut store_grads) = (ExpertStore::default(), ExpertStore::default());
    let mut local = LocalExperts::new(&cfg, &store, &mut store_grads);
    let (_, cache) = moa_forward(&cfg, &rope, &w, input(&x), BATCH, &mut NoShards, replicated(&mut local)).unwrap();
    let mut gw = w.clone();
    for (_, p) in gw.params_mut() {
        p.fill(0.0);
    }
    // The router's and the projections' parts of the input gradient.
    let (mut dx, mut dx_all) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let grads = MoaInputGrads { own_td: &mut dx, all_td: &mut dx_all };
    let experts = replicated(&mut local);
    moa_backward(&cfg, &rope, (&w, &mut gw), &cache, input(&x), &probe, SCALES, grads, &mut NoShards, experts).unwrap();
    dx.iter_mut().zip(&dx_all).for_each(|(a, b)| *a += b);
    let fd = common::Fd { eps: 1e-3, atol: 3e-4, rtol: 2e-2, max_checks: 32 };
    common::check_gradient_with(&format!("{label} x"), &x, &dx, |xp| loss(&cfg, &w, xp, &probe), fd);
    let mut names: Vec<String> = ["attn.wk.weight", "attn.wv.weight", "attn.router.weight"].map(String::from).into();
    // The first and the last expert any token chose (an unchosen one has no gradient).
    let chosen: Vec<usize> = (0..cfg.attn_experts).filter(|&e| cache.routing.chosen_per_expert[e] > 0).collect();
    assert!(chosen.len() >= 2, "{label}: the test wants tokens on two experts at least, got {chosen:?}");
    names.push(format!("attn.experts.{}.wq.weight", chosen[0]));
    names.push(format!("attn.experts.{}.wo.weight", chosen[chosen.len() - 1]));
    if cfg.qk_norm {
        names.extend(["attn.q_norm.weight".into(), "attn.k_norm.weight".into()]);
    }
    for name in names.iter().map(String::as_str) {
        let value = tensor(&mut w.clone(), name).clone();
        let analytic = tensor(&mut gw, name).clone();
        assert!(analytic.iter().any(|g| *g != 0.0), "{label} {name}: gradient is all zero");
        common::check_gradient_with(
            &format!("{label} {name}"),
            &value,
            &analytic,
            |vp| {
                let mut wp = w.clone();
                tensor(&mut wp, name).copy_from_slice(vp);
                loss(&cfg, &wp, &x, &probe)
            },
            fd,
        );
    }
}

#[test]
fn top2_of_3_gqa() {
    check(config(3, 2, 1, false), 3);
}

#[test]
fn top1_of_2_mha_with_head_norms() {
    check(config(2, 1, 2, true), 6);
}

#[test]
fn soft_routing_over_every_expert() {
    check(config(3, 3, 2, false), 5);
}

/// A dense model whose attention is turned into identical experts (BAM's
/// upcycling, any router) computes the same logits: the gates sum to one.
#[test]
fn identical_experts_equal_dense_attention() {
    let moa_cfg = ModelConfig { n_layers: 2, ..config(3, 2, 1, false) };
    let dense_cfg = ModelConfig { attention: AttentionKind::Dense, attn_experts: 0, attn_top_k: 0, ..moa_cfg.clone() };
    let dense = ModelWeights::init(&dense_cfg, 8);
    let mut moa = dense.clone();
    for (layer, router_seed) in moa.dense.layers.iter_mut().zip(30..) {
        let (wq, wo) = (std::mem::take(&mut layer.wq), std::mem::take(&mut layer.wo));
        layer.attn_experts = (0..3).map(|_| AttnExpertWeights { wq: wq.clone(), wo: wo.clone() }).collect();
        layer.attn_router = Some(common::values(3 * moa_cfg.d_model, router_seed));
        layer.attn_bias = Some(vec![0.0; moa_cfg.d_model]);
    }
    let logits = |cfg: &ModelConfig, w: &ModelWeights| {
        let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
        let mut scratch = w.experts.zeros_like();
        let mut experts = LocalExperts::new(cfg, &w.experts, &mut scratch);
        let toks: Vec<u32> = (0..BATCH * (cfg.seq_len + 1)).map(|i| (i * 5 % cfg.vocab) as u32).collect();
        forward_logits(cfg, &rope, &w.dense, &mut experts, MicroBatch { tokens: &toks, batch: BATCH, modality: &[] })
            .unwrap()
    };
    let (a, b) = (logits(&dense_cfg, &dense), logits(&moa_cfg, &moa));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let largest = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(worst <= 1e-5 * largest.max(1.0), "upcycled MoA differs from dense by {worst} (largest logit {largest})");
}
