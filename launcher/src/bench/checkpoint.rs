//! `switchyard bench checkpoint`: what checkpoints cost, per store URL.
//!
//! - save bandwidth: one rank's full shard (weights and both AdamW
//!   moments) written the way training writes it (safetensors encoding,
//!   checksums, multipart upload), against a plain object_store put of the
//!   same number of bytes to the same store, measured in the same run;
//! - stall: a real `switchyard train` (coordinator, background uploads)
//!   checkpointing every few steps: the time a save step spends on the
//!   checkpoint, as a share of a step without one;
//! - resume: reading, checksumming and placing a committed step back into
//!   a training state.
//!
//! Each timing is the best of `--rounds`.

use anyhow::{bail, Context, Result};
use checkpoint::CheckpointStore;
use layout::PlacementPlan;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use worker::metrics::StepMetrics;
use worker::state::{write_snapshot, ShardWrites, TrainState};
use worker::JobConfig;

/// What `switchyard bench checkpoint` measures.
pub struct CheckpointBench {
    pub urls: Vec<String>,
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub rounds: usize,
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    url: String,
    shard_mib: f64,
    save_mib_per_s: f64,
    raw_put_mib_per_s: f64,
    save_vs_raw: f64,
    stall_per_save_s: f64,
    step_s: f64,
    stall_share: f64,
    resume_s: f64,
}

/// Steps of the training run that measures the stall, and its save interval.
const STALL_STEPS: u64 = 24;
const STALL_EVERY: u64 = 6;

pub fn run(bench: CheckpointBench) -> Result<()> {
    let job = JobConfig::load(bench.config.as_deref(), &bench.overrides)?;
    let scratch = std::env::temp_dir().join(format!("switchyard-bench-checkpoint-{}", std::process::id()));
    let urls =
        if bench.urls.is_empty() { vec![scratch.join("store").display().to_string()] } else { bench.urls.clone() };
    let mut rows = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        eprintln!("bench checkpoint: {url} ...");
        rows.push(measure(&bench, &job, url, &scratch.join(format!("run-{i}")))?);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if bench.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&job, &rows);
    }
    Ok(())
}

fn measure(bench: &CheckpointBench, job: &JobConfig, url: &str, run_dir: &Path) -> Result<Row> {
    let store = CheckpointStore::open_with(url, &job.checkpoint.store_options())?;
    if let Some(step) = store.committed_steps()?.first() {
        bail!("{url} already holds checkpoints (step {step}): give the benchmark an empty prefix");
    }
    let plan = PlacementPlan::contiguous(job.model.n_layers, job.model.n_experts, 1);
    let state = TrainState::fresh(job, &plan, None, 0);
    let tensors = state.shard_tensors(job, ShardWrites::ALL);
    let refs: Vec<_> = tensors.iter().map(|t| t.as_ref()).collect();
    let raw: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().flat_map(|x| x.to_le_bytes())).collect();
    let (mut save_s, mut raw_s, mut shard_bytes) = (f64::INFINITY, f64::INFINITY, 0u64);
    let mut raw_objects = Vec::new();
    for round in 0..bench.rounds as u64 {
        let started = Instant::now();
        let report = write_snapshot(&store, 1 + round, 0, &refs)?.context("a full model has tensors")?;
        save_s = save_s.min(started.elapsed().as_secs_f64());
        shard_bytes = report.size_bytes;
        // The same number of bytes in one plain put.
        let mut bytes = raw.clone();
        bytes.resize(shard_bytes as usize, 0);
        let rel = format!("bench-raw/object-{round}");
        let started = Instant::now();
        store.put_object(&rel, bytes)?;
        raw_s = raw_s.min(started.elapsed().as_secs_f64());
        raw_objects.push(rel);
    }
    // Resume: commit the last round's shard, then load it as a resumed rank does.
    let last = bench.rounds as u64;
    let mut manifest = state.manifest(job, &job.parallel_dims()?, &plan, Vec::new());
    manifest.step = last;
    let report = write_snapshot(&store, last, 0, &refs)?.context("a full model has tensors")?;
    manifest.add_shard(report);
    store.commit(&manifest)?;
    let mut resume_s = f64::INFINITY;
    for _ in 0..bench.rounds {
        let started = Instant::now();
        let loaded = TrainState::load(&store, last, job, (&plan, None), 0)?;
        resume_s = resume_s.min(started.elapsed().as_secs_f64());
        if loaded.weights.tensors()[0].1 != state.weights.tensors()[0].1 {
            bail!("the resumed state differs from the saved one: the checkpoint path is broken");
        }
    }
    store.delete_objects(&raw_objects)?;
    store.prune(0)?;
    store.cleanup_uncommitted()?;
    // `latest` names a deleted step now; remove it so the prefix is empty again.
    store.delete_objects(&["latest".to_string()])?;
    store.prune(0)?;

    let (stall_per_save_s, step_s) = training_stall(bench, url, run_dir)?;
    let mib = shard_bytes as f64 / (1u64 << 20) as f64;
    Ok(Row {
        url: store.url().to_string(),
        shard_mib: mib,
        save_mib_per_s: mib / save_s,
        raw_put_mib_per_s: mib / raw_s,
        save_vs_raw: raw_s / save_s,
        stall_per_save_s,
        step_s,
        stall_share: stall_per_save_s / step_s,
        resume_s,
    })
}

/// A real training run checkpointing to `url`: mean checkpoint time of a
/// save step, and the median time of the steps without a save.
fn training_stall(bench: &CheckpointBench, url: &str, run_dir: &Path) -> Result<(f64, f64)> {
    let exe = std::env::current_exe().context("cannot find this program to run the training job")?;
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--quiet", "--run-dir"]).arg(run_dir);
    if let Some(config) = &bench.config {
        cmd.arg("--config").arg(config);
    }
    for set in &bench.overrides {
        cmd.args(["--set", set]);
    }
    let sets = [
        format!("train.steps={STALL_STEPS}"),
        format!("checkpoint.every={STALL_EVERY}"),
        format!("checkpoint.url={url}/bench-train"),
        "checkpoint.keep_last=1".to_string(),
        "train.log_every=1000000".to_string(),
    ];
    for set in &sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().context("cannot start the training job")?;
    if !out.status.success() {
        bail!(
            "the training job checkpointing to {url} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let steps: Vec<StepMetrics> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    // Step 1 warms up; the last save waits for its commit (the job's end).
    let saves: Vec<f64> =
        steps.iter().filter(|m| m.step % STALL_EVERY == 0 && m.step < STALL_STEPS).map(|m| m.checkpoint_s).collect();
    let mut plain: Vec<f64> =
        steps.iter().filter(|m| m.step > 1 && m.step % STALL_EVERY != 0).map(|m| m.step_time_s).collect();
    plain.sort_by(f64::total_cmp);
    let stall = saves.iter().sum::<f64>() / saves.len().max(1) as f64;
    let median = plain.get(plain.len() / 2).copied().unwrap_or(f64::NAN);
    let trained = CheckpointStore::open_with(&format!("{url}/bench-train"), &Default::default())?;
    trained.prune(0)?;
    trained.delete_objects(&["latest".to_string()])?;
    trained.prune(0)?;
    Ok((stall, median))
}

fn print_table(job: &JobConfig, rows: &[Row]) {
    println!(
        "switchyard bench checkpoint: job {:?}, {} params; one rank's full shard (weights + AdamW moments)",
        job.name,
        job.model.num_params()
    );
    println!();
    println!("| store | shard | save (shard write) | plain put, same bytes | save / put | stall per save | step without save | stall / step | resume (load + verify) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} MiB | {:.0} MiB/s | {:.0} MiB/s | {:.2}x | {:.1} ms | {:.1} ms | {:.1}% | {:.3} s |",
            r.url,
            r.shard_mib,
            r.save_mib_per_s,
            r.raw_put_mib_per_s,
            r.save_vs_raw,
            r.stall_per_save_s * 1e3,
            r.step_s * 1e3,
            r.stall_share * 100.0,
            r.resume_s
        );
    }
}
