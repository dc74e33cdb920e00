//! Starting a training job: where it resumes from, and its ranks.
//!
//! `train` checks the layout, then runs one rank on the calling thread,
//! every rank as a thread of this process (`local` backend), or this
//! process as one rank of an MPI job (`mpi` backend, started by a launcher
//! such as mpirun or srun). The loop itself is in `rank.rs`.

use crate::config::JobConfig;
use crate::coordination::CoordinatorLink;
use crate::data::DataSource;
use crate::error::WorkerError;
use crate::metrics::StepMetrics;
use crate::rank::run_rank;
use crate::state::TrainState;
use checkpoint::CheckpointStore;
use collectives::local::LocalWorld;
use collectives::mpi::MpiWorld;
use collectives::{Communicator, SelfComm};
use coordinator::{ParallelDims, PlacementPlan};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Opens the store and finds the starting state; errors before anything is written.
pub(crate) fn starting_state(
    job: &JobConfig,
    opts: &RunOptions,
    plan: &PlacementPlan,
    ep_rank: usize,
) -> Result<(CheckpointStore, TrainState, Option<String>), WorkerError> {
    let (root, step) = match &opts.resume {
        Resume::From(url) => {
            let (root, step) = checkpoint::parse_step_url(url)?;
            (root, Some(step))
        }
        _ => (checkpoint_url(job, &opts.run_dir), None),
    };
    let store = CheckpointStore::open_with(&root, &job.checkpoint.store_options())?;
    let step = match (&opts.resume, step) {
        (Resume::From(_), step) => step,
        (Resume::Latest, _) => {
            let latest = store.latest_step()?;
            if latest.is_none() {
                return Err(WorkerError::Incompatible {
                    url: root.clone(),
                    reason: "there is no committed checkpoint there. Start without --resume, or point \
                             --run-dir / [checkpoint] url at the run to continue"
                        .into(),
                });
            }
            latest
        }
        (Resume::LatestOrFresh, _) => store.latest_step()?,
        (Resume::No, _) => {
            if let Some(existing) = store.latest_step()? {
                return Err(WorkerError::Incompatible {
                    url: root.clone(),
                    reason: format!(
                        "the run folder already holds a checkpoint (step {existing}). Add --resume to continue it, \
                         or pick another --run-dir so nothing saved is overwritten"
                    ),
                });
            }
            None
        }
    };
    match step {
        Some(step) => {
            let state = TrainState::load(&store, step, job, plan, ep_rank)?;
            let from = store.step_url(step);
            // Checkpoints keep going to the job's own URL.
            let store = if matches!(opts.resume, Resume::From(_)) {
                CheckpointStore::open_with(&checkpoint_url(job, &opts.run_dir), &job.checkpoint.store_options())?
            } else {
                store
            };
            Ok((store, state, Some(from)))
        }
        None => Ok((store, TrainState::fresh(job, plan, ep_rank), None)),
    }
}

/// Opens the training data and checks it fits the model.
pub(crate) fn open_data(job: &JobConfig) -> Result<DataSource, WorkerError> {
    let data = job.data.open_source()?;
    data.check_len(job.model.seq_len + 1)?;
    if data.vocab() > job.model.vocab {
        return Err(WorkerError::Incompatible {
            url: job.data.source.clone(),
            reason: format!(
                "the data's vocabulary has {} tokens but [model] vocab is {}: set model.vocab to at least {}",
                data.vocab(),
                job.model.vocab,
                data.vocab()
            ),
        });
    }
    Ok(data)
}

/// Runs the job to `train.steps` (or `stop_at`), checkpointing every
/// `checkpoint.every` steps and at the end. Rank 0 reports to `observer`.
pub fn train(job: &JobConfig, opts: &RunOptions, observer: &mut dyn Observer) -> Result<TrainSummary, WorkerError> {
    crate::preemption::install();
    let dims = job.parallel_dims().map_err(|e| WorkerError::Layout(e.to_string()))?;
    let micro_tokens = job.train.micro_batch_size * job.model.seq_len;
    if !micro_tokens.is_multiple_of(dims.attn_tp) {
        return Err(WorkerError::Layout(format!(
            "parallel.attn_tp = {} shards must divide a micro-batch's {micro_tokens} tokens \
             (train.micro_batch_size x model.seq_len)",
            dims.attn_tp
        )));
    }
    match job.parallel.backend.as_str() {
        "local" if dims.world == 1 => run_rank(job, opts, &mut SelfComm, Some(observer)),
        "local" => run_local_threads(job, opts, dims.world, observer),
        "mpi" => run_mpi_process(job, opts, dims.world, observer),
        "nccl" => {
            // One process per GPU; its launcher (Indexed Job, torchrun, srun) says which rank it is.
            let rank = collectives::mpi::launched_rank().map_or(0, |l| l.rank);
            let mut comm = collectives::nccl::NcclWorld::init(rank, dims.world)?;
            run_rank(job, opts, comm.as_mut(), Some(observer))
        }
        other => Err(WorkerError::Layout(format!(
            "[parallel] backend = \"{other}\" is unknown: use \"local\" (threads), \"mpi\" (processes) or \"nccl\" (GPUs)"
        ))),
    }
}

/// This process as one rank of an MPI job (started by mpirun, srun, ...).
/// When this rank fails while others may be waiting for it in a
/// collective, it ends the whole job with MPI_Abort after printing why,
/// so nobody hangs until the timeout.
fn run_mpi_process(
    job: &JobConfig,
    opts: &RunOptions,
    world: usize,
    observer: &mut dyn Observer,
) -> Result<TrainSummary, WorkerError> {
    let mpi = MpiWorld::init()?;
    let mut comm = mpi.world(Duration::from_secs_f64(job.parallel.collective_timeout_s))?;
    if comm.size() != world {
        return Err(WorkerError::Layout(format!(
            "MPI started {} ranks but [parallel] ranks = {world}: start as many ranks as the config asks for \
             (mpirun -n {world}), or set --ranks {}",
            comm.size(),
            comm.size()
        )));
    }
    let lead = comm.rank() == 0;
    let result = run_rank(job, opts, comm.as_mut(), lead.then_some(observer));
    if let Err(e) = &result {
        if world > 1 {
            drop(comm);
            mpi.abort(&format!("training failed: {e}"), 1);
        }
    }
    result
}

/// Every rank as a thread of this process over the `local` backend. A rank
/// that fails aborts the group so the others stop at once instead of
/// waiting for the collective timeout; the first real error is returned.
fn run_local_threads(
    job: &JobConfig,
    opts: &RunOptions,
    world: usize,
    observer: &mut dyn Observer,
) -> Result<TrainSummary, WorkerError> {
    let timeout = Duration::from_secs_f64(job.parallel.collective_timeout_s);
    let mut comms = LocalWorld::new(world, timeout).into_iter();
    let mut first = comms.next().expect("world has rank 0");
    let results: Vec<Result<TrainSummary, WorkerError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = comms
            .map(|mut comm| {
                std::thread::Builder::new()
                    .name(format!("rank-{}", comm.rank()))
                    .spawn_scoped(scope, move || {
                        let result = run_rank(job, opts, &mut comm, None);
                        if let Err(e) = &result {
                            comm.abort(&format!("rank {} failed: {e}", comm.rank()));
                        }
                        result
                    })
                    .expect("spawn a rank thread")
            })
            .collect();
        let result0 = run_rank(job, opts, &mut first, Some(observer));
        if let Err(e) = &result0 {
            first.abort(&format!("rank 0 failed: {e}"));
        }
        let mut results = vec![result0];
        results.extend(workers.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(WorkerError::RankPanicked))));
        results
    });
    first_error(results)
}

/// Rank 0's summary when every rank succeeded; else the root cause (an
/// error that is not merely "the group was aborted because of another").
fn first_error(results: Vec<Result<TrainSummary, WorkerError>>) -> Result<TrainSummary, WorkerError> {
    if results.iter().all(|r| r.is_ok()) {
        return results.into_iter().next().expect("rank 0");
    }
    let mut errors: Vec<WorkerError> = results.into_iter().filter_map(|r| r.err()).collect();
    let root = errors.iter().position(|e| !e.is_abort()).unwrap_or(0);
    Err(errors.swap_remove(root))
}
