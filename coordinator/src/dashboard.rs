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

use serde_json::{json, Map, Value};

/// The page (HTML, CSS and script in one file).
pub const PAGE: &str = include_str!("dashboard.html");

/// Points the history holds at most.
pub const MAX_POINTS: usize = 1000;

/// The keys of a metrics.jsonl row the page draws.
const KEPT: [&str; 11] = [
    "step",
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "compute_s",
    "exposed_comm_s",
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
}

impl Default for History {
    fn default() -> Self {
        Self::with_capacity(MAX_POINTS)
    }
}

impl History {
    /// A history of at most `cap` (at least 2) points.
    pub fn with_capacity(cap: usize) -> Self {
        Self { points: Vec::new(), stride: 1, cap: cap.max(2) }
    }

    /// Adds a metrics.jsonl row (a step); rows of steps at or after it (an
    /// attempt that resumed from an earlier checkpoint) go first. Returns
    /// false for a row that is not a step's JSON object.
    pub fn push_row(&mut self, row: &str) -> bool {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(row) else { return false };
        let Some(step) = fields.get("step").and_then(Value::as_u64) else { return false };
        self.points.retain(|p| p["step"].as_u64().is_some_and(|s| s < step));
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
    let dropped: f64 =
        fields.get("dropped").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_f64).sum();
    out.insert("dropped".into(), json!(dropped));
    let ranks: Vec<Value> = fields
        .get("per_rank")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| json!({"rank": r["rank"], "compute_s": r["compute_s"], "exposed_comm_s": r["exposed_comm_s"]}))
        .collect();
    out.insert("per_rank".into(), Value::Array(ranks));
    Value::Object(out)
}

/// The history of a metrics.jsonl file's text, and a message for each
/// line that is not a step's row (a line cut short by a killed process).
pub fn history_of_file(text: &str) -> (History, Vec<String>) {
    let mut history = History::default();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if !line.trim().is_empty() && !history.push_row(line) {
            let shown: String = line.chars().take(60).collect();
            problems.push(format!("line {} is not a step's JSON row (cut short?): {shown}", n + 1));
        }
    }
    (history, problems)
}

/// What `/api/history` answers: the points, how they were kept, the job's
/// status (the coordinator's `/status`, or null from files) and problems.
pub fn history_json(history: &History, status: Value, problems: &[String]) -> String {
    json!({
        "points": history.points(),
        "stride": history.stride(),
        "status": status,
        "problems": problems,
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
        let (h, problems) = history_of_file(&text);
        let steps: Vec<u64> = h.points().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("line 5"), "{problems:?}");
        let page = report_html(&history_json(&h, Value::Null, &problems));
        assert!(page.contains("window.SWITCHYARD_DATA = {") && !page.contains("<!--DATA-->"));
    }
}
