//! `metrics.jsonl`: one JSON object per step, each with its `step`,
//! appended by rank 0 or, when there is one, by the coordinator (the
//! object is rank 0's report, so both write the same rows). The file's
//! shape belongs to no one side, so its upkeep lives here, beside the
//! protocol that carries its rows.

use std::path::Path;

/// Makes `path` (a metrics.jsonl) end at step `start`, where training
/// (re)starts: rows of later steps, run by an earlier attempt after the
/// checkpoint it resumes from, would otherwise appear twice, and a line cut
/// short by a killed process is no row at all. Rewritten through a
/// temporary file and a rename; returns how many lines were dropped.
pub fn truncate_after(path: &Path, start: u64) -> std::io::Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let step_of = |line: &str| serde_json::from_str::<serde_json::Value>(line).ok()?.get("step")?.as_u64();
    let kept: Vec<&str> = text.lines().filter(|line| step_of(line).is_some_and(|step| step <= start)).collect();
    let dropped = text.lines().count() - kept.len();
    if dropped > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        let body: String = kept.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(dropped)
}

/// Appends one line (a step's row) to `path`, creating the file and its
/// folder on first use.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(file, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_after_keeps_the_rows_up_to_the_start_and_drops_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("switchyard-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let rows: String = (1..=5).map(|s| format!("{{\"step\":{s},\"loss\":1.0}}\n")).collect();
        std::fs::write(&path, format!("{rows}{{\"step\":6,\"lo")).unwrap();
        assert_eq!(truncate_after(&path, 3).unwrap(), 3);
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(truncate_after(&path, 3).unwrap(), 0, "nothing to drop the second time");
        assert_eq!(truncate_after(&dir.join("none.jsonl"), 0).unwrap(), 0, "no file yet");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
