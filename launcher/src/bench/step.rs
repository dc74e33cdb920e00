//! `switchyard bench step`: where a training step's time goes — compute,
//! all-to-all, gradient sync and the rest — on 1, 2, 4 ranks, for every
//! backend this binary has (threads, and MPI processes when built with
//! `--features mpi`), measured in the same run so they can be compared.
//!
//! Each row is a real `switchyard train` of the same job (default: the
//! built-in tiny job) in a scratch folder; the first steps are warm-up and
//! left out. Times are the slowest rank's, averaged over the other steps:
//! compute = the micro-batches (tokens, forward, backward) without all-to-all, other = optimizer
//! and metrics. The all-to-all column is what overlap did not hide; the two
//! after it split the whole all-to-all time (hidden or not) into waiting for
//! the last rank of the group to arrive and the transfer itself.
//!
//! `--vary KEY=V1,V2` measures every row once per value of one config key
//! (for example where MoA's attention experts live), the values taking
//! turns within each (backend, ranks) pair so a drifting machine
//! affects them alike.

use super::torch_step;
use crate::run::step_summary::{read_metrics, StepSummary};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use worker::JobConfig;

/// Steps left out of the averages (thread pools, allocations warming up).
const WARMUP_STEPS: usize = 2;

/// What `switchyard bench step` measures.
pub struct StepBench {
    pub ranks: Vec<usize>,
    pub backends: Vec<String>,
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    /// One key measured at several values (None: the job as configured).
    pub vary: Option<Vary>,
    pub steps: u64,
    /// PyTorch modes measured on the same job (empty: none).
    pub torch: Vec<String>,
    pub json: bool,
}

/// `--vary KEY=V1,V2,...`.
#[derive(Debug, Clone, PartialEq)]
pub struct Vary {
    pub key: String,
    pub values: Vec<String>,
}

impl Vary {
    /// Reads `KEY=V1,V2,...`: a key and at least one value.
    pub fn parse(text: &str) -> Result<Self> {
        let (key, values) = text
            .split_once('=')
            .with_context(|| format!("--vary {text:?}: expected KEY=V1,V2,... (e.g. parallel.attn_tp=1,2)"))?;
        let values: Vec<String> =
            values.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect();
        if key.trim().is_empty() || values.is_empty() {
            bail!("--vary {text:?}: expected KEY=V1,V2,... (a key and at least one value)");
        }
        Ok(Self { key: key.trim().to_string(), values })
    }

    /// The `--set` of one value.
    fn set(&self, value: &str) -> String {
        format!("{}={value}", self.key)
    }
}

#[derive(Debug, Serialize)]
struct Row {
    /// `KEY=VALUE` of `--vary`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    setting: Option<String>,
    backend: String,
    ranks: usize,
    step_s: f64,
    tokens_per_s: f64,
    compute_s: f64,
    alltoall_s: f64,
    alltoall_peer_wait_s: f64,
    alltoall_transfer_s: f64,
    sync_s: f64,
    other_s: f64,
    alltoall_mb_per_step: f64,
    loss_at_end: f64,
}

/// Runs every (backend, ranks) row and prints the table.
pub fn run(bench: StepBench) -> Result<()> {
    if bench.steps as usize <= WARMUP_STEPS {
        bail!("--steps must be more than the {WARMUP_STEPS} warm-up steps");
    }
    let scratch = std::env::temp_dir().join(format!("switchyard-bench-step-{}", std::process::id()));
    let settings: Vec<Option<String>> = match &bench.vary {
        Some(vary) => vary.values.iter().map(|v| Some(vary.set(v))).collect(),
        None => vec![None],
    };
    // Every setting must make a valid job before anything runs.
    for setting in settings.iter().flatten() {
        let sets: Vec<String> = bench.overrides.iter().cloned().chain([setting.clone()]).collect();
        JobConfig::load(bench.config.as_deref(), &sets).with_context(|| format!("--vary: {setting}"))?;
    }
    let mut rows = Vec::new();
    for backend in &bench.backends {
        for &ranks in &bench.ranks {
            for (i, setting) in settings.iter().enumerate() {
                let label = setting.as_deref().map_or(String::new(), |s| format!(", {s}"));
                eprintln!("bench step: {backend} backend, {ranks} rank(s){label} ...");
                let run_dir = scratch.join(format!("{backend}-{ranks}-{i}"));
                let _ = std::fs::remove_dir_all(&run_dir);
                train(&bench, backend, ranks, setting.as_deref(), &run_dir)?;
                rows.push(Row { setting: setting.clone(), ..summarise(backend, ranks, &run_dir)? });
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let job = JobConfig::load(bench.config.as_deref(), &bench.overrides)?;
    let torch = match bench.torch.is_empty() {
        true => Vec::new(),
        false => torch_step::measure(&job, &bench.torch, bench.steps - WARMUP_STEPS as u64)?,
    };
    if bench.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "switchyard": rows, "torch": torch }))?);
    } else {
        print_table(&rows, job.train.precision.as_str());
        print_peer(&rows, &torch);
    }
    Ok(())
}

/// The PyTorch rows, and how one switchyard process (the local backend
/// on one rank: the same threads) compares with each.
fn print_peer(rows: &[Row], torch: &[torch_step::TorchRow]) {
    if torch.is_empty() {
        return;
    }
    println!();
    println!("| the same job in PyTorch (one process, same threads) | step | tokens/s | switchyard local, 1 rank, against it |");
    println!("|---|---:|---:|---:|");
    let ours = rows.iter().find(|r| r.backend == "local" && r.ranks == 1).map(|r| r.tokens_per_s);
    for t in torch {
        match (t.tokens_per_s, t.step_s) {
            (Some(tps), Some(step)) => println!(
                "| {} | {:.1} ms | {tps:.0} | {} |",
                torch_step::label(&t.mode),
                step * 1e3,
                ours.map_or("(no 1-rank local row)".to_string(), |o| format!("{:.2}x", o / tps))
            ),
            _ => {
                println!("| {} | | | not measured: {} |", torch_step::label(&t.mode), t.error.as_deref().unwrap_or(""))
            }
        }
    }
}

fn train(bench: &StepBench, backend: &str, ranks: usize, setting: Option<&str>, run_dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to run the training jobs")?;
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--quiet", "--backend", backend, "--ranks", &ranks.to_string(), "--run-dir"]).arg(run_dir);
    if let Some(config) = &bench.config {
        cmd.arg("--config").arg(config);
    }
    for set in bench.overrides.iter().map(String::as_str).chain(setting) {
        cmd.args(["--set", set]);
    }
    let steps = format!("train.steps={}", bench.steps);
    cmd.args(["--set", &steps, "--set", "checkpoint.every=0", "--set", "train.log_every=1000000"]);
    let out = cmd.output().context("cannot start the training job")?;
    if !out.status.success() {
        bail!(
            "the {backend} job on {ranks} rank(s) failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn summarise(backend: &str, ranks: usize, run_dir: &Path) -> Result<Row> {
    let s = StepSummary::of(&read_metrics(run_dir)?, WARMUP_STEPS)?;
    Ok(Row {
        setting: None,
        backend: backend.into(),
        ranks,
        step_s: s.step_s,
        tokens_per_s: s.tokens_per_s,
        compute_s: s.compute_s,
        alltoall_s: s.alltoall_s,
        alltoall_peer_wait_s: s.alltoall_peer_wait_s,
        alltoall_transfer_s: s.alltoall_transfer_s,
        sync_s: s.sync_s,
        other_s: s.other_s,
        alltoall_mb_per_step: s.alltoall_bytes_per_step / 1e6,
        loss_at_end: s.loss_at_end,
    })
}

fn print_table(rows: &[Row], precision: &str) {
    println!(
        "switchyard bench step ([train] precision = {precision}; times per step: slowest rank, mean after \
         {WARMUP_STEPS} warm-up steps)"
    );
    println!();
    let varied = rows.iter().any(|r| r.setting.is_some());
    let (head, rule) = if varied { ("| setting ", "|---") } else { ("", "") };
    println!(
        "{head}| backend | ranks | step | tokens/s | compute | all-to-all | waiting for peers | transfer | grad sync | other | all-to-all MB/step |"
    );
    println!("{rule}|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for r in rows {
        let setting = r.setting.as_deref().map_or(String::new(), |s| format!("| {s} "));
        println!(
            "{setting}| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} |",
            r.backend,
            r.ranks,
            ms(r.step_s),
            r.tokens_per_s,
            ms(r.compute_s),
            ms(r.alltoall_s),
            ms(r.alltoall_peer_wait_s),
            ms(r.alltoall_transfer_s),
            ms(r.sync_s),
            ms(r.other_s),
            r.alltoall_mb_per_step
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_reads_a_key_and_its_values() {
        let vary = Vary::parse("parallel.attn_expert_placement=replicated, partitioned").unwrap();
        assert_eq!(vary.key, "parallel.attn_expert_placement");
        assert_eq!(vary.values, ["replicated", "partitioned"]);
        assert_eq!(vary.set("partitioned"), "parallel.attn_expert_placement=partitioned");
        for bad in ["parallel.attn_tp", "=1,2", "parallel.attn_tp="] {
            let err = Vary::parse(bad).unwrap_err().to_string();
            assert!(err.contains("KEY=V1,V2"), "{bad}: {err}");
        }
    }
}
