//! A finished run's `metrics.jsonl` reduced to one row of means: what
//! `switchyard bench step` and `switchyard sweep` report about a job.
//!
//! Times are the slowest rank's (as the metrics record them), averaged over
//! the steps after warm-up. The step splits into parts that add up to it:
//! compute = the micro-batches (tokens, forward, backward) without the
//! all-to-all they waited for; exposed communication = that all-to-all
//! wait + gradient sync (what overlap did not hide, docs/overlap.md);
//! other = the rest (optimizer, metrics, checkpoint stalls before the last step).

use anyhow::{bail, Context, Result};
use std::path::Path;
use worker::metrics::StepMetrics;

/// Means over the timed steps of one run.
#[derive(Debug, Clone)]
pub struct StepSummary {
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Forward+backward without the all-to-all it waited for.
    pub compute_s: f64,
    /// All-to-all time no computation hid (all of it without overlap).
    pub alltoall_s: f64,
    /// The whole all-to-all time (hidden or not) split into waiting for
    /// the last peer of the group to arrive and transfer (each the slowest
    /// rank's).
    pub alltoall_peer_wait_s: f64,
    pub alltoall_transfer_s: f64,
    /// Gradient all-reduce and norm.
    pub sync_s: f64,
    /// Step time not in compute, all-to-all or sync.
    pub other_s: f64,
    pub alltoall_bytes_per_step: f64,
    /// Expert rows (forward) of the busiest rank per step.
    pub expert_rows_max: f64,
    /// Expert rows per rank per step, mean over ranks.
    pub expert_rows_mean: f64,
    /// Tokens of the global batch per step.
    pub tokens_per_step: f64,
    /// Loss of the last step.
    pub loss_at_end: f64,
}

/// Reads `<run_dir>/metrics.jsonl`.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<StepMetrics>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1)))
        .collect()
}

impl StepSummary {
    /// The busiest rank's expert rows over the mean (1 without experts).
    pub fn load_skew(&self) -> f64 {
        if self.expert_rows_mean > 0.0 {
            (self.expert_rows_max / self.expert_rows_mean).max(1.0)
        } else {
            1.0
        }
    }

    /// Means over `steps` after the first `warmup` (which thread pools and
    /// allocators spend warming up); at least one step must remain. The
    /// last step is left out when it saved the job's final checkpoint (a
    /// job ends only once that is committed, which no other step waits
    /// for) and other steps remain.
    pub fn of(steps: &[StepMetrics], warmup: usize) -> Result<Self> {
        if steps.len() <= warmup {
            bail!("{} step(s) recorded: need more than the {warmup} warm-up step(s)", steps.len());
        }
        let mut timed = &steps[warmup..];
        if timed.len() > 1 && timed.last().is_some_and(|m| m.checkpoint_s > 0.0) {
            timed = &timed[..timed.len() - 1];
        }
        let mean = |f: &dyn Fn(&StepMetrics) -> f64| timed.iter().map(f).sum::<f64>() / timed.len() as f64;
        let step_s = mean(&|m| m.step_time_s);
        let compute_all = mean(&|m| m.compute_s);
        let alltoall_s = mean(&exposed_alltoall);
        let sync_s = mean(&|m| m.sync_s);
        Ok(Self {
            step_s,
            tokens_per_s: mean(&|m| m.tokens as f64) / step_s,
            compute_s: compute_all - alltoall_s,
            alltoall_s,
            alltoall_peer_wait_s: mean(&|m| m.alltoall_peer_wait_s),
            alltoall_transfer_s: mean(&|m| m.alltoall_transfer_s),
            sync_s,
            other_s: (step_s - compute_all - sync_s).max(0.0),
            alltoall_bytes_per_step: mean(&|m| m.alltoall_bytes_sent as f64),
            expert_rows_max: mean(&|m| expert_rows(m).into_iter().fold(0.0, f64::max)),
            expert_rows_mean: mean(&|m| expert_rows(m).iter().sum::<f64>() / expert_rows(m).len() as f64),
            tokens_per_step: mean(&|m| m.tokens as f64),
            loss_at_end: steps.last().map_or(f64::NAN, |m| m.loss),
        })
    }
}

/// The all-to-all time of a step that no computation hid: the exposed
/// communication less the gradient sync, or all of it in metrics written
/// before overlap was measured (no `comm_s`).
fn exposed_alltoall(m: &StepMetrics) -> f64 {
    if m.comm_s > 0.0 {
        (m.exposed_comm_s - m.sync_s).clamp(0.0, m.alltoall_s)
    } else {
        m.alltoall_s
    }
}

/// Expert rows per rank. A single rank dispatches nothing, so its metrics
/// carry no per-rank row count; then every kept token is its row.
fn expert_rows(m: &StepMetrics) -> Vec<f64> {
    if m.per_rank.len() <= 1 {
        return vec![m.tokens_per_expert.iter().flatten().sum::<usize>() as f64];
    }
    m.per_rank.iter().map(|r| r.expert_rows as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step_time_s: f64, checkpoint_s: f64) -> StepMetrics {
        StepMetrics { step_time_s, checkpoint_s, compute_s: step_time_s / 2.0, tokens: 100, ..Default::default() }
    }

    #[test]
    fn the_final_checkpoint_stall_is_left_out_but_earlier_saves_count() {
        let steps = [step(9.0, 0.0), step(1.0, 0.5), step(3.0, 0.0), step(50.0, 49.0)];
        let s = StepSummary::of(&steps, 1).unwrap();
        assert_eq!(s.step_s, 2.0);
        // A one-step run keeps its only timed step.
        assert_eq!(StepSummary::of(&steps[..2], 1).unwrap().step_s, 1.0);
    }
}
