//! The dashboard: the page a running job's coordinator serves at `/` and
//! the history it draws (`/api/history`), then the same from the run folder
//! (`switchyard dashboard --run-dir`, `switchyard report`), and a folder
//! with a line cut short; and in a real browser (headless Chromium) the
//! live page of a 4-rank job and, with MPI, of a job whose rank is killed
//! and restarted, then of its folder after the run, read back from the DOM
//! its script drew, with screenshots under target/test-output/dashboard/.

mod common;

use common::{temp_dir, text, EXE, SMALL};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` on `addr`: the response body.
fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    // One write: a server may answer (and close) as soon as the head is in.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body.to_string()
}

/// Reads lines of `reader` until one holds `marker`; returns the address
/// after `http://` in it.
fn address_after(reader: &mut impl BufRead, marker: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the output ended before {marker:?}");
        if let Some(at) = line.find(marker) {
            let rest = &line[at + marker.len()..];
            return rest.split('/').next().unwrap().to_string();
        }
    }
}

/// A 4-rank job in `run` with `extra` arguments (after the small model's),
/// and its dashboard's address (from the banner on stderr, which is then
/// drained). `SWITCHYARD_TEST_TAG` = `tag` marks its processes.
fn start_job(run: &std::path::Path, extra: &[&str], tag: &str) -> (std::process::Child, String) {
    let mut args = vec!["train", "--quiet", "--ranks", "4", "--run-dir", run.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(extra);
    let mut child = Command::new(EXE)
        .args(&args)
        .env("SWITCHYARD_TEST_TAG", tag)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = address_after(&mut stderr, "dashboard http://");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, addr)
}

#[test]
fn a_running_job_serves_its_dashboard_and_the_folder_serves_it_after() {
    let dir = temp_dir("dashboard", "live");
    let run = dir.join("run");
    let (mut child, addr) = start_job(&run, &["--set", "train.steps=300", "--set", "checkpoint.every=0"], "");
    let page = get(&addr, "/");
    assert!(page.contains("<canvas id=\"loss\"") && page.contains("api/history"), "the page: {page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "nothing loaded from the internet");
    let started = Instant::now();
    let history = loop {
        let history: serde_json::Value = serde_json::from_str(&get(&addr, "/api/history")).unwrap();
        if history["points"].as_array().unwrap().len() >= 20 {
            break history;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "20 steps in 2 minutes: {history}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let points = history["points"].as_array().unwrap();
    for p in points {
        assert!(p["loss"].as_f64().unwrap() > 0.0 && p["tokens_per_s"].as_f64().unwrap() > 0.0, "{p}");
        let layers = p["tokens_per_expert"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "a row of loads per layer: {p}");
        assert!(layers.iter().all(|l| l.as_array().unwrap().len() == 8), "every expert of every layer: {p}");
        assert_eq!(p["per_rank"].as_array().unwrap().len(), 4, "the step split of every rank: {p}");
        // Each rank's all-to-all split: waiting for the last peer + transfer.
        for r in p["per_rank"].as_array().unwrap() {
            let (wait, transfer) = (r["alltoall_peer_wait_s"].as_f64(), r["alltoall_transfer_s"].as_f64());
            assert!(wait.is_some_and(|w| w >= 0.0) && transfer.is_some_and(|t| t >= 0.0), "{r}");
        }
    }
    let ranks = history["status"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    assert!(ranks.iter().all(|r| r["health"] == "healthy"), "{ranks:?}");
    let events = history["events"].as_array().unwrap();
    let attempt = events.iter().find(|e| e["event"] == "attempt").expect("the attempt is an event");
    assert_eq!((attempt["restart"].as_u64(), attempt["world"].as_u64()), (Some(0), Some(4)), "{attempt}");
    let plan = events.iter().find(|e| e["event"] == "placement").expect("the first step's plan");
    assert_eq!(plan["reason"], "start");
    assert_eq!(plan["ep_ranks"], serde_json::json!([[0], [1], [2], [3]]), "experts over 4 ranks: {plan}");
    let owners = plan["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "a plan per layer");
    assert!(owners.iter().all(|l| l.as_array().unwrap().len() == 8), "every expert placed: {plan}");
    let status = child.wait().unwrap();
    assert!(status.success());

    // After the run: the folder's report and its server hold every step.
    let report = dir.join("report.html");
    let out =
        Command::new(EXE).args(["report", "--run-dir", run.to_str().unwrap(), "--out"]).arg(&report).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let html = std::fs::read_to_string(&report).unwrap();
    let data = html.split("window.SWITCHYARD_DATA = ").nth(1).expect("the data inside the page");
    let data: serde_json::Value = serde_json::Deserializer::from_str(data).into_iter().next().unwrap().unwrap();
    assert_eq!(data["points"].as_array().unwrap().len(), 300, "every step of the run");
    let mut server = Command::new(EXE)
        .args(["dashboard", "--run-dir", run.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = address_after(&mut BufReader::new(server.stdout.take().unwrap()), "http://");
    let served: serde_json::Value = serde_json::from_str(&get(&addr, "/api/history")).unwrap();
    assert_eq!(served["points"], data["points"]);
    assert!(get(&addr, "/").contains("<canvas id=\"loss\""));
    server.kill().unwrap();
    let _ = server.wait();
}

#[test]
fn a_cut_line_or_no_metrics_is_said_in_the_terminal_and_on_the_page() {
    let dir = temp_dir("dashboard", "bad");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\":1,\"loss\":5.0}\n{\"step\":2,\"lo").unwrap();
    let report = dir.join("report.html");
    let out =
        Command::new(EXE).args(["report", "--run-dir", run.to_str().unwrap(), "--out"]).arg(&report).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("metrics.jsonl") && text(&out).contains("line 2"), "{}", text(&out));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("line 2 is not a step"), "the page says it too");
    let missing = dir.join("nothing-here");
    let out = Command::new(EXE)
        .args(["report", "--run-dir", missing.to_str().unwrap(), "--out"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        text(&out).contains("is nothing-here a run folder") || text(&out).contains("a run folder"),
        "{}",
        text(&out)
    );
}

/// Debian's Chromium, headless (./ci.sh installs it).
fn chromium(args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=6000"])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("the dashboard's browser test needs chromium ({e}): apt-get install chromium; ./ci.sh does")
        });
    assert!(out.status.success(), "chromium failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number in `name="N"` of the element whose markup starts at `at`.
fn attribute(dom: &str, element: &str, name: &str) -> Vec<u64> {
    dom.match_indices(element)
        .filter_map(|(at, _)| {
            let tag = &dom[at..at + dom[at..].find('>')?];
            let value = tag.split(&format!("{name}=\"")).nth(1)?.split('"').next()?;
            value.parse().ok()
        })
        .collect()
}

/// The history once `enough` says so (at most 2 minutes).
fn history_when(addr: &str, what: &str, enough: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let history: serde_json::Value = serde_json::from_str(&get(addr, "/api/history")).unwrap();
        if enough(&history) {
            return history;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{what} in 2 minutes: {history}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn count(history: &serde_json::Value, key: &str, kind: &str) -> usize {
    history[key].as_array().unwrap().iter().filter(|e| kind.is_empty() || e["event"] == kind).count()
}

/// The page at `url` as the browser's script left it, and a screenshot of
/// it as `name` under target/test-output/dashboard/.
fn browse(url: &str, name: &str) -> String {
    let dom = chromium(&["--dump-dom", url]);
    let shots = common::repo().join("target/test-output/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join(name);
    chromium(&["--window-size=1300,1900", &format!("--screenshot={}", shot.display()), url]);
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "a screenshot at {}", shot.display());
    dom
}

/// What the page drew of a 4-rank job of 2 layers of 8 experts: the loss
/// chart, a heatmap cell per expert and step, the step split and plan.
fn assert_drawn(dom: &str, min_points: u64) {
    let drawn = attribute(dom, "<body", "data-points");
    assert!(drawn.first().is_some_and(|&n| n >= min_points), "the page drew {min_points} steps: {drawn:?}");
    let loss = attribute(dom, "<canvas id=\"loss\"", "data-points");
    assert!(loss.first().is_some_and(|&n| n >= min_points), "the loss chart has its points: {loss:?}");
    let cells = attribute(dom, "<canvas class=\"heatmap\"", "data-cells");
    let experts = attribute(dom, "<canvas class=\"heatmap\"", "data-experts");
    assert_eq!(cells.len(), 2, "a heatmap per layer: {dom}");
    assert_eq!(experts, [8, 8], "every expert of every layer");
    assert!(cells.iter().all(|&c| c >= min_points * 8), "a cell per expert and step: {cells:?}");
    assert_eq!(attribute(dom, "<canvas id=\"split\"", "data-ranks"), [4], "the step split of every rank");
    assert_eq!(attribute(dom, "<canvas id=\"plan\"", "data-experts"), [8], "the plan shows every expert");
    assert_eq!(attribute(dom, "<canvas id=\"plan\"", "data-places"), [4], "on every rank");
    let held = attribute(dom, "<canvas id=\"plan\"", "data-held");
    assert!(held.first().is_some_and(|&n| n >= 8), "each expert on a rank at least: {held:?}");
}

#[test]
fn a_browser_draws_the_live_page_of_a_4_rank_job() {
    let dir = temp_dir("dashboard", "browser");
    let run = dir.join("run");
    let job = ["--trace", "--set", "train.steps=1000000", "--set", "checkpoint.every=5"];
    let (mut child, addr) = start_job(&run, &job, "");
    history_when(&addr, "20 steps and a commit", |h| {
        count(h, "points", "") >= 20 && count(h, "events", "checkpoint") >= 1
    });
    let dom = browse(&format!("http://{addr}/"), "live-4-ranks.png");
    // The timeline of the last steps, served live while the job runs.
    let trace: serde_json::Value = serde_json::from_str(&get(&addr, "/trace.json")).expect("the trace is JSON");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    assert_drawn(&dom, 20);
    assert_eq!(dom.matches("<td>healthy</td>").count(), 4, "every rank's health: {dom}");
    assert!(dom.contains("ranks 4/4"), "the summary line");
    assert_eq!(attribute(&dom, "<div class=\"card\" id=\"health\"", "data-restarts"), [0]);
    let commits = attribute(&dom, "<div class=\"list\" id=\"commits\"", "data-commits");
    assert!(commits.first().is_some_and(|&n| n >= 1), "the checkpoint timeline: {commits:?}");
    assert!(dom.contains("committed: ") && dom.contains("s stall"), "a commit with its stall: {dom}");
    assert!(dom.contains("<a id=\"trace\" href=\"trace.json\""), "the page links the trace: {dom}");
    let steps: std::collections::BTreeSet<u64> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "step")
        .map(|e| e["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..4).collect(), "the live trace holds the steps of every rank");
}

/// A 4-rank MPI job with `--max-restarts 1`: the live page before rank 1
/// is killed, the page after the restart (the same address), and the
/// folder's page after the run.
#[cfg(feature = "mpi")]
#[test]
fn a_browser_sees_a_killed_rank_restart_and_the_run_after_it_ends() {
    let dir = temp_dir("dashboard", "restart");
    let run = dir.join("run");
    let tag = format!("dashboard-restart-{}", std::process::id());
    let job = [
        "--backend",
        "mpi",
        "--max-restarts",
        "1",
        "--set",
        "train.steps=1000000",
        "--set",
        "checkpoint.every=10",
        "--set",
        "parallel.collective_timeout_s=10",
    ];
    let (child, addr) = start_job(&run, &job, &tag);
    let url = format!("http://{addr}/");
    history_when(&addr, "20 steps and a commit", |h| {
        count(h, "points", "") >= 20 && count(h, "events", "checkpoint") >= 1
    });
    let before = browse(&url, "mpi-before-kill.png");
    let pid = common::processes::find_rank(&tag, 1).expect("rank 1 found by its environment");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    // The restart serves the same address; its ranks train on.
    let restarted = history_when(&addr, "the restart training 5 steps", |h| {
        let attempt = h["events"].as_array().unwrap().iter().rev().find(|e| e["event"] == "attempt");
        let resumed_at = attempt.filter(|a| a["restart"] == 1).and_then(|a| a["step"].as_u64());
        let last = h["points"].as_array().unwrap().last().and_then(|p| p["step"].as_u64());
        let healthy = h["status"]["ranks"].as_array().unwrap().iter().filter(|r| r["health"] == "healthy").count();
        resumed_at.zip(last).is_some_and(|(at, last)| last >= at + 5) && healthy == 4
    });
    let after = browse(&url, "mpi-restarted.png");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let stopped = common::processes::wait_guarded(child, Duration::from_secs(120), "the job after SIGTERM");
    assert_eq!(stopped.status.code(), Some(143), "stopped with a checkpoint on SIGTERM");
    assert_drawn(&before, 20);
    assert_eq!(before.matches("<td>healthy</td>").count(), 4, "every rank's health: {before}");
    assert_eq!(attribute(&before, "<div class=\"card\" id=\"health\"", "data-restarts"), [0]);
    let lost = restarted["events"].as_array().unwrap().iter().find(|e| e["event"] == "lost").unwrap();
    assert_eq!(lost["rank"], 1, "the killed rank is the lost one: {lost}");
    assert_drawn(&after, 20);
    assert_eq!(attribute(&after, "<div class=\"card\" id=\"health\"", "data-restarts"), [1], "{after}");
    assert_eq!(attribute(&after, "<div class=\"card\" id=\"health\"", "data-lost"), [1]);
    assert!(after.contains("rank 1 on ") && after.contains("lost at step"), "the lost rank is named: {after}");
    assert!(after.contains("restart 1: 4 ranks from step"), "the restart is listed: {after}");
    assert!(after.contains("| restarts 1"), "the summary counts it");
    assert_eq!(after.matches("<td>healthy</td>").count(), 4, "the restarted ranks are healthy: {after}");
    let plans = attribute(&after, "<div class=\"card\" id=\"placement\"", "data-plans");
    assert!(plans.first().is_some_and(|&n| n >= 2), "each attempt's plan: {plans:?}");

    // After the run: the folder's own server shows the same story.
    let mut server = Command::new(EXE)
        .args(["dashboard", "--run-dir", run.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let folder = address_after(&mut BufReader::new(server.stdout.take().unwrap()), "http://");
    let served = browse(&format!("http://{folder}/"), "mpi-after-run.png");
    server.kill().unwrap();
    let _ = server.wait();
    assert_drawn(&served, 20);
    assert_eq!(attribute(&served, "<div class=\"card\" id=\"health\"", "data-restarts"), [1], "{served}");
    assert!(served.contains("restart 1: 4 ranks from step") && served.contains("lost at step"), "{served}");
    let commits = attribute(&served, "<div class=\"list\" id=\"commits\"", "data-commits");
    assert!(commits.first().is_some_and(|&n| n >= 2), "the commits of both attempts: {commits:?}");
}
