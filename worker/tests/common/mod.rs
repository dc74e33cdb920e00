//! Helpers for the training-loop tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use worker::api::{Observer, StartInfo};
use worker::metrics::StepMetrics;
use worker::JobConfig;

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
    let dir = std::env::temp_dir().join(format!("switchyard-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A scratch folder removed when the test is done with it; kept when the
/// test panicked, so what it left can be looked at.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
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
