//! Overlap techniques change when communication happens, not what the
//! model computes. On 4 thread ranks with 2 micro-batches each, 20 steps:
//! - `parallel_block` (attention while the MoE rows travel) and gradient
//!   buckets: bit-identical losses and gradient norms;
//! - `chunks` and `interleave`: expert weight gradients are summed chunk by
//!   chunk, and two lanes' gradients are added at the end, so rounding
//!   differs: losses within 1e-6 relative;
//! - everything on (also with parallel blocks, attention shards, a capacity
//!   factor, an odd number of micro-batches, and balanced placement moving
//!   experts): within 1e-6.

mod common;

use common::{micro_job, options, temp_dir, Recorder};
use worker::api::Resume;
use worker::metrics::StepMetrics;
use worker::train::train;

const ALL_OFF: [&str; 4] =
    ["overlap.chunks=1", "overlap.parallel_block=false", "overlap.interleave=false", "overlap.grad_bucket_mib=0"];

fn run(name: &str, sets: &[&str]) -> Vec<StepMetrics> {
    // Threads: the switches act only when asked for (mode "auto" leaves them off).
    let mut all =
        vec!["parallel.ranks=4", "train.global_batch_size=16", "train.micro_batch_size=2", "overlap.mode=\"on\""];
    all.extend_from_slice(&ALL_OFF);
    all.extend_from_slice(sets);
    let job = micro_job(&all);
    let dir = temp_dir(name);
    let mut rec = Recorder::default();
    train(&job, &options(&dir, Resume::No, None), &mut rec).unwrap();
    assert_eq!(rec.steps.len(), 20, "{name}: steps");
    rec.steps
}

fn losses(steps: &[StepMetrics]) -> Vec<f64> {
    steps.iter().map(|m| m.loss).collect()
}

fn assert_within(reference: &[StepMetrics], other: &[StepMetrics], tolerance: f64, what: &str) {
    for (i, (a, b)) in reference.iter().zip(other).enumerate() {
        let rel = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(rel <= tolerance, "{what}: step {} loss {} vs {} (relative {rel:.2e})", i + 1, b.loss, a.loss);
    }
}

#[test]
fn parallel_block_overlap_is_bit_identical() {
    let block = "model.block=\"parallel\"";
    let off = run("ov-par-off", &[block]);
    let on = run("ov-par-on", &[block, "overlap.parallel_block=true"]);
    assert_eq!(losses(&off), losses(&on));
    assert_eq!(off.iter().map(|m| m.grad_norm).collect::<Vec<_>>(), on.iter().map(|m| m.grad_norm).collect::<Vec<_>>());
    // The rows went through the communication thread, and some of it hid.
    assert!(on.iter().all(|m| m.comm_s > 0.0) && on.iter().any(|m| m.overlap_efficiency > 0.0));
}

#[test]
fn gradient_buckets_are_bit_identical() {
    let off = run("ov-buckets-off", &[]);
    // Tiny buckets: several per backward pass.
    let on = run("ov-buckets-on", &["overlap.grad_bucket_mib=0.005"]);
    assert_eq!(losses(&off), losses(&on));
    assert_eq!(off.iter().map(|m| m.grad_norm).collect::<Vec<_>>(), on.iter().map(|m| m.grad_norm).collect::<Vec<_>>());
}

#[test]
fn chunks_and_interleaving_stay_within_1e_6() {
    let off = run("ov-ci-off", &[]);
    let chunks = run("ov-chunks", &["overlap.chunks=3"]);
    assert_within(&off, &chunks, 1e-6, "chunks=3");
    let interleave = run("ov-interleave", &["overlap.interleave=true"]);
    assert_within(&off, &interleave, 1e-6, "interleave");
    assert!(off[19].loss < off[0].loss - 0.3, "the job learns: {:?}", losses(&off));
}

#[test]
fn everything_on_stays_within_1e_6() {
    let all_on =
        ["overlap.chunks=2", "overlap.parallel_block=true", "overlap.interleave=true", "overlap.grad_bucket_mib=0.005"];
    for (name, layout) in [
        ("plain", vec![]),
        ("parallel-blocks", vec!["model.block=\"parallel\""]),
        ("attention-shards", vec!["parallel.attn_tp=2"]),
        // Capacity drops are decided at routing, before any chunking.
        ("capacity", vec!["model.capacity_factor=1.0"]),
        // 3 micro-batches per rank: one alone, then a pair.
        ("odd-micro-batches", vec!["train.global_batch_size=24"]),
    ] {
        let off = run(&format!("ov-all-off-{name}"), &layout);
        let mut sets = layout.clone();
        sets.extend_from_slice(&all_on);
        let on = run(&format!("ov-all-on-{name}"), &sets);
        assert_within(&off, &on, 1e-6, name);
        for m in &on {
            assert!(m.exposed_comm_s <= m.comm_s + 1e-9, "{name}: exposed {} > total {}", m.exposed_comm_s, m.comm_s);
            assert!((0.0..=1.0).contains(&m.overlap_efficiency), "{name}: efficiency {}", m.overlap_efficiency);
        }
        // All off: every transfer is waited for where it starts.
        assert!(
            off.iter().all(|m| m.overlap_efficiency < 0.05),
            "{name}: {:?}",
            off.iter().map(|m| m.overlap_efficiency).collect::<Vec<_>>()
        );
    }
}

#[test]
fn balanced_placement_moves_experts_under_overlap() {
    // Re-planning every 4 steps moves and replicates experts; the second
    // lane's gradient buffers must follow the new placement.
    let balanced = [
        "model.aux_loss_coef=0.0",
        "parallel.placement=\"balanced\"",
        "parallel.rebalance_every=4",
        "parallel.redundant_experts=4",
    ];
    let off = run("ov-balanced-off", &balanced);
    let mut sets = balanced.to_vec();
    sets.extend_from_slice(&["overlap.chunks=2", "overlap.parallel_block=true", "overlap.interleave=true"]);
    let on = run("ov-balanced-on", &sets);
    assert_within(&off, &on, 1e-6, "balanced placement");
}
