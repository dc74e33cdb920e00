//! `[train] precision = "bf16"`: the micro job's losses in bf16 against
//! fp32 (bf16 ran, and stays close), the same in bf16 on 1, 2 and 4 ranks
//! (layout parity within a stated tolerance), and a bf16 run resumed on its
//! layout continues bit-exactly. Precision is process-wide, so the cases
//! take turns (and live in this test binary alone).

mod common;

use common::{fresh_run, layout_job, micro_job, temp_dir, train_steps};
use std::sync::Mutex;
use worker::metrics::StepMetrics;
use worker::Resume;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn losses(steps: &[StepMetrics]) -> Vec<f64> {
    steps.iter().map(|s| s.loss).collect()
}

/// Largest relative difference of two runs' losses, step by step.
fn worst(a: &[StepMetrics], b: &[StepMetrics]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x.loss - y.loss).abs() / x.loss).fold(0.0, f64::max)
}

#[test]
fn bf16_losses_follow_fp32_closely_but_not_exactly() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fp32 = fresh_run(&micro_job(&["train.precision=\"fp32\""]), "bf16-vs-fp32-a");
    let bf16 = fresh_run(&micro_job(&["train.precision=\"bf16\""]), "bf16-vs-fp32-b");
    let rel = worst(&fp32, &bf16);
    println!("bf16 against fp32, worst relative loss difference over 20 steps: {rel:.2e}");
    assert!(rel > 0.0, "bf16 changed no loss: did the products run in bf16?");
    // Over 20 steps of the micro job: within 0.2% of fp32 at every step.
    assert!(rel < 2e-3, "bf16 {:?} against fp32 {:?}: {rel:e}", losses(&bf16), losses(&fp32));
    assert!(bf16.last().unwrap().loss < bf16[0].loss - 0.1, "bf16 training learns: {:?}", losses(&bf16));
}

#[test]
fn bf16_on_2_and_4_ranks_matches_1_rank_within_1e_4() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bf16 = ["train.precision=\"bf16\""];
    let one = fresh_run(&layout_job(&[], 1, &bf16), "bf16-layout-1");
    for ranks in [2, 4] {
        let other = fresh_run(&layout_job(&[], ranks, &bf16), &format!("bf16-layout-{ranks}"));
        let rel = worst(&one, &other);
        println!("bf16 on {ranks} ranks against 1 rank, worst relative loss difference: {rel:.2e}");
        // Layouts differ in which rows share a product block, and with
        // several ranks expert outputs and gradients travel in bf16.
        assert!(rel < 1e-4, "{ranks} ranks in bf16: {:?} against 1 rank {:?} ({rel:e})", losses(&other), losses(&one));
    }
}

#[test]
fn bf16_rows_travel_in_half_the_bytes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bytes = |precision: &str| {
        let job = layout_job(&[], 2, &[&format!("train.precision=\"{precision}\""), "train.steps=1"]);
        fresh_run(&job, &format!("bf16-bytes-{precision}"))[0].alltoall_bytes_sent as f64
    };
    let (fp32, bf16) = (bytes("fp32"), bytes("bf16"));
    // The same first step (a router tie broken otherwise by the bf16
    // attention could move a row or two).
    let ratio = bf16 / fp32;
    assert!((ratio - 0.5).abs() < 0.02, "bf16 sent {bf16} bytes, fp32 {fp32}: {ratio}");
}

#[test]
fn a_bf16_run_resumes_bit_exactly() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let job = micro_job(&["train.precision=\"bf16\"", "parallel.ranks=2"]);
    let whole = fresh_run(&job, "bf16-whole");
    let dir = temp_dir("bf16-resumed");
    let first = train_steps(&job, &dir, Resume::No, Some(10));
    let rest = train_steps(&job, &dir, Resume::Latest, None);
    let resumed: Vec<u64> = first.iter().chain(&rest).map(|s| s.loss.to_bits()).collect();
    let straight: Vec<u64> = whole.iter().map(|s| s.loss.to_bits()).collect();
    assert_eq!(resumed, straight, "bf16 losses after a resume differ from the run without one");
}
