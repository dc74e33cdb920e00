//! The worker's public face: how a run starts ([`Resume`], [`RunOptions`]),
//! what it tells its observer ([`StartInfo`], [`Observer`]) and how it ends
//! ([`TrainSummary`]). The launcher and tests use these; the step engine
//! fills them.

use crate::config::JobConfig;
use crate::coordination::CoordinatorLink;
use crate::metrics::StepMetrics;
use layout::ParallelDims;
use std::path::{Path, PathBuf};

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Fresh weights (refuses a run folder that already has checkpoints).
    No,
    /// The newest committed checkpoint of the configured URL.
    Latest,
    /// The newest committed checkpoint if there is one, else fresh weights:
    /// for jobs a scheduler starts again (Slurm requeue, a restarted pod).
    LatestOrFresh,
    /// A specific step: `<root URL>/step-XXXXXXXX`.
    From(String),
}

/// Where the run keeps its files and how it starts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub resume: Resume,
    /// Stop (with a checkpoint) once the job reaches this step, although
    /// `train.steps` is further: the schedule still spans `train.steps`, so
    /// a later `--resume` continues exactly as if never stopped.
    pub stop_at: Option<u64>,
    /// The job's coordinator, when the launcher runs one.
    pub coordinator: Option<CoordinatorLink>,
    /// Rows one rank's experts may take per exchange by the launcher's
    /// memory check of this machine, used when `parallel.max_expert_rows`
    /// is 0; `None`: no bound unless the config sets one.
    pub expert_rows_that_fit: Option<usize>,
}

/// Facts about the run, given to the observer before the first step.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub start_step: u64,
    pub total_steps: u64,
    pub checkpoint_url: String,
    pub resumed_from: Option<String>,
    pub num_params: usize,
    pub num_active_params: usize,
    pub tokens_per_step: u64,
    pub grad_accumulation: usize,
    pub dims: ParallelDims,
    /// The node (host name) of every rank, in rank order.
    pub nodes: Vec<String>,
    /// The overlap techniques this layout runs (docs/overlap.md).
    pub overlap: crate::overlap::Techniques,
    /// Objects whose multipart uploads, left unfinished by an earlier run
    /// that was killed while saving, were aborted before this one started.
    pub aborted_uploads: Vec<String>,
    /// The banner line of `[train] precision`: what the products run in, on which kernels, and why.
    pub precision: String,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub steps_run: u64,
    pub final_step: u64,
    /// URL of the last committed checkpoint.
    pub checkpoint: Option<String>,
    pub seconds: f64,
    /// Stopped early on SIGTERM, after committing a checkpoint of `final_step`.
    pub preempted: bool,
}

/// Receives progress; the launcher prints it.
pub trait Observer {
    fn on_start(&mut self, info: &StartInfo);
    fn on_step(&mut self, metrics: &StepMetrics);
    fn on_checkpoint(&mut self, step: u64, url: &str);
    /// Experts were re-placed at `step`; the busiest rank's expert tokens
    /// over the mean went from `before` to `after` (measured loads).
    fn on_rebalance(&mut self, _step: u64, _before: f64, _after: f64) {}
}

/// The checkpoint URL of a job: `[checkpoint] url`, or the run folder's.
pub fn checkpoint_url(job: &JobConfig, run_dir: &Path) -> String {
    if job.checkpoint.url.is_empty() {
        let dir = std::path::absolute(run_dir.join("checkpoints")).unwrap_or_else(|_| run_dir.join("checkpoints"));
        format!("file://{}", dir.display())
    } else {
        job.checkpoint.url.clone()
    }
}
