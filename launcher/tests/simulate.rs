//! The simulator against this machine, as a user would check it:
//! `simulate calibrate`, a real `sweep` over ranks and experts, then
//! `simulate` of the same grid; every predicted step time must be within
//! 25% of the measured one.
//!
//! On a shared machine a run can land in another process's busy spell, so
//! the sweep is measured in rounds and each point keeps its best round
//! (each round: the median step after warm-up, the final checkpoint's step
//! left out), as calibration keeps the fastest of its timings: both
//! estimate this machine's own speed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

/// Runs `switchyard args...`, which must succeed.
fn switchyard(args: &[&str], cwd: &Path) -> Output {
    let out = common::switchyard(args, cwd);
    assert!(out.status.success(), "switchyard {args:?} failed:\n{}", common::text(&out));
    out
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("simulate", name)
}

const JOB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sweeps/job.toml");

/// 3 rank counts x 2 expert counts, global batch 16 (strong scaling).
const GRID: &str = "steps = 12\nwarmup = 3\n[axes]\nparallel.ranks = [1, 2, 4]\nmodel.n_experts = [4, 8]\n";

const ROUNDS: usize = 4;
const WARMUP: usize = 3;

/// Median step time of one measured point's run (after warm-up, without the last step).
fn median_step(run_dir: &Path) -> f64 {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut times: Vec<f64> =
        steps[WARMUP..steps.len() - 1].iter().map(|m| m["step_time_s"].as_f64().unwrap()).collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn calibrated_simulator_predicts_this_machine_within_25_percent() {
    let dir = temp_dir("validate");
    std::fs::write(dir.join("grid.toml"), GRID).unwrap();
    let started = std::time::Instant::now();
    switchyard(&["simulate", "calibrate", "--out", "cluster.toml"], &dir);
    let cluster = std::fs::read_to_string(dir.join("cluster.toml")).unwrap();
    assert!(cluster.contains("matrix_curve_core") && cluster.contains("step_overhead_us"), "{cluster}");

    // Measured: the best round of every point.
    let mut measured: BTreeMap<String, f64> = BTreeMap::new();
    for round in 0..ROUNDS {
        let out = format!("round{round}");
        switchyard(&["sweep", "--config", JOB, "--grid", "grid.toml", "--out", &out], &dir);
        for row in rows(&dir.join(&out)) {
            assert_eq!(row["status"], "ok", "{row}");
            let id = row["id"].as_str().unwrap().to_string();
            let step = median_step(&dir.join(&out).join("points").join(&id));
            measured.entry(id).and_modify(|best| *best = best.min(step)).or_insert(step);
        }
    }
    assert_eq!(measured.len(), 6);

    // Predicted: the same grid, the measured rows joined in (one file, one set of plots).
    let sim = switchyard(
        &[
            "simulate",
            "--config",
            JOB,
            "--cluster",
            "cluster.toml",
            "--grid",
            "grid.toml",
            "--out",
            "sim",
            "--measured",
            "round0",
        ],
        &dir,
    );
    let table = String::from_utf8_lossy(&sim.stdout);
    assert!(table.contains("predicted step ms"), "{table}");
    let all = rows(&dir.join("sim"));
    assert_eq!(all.iter().filter(|r| r["source"] == "measured").count(), 6);
    let csv = std::fs::read_to_string(dir.join("sim/results.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains("source") && csv.contains(",predicted,"), "{csv}");
    for plot in ["throughput_vs_parallel.ranks.svg", "scaling_efficiency.png", "step_split.svg"] {
        assert!(dir.join("sim").join(plot).exists(), "{plot} missing");
    }

    println!("calibrated simulator vs measured on this machine (best of {ROUNDS} rounds, median step after warm-up):");
    println!("| point | measured ms | predicted ms | error |");
    println!("|---|---:|---:|---:|");
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    for row in all.iter().filter(|r| r["source"] == "predicted") {
        let id = row["id"].as_str().unwrap();
        let predicted = row["step_s"].as_f64().unwrap();
        let truth = measured[id];
        let error = (predicted - truth) / truth;
        worst = worst.max(error.abs());
        println!("| {id} | {:.2} | {:.2} | {:+.1}% |", truth * 1e3, predicted * 1e3, 100.0 * error);
        if error.abs() > 0.25 {
            failures.push(id.to_string());
        }
    }
    println!("worst error {:.1}%; whole test {:.1} s", 100.0 * worst, started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "predicted step time off by more than 25% at {failures:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_cluster_files_are_named() {
    let dir = temp_dir("bad");
    let h100 = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/clusters/h100-8x-nvlink-ib400.toml");
    let text = std::fs::read_to_string(h100).unwrap().replace("latency_us = 3", "latency_us = 3\nlatnecy = 1");
    std::fs::write(dir.join("bad.toml"), text).unwrap();
    let out = common::switchyard(&["simulate", "--config", JOB, "--cluster", "bad.toml"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml") && err.contains("latnecy"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
