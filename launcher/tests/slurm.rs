//! `switchyard slurm submit` on a REAL one-node Slurm cluster that this
//! test starts (scripts/slurm-cluster.sh: slurm-wlm + munge, DESIGN section
//! 10): a job runs to completion and its loss falls; a job cancelled
//! mid-run checkpoints on SIGTERM, and submitted again resumes and finishes.
//! One test, since both share the cluster it brings up and tears down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{text, EXE};

/// The cluster, torn down when the test ends, passing or not.
struct Cluster {
    script: PathBuf,
    state: PathBuf,
    conf: String,
}

impl Cluster {
    fn up(dir: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm-cluster.sh");
        let state = dir.join("slurm");
        let out = Command::new(&script).arg("up").arg(&state).output().unwrap_or_else(|e| {
            panic!("cannot run {}: {e}", script.display());
        });
        assert!(
            out.status.success(),
            "the Slurm cluster did not start (it needs root, slurm-wlm and munge; ./ci.sh installs them):\n{}",
            text(&out)
        );
        let conf = state.join("slurm.conf").display().to_string();
        Self { script, state, conf }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// `switchyard slurm submit` of the tiny job on 2 ranks into `run_dir`; returns the job id.
    fn submit(&self, run_dir: &Path, steps: u64) -> String {
        let out = self
            .command(EXE)
            .args(["slurm", "submit", "--ntasks-per-node", "2", "--port", "29650", "--run-dir"])
            .arg(run_dir)
            .args(["--set", &format!("train.steps={steps}"), "--set", "checkpoint.every=1000"])
            .args(["--set", "train.log_every=10"])
            .output()
            .unwrap();
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        let id = log.split_whitespace().skip_while(|w| *w != "job").nth(1).expect("submitted job <id>");
        id.to_string()
    }

    fn running(&self, id: &str) -> bool {
        let out = self.command("squeue").args(["-h", "-j", id]).output().unwrap();
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    fn wait_done(&self, id: &str) {
        let started = Instant::now();
        while self.running(id) {
            assert!(started.elapsed() < Duration::from_secs(300), "job {id} still running after 5 minutes");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("down").arg(&self.state).status();
    }
}

fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn job_output(run_dir: &Path, id: &str) -> String {
    std::fs::read_to_string(run_dir.join(format!("slurm-{id}.out"))).unwrap_or_default()
}

#[test]
fn a_submitted_job_trains_and_a_cancelled_one_resumes_when_submitted_again() {
    // Declared before the cluster, so the cluster is taken down first and
    // its daemons write nothing into the folder once it is removed.
    let dir = common::temp_dir("slurm", "cluster");
    let cluster = Cluster::up(&dir);

    // A job that runs to its end: the coordinator and both ranks finish, the loss falls.
    let run_dir = dir.join("complete");
    let id = cluster.submit(&run_dir, 30);
    cluster.wait_done(&id);
    let out = job_output(&run_dir, &id);
    assert!(out.contains("every rank finished") && out.contains("workers exited 0, coordinator 0"), "{out}");
    let steps = metrics(&run_dir);
    assert_eq!(steps.len(), 30, "{out}");
    let (first, last) = (steps[0]["loss"].as_f64().unwrap(), steps[29]["loss"].as_f64().unwrap());
    assert!(last < first - 1.0, "the loss fell from {first} to {last}");
    assert!(out.contains("checkpoint step 30 committed"), "{out}");

    // A job cancelled mid-run: SIGTERM → checkpoint of the step it reached.
    let run_dir = dir.join("cancelled");
    let id = cluster.submit(&run_dir, 150);
    let started = Instant::now();
    while metrics(&run_dir).len() < 5 {
        assert!(started.elapsed() < Duration::from_secs(180), "job {id} never trained: {}", job_output(&run_dir, &id));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cluster.command("scancel").arg(&id).status().unwrap().success());
    cluster.wait_done(&id);
    let out = job_output(&run_dir, &id);
    let reached = metrics(&run_dir).len();
    assert!(reached < 150, "the job finished before it was cancelled: {out}");
    assert!(out.contains(&format!("stopped on SIGTERM at step {reached}")), "{out}");
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{reached:08}"), "{out}");

    // Submitted again: it resumes from that checkpoint and finishes.
    let id = cluster.submit(&run_dir, 150);
    cluster.wait_done(&id);
    let out = job_output(&run_dir, &id);
    assert!(out.contains("resuming from") && out.contains(&format!("(step {reached})")), "{out}");
    assert!(out.contains("workers exited 0, coordinator 0"), "{out}");
    let steps = metrics(&run_dir);
    assert_eq!(steps.len(), 150, "{out}");
    assert_eq!(steps.last().unwrap()["step"], 150);

    // A sweep whose points are Slurm jobs: 1 and 2 ranks.
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, "steps = 4\nwarmup = 1\n[axes]\nparallel.ranks = [1, 2]\n").unwrap();
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sweeps/job.toml");
    let out = cluster
        .command(EXE)
        .args(["sweep", "--launcher", "slurm", "--config"])
        .arg(&job)
        .arg("--grid")
        .arg(&grid)
        .arg("--out")
        .arg(dir.join("sweep"))
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success() && log.contains("2 run, 0 skipped"), "{log}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sweep/results.json")).unwrap()).unwrap();
    let rows = results.as_array().expect("one row per point");
    assert_eq!(rows.len(), 2, "{results}");
    for row in rows {
        assert_eq!(row["status"], "ok", "{row}");
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
}
