//! What the binary's test suites share: running `switchyard`, reading its
//! output, scratch folders and a job small enough to train in a second.
#![allow(dead_code)]

#[path = "../../../worker/tests/common/scratch.rs"]
mod scratch;
pub use scratch::Scratch;

pub mod processes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The binary under test.
pub const EXE: &str = env!("CARGO_BIN_EXE_switchyard");

/// The repository's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `switchyard args...` in `cwd` to its end.
pub fn switchyard(args: &[&str], cwd: &Path) -> Output {
    Command::new(EXE).args(args).current_dir(cwd).output().expect("binary runs")
}

/// Everything a run printed, stdout then stderr.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A fresh, empty folder `switchyard-<suite>-<name>-<pid>-<n>`, unique per
/// call (tests of a suite run in parallel), removed when dropped.
pub fn temp_dir(suite: &str, name: &str) -> Scratch {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("switchyard-{suite}-{name}-{}-{n}", std::process::id()));
    Scratch::fresh(dir)
}

/// `--set` flags for a job small enough to train in about a second
/// (12 steps, checkpoints at 6 and 12).
pub const SMALL: &[&str] = &[
    "--set",
    "model.d_model=32",
    "--set",
    "model.ffn_hidden=64",
    "--set",
    "model.seq_len=16",
    "--set",
    "train.steps=12",
    "--set",
    "train.log_every=4",
    "--set",
    "checkpoint.every=6",
];

/// The YAML documents of `yaml` as JSON values, sorted by kind and name
/// (PyYAML comes with kubernetes-validate, which ci.sh installs).
pub fn parse_yaml(yaml: &str) -> Vec<serde_json::Value> {
    let dir = temp_dir("yaml", "parse");
    let file = dir.join("docs.yaml");
    std::fs::write(&file, yaml).unwrap();
    let script = "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let out = Command::new("python3").args(["-c", script]).arg(&file).output().expect("python3 runs");
    assert!(out.status.success(), "PyYAML (pip install kubernetes-validate) cannot read it: {}", text(&out));
    let mut docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    docs.sort_by_key(|d| (d["kind"].to_string(), d["metadata"]["name"].to_string()));
    docs
}
