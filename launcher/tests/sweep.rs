//! `switchyard sweep` as a user runs it: real training jobs per point, the
//! results files and plots, a failing point recorded while the others are
//! measured, and a second run that skips what is done.

use std::path::Path;
use std::process::Output;

mod common;
use common::{switchyard, text as stderr};

fn temp_dir(name: &str) -> common::Scratch {
    common::temp_dir("sweep", name)
}

/// A job that trains a step in milliseconds.
const JOB: &str = r#"
name = "sweep-test"
[model]
d_model = 32
ffn_hidden = 64
seq_len = 16
n_experts = 4
top_k = 2
[train]
global_batch_size = 8
micro_batch_size = 2
"#;

/// 2 rank counts x 3 expert counts; 1 expert with top-2 routing cannot work.
const GRID: &str = "steps = 4\nwarmup = 1\n[axes]\nparallel.ranks = [1, 2]\nmodel.n_experts = [1, 2, 4]\n";

fn sweep(dir: &Path) -> Output {
    switchyard(&["sweep", "--config", "job.toml", "--grid", "grid.toml", "--out", "out"], dir)
}

#[test]
fn sweep_measures_every_point_records_failures_and_resumes() {
    let dir = temp_dir("grid");
    std::fs::write(dir.join("job.toml"), JOB).unwrap();
    std::fs::write(dir.join("grid.toml"), GRID).unwrap();
    let first = sweep(&dir);
    let log = stderr(&first);
    assert!(first.status.success(), "{log}");
    assert!(log.contains("point 1/6 model.n_experts=1 parallel.ranks=1"), "{log}");
    assert!(log.contains("6 run, 0 skipped (already done), 2 failed"), "{log}");
    let out = dir.join("out");

    // JSON: one row per point; the impossible ones failed with the reason.
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let experts = row["values"]["model.n_experts"].as_str().unwrap();
        if experts == "1" {
            assert_eq!(row["status"], "failed", "{row}");
            let error = row["error"].as_str().unwrap();
            assert!(error.contains("top_k") && error.contains("n_experts"), "{error}");
            continue;
        }
        assert_eq!(row["status"], "ok", "{row}");
        let num = |k: &str| row[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {row}"));
        assert!(num("tokens_per_s") > 0.0, "{row}");
        let parts = num("compute_s") + num("exposed_comm_s") + num("other_s");
        assert!(
            (parts - num("step_s")).abs() <= 0.05 * num("step_s"),
            "split {parts} vs step {}: {row}",
            num("step_s")
        );
        assert!((num("exposed_comm_s") - num("alltoall_s") - num("sync_s")).abs() < 1e-9);
        assert!(num("expert_rows_max") >= num("expert_rows_mean") && num("expert_rows_mean") > 0.0, "{row}");
        assert!(num("loss_at_end").is_finite() && num("loss_at_end") > 0.0);
        assert_eq!(row["ranks"].as_u64().unwrap().to_string(), row["values"]["parallel.ranks"].as_str().unwrap());
        // Between different ranks only: one rank sends nothing.
        if row["ranks"] == 1 {
            assert_eq!(num("alltoall_bytes_per_step"), 0.0);
        } else {
            assert!(num("alltoall_bytes_per_step") > 0.0, "{row}");
        }
        assert!(num("peak_rss_process_mib") > 1.0, "{row}");
        assert!(row["peak_rss_per_rank_mib"].is_null(), "threads share one resident set: {row}");
    }

    // CSV: the axes, then the measured columns; same rows.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    for column in
        ["model.n_experts", "parallel.ranks", "status", "tokens_per_s", "step_s", "compute_s", "exposed_comm_s"]
    {
        assert!(header.contains(&column), "{column} missing: {header:?}");
    }
    for column in
        ["other_s", "alltoall_bytes_per_step", "expert_rows_max", "peak_rss_per_rank_mib", "loss_at_end", "error"]
    {
        assert!(header.contains(&column), "{column} missing: {header:?}");
    }
    assert_eq!(lines.len(), 7, "{csv}");
    assert_eq!(lines.iter().filter(|l| l.contains(",ok,")).count(), 4, "{csv}");

    // Plots: valid SVG naming the axes, and PNG.
    for (name, must) in [
        ("throughput_vs_parallel.ranks", "parallel.ranks"),
        ("throughput_vs_model.n_experts", "model.n_experts"),
        ("scaling_efficiency", "parallel.ranks"),
        ("step_split", "ms per step"),
    ] {
        let svg =
            std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap_or_else(|e| panic!("{name}.svg: {e}"));
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{name}: {}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>") && svg.contains(must), "{name}.svg lacks {must}");
        let png = std::fs::read(out.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png");
    }

    // Again: the measured points are skipped (their metrics untouched), the failed ones retried.
    let metrics = out.join("points/model.n_experts=2,parallel.ranks=2/metrics.jsonl");
    let before = (std::fs::read(&metrics).unwrap(), std::fs::metadata(&metrics).unwrap().modified().unwrap());
    let second = sweep(&dir);
    let log = stderr(&second);
    assert!(second.status.success(), "{log}");
    assert!(log.contains("2 run, 4 skipped (already done), 2 failed"), "{log}");
    assert!(log.contains("model.n_experts=2 parallel.ranks=2 ... skipped"), "{log}");
    let after = (std::fs::read(&metrics).unwrap(), std::fs::metadata(&metrics).unwrap().modified().unwrap());
    assert_eq!(before, after, "a finished point was run again");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 6);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_grid_is_named_before_any_point_runs() {
    let dir = temp_dir("bad");
    std::fs::write(dir.join("job.toml"), JOB).unwrap();
    std::fs::write(dir.join("grid.toml"), "steps = 4\n[axes]\nmodel.top_k = 2\n").unwrap();
    let out = sweep(&dir);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(log.contains("grid.toml") && log.contains("model.top_k"), "{log}");
    assert!(!dir.join("out").exists(), "nothing should be written for a bad grid");
    let _ = std::fs::remove_dir_all(&dir);
}
