//! The run's dashboard: one self-contained HTML page (`dashboard.html`, no
//! script or style from the internet) that draws the step history, and the
//! history it draws. The coordinator serves the page at `/` and the live
//! history at `/api/history`; `switchyard dashboard --run-dir` serves the
//! same from a run folder's metrics.jsonl, and `switchyard report` writes
//! the page with the history inside it.
//!
//! The history keeps at most [`MAX_POINTS`] steps: when full it drops every
//! other point and keeps one step in twice as many from then on, so a long
//! run costs the coordinator bounded memory and the page shows the whole
//! run at an even resolution.
//!
//! Beside the steps it keeps the run's events, never downsampled but
//! bounded ([`MAX_EVENTS`], of them at most [`MAX_PLANS`] placements):
//! from the rows, each checkpoint save's stall (`save`) and each placement
//! plan (`placement`); from the coordinator (`events.jsonl` in the run
//! folder), each attempt (`attempt`, with its restart number), lost rank
//! (`lost`) and commit (`checkpoint`, `checkpoint_failed`).

use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The page (HTML, CSS and script in one file).
pub const PAGE: &str = include_str!("dashboard.html");

/// Points the history holds at most.
pub const MAX_POINTS: usize = 1000;

/// Events the history holds at most (the oldest go first).
pub const MAX_EVENTS: usize = 500;

/// Placement plans among them at most (a plan lists every expert's ranks).
pub const MAX_PLANS: usize = 20;

/// The events that come from metrics rows, and go with their rows when an
/// attempt resumes from an earlier step.
const ROW_EVENTS: [&str; 2] = ["save", "placement"];

/// The keys of a metrics.jsonl row the page draws.
const KEPT: [&str; 13] = [
    "step",
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "compute_s",
    "exposed_comm_s",
    "alltoall_peer_wait_s",
    "alltoall_transfer_s",
    "overlap_efficiency",
    "tokens_per_expert",
];

/// The steps the page draws, downsampled evenly.
#[derive(Debug, Clone)]
pub struct History {
    points: Vec<Value>,
    /// Keep a step when its number is a multiple of this.
    stride: u64,
    cap: usize,
    events: Vec<Value>,
}

impl Default for History {
    fn default() -> Self {
        Self::with_capacity(MAX_POINTS)
    }
}

impl History {
    /// A history of at most `cap` (at least 2) points.
    pub fn with_capacity(cap: usize) -> Self {
        Self { points: Vec::new(), stride: 1, cap: cap.max(2), events: Vec::new() }
    }

    /// Adds a metrics.jsonl row (a step); rows of steps at or after it (an
    /// attempt that resumed from an earlier checkpoint) go first. Returns
    /// false for a row that is not a step's JSON object.
    pub fn push_row(&mut self, row: &str) -> bool {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(row) else { return false };
        let Some(step) = fields.get("step").and_then(Value::as_u64) else { return false };
        self.points.retain(|p| p["step"].as_u64().is_some_and(|s| s < step));
        self.events.retain(|e| {
            let from_row = ROW_EVENTS.iter().any(|&kind| e["event"] == kind);
            !from_row || e["step"].as_u64().is_some_and(|s| s < step)
        });
        let stall = fields.get("checkpoint_s").and_then(Value::as_f64).unwrap_or(0.0);
        if stall > 0.0 {
            self.push_event(json!({"event": "save", "step": step, "stall_s": stall}));
        }
        if let Some(Value::Object(plan)) = fields.get("placement") {
            let mut event = plan.clone();
            event.insert("event".into(), json!("placement"));
            event.insert("step".into(), json!(step));
            self.push_event(Value::Object(event));
        }
        // The last step always shows; a kept one replaces it when it is not.
        if let Some(last) = self.points.last() {
            let last_step = last["step"].as_u64().unwrap_or(0);
            if !last_step.is_multiple_of(self.stride) {
                self.points.pop();
            }
        }
        self.points.push(compact(&fields));
        if self.points.len() > self.cap {
            self.stride *= 2;
            let stride = self.stride;
            let last = self.points.len() - 1;
            let mut i = 0;
            self.points.retain(|p| {
                let keep = i == last || p["step"].as_u64().is_some_and(|s| s.is_multiple_of(stride));
                i += 1;
                keep
            });
        }
        true
    }

    /// Adds an event (a JSON object with `event` and `step`), dropping the
    /// oldest placement beyond [`MAX_PLANS`] and the oldest event beyond
    /// [`MAX_EVENTS`].
    pub fn push_event(&mut self, event: Value) {
        self.events.push(event);
        let is_plan = |e: &Value| e["event"] == "placement";
        if self.events.iter().filter(|e| is_plan(e)).count() > MAX_PLANS {
            let oldest = self.events.iter().position(is_plan).expect("counted above");
            self.events.remove(oldest);
        }
        if self.events.len() > MAX_EVENTS {
            self.events.remove(0);
        }
    }

    /// Forgets every event (a fresh run in an old run folder).
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// The events, in the order they came.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The points, oldest first.
    pub fn points(&self) -> &[Value] {
        &self.points
    }

    /// Every `stride`-th step is kept (1 until the history first filled).
    pub fn stride(&self) -> u64 {
        self.stride
    }
}

/// A row reduced to what the page draws, with the per-rank step split.
fn compact(fields: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for key in KEPT {
        if let Some(v) = fields.get(key) {
            out.insert(key.to_string(), v.clone());
        }
    }
    // Per layer (the heatmaps say each layer's), and in all (the summary).
    let dropped: Vec<f64> =
        fields.get("dropped").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_f64).collect();
    out.insert("dropped".into(), json!(dropped.iter().sum::<f64>()));
    out.insert("dropped_per_layer".into(), json!(dropped));
    let ranks: Vec<Value> = fields
        .get("per_rank")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            json!({"rank": r["rank"], "compute_s": r["compute_s"], "comm_s": r["comm_s"],
                "exposed_comm_s": r["exposed_comm_s"], "alltoall_peer_wait_s": r["alltoall_peer_wait_s"],
                "alltoall_transfer_s": r["alltoall_transfer_s"]})
        })
        .collect();
    out.insert("per_rank".into(), Value::Array(ranks));
    Value::Object(out)
}

/// The history of a run folder's metrics.jsonl and events.jsonl texts,
/// and a message for each line that is not a step's row or an event (a
/// line cut short by a killed process).
pub fn history_of_files(metrics: &str, events: &str) -> (History, Vec<String>) {
    let mut history = History::default();
    let mut problems = Vec::new();
    let shown = |line: &str| line.chars().take(60).collect::<String>();
    for (n, line) in metrics.lines().enumerate() {
        if !line.trim().is_empty() && !history.push_row(line) {
            problems.push(format!("line {} is not a step's JSON row (cut short?): {}", n + 1, shown(line)));
        }
    }
    for (n, line) in events.lines().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(event) if event["event"].is_string() => history.push_event(event),
            _ if line.trim().is_empty() => {}
            _ => problems.push(format!("events.jsonl line {} is not an event (cut short?): {}", n + 1, shown(line))),
        }
    }
    (history, problems)
}

/// The events file the coordinator keeps beside metrics.jsonl.
pub const EVENTS_FILE: &str = "events.jsonl";

/// The history of a run folder: its metrics.jsonl (which must be there)
/// and events.jsonl (when there is one), and every problem, naming the file.
pub fn history_of_folder(run_dir: &Path) -> (History, Vec<String>) {
    let metrics_path = run_dir.join("metrics.jsonl");
    let metrics = match std::fs::read_to_string(&metrics_path) {
        Ok(text) => text,
        Err(e) => {
            let problem = format!(
                "cannot read {} ({e}): is {} a run folder (switchyard train --run-dir)?",
                metrics_path.display(),
                run_dir.display()
            );
            return (History::default(), vec![problem]);
        }
    };
    let events = std::fs::read_to_string(run_dir.join(EVENTS_FILE)).unwrap_or_default();
    let (history, problems) = history_of_files(&metrics, &events);
    let named = problems
        .into_iter()
        .map(|p| if p.starts_with(EVENTS_FILE) { p } else { format!("metrics.jsonl {p}") })
        .map(|p| format!("{}: {p}", run_dir.display()))
        .collect();
    (history, named)
}

/// The trace `switchyard train --trace` writes into the run folder, which
/// the dashboard links (served at `/trace.json`).
pub const TRACE_FILE: &str = "trace.json";

/// Steps the live trace covers.
pub const LIVE_TRACE_STEPS: usize = 5;

/// A timeline this process records as it runs (`train --trace` with the
/// ranks as threads here), which the running job's dashboard serves.
pub trait LiveTrace: Send + Sync {
    /// Whether a step was recorded yet.
    fn has_steps(&self) -> bool;
    /// The Chrome trace of the last `steps` steps of every rank.
    fn last_steps(&self, steps: usize) -> Option<Vec<u8>>;
}

/// The process's live timeline, when it records one: like the `tracing`
/// subscriber that fills it, there is one per process.
static LIVE_TRACE: OnceLock<Arc<dyn LiveTrace>> = OnceLock::new();

/// Lets the dashboard serve `trace` (the first one set stays).
pub fn set_live_trace(trace: Arc<dyn LiveTrace>) {
    let _ = LIVE_TRACE.set(trace);
}

/// Whether `/trace.json` has a trace: the live one, or the folder's file.
pub fn has_trace(run_dir: Option<&Path>) -> bool {
    LIVE_TRACE.get().is_some_and(|t| t.has_steps()) || run_dir.is_some_and(|d| d.join(TRACE_FILE).exists())
}

/// What `/trace.json` serves: the live trace of the last
/// [`LIVE_TRACE_STEPS`] steps while this process records one, else the
/// run folder's trace (written at the end of a `--trace` run).
pub fn trace_to_serve(run_dir: Option<&Path>) -> Option<Vec<u8>> {
    LIVE_TRACE
        .get()
        .and_then(|t| t.last_steps(LIVE_TRACE_STEPS))
        .or_else(|| std::fs::read(run_dir?.join(TRACE_FILE)).ok())
}

/// What `/api/history` answers: the points and events, how the points were
/// kept, the job's status (the coordinator's `/status`, or null from
/// files), problems, and the link to the run's trace, if it has one.
pub fn history_json(history: &History, status: Value, problems: &[String], trace: Option<&str>) -> String {
    json!({
        "points": history.points(),
        "events": history.events(),
        "stride": history.stride(),
        "status": status,
        "problems": problems,
        "trace": trace,
    })
    .to_string()
}

/// The page with `data` (an `/api/history` answer) inside: a file that
/// shows the run with no server.
pub fn report_html(data: &str) -> String {
    // `</` inside the script would end it: JSON allows `<\/`.
    let inline = data.replace("</", "<\\/");
    PAGE.replacen("<!--DATA-->", &format!("<script>window.SWITCHYARD_DATA = {inline};</script>"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64) -> String {
        format!(
            r#"{{"step":{step},"loss":{},"tokens_per_expert":[[1,2]],"dropped":[1,2],"per_rank":[{{"rank":0,"compute_s":0.1,"exposed_comm_s":0.0}}]}}"#,
            5.0 / step as f64
        )
    }

    #[test]
    fn a_long_run_keeps_bounded_even_points_and_its_last_step() {
        let mut h = History::with_capacity(10);
        for step in 1..=100 {
            assert!(h.push_row(&row(step)));
            assert!(h.points().len() <= 10, "step {step}: {} points", h.points().len());
            assert_eq!(h.points().last().unwrap()["step"], step, "the newest step shows");
        }
        let steps: Vec<u64> = h.points().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(h.stride(), 16);
        assert!(steps[..steps.len() - 1].iter().all(|s| s % 16 == 0), "{steps:?}");
        assert_eq!(h.points()[0]["dropped"], 3.0, "dropped summed over layers");
    }

    #[test]
    fn a_resumed_attempt_replaces_the_later_steps_and_bad_lines_are_named() {
        let text = format!("{}\n{}\n{}\n{}\n{{\"step\":4,\"lo", row(1), row(2), row(3), row(2));
        let (h, problems) = history_of_files(&text, "");
        let steps: Vec<u64> = h.points().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("line 5"), "{problems:?}");
        let page = report_html(&history_json(&h, Value::Null, &problems, None));
        assert!(page.contains("window.SWITCHYARD_DATA = {") && !page.contains("<!--DATA-->"));
    }

    #[test]
    fn events_of_rows_go_with_their_steps_and_plans_stay_bounded() {
        let mut h = History::default();
        let saved = |step: u64| format!(r#"{{"step":{step},"loss":1.0,"checkpoint_s":0.5}}"#);
        let planned = |step: u64| format!(r#"{{"step":{step},"loss":1.0,"placement":{{"reason":"start"}}}}"#);
        h.push_row(&planned(1));
        h.push_row(&saved(2));
        h.push_event(json!({"event": "lost", "rank": 1, "step": 3}));
        h.push_row(&saved(4));
        // An attempt that resumed from step 2's commit: step 4's save is gone,
        // what happened to the job is not.
        h.push_row(&planned(3));
        let kinds: Vec<(String, u64)> = h
            .events()
            .iter()
            .map(|e| (e["event"].as_str().unwrap().to_string(), e["step"].as_u64().unwrap()))
            .collect();
        let want = [("placement", 1), ("save", 2), ("lost", 3), ("placement", 3)];
        assert_eq!(kinds, want.map(|(k, s)| (k.to_string(), s)));
        assert_eq!(h.events()[1]["stall_s"], 0.5);
        for step in 4..100 {
            h.push_row(&planned(step));
        }
        let plans = h.events().iter().filter(|e| e["event"] == "placement").count();
        assert_eq!(plans, MAX_PLANS, "the newest plans only");
        assert_eq!(h.events().last().unwrap()["step"], 99);
        assert!(h.events().iter().any(|e| e["event"] == "lost"), "other events stay");
    }

    #[test]
    fn a_folder_events_file_is_read_and_a_cut_line_named() {
        let events = "{\"event\":\"attempt\",\"restart\":1,\"step\":10}\n{\"event\":\"chec";
        let (h, problems) = history_of_files(&row(1), events);
        assert_eq!(h.events().len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("events.jsonl line 2"), "{problems:?}");
        let data: Value = serde_json::from_str(&history_json(&h, Value::Null, &problems, Some("trace.json"))).unwrap();
        assert_eq!(data["events"][0]["restart"], 1);
        assert_eq!(data["trace"], "trace.json");
    }
}
