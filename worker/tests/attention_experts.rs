//! JetMoE's attention experts (MoA) and MoH's routed heads (docs/model.md)
//! in training, over the local (threads) backend: every layout gives the
//! same losses (within 1e-6 over 20 steps): the FFN experts' layouts,
//! attention shards (which split MoA's experts and MoH's heads by heads,
//! like dense attention's), and MoA's experts partitioned over the
//! expert-parallel group (`parallel.attn_expert_placement`); resume on the
//! same layout is bit-exact and on another (partitioned to replicated and
//! back) within 1e-6.

mod common;

use common::{fresh_run as run, layout_job as job, temp_dir, train_steps as steps};
use worker::api::Resume;
use worker::metrics::StepMetrics;

/// 4 attention experts of 4 heads over 2 shared kv heads, top-2.
const MOA: &[&str] = &["model.attention=\"moa\"", "model.attn_experts=4", "model.attn_top_k=2"];

/// MoA's attention experts partitioned over the expert-parallel group.
const PARTITIONED: &str = "parallel.attn_expert_placement=\"partitioned\"";

/// 8 heads, 2 shared, 3 of the other 6 per token, MoH's learned router.
const MOH: &[&str] = &["model.attention=\"moh\"", "model.n_heads=8", "model.attn_shared_heads=2", "model.attn_top_k=3"];

fn assert_close(reference: &[StepMetrics], other: &[StepMetrics], what: &str) {
    common::assert_close_by(reference, other, what, |m| m.attn_load.clone());
}

/// Every layer's attention loads count each token's `top_k` choices once.
fn assert_loads_count_every_choice(run: &[StepMetrics], experts: usize, top_k: usize) {
    for m in run {
        assert_eq!(m.attn_load.len(), 2, "a row of loads per layer");
        for layer in &m.attn_load {
            assert_eq!(layer.len(), experts);
            assert_eq!(layer.iter().sum::<usize>(), m.tokens as usize * top_k, "step {}: {layer:?}", m.step);
        }
    }
}

#[test]
fn attention_experts_match_on_every_layout() {
    for (block, name) in [("sequential", "seq"), ("parallel", "par")] {
        let block_set = format!("model.block=\"{block}\"");
        let model = [MOA, &[block_set.as_str()][..]].concat();
        let one = run(&job(&model, 1, &[]), &format!("moa-{name}-1"));
        assert_loads_count_every_choice(&one, 4, 2);
        assert!(one[19].loss < one[0].loss - 0.3, "{block}: the job learns: {} -> {}", one[0].loss, one[19].loss);
        let layouts: [(usize, &[&str]); 10] = [
            (2, &[]),
            (4, &[]),
            (4, &["parallel.ep=2"]),
            (4, &["parallel.placement=\"balanced\"", "parallel.rebalance_every=4", "parallel.redundant_experts=4"]),
            (2, &["parallel.attn_tp=2"]),
            (4, &["parallel.attn_tp=2"]),
            (2, &[PARTITIONED]),
            (4, &[PARTITIONED]),
            (4, &[PARTITIONED, "parallel.ep=2"]),
            // Rows on the communication thread, two lanes, attention while
            // the FFN rows travel (parallel blocks).
            (4, &[PARTITIONED, "overlap.mode=\"on\""]),
        ];
        for (i, (ranks, extra)) in layouts.into_iter().enumerate() {
            let other = run(&job(&model, ranks, extra), &format!("moa-{name}-layout-{i}"));
            assert_close(&one, &other, &format!("{block}, {ranks} ranks {extra:?}"));
        }
    }
}

#[test]
fn attention_experts_resume_bit_exactly_and_on_another_layout() {
    let dir = temp_dir("moa-resume");
    let mut joined = steps(&job(MOA, 2, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOA, 2, &[]), &dir, Resume::Latest, None));
    let reference = run(&job(MOA, 2, &[]), "moa-resume-ref");
    for (a, b) in reference.iter().zip(&joined) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: resumed loss", a.step);
    }
    let dir = temp_dir("moa-reshard");
    let mut joined = steps(&job(MOA, 4, &["parallel.attn_tp=2"]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOA, 1, &[]), &dir, Resume::Latest, None));
    assert_close(&reference, &joined, "4 ranks in 2 attention shards, then 1");
    let manifest = std::fs::read_to_string(dir.join("checkpoints/step-00000020/manifest.json")).unwrap();
    for name in ["layers.1.attn.experts.3.wq.weight", "layers.0.attn.router.weight", "layers.0.attn.bias"] {
        assert!(manifest.contains(&format!("\"{name}\"")), "{name} in the checkpoint");
    }
    assert!(!manifest.contains("\"layers.0.attn.wq.weight\""), "no dense query projection");
}

#[test]
fn balanced_placement_moves_partitioned_attention_experts_and_keeps_the_losses() {
    let reference = run(&job(MOA, 1, &[]), "moa-balanced-ref");
    let balanced = ["parallel.placement=\"balanced\"", "parallel.rebalance_every=4", "parallel.ep=2"];
    let moved = run(&job(MOA, 4, &[&[PARTITIONED][..], &balanced].concat()), "moa-balanced");
    assert_close(&reference, &moved, "4 ranks, attention experts partitioned over 2, balanced");
    let contiguous = vec![vec![vec![0], vec![0], vec![1], vec![1]]; 2];
    let plans: Vec<_> = moved.iter().filter_map(|m| m.placement.as_ref()).collect();
    assert_eq!(plans[0].attn_owners, contiguous, "the run starts on the contiguous plan");
    let replanned = plans.iter().find(|p| p.reason == "rebalanced" && p.attn_owners != contiguous);
    let replanned = replanned.unwrap_or_else(|| panic!("the attention experts never moved: {plans:?}"));
    for layer in &replanned.attn_owners {
        let mut per_rank = [0, 0];
        layer.iter().for_each(|owners| per_rank[owners[0]] += 1);
        assert_eq!(per_rank, [2, 2], "two experts per rank, one owner each: {layer:?}");
    }
}

#[test]
fn partitioned_attention_experts_resume_bit_exactly_and_on_other_layouts() {
    let reference = run(&job(MOA, 1, &[]), "moa-part-ref");
    let dir = temp_dir("moa-part-resume");
    let mut joined = steps(&job(MOA, 4, &[PARTITIONED]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOA, 4, &[PARTITIONED]), &dir, Resume::Latest, None));
    let whole = run(&job(MOA, 4, &[PARTITIONED]), "moa-part-whole");
    for (a, b) in whole.iter().zip(&joined) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: resumed loss", a.step);
    }
    assert_close(&reference, &whole, "4 ranks, partitioned");
    // The rows travel: 4 more exchanges per layer and pass than replicated.
    let replicated = run(&job(MOA, 4, &[]), "moa-part-replicated");
    let bytes = |run: &[StepMetrics]| run.iter().map(|m| m.alltoall_bytes_sent).sum::<u64>();
    assert!(
        bytes(&whole) > bytes(&replicated),
        "bytes sent: {} partitioned, {} replicated",
        bytes(&whole),
        bytes(&replicated)
    );
    // Every expert of every layer is in the checkpoint once, whoever held it.
    let manifest = std::fs::read_to_string(dir.join("checkpoints/step-00000020/manifest.json")).unwrap();
    for l in 0..2 {
        for e in 0..4 {
            let name = format!("\"layers.{l}.attn.experts.{e}.wo.weight\"");
            assert_eq!(manifest.matches(&name).count(), 1, "{name} in the checkpoint once");
        }
    }
    let dir = temp_dir("moa-part-to-replicated");
    let mut joined = steps(&job(MOA, 2, &[PARTITIONED]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOA, 1, &[]), &dir, Resume::Latest, None));
    assert_close(&reference, &joined, "2 ranks partitioned, then 1");
    let dir = temp_dir("moa-replicated-to-part");
    let mut joined = steps(&job(MOA, 1, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOA, 4, &[PARTITIONED, "parallel.ep=2"]), &dir, Resume::Latest, None));
    assert_close(&reference, &joined, "1 rank, then 4 partitioned over 2");
}

#[test]
fn routed_heads_match_on_every_layout_and_resume_bit_exactly() {
    for (router, name) in [("learned", "learned"), ("query_norm", "qnorm")] {
        let router_set = format!("model.attn_router=\"{router}\"");
        let model = [MOH, &[router_set.as_str(), "model.block=\"parallel\""][..]].concat();
        let one = run(&job(&model, 1, &[]), &format!("moh-{name}-1"));
        assert_loads_count_every_choice(&one, 6, 3);
        assert!(one[19].loss < one[0].loss - 0.3, "{router}: the job learns: {} -> {}", one[0].loss, one[19].loss);
        let layouts: [(usize, &[&str]); 4] =
            [(2, &[]), (4, &["parallel.ep=2"]), (2, &["parallel.attn_tp=2"]), (4, &["parallel.attn_tp=2"])];
        for (i, (ranks, extra)) in layouts.into_iter().enumerate() {
            let other = run(&job(&model, ranks, extra), &format!("moh-{name}-layout-{i}"));
            assert_close(&one, &other, &format!("{router}, {ranks} ranks {extra:?}"));
        }
        let dir = temp_dir(&format!("moh-{name}-resume"));
        let mut joined = steps(&job(&model, 2, &[]), &dir, Resume::No, Some(10));
        joined.extend(steps(&job(&model, 2, &[]), &dir, Resume::Latest, None));
        let reference = run(&job(&model, 2, &[]), &format!("moh-{name}-ref"));
        for (a, b) in reference.iter().zip(&joined) {
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{router}, step {}: resumed loss", a.step);
        }
    }
}

#[test]
fn bad_attention_expert_settings_name_the_key() {
    let cases: [(&[&str], &str); 8] = [
        (&["model.attention=\"moa\"", "model.attn_top_k=2"], "attn_experts"),
        (&["model.attention=\"moa\"", "model.attn_experts=2", "model.attn_top_k=3"], "attn_top_k"),
        (&["model.attn_experts=4"], "attn_experts"),
        (&["model.attention=\"moh\"", "model.attn_shared_heads=4", "model.attn_top_k=1"], "attn_shared_heads"),
        (&["model.attention=\"moh\"", "model.attn_shared_heads=2", "model.attn_top_k=3"], "attn_top_k"),
        (&["model.attn_router=\"query_norm\""], "attn_router"),
        (&[PARTITIONED], "attn_expert_placement"),
        (&[MOA[0], MOA[1], MOA[2], PARTITIONED, "parallel.ranks=2", "parallel.attn_tp=2"], "attn_expert_placement"),
    ];
    for (sets, key) in cases {
        let mut all: Vec<String> =
            ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"].map(String::from).into();
        all.extend(sets.iter().map(|s| s.to_string()));
        let err = worker::JobConfig::load(None, &all).map(|_| ()).expect_err(key).to_string();
        assert!(err.contains(key), "{sets:?}: {err}");
    }
}
