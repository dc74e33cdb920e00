//! The TensorBoard event files a run writes beside metrics.jsonl, read back
//! with TensorBoard's own reader (`EventAccumulator`; ci.sh installs the
//! `tensorboard` package): every step's scalars equal the metrics.jsonl
//! rows, each layer's expert load is a histogram over expert ids, and a
//! resumed run shows every step once (the resumed attempt's file purges the
//! earlier attempt's later steps). Validation during training (`eval_every`)
//! is `switchyard eval`'s number and TensorBoard's `eval/loss`.

mod common;

use common::{switchyard, temp_dir, text, SMALL};
use std::path::Path;
use std::process::Command;

/// Reads every scalar and histogram of a run folder with TensorBoard's
/// reader: `{"scalars": {tag: [[step, value]]}, "histograms": {tag: [[step, num, [bucket counts]]]}}`.
const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "histograms": {t: [[e.step, e.histogram_value.num, list(e.histogram_value.bucket)] for e in acc.Histograms(t)]
                   for t in tags["histograms"]},
}))
"#;

fn read_events(run: &Path) -> serde_json::Value {
    let out = Command::new("python3").args(["-c", READ, run.to_str().unwrap()]).output().expect("python3 runs");
    assert!(
        out.status.success(),
        "TensorBoard's reader failed (./ci.sh installs it: pip install tensorboard): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the reader prints JSON")
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn tensorboard_shows_every_step_once_with_the_metrics_values_and_expert_load() {
    let dir = temp_dir("tensorboard", "run");
    let run = dir.join("run");
    let step8 = format!("file://{}/checkpoints/step-00000008", run.display());
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--quiet", "--run-dir", run.to_str().unwrap()];
        args.extend(SMALL);
        // Checkpoints at 4 and 8 (and where a run stops).
        args.extend(["--set", "checkpoint.every=4", "--set", "train.steps=14"]);
        args.extend(extra);
        let out = switchyard(&args, &dir);
        assert!(out.status.success(), "{}", text(&out));
    };
    // The first attempt stops at step 10; the second starts again at step
    // 9 (from the step-8 checkpoint) and runs to 14, in a new file.
    train(&["--stop-at", "10"]);
    train(&["--resume-from", &step8]);
    let files =
        std::fs::read_dir(&run).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("tfevents"));
    assert_eq!(files.count(), 2, "one event file per attempt");

    let events = read_events(&run);
    let rows = metrics(&run);
    assert_eq!(rows.len(), 14, "metrics.jsonl holds every step once");
    let loss = events["scalars"]["train/loss"].as_array().expect("train/loss scalars");
    let steps: Vec<u64> = loss.iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=14).collect::<Vec<u64>>(), "each step once, the first attempt's 9 and 10 purged");
    for (point, row) in loss.iter().zip(&rows) {
        let (tb, ours) = (point[1].as_f64().unwrap(), row["loss"].as_f64().unwrap());
        assert!((tb - ours).abs() <= 1e-6 * ours.abs(), "step {}: TensorBoard {tb}, metrics.jsonl {ours}", point[0]);
    }
    for tag in ["train/lr", "train/grad_norm", "train/tokens_per_s", "train/aux_loss", "expert_balance/layer_1"] {
        let points = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag}: {}", events["scalars"]));
        assert_eq!(points.len(), 14, "{tag}");
    }
    for layer in 0..2 {
        let tag = format!("expert_load/layer_{layer}");
        let histograms = events["histograms"][&tag].as_array().unwrap_or_else(|| panic!("no {tag}"));
        assert_eq!(histograms.len(), 14, "{tag}");
        for (h, row) in histograms.iter().zip(&rows) {
            let ours: Vec<f64> =
                row["tokens_per_expert"][layer].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
            let buckets: Vec<f64> = h[2].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
            assert_eq!(buckets, ours, "{tag} at step {}: one bucket per expert", h[0]);
            assert_eq!(h[1].as_f64().unwrap(), ours.iter().sum::<f64>());
        }
    }
}

#[test]
fn validation_during_training_is_switchyard_eval_and_shows_as_eval_loss() {
    let dir = temp_dir("tensorboard", "validation");
    let run = dir.join("run");
    let mut args = vec!["train", "--quiet", "--run-dir", run.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(["--set", "train.eval_every=6", "--set", "data.eval_source=\"builtin\""]);
    let out = switchyard(&args, &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("eval loss"), "the validation has its own line: {}", text(&out));
    let rows = metrics(&run);
    let evals: Vec<(u64, f64)> =
        rows.iter().filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [6, 12], "{evals:?}");
    // The same number as `switchyard eval` on the held-out text `data sample` writes.
    let held = dir.join("held-out.txt");
    let out = switchyard(&["data", "sample", "--out", held.to_str().unwrap()], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let checkpoints = run.join("checkpoints").display().to_string();
    let out = switchyard(&["eval", "--checkpoint", &checkpoints, "--data", held.to_str().unwrap(), "--json"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (ours, theirs) = (evals[1].1, eval["loss"].as_f64().unwrap());
    assert!((ours - theirs).abs() <= 1e-6 * theirs, "validation at step 12: {ours}, switchyard eval: {theirs}");
    let events = read_events(&run);
    let points = events["scalars"]["eval/loss"].as_array().expect("eval/loss in TensorBoard");
    assert_eq!(points.iter().map(|p| p[0].as_u64().unwrap()).collect::<Vec<_>>(), [6, 12]);
}
