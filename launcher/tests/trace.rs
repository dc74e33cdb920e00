//! `train --trace FILE`: a Chrome trace (JSON) of every rank's phases,
//! one process track per rank and a thread track per thread, with the
//! communication threads' operations (overlap on) and the checkpoint copy
//! and upload.

mod common;

use common::{switchyard, temp_dir, text, SMALL};
use std::collections::{BTreeMap, BTreeSet};

/// The phases every rank's track must hold.
const PHASES: [&str; 10] = [
    "step",
    "forward",
    "backward",
    "dispatch",
    "expert compute",
    "combine",
    "gradient all-reduce",
    "optimizer",
    "checkpoint copy",
    "comm thread",
];

/// Per process track (`pid`): the names of its complete events, and the
/// tracks' names from the metadata events.
fn tracks(trace: &serde_json::Value) -> (BTreeMap<u64, BTreeSet<String>>, BTreeMap<u64, String>) {
    let events = trace["traceEvents"].as_array().expect("a traceEvents array");
    let (mut phases, mut names) = (BTreeMap::<u64, BTreeSet<String>>::new(), BTreeMap::new());
    for e in events {
        let pid = e["pid"].as_u64().expect("every event has a pid");
        match e["ph"].as_str() {
            Some("X") => {
                assert!(e["ts"].as_f64().is_some() && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
                assert!(e["tid"].as_u64().is_some(), "{e}");
                phases.entry(pid).or_default().insert(e["name"].as_str().unwrap().to_string());
            }
            Some("M") if e["name"] == "process_name" => {
                names.insert(pid, e["args"]["name"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    (phases, names)
}

#[test]
fn the_trace_holds_every_phase_of_every_rank() {
    let dir = temp_dir("trace", "local");
    let (run, file) = (dir.join("run"), dir.join("trace.json"));
    let mut args = vec!["train", "--quiet", "--ranks", "4", "--run-dir", run.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(["--set", "train.steps=4", "--set", "checkpoint.every=2", "--set", "overlap.mode=\"on\""]);
    args.extend(["--trace", file.to_str().unwrap()]);
    let out = switchyard(&args, &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("trace.json"), "the run says where the trace is: {}", text(&out));
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let (phases, names) = tracks(&trace);
    for rank in 0..4u64 {
        let have = phases.get(&rank).unwrap_or_else(|| panic!("no track for rank {rank}: {names:?}"));
        for phase in PHASES {
            assert!(have.contains(phase), "rank {rank} has no {phase:?}: {have:?}");
        }
        assert_eq!(names[&rank], format!("rank {rank}"));
    }
}

#[test]
fn trace_without_a_file_goes_into_the_run_folder_which_the_dashboard_links() {
    let dir = temp_dir("trace", "run-folder");
    let run = dir.join("run");
    let mut args = vec!["train", "--quiet", "--ranks", "2", "--run-dir", run.to_str().unwrap(), "--trace"];
    args.extend(SMALL);
    args.extend(["--set", "train.steps=3"]);
    let out = switchyard(&args, &dir);
    assert!(out.status.success(), "{}", text(&out));
    let file = run.join("trace.json");
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let (phases, _) = tracks(&trace);
    assert!((0..2u64).all(|r| phases.get(&r).is_some_and(|p| p.contains("step"))), "{phases:?}");
    // The folder's report links it by its file URL.
    let report = dir.join("report.html");
    let out = switchyard(&["report", "--run-dir", run.to_str().unwrap(), "--out", report.to_str().unwrap()], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let html = std::fs::read_to_string(&report).unwrap();
    let link = format!("\"trace\":\"file://{}\"", std::path::absolute(&file).unwrap().display());
    assert!(html.contains(&link), "the report links {link}");
}
