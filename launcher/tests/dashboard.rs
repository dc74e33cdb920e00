//! The dashboard: the page a running job's coordinator serves at `/` and
//! the history it draws (`/api/history`), then the same from the run folder
//! (`switchyard dashboard --run-dir`, `switchyard report`), and a folder
//! with a line cut short; and in a real browser (headless Chromium) the
//! live page of a 4-rank job, read back from the DOM its script drew, with
//! a screenshot under target/test-output/dashboard/.

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

/// A 4-rank job of `steps` in `run`, and its dashboard's address (from
/// the banner on stderr, which is then drained).
fn start_job(run: &std::path::Path, steps: &str) -> (std::process::Child, String) {
    let mut args = vec!["train", "--quiet", "--ranks", "4", "--run-dir", run.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(["--set", steps, "--set", "checkpoint.every=0"]);
    let mut child = Command::new(EXE).args(&args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = address_after(&mut stderr, "dashboard http://");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, addr)
}

#[test]
fn a_running_job_serves_its_dashboard_and_the_folder_serves_it_after() {
    let dir = temp_dir("dashboard", "live");
    let run = dir.join("run");
    let (mut child, addr) = start_job(&run, "train.steps=300");
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
    }
    let ranks = history["status"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    assert!(ranks.iter().all(|r| r["health"] == "healthy"), "{ranks:?}");
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

#[test]
fn a_browser_draws_the_live_page_of_a_4_rank_job() {
    let dir = temp_dir("dashboard", "browser");
    let run = dir.join("run");
    let (mut child, addr) = start_job(&run, "train.steps=1000000");
    let started = Instant::now();
    while serde_json::from_str::<serde_json::Value>(&get(&addr, "/api/history")).unwrap()["points"]
        .as_array()
        .unwrap()
        .len()
        < 20
    {
        assert!(started.elapsed() < Duration::from_secs(120), "20 steps in 2 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the page's script drew, read back from the DOM it left.
    let dom = chromium(&["--dump-dom", &format!("http://{addr}/")]);
    let shots = common::repo().join("target/test-output/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("live-4-ranks.png");
    chromium(&["--window-size=1300,1400", &format!("--screenshot={}", shot.display()), &format!("http://{addr}/")]);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let drawn = attribute(&dom, "<body", "data-points");
    assert!(drawn.first().is_some_and(|&n| n >= 20), "the page drew at least 20 steps: {drawn:?}");
    let loss = attribute(&dom, "<canvas id=\"loss\"", "data-points");
    assert!(loss.first().is_some_and(|&n| n >= 20), "the loss chart has its points: {loss:?}");
    let cells = attribute(&dom, "<canvas class=\"heatmap\"", "data-cells");
    let experts = attribute(&dom, "<canvas class=\"heatmap\"", "data-experts");
    assert_eq!(cells.len(), 2, "a heatmap per layer: {dom}");
    assert_eq!(experts, [8, 8], "every expert of every layer");
    assert!(cells.iter().all(|&c| c >= 20 * 8), "a cell per expert and step: {cells:?}");
    assert_eq!(dom.matches("<td>healthy</td>").count(), 4, "every rank's health: {dom}");
    assert!(dom.contains("ranks 4/4"), "the summary line");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "a screenshot at {}", shot.display());
}
