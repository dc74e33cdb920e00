//! The routers beyond v1 in training (docs/model.md, "Routers beyond v1"):
//! DeepSeek-V3's sigmoid router with group-limited choice, aux-loss-free
//! expert bias and the sequence-wise loss, and Qwen2-MoE's gated shared
//! expert, over the local (threads) backend. Every layout gives the same
//! losses; the bias is bit-identical in every layout at every step (and the
//! ranks of a run check each step that they hold the same one); resume
//! on the same layout is bit-exact.

mod common;

use common::{fresh_run as run, layout_job as job, temp_dir, train_steps as steps};
use worker::api::Resume;
use worker::metrics::StepMetrics;

/// DeepSeek-V3 in small: 8 experts in 4 groups of which 2 are kept, top-2,
/// a shared expert, sigmoid scores scaled by 2.5, the sequence-wise loss
/// and no Switch aux loss.
const DEEPSEEK: &[&str] = &[
    "model.n_experts=8",
    "model.top_k=2",
    "model.n_shared_experts=1",
    "model.router_score=\"sigmoid\"",
    "model.routed_scaling_factor=2.5",
    "model.n_groups=4",
    "model.topk_groups=2",
    "model.expert_bias=true",
    "model.bias_update_speed=0.01",
    "model.seq_aux_loss_coef=1e-4",
    "model.aux_loss_coef=0.0",
];

/// MoE++ in small: 4 FFN experts beside a constant, a copy and a zero
/// expert, the 2-layer router with gating residuals, the sequence-wise loss
/// weighted by tau.
const MOE_PLUS_PLUS: &[&str] = &[
    "model.constant_experts=1",
    "model.copy_experts=1",
    "model.zero_experts=1",
    "model.gating_residuals=true",
    "model.router_mlp=true",
    "model.seq_aux_loss_coef=1e-4",
    "model.expert_bias=true",
];

/// Qwen2-MoE in small: a gated shared expert, gates not renormalised.
const QWEN: &[&str] = &["model.n_shared_experts=1", "model.shared_expert_gate=true", "model.norm_topk_prob=false"];

/// Losses within 1e-6 (relative) and, with an expert bias, the same bias bits.
fn assert_same_run(reference: &[StepMetrics], other: &[StepMetrics], what: &str) {
    assert_eq!(reference.len(), other.len(), "{what}: step count");
    for (a, b) in reference.iter().zip(other) {
        let rel = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(rel <= 1e-6, "{what}: step {} loss {} vs {} (relative {rel:.2e})", a.step, b.loss, a.loss);
        assert_eq!(a.expert_bias, b.expert_bias, "{what}: step {} expert bias", a.step);
        assert_eq!(a.expert_load, b.expert_load, "{what}: step {} expert loads", a.step);
    }
}

#[test]
fn deepseek_router_matches_on_every_layout() {
    let one = run(&job(DEEPSEEK, 1, &[]), "ds-1");
    assert!(one[19].loss < one[0].loss - 0.3, "the job learns: {:?}", one.iter().map(|m| m.loss).collect::<Vec<_>>());
    assert!(one.iter().all(|m| m.seq_aux_loss > 0.0), "the sequence-wise loss is reported");
    // The bias moves by 0.01 a step, from zero, towards balance.
    let first = &one[0];
    assert_eq!(first.expert_bias.len(), 2, "one bias per layer");
    for (bias, load) in first.expert_bias.iter().zip(&first.expert_load) {
        let mean = load.iter().sum::<usize>() as f64 / load.len() as f64;
        for (b, &l) in bias.iter().zip(load) {
            let want = if (l as f64) < mean {
                0.01
            } else if (l as f64) > mean {
                -0.01
            } else {
                0.0
            };
            assert_eq!(*b, want, "bias after step 1 (load {l}, mean {mean})");
        }
    }
    let layouts: [(&str, usize, &[&str]); 5] = [
        ("2 ranks", 2, &[]),
        ("4 ranks", 4, &[]),
        ("4 ranks, experts replicated twice", 4, &["parallel.ep=2"]),
        ("2 ranks, attention in 2 shards", 2, &["parallel.attn_tp=2"]),
        ("4 ranks, attention in 2 shards", 4, &["parallel.attn_tp=2"]),
    ];
    for (i, (what, ranks, extra)) in layouts.into_iter().enumerate() {
        assert_same_run(&one, &run(&job(DEEPSEEK, ranks, extra), &format!("ds-layout-{i}")), what);
    }
    let balanced = ["parallel.placement=\"balanced\"", "parallel.rebalance_every=4", "parallel.redundant_experts=4"];
    assert_same_run(&one, &run(&job(DEEPSEEK, 4, &balanced), "ds-balanced"), "balanced placement");
}

#[test]
fn deepseek_router_resumes_bit_exactly_and_on_another_layout() {
    let reference = run(&job(DEEPSEEK, 2, &[]), "ds-resume-ref");
    // Same layout: bit-exact, bias included.
    let dir = temp_dir("ds-resume-same");
    let mut joined = steps(&job(DEEPSEEK, 2, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(DEEPSEEK, 2, &[]), &dir, Resume::Latest, None));
    for (a, b) in reference.iter().zip(&joined) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: resumed loss", a.step);
        assert_eq!(a.expert_bias, b.expert_bias, "step {}: resumed bias", a.step);
    }
    // 4 ranks with attention shards, then 1 rank.
    let dir = temp_dir("ds-resume-reshard");
    let mut joined = steps(&job(DEEPSEEK, 4, &["parallel.attn_tp=2"]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(DEEPSEEK, 1, &[]), &dir, Resume::Latest, None));
    assert_same_run(&reference, &joined, "4 ranks (attn_tp 2) then 1");
    let manifest = std::fs::read_to_string(dir.join("checkpoints/step-00000020/manifest.json")).unwrap();
    assert!(manifest.contains("\"layers.1.moe.expert_bias\""), "the bias is checkpointed");
    assert!(!manifest.contains("optim.layers.1.moe.expert_bias"), "the bias has no optimizer moments");
}

#[test]
fn aux_loss_free_bias_balances_the_experts() {
    // No balance loss at all: without the bias the router collapses (every
    // token of the micro model picks the same pair: busiest/mean = 4 of 8
    // experts at top-2); the bias alone, at DeepSeek-V3's speed, spreads it.
    let busiest_over_mean = |steps: &[StepMetrics]| -> f64 {
        let late = &steps[50..];
        let ratio = |load: &Vec<usize>| {
            *load.iter().max().unwrap() as f64 / (load.iter().sum::<usize>() as f64 / load.len() as f64)
        };
        late.iter().map(|m| ratio(&m.tokens_per_expert[0])).sum::<f64>() / late.len() as f64
    };
    let no_loss = ["model.seq_aux_loss_coef=0.0", "model.bias_update_speed=0.001", "train.steps=100"];
    let without = [DEEPSEEK, &no_loss, &["model.expert_bias=false"]].concat();
    let with = [DEEPSEEK, &no_loss].concat();
    let without = busiest_over_mean(&run(&job(&without, 1, &[]), "ds-nobias"));
    let with = busiest_over_mean(&run(&job(&with, 1, &[]), "ds-bias"));
    assert!(
        with < 0.9 * without,
        "busiest/mean expert load, steps 51-100: {with:.2} with the bias, {without:.2} without"
    );
}

#[test]
fn qwen_gated_shared_expert_matches_on_every_layout() {
    let one = run(&job(QWEN, 1, &[]), "qwen-1");
    assert!(one[19].loss < one[0].loss - 0.3, "the job learns");
    assert!(one[0].expert_bias.is_empty() && one[0].expert_load.is_empty(), "no bias, no loads");
    for (i, (ranks, extra)) in [(4, &[][..]), (4, &["parallel.attn_tp=2"][..])].into_iter().enumerate() {
        assert_same_run(
            &one,
            &run(&job(QWEN, ranks, extra), &format!("qwen-{i}")),
            &format!("{ranks} ranks {extra:?}"),
        );
    }
}

#[test]
fn moe_plus_plus_matches_on_every_layout_and_resumes_bit_exactly() {
    let one = run(&job(MOE_PLUS_PLUS, 1, &[]), "mpp-1");
    assert!(one[19].loss < one[0].loss - 0.3, "the job learns");
    let share = one[0].computation_free_share;
    assert!(share > 0.0 && share < 1.0, "some assignments take computation-free experts: {share}");
    // FFN loads count FFN experts only; the bias covers every router output.
    assert_eq!((one[0].tokens_per_expert[0].len(), one[0].expert_bias[0].len()), (4, 7));
    let layouts: [(usize, &[&str]); 4] = [
        (2, &[]),
        (4, &[]),
        (4, &["parallel.attn_tp=2"]),
        (4, &["parallel.placement=\"balanced\"", "parallel.rebalance_every=4", "parallel.redundant_experts=4"]),
    ];
    for (i, (ranks, extra)) in layouts.into_iter().enumerate() {
        let other = run(&job(MOE_PLUS_PLUS, ranks, extra), &format!("mpp-layout-{i}"));
        assert_same_run(&one, &other, &format!("{ranks} ranks {extra:?}"));
        for (a, b) in one.iter().zip(&other) {
            assert_eq!(a.computation_free_share, b.computation_free_share, "step {}", a.step);
        }
    }
    let dir = temp_dir("mpp-resume");
    let mut joined = steps(&job(MOE_PLUS_PLUS, 2, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOE_PLUS_PLUS, 2, &[]), &dir, Resume::Latest, None));
    let reference = run(&job(MOE_PLUS_PLUS, 2, &[]), "mpp-resume-ref");
    for (a, b) in reference.iter().zip(&joined) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: resumed loss", a.step);
    }
}

#[test]
fn dense_first_layers_match_on_every_layout_and_resume() {
    // 3 layers: a dense FFN layer, then the DeepSeek router on two MoE layers.
    let dense = [DEEPSEEK, &["model.n_layers=3", "model.first_dense_layers=1", "model.dense_ffn_hidden=96"]].concat();
    let one = run(&job(&dense, 1, &[]), "dense-1");
    assert!(one[19].loss < one[0].loss - 0.3, "the job learns");
    assert!(one[0].expert_bias[0].is_empty() && one[0].expert_bias[1].len() == 8, "no bias in the dense layer");
    assert_eq!(one[0].tokens_per_expert[0].iter().sum::<usize>(), 0, "no expert tokens in the dense layer");
    for (i, (ranks, extra)) in [(4, &[][..]), (4, &["parallel.attn_tp=2"][..])].into_iter().enumerate() {
        assert_same_run(&one, &run(&job(&dense, ranks, extra), &format!("dense-{i}")), &format!("{ranks} {extra:?}"));
    }
    let dir = temp_dir("dense-resume");
    let mut joined = steps(&job(&dense, 4, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(&dense, 2, &[]), &dir, Resume::Latest, None));
    assert_same_run(&one, &joined, "4 ranks then 2");
    let manifest = std::fs::read_to_string(dir.join("checkpoints/step-00000020/manifest.json")).unwrap();
    assert!(manifest.contains("\"layers.0.ffn.w2.weight\"") && !manifest.contains("\"layers.0.moe."), "dense layer 0");
}
