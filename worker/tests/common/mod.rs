//! Helpers for the training-loop tests.
#![allow(dead_code)]

mod scratch;
pub use scratch::Scratch;

use worker::api::{Observer, Resume, RunOptions, StartInfo};
use worker::metrics::StepMetrics;
use worker::JobConfig;

/// How a test runs a job in `dir`: no coordinator, no memory-check budget.
pub fn options(dir: &std::path::Path, resume: Resume, stop_at: Option<u64>) -> RunOptions {
    RunOptions { run_dir: dir.to_path_buf(), resume, stop_at, coordinator: None, expert_rows_that_fit: None }
}

/// Records every step's metrics.
#[derive(Default)]
pub struct Recorder {
    pub steps: Vec<StepMetrics>,
    pub checkpoints: Vec<(u64, String)>,
}

impl Observer for Recorder {
    fn on_start(&mut self, _info: &StartInfo) {}
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.steps.push(metrics.clone());
    }
    fn on_checkpoint(&mut self, step: u64, url: &str) {
        self.checkpoints.push((step, url.to_string()));
    }
}

/// A fresh, empty folder under the system temp dir, removed when dropped.
pub fn temp_dir(name: &str) -> Scratch {
    Scratch::fresh(std::env::temp_dir().join(format!("switchyard-test-{name}-{}", std::process::id())))
}

/// A very small MoE job that runs a step in milliseconds.
pub fn micro_job(overrides: &[&str]) -> JobConfig {
    let mut sets: Vec<String> = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden=48",
        "model.n_experts=4",
        "model.top_k=2",
        "model.seq_len=16",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.steps=20",
        "optim.warmup_steps=5",
        "checkpoint.every=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(overrides.iter().map(|s| s.to_string()));
    JobConfig::load(None, &sets).unwrap()
}

/// [`micro_job`] with global batch 8 in micro-batches of 2 on `ranks`
/// ranks, the model options `model`, then `extra`.
pub fn layout_job(model: &[&str], ranks: usize, extra: &[&str]) -> JobConfig {
    let ranks = format!("parallel.ranks={ranks}");
    let mut sets = vec!["train.global_batch_size=8", "train.micro_batch_size=2", ranks.as_str()];
    sets.extend_from_slice(model);
    sets.extend_from_slice(extra);
    micro_job(&sets)
}

/// Trains `job` in `dir` (resuming as told, stopping at `stop_at`) and
/// returns every step's metrics.
pub fn train_steps(job: &JobConfig, dir: &std::path::Path, resume: Resume, stop_at: Option<u64>) -> Vec<StepMetrics> {
    let mut rec = Recorder::default();
    worker::train::train(job, &options(dir, resume, stop_at), &mut rec).unwrap();
    rec.steps
}

/// [`train_steps`] of a fresh run in a new folder named after `name`.
pub fn fresh_run(job: &JobConfig, name: &str) -> Vec<StepMetrics> {
    train_steps(job, &temp_dir(name), Resume::No, None)
}

/// Asserts two runs' losses agree within 1e-6 (relative) step by step, and
/// that `same` (a per-step value both must share exactly) agrees too.
pub fn assert_close_by<T: PartialEq + std::fmt::Debug>(
    reference: &[StepMetrics],
    other: &[StepMetrics],
    what: &str,
    same: impl Fn(&StepMetrics) -> T,
) {
    assert_eq!(reference.len(), other.len(), "{what}: step count");
    for (a, b) in reference.iter().zip(other) {
        let rel = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(rel <= 1e-6, "{what}: step {} loss {} vs {} (relative {rel:.2e})", a.step, b.loss, a.loss);
        assert_eq!(same(a), same(b), "{what}: step {}", a.step);
    }
}
