//! The simulator's workflow as a user runs it: `simulate calibrate`, a real
//! `sweep` over ranks and experts, then `simulate` of the same grid with
//! the measured rows joined in. These tests check what the commands write;
//! how close the prediction lands is a measurement of the machine, printed
//! by `switchyard bench simulator` (docs/scaling.md), never a test.

use std::path::Path;
use std::process::Output;

mod common;

/// Runs `switchyard args...`, which must succeed.
fn switchyard(args: &[&str], cwd: &Path) -> Output {
    let out = common::switchyard(args, cwd);
    assert!(out.status.success(), "switchyard {args:?} failed:\n{}", common::text(&out));
    out
}

fn temp_dir(name: &str) -> common::Scratch {
    common::temp_dir("simulate", name)
}

const JOB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sweeps/job.toml");

/// 3 rank counts x 2 expert counts, global batch 16 (strong scaling).
const GRID: &str = "steps = 12\nwarmup = 3\n[axes]\nparallel.ranks = [1, 2, 4]\nmodel.n_experts = [4, 8]\n";

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn calibrate_sweep_and_simulate_write_one_comparable_set_of_results() {
    let dir = temp_dir("validate");
    std::fs::write(dir.join("grid.toml"), GRID).unwrap();
    switchyard(&["simulate", "calibrate", "--out", "cluster.toml"], &dir);
    let cluster = std::fs::read_to_string(dir.join("cluster.toml")).unwrap();
    assert!(cluster.contains("matrix_curve_core") && cluster.contains("step_overhead_us"), "{cluster}");

    switchyard(&["sweep", "--config", JOB, "--grid", "grid.toml", "--out", "measured"], &dir);
    let measured: Vec<String> = rows(&dir.join("measured"))
        .iter()
        .map(|row| {
            assert_eq!(row["status"], "ok", "{row}");
            row["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(measured.len(), 6);

    // Predicted: the same grid, the measured rows joined in (one file, one set of plots).
    let args = ["simulate", "--config", JOB, "--cluster", "cluster.toml", "--grid", "grid.toml", "--out", "sim"];
    let sim = switchyard(&[&args[..], &["--measured", "measured"]].concat(), &dir);
    let table = String::from_utf8_lossy(&sim.stdout);
    assert!(table.contains("predicted step ms"), "{table}");
    let all = rows(&dir.join("sim"));
    assert_eq!(all.iter().filter(|r| r["source"] == "measured").count(), 6);
    let predicted: Vec<&serde_json::Value> = all.iter().filter(|r| r["source"] == "predicted").collect();
    assert_eq!(predicted.len(), 6);
    for row in predicted {
        // Every measured point has its prediction, a positive finite time.
        assert!(measured.iter().any(|id| row["id"] == id.as_str()), "{row}");
        let step = row["step_s"].as_f64().unwrap();
        assert!(step.is_finite() && step > 0.0, "{row}");
    }
    let csv = std::fs::read_to_string(dir.join("sim/results.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains("source") && csv.contains(",predicted,"), "{csv}");
    for plot in ["throughput_vs_parallel.ranks.svg", "scaling_efficiency.png", "step_split.svg"] {
        assert!(dir.join("sim").join(plot).exists(), "{plot} missing");
    }
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
