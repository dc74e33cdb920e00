//! The communicators a rank talks through, split once from the world
//! before the first step (DESIGN section 3): the expert-parallel group, the
//! expert replicas, the attention shards and their data-parallel peers, and
//! the copies the overlap techniques run on other threads.

use crate::error::WorkerError;
use crate::overlap::Techniques;
use collectives::comm_thread::CommThread;
use collectives::Communicator;
use layout::ParallelDims;

/// The groups a rank talks to.
pub(crate) struct Groups {
    /// The ranks sharing one copy of the experts (all-to-all, norm).
    pub ep: Box<dyn Communicator>,
    /// The replicas of this rank's experts (expert gradients), when edp > 1.
    pub edp: Option<Box<dyn Communicator>>,
    /// The attention shards of this rank's micro-batches, when attn_tp > 1.
    pub tp: Option<Box<dyn Communicator>>,
    /// The ranks holding the same attention shard (its gradients), when attn_tp > 1 and dp > 1.
    pub dp: Option<Box<dyn Communicator>>,
    /// The expert-parallel group's communication thread (overlap).
    pub ep_pipe: Option<CommThread>,
    /// The second lane's groups, when micro-batches interleave.
    pub second: Option<SecondLane>,
    /// Every rank, on a communication thread: gradient buckets.
    pub grad_pipe: Option<CommThread>,
}

/// The groups of the second lane (see `micro_batches`).
pub(crate) struct SecondLane {
    pub ep: Box<dyn Communicator>,
    pub pipe: Option<CommThread>,
    pub tp: Option<Box<dyn Communicator>>,
}

impl Groups {
    /// Splits the world into this layout's groups; every rank calls this
    /// with the same arguments, so the splits match.
    pub fn split(
        comm: &mut dyn Communicator,
        dims: &ParallelDims,
        techniques: &Techniques,
    ) -> Result<Groups, WorkerError> {
        let rank = comm.rank();
        let mut ep = comm.split(dims.edp_rank(rank), dims.ep_rank(rank))?;
        let edp = if dims.edp > 1 { Some(comm.split(dims.ep_rank(rank), dims.edp_rank(rank))?) } else { None };
        let sharded = dims.attn_tp > 1;
        let mut tp = if sharded { Some(comm.split(dims.dp_rank(rank), dims.tp_rank(rank))?) } else { None };
        let dp = if sharded && dims.dp > 1 { Some(comm.split(dims.tp_rank(rank), dims.dp_rank(rank))?) } else { None };
        // Copies of a group (same ranks) for communication threads and the
        // second lane: every rank makes them in the same order.
        let copy = |group: &mut dyn Communicator| group.split(0, group.rank());
        let pipe = |group: &mut dyn Communicator| -> Result<CommThread, WorkerError> {
            CommThread::spawn(copy(group)?).map_err(WorkerError::CommThread)
        };
        let ep_pipe = if techniques.pipe_chunks.is_some() { Some(pipe(ep.as_mut())?) } else { None };
        let second = if techniques.interleave {
            let mut ep2 = copy(ep.as_mut())?;
            let pipe2 = if techniques.pipe_chunks.is_some() { Some(pipe(ep2.as_mut())?) } else { None };
            let tp2 = match tp.as_mut() {
                Some(tp) => Some(copy(tp.as_mut())?),
                None => None,
            };
            Some(SecondLane { ep: ep2, pipe: pipe2, tp: tp2 })
        } else {
            None
        };
        let grad_pipe = if techniques.bucket_values.is_some() { Some(pipe(comm)?) } else { None };
        Ok(Groups { ep, edp, tp, dp, ep_pipe, second, grad_pipe })
    }
}

/// A group borrowed for a step (the trait object's lifetime shortened,
/// which `Option` does not do by itself).
pub(crate) fn shorter(group: &mut Option<Box<dyn Communicator>>) -> Option<&mut dyn Communicator> {
    group.as_mut().map(|g| g.as_mut() as &mut dyn Communicator)
}
