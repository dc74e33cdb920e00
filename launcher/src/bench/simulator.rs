//! `switchyard bench simulator`: how well the calibrated step model
//! predicts this machine. It runs what a user would: `simulate calibrate`,
//! a real `sweep` of a grid over ranks and experts (in rounds), then
//! `simulate` of the same grid, and prints measured against predicted step
//! times per point.
//!
//! A benchmark, not a test: how close the prediction lands depends on what
//! else the machine is doing, so no run passes or fails on it. On a shared
//! machine a run can land in another process's busy spell, so each point
//! keeps its best round (each round: the median step after warm-up, the
//! final checkpoint's step left out), as calibration keeps the fastest of
//! its timings: both estimate this machine's own speed.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Steps of each measured run left out as warm-up.
const WARMUP: usize = 3;

/// What `switchyard bench simulator` measures.
pub struct SimulatorBench {
    /// The job swept (default examples/sweeps/job.toml).
    pub config: PathBuf,
    /// Rounds of the measured sweep; each point keeps its best.
    pub rounds: usize,
    /// Threads of one process or MPI processes (the sweep's launcher, and
    /// the backend the prediction is told).
    pub backend: worker::Backend,
    pub json: bool,
}

/// The grid's axes: 3 rank counts x 2 expert counts (strong scaling).
const AXES: &str = "[axes]\nparallel.ranks = [1, 2, 4]\nmodel.n_experts = [4, 8]\n";

#[derive(Debug, Serialize)]
struct Row {
    point: String,
    measured_s: f64,
    predicted_s: f64,
    error: f64,
}

/// Runs the benchmark in a scratch folder and prints its table.
pub fn run(bench: SimulatorBench) -> Result<()> {
    let config = std::path::absolute(&bench.config)
        .with_context(|| format!("cannot resolve the job config path {}", bench.config.display()))?;
    let dir = std::env::temp_dir().join(format!("switchyard-bench-simulator-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = measure(&bench, &config, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    if bench.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "switchyard bench simulator: calibrated simulator vs measured on this machine, ranks on the {} backend \
         (best of {} rounds, median step after warm-up)",
        bench.backend.as_str(),
        bench.rounds
    );
    println!("| point | measured ms | predicted ms | error |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!("| {} | {:.2} | {:.2} | {:+.1}% |", r.point, r.measured_s * 1e3, r.predicted_s * 1e3, 100.0 * r.error);
    }
    let worst = rows.iter().map(|r| r.error.abs()).fold(0.0, f64::max);
    println!("worst error {:.1}%", 100.0 * worst);
    Ok(())
}

fn measure(bench: &SimulatorBench, config: &Path, dir: &Path) -> Result<Vec<Row>> {
    // The sweep's own summary and the medians below leave out the same warm-up.
    std::fs::write(dir.join("grid.toml"), format!("steps = 12\nwarmup = {WARMUP}\n{AXES}"))?;
    let job = config.to_str().context("the job config path is not UTF-8")?;
    eprintln!("bench simulator: calibrating this machine ...");
    switchyard(&["simulate", "calibrate", "--out", "cluster.toml"], dir)?;
    let mut measured: BTreeMap<String, f64> = BTreeMap::new();
    for round in 0..bench.rounds {
        eprintln!("bench simulator: measured sweep, round {}/{} ...", round + 1, bench.rounds);
        let out = format!("round{round}");
        let launcher = bench.backend.as_str();
        switchyard(&["sweep", "--config", job, "--grid", "grid.toml", "--launcher", launcher, "--out", &out], dir)?;
        for row in rows(&dir.join(&out))? {
            let id = row["id"].as_str().context("a results row without an id")?.to_string();
            if row["status"] != "ok" {
                bail!("the sweep point {id} failed: {row}");
            }
            let step = median_step(&dir.join(&out).join("points").join(&id))?;
            measured.entry(id).and_modify(|best| *best = best.min(step)).or_insert(step);
        }
    }
    eprintln!("bench simulator: predicting the same grid ...");
    let backend = format!("parallel.backend=\"{}\"", bench.backend.as_str());
    let args = [
        "simulate",
        "--config",
        job,
        "--cluster",
        "cluster.toml",
        "--grid",
        "grid.toml",
        "--set",
        &backend,
        "--out",
        "sim",
    ];
    switchyard(&args, dir)?;
    let mut out = Vec::new();
    for row in rows(&dir.join("sim"))?.iter().filter(|r| r["source"] == "predicted") {
        let point = row["id"].as_str().context("a predicted row without an id")?.to_string();
        let predicted_s = row["step_s"].as_f64().context("a predicted row without step_s")?;
        let measured_s = *measured.get(&point).with_context(|| format!("no measured run of {point}"))?;
        out.push(Row { point, measured_s, predicted_s, error: (predicted_s - measured_s) / measured_s });
    }
    Ok(out)
}

/// Runs this binary with `args` in `dir`; its output is shown only on failure.
fn switchyard(args: &[&str], dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let out = Command::new(exe).args(args).current_dir(dir).output().context("cannot start switchyard")?;
    if !out.status.success() {
        bail!(
            "switchyard {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn rows(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Median step time of one measured point's run (after warm-up, without
/// the last step, which saved the final checkpoint).
fn median_step(run_dir: &Path) -> Result<f64> {
    let steps = crate::run::step_summary::read_metrics(run_dir)?;
    if steps.len() < WARMUP + 2 {
        bail!("{} has {} steps, too few to time", run_dir.display(), steps.len());
    }
    let mut times: Vec<f64> = steps[WARMUP..steps.len() - 1].iter().map(|m| m.step_time_s).collect();
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
