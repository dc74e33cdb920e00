//! A sweep's results: one row per point, kept as `results.json` (read back
//! to resume) and `results.csv` (for spreadsheets and pandas). The
//! simulator writes the same rows, marked `predicted`, so measured and
//! predicted points share one file format and one set of plots.

use crate::experiments::sweep::grid::{plain_text, Point};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One point's outcome. Measurements are `None` for a failed point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointResult {
    pub id: String,
    /// Axis key -> value as shown (strings unquoted).
    pub values: BTreeMap<String, String>,
    /// "ok" or "failed".
    pub status: String,
    /// "measured" (a real run) or "predicted" (`switchyard simulate`).
    #[serde(default = "measured")]
    pub source: String,
    /// Why a point failed (the training job's error lines).
    pub error: Option<String>,
    /// local or mpi.
    pub launcher: String,
    pub steps: u64,
    pub warmup: u64,
    pub ranks: Option<usize>,
    pub tokens_per_step: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub step_s: Option<f64>,
    /// Forward+backward without all-to-all.
    pub compute_s: Option<f64>,
    /// All-to-all + gradient sync, as measured (not hidden by overlap).
    pub exposed_comm_s: Option<f64>,
    pub alltoall_s: Option<f64>,
    /// Measured only: the slowest rank's whole all-to-all time (hidden or
    /// not) split into waiting for the last peer of its group to arrive
    /// and transfer (metrics.jsonl's `alltoall_peer_wait_s` and
    /// `alltoall_transfer_s`).
    #[serde(default)]
    pub alltoall_peer_wait_s: Option<f64>,
    #[serde(default)]
    pub alltoall_transfer_s: Option<f64>,
    pub sync_s: Option<f64>,
    pub other_s: Option<f64>,
    pub alltoall_bytes_per_step: Option<f64>,
    pub expert_rows_max: Option<f64>,
    pub expert_rows_mean: Option<f64>,
    /// Peak resident set of one rank; only where ranks are processes (mpi).
    pub peak_rss_per_rank_mib: Option<f64>,
    /// Peak resident set of the largest process of the point (local: all ranks).
    pub peak_rss_process_mib: Option<f64>,
    pub loss_at_end: Option<f64>,
    /// Wall time of the whole point (start-up included).
    pub wall_s: f64,
    /// Predicted only: all-to-all bytes per step inside nodes and between them.
    #[serde(default)]
    pub alltoall_intra_bytes_per_step: Option<f64>,
    #[serde(default)]
    pub alltoall_inter_bytes_per_step: Option<f64>,
    /// Predicted only: memory of the busiest rank (parameters, gradients,
    /// optimizer state, activations, buffers).
    #[serde(default)]
    pub memory_per_rank_mib: Option<f64>,
    /// Predicted only: model FLOPs utilisation of the devices' peak.
    #[serde(default)]
    pub mfu: Option<f64>,
}

fn measured() -> String {
    "measured".into()
}

impl PointResult {
    /// A row of `point` with nothing measured yet (status ok, every number unknown).
    pub fn blank(point: &Point, source: &str, launcher: &str, steps: u64, warmup: u64) -> Self {
        Self {
            id: point.id(),
            values: point.values.iter().map(|(k, v)| (k.clone(), plain_text(v))).collect(),
            status: "ok".into(),
            source: source.into(),
            error: None,
            launcher: launcher.into(),
            steps,
            warmup,
            ranks: None,
            tokens_per_step: None,
            tokens_per_s: None,
            step_s: None,
            compute_s: None,
            exposed_comm_s: None,
            alltoall_s: None,
            alltoall_peer_wait_s: None,
            alltoall_transfer_s: None,
            sync_s: None,
            other_s: None,
            alltoall_bytes_per_step: None,
            expert_rows_max: None,
            expert_rows_mean: None,
            peak_rss_per_rank_mib: None,
            peak_rss_process_mib: None,
            loss_at_end: None,
            wall_s: 0.0,
            alltoall_intra_bytes_per_step: None,
            alltoall_inter_bytes_per_step: None,
            memory_per_rank_mib: None,
            mfu: None,
        }
    }

    /// Whether the point finished and was measured.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The measured columns of the CSV after the axis columns, in order.
const COLUMNS: [&str; 27] = [
    "status",
    "source",
    "launcher",
    "steps",
    "ranks",
    "tokens_per_step",
    "tokens_per_s",
    "step_s",
    "compute_s",
    "exposed_comm_s",
    "alltoall_s",
    "alltoall_peer_wait_s",
    "alltoall_transfer_s",
    "sync_s",
    "other_s",
    "alltoall_bytes_per_step",
    "expert_rows_max",
    "expert_rows_mean",
    "peak_rss_per_rank_mib",
    "peak_rss_process_mib",
    "loss_at_end",
    "wall_s",
    "alltoall_intra_bytes_per_step",
    "alltoall_inter_bytes_per_step",
    "memory_per_rank_mib",
    "mfu",
    "error",
];

/// Reads `<out>/results.json`; none yet is an empty list.
pub fn load(out: &Path) -> Result<Vec<PointResult>> {
    let path = out.join("results.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a sweep's results; move it away or pick another --out", path.display()))
}

/// Writes `results.json` and `results.csv` (each replaced whole, via a
/// temporary file, so an interrupted sweep never leaves half a file).
pub fn save(out: &Path, axes: &[String], rows: &[PointResult]) -> Result<()> {
    write_atomic(&out.join("results.json"), serde_json::to_string_pretty(rows)?.as_bytes())?;
    write_atomic(&out.join("results.csv"), csv(axes, rows).as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The CSV text: the axis columns, then [`COLUMNS`]; empty cells where unknown.
pub fn csv(axes: &[String], rows: &[PointResult]) -> String {
    let mut text = axes.iter().map(|a| a.as_str()).chain(COLUMNS).map(quote).collect::<Vec<_>>().join(",");
    text.push('\n');
    let num = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
    for r in rows {
        let mut cells: Vec<String> = axes.iter().map(|a| r.values.get(a).cloned().unwrap_or_default()).collect();
        cells.extend([
            r.status.clone(),
            r.source.clone(),
            r.launcher.clone(),
            r.steps.to_string(),
            r.ranks.map_or(String::new(), |n| n.to_string()),
            num(r.tokens_per_step),
            num(r.tokens_per_s),
            num(r.step_s),
            num(r.compute_s),
            num(r.exposed_comm_s),
            num(r.alltoall_s),
            num(r.alltoall_peer_wait_s),
            num(r.alltoall_transfer_s),
            num(r.sync_s),
            num(r.other_s),
            num(r.alltoall_bytes_per_step),
            num(r.expert_rows_max),
            num(r.expert_rows_mean),
            num(r.peak_rss_per_rank_mib),
            num(r.peak_rss_process_mib),
            num(r.loss_at_end),
            format!("{:.3}", r.wall_s),
            num(r.alltoall_intra_bytes_per_step),
            num(r.alltoall_inter_bytes_per_step),
            num(r.memory_per_rank_mib),
            num(r.mfu),
            r.error.clone().unwrap_or_default(),
        ]);
        text.push_str(&cells.iter().map(|c| quote(c)).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    text
}

/// RFC 4180 quoting, only where a cell needs it (errors carry commas and newlines).
fn quote(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_with_commas_are_quoted() {
        assert_eq!(quote("a,b \"c\""), "\"a,b \"\"c\"\"\"");
        assert_eq!(quote("plain"), "plain");
    }
}
