//! Starting a training job's ranks.
//!
//! `train` checks the layout, then runs one rank on the calling thread,
//! every rank as a thread of this process (`local` backend), or this
//! process as one rank of a job whose launcher (mpirun, srun, a pod)
//! started every rank as a process (`mpi`, `nccl`). One rank's loop is in
//! `rank/`.

use crate::api::{Observer, RunOptions, TrainSummary};
use crate::config::{Backend, JobConfig};
use crate::error::WorkerError;
use crate::rank::run_rank;
use collectives::local::LocalWorld;
use collectives::mpi::MpiWorld;
use collectives::{Communicator, SelfComm};
use std::time::Duration;

/// Runs the job to `train.steps` (or `stop_at`), checkpointing every
/// `checkpoint.every` steps and at the end. Rank 0 reports to `observer`.
pub fn train(job: &JobConfig, opts: &RunOptions, observer: &mut dyn Observer) -> Result<TrainSummary, WorkerError> {
    crate::preemption::install();
    crate::precision::apply(job);
    let dims = job.parallel_dims()?;
    let micro_tokens = job.train.micro_batch_size * job.model.seq_len;
    if !micro_tokens.is_multiple_of(dims.attn_tp) {
        return Err(layout::LayoutError {
            key: "parallel.attn_tp",
            reason: format!(
                "{} shards must divide a micro-batch's {micro_tokens} tokens (train.micro_batch_size x model.seq_len)",
                dims.attn_tp
            ),
        }
        .into());
    }
    match job.parallel.backend {
        Backend::Local if dims.world == 1 => run_rank(job, opts, &mut SelfComm, Some(observer)),
        Backend::Local => run_local_threads(job, opts, dims.world, observer),
        Backend::Mpi => run_mpi_process(job, opts, dims.world, observer),
        Backend::Nccl => {
            // One process per GPU; its launcher (Indexed Job, torchrun, srun) says which rank it is.
            let rank = collectives::launch::launched_rank().map_or(0, |l| l.rank);
            let mut comm = collectives::nccl::NcclWorld::init(rank, dims.world)?;
            run_rank(job, opts, comm.as_mut(), Some(observer))
        }
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
        return Err(WorkerError::WorldSize { started: comm.size(), configured: world });
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
