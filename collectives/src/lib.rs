//! Collective communication between ranks (DESIGN sections 3 and 4).
//!
//! One [`Communicator`] trait with backends: `local` (ranks are threads of
//! one process; the single-rank [`SelfComm`] is its world-size-1 case),
//! `mpi` (feature `mpi`) and `nccl` (feature `cuda`). The expert-parallel
//! issue fills in the multi-rank backends.

/// Errors of collective operations.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The backend was not compiled into this binary.
    #[error("the `{backend}` backend is not compiled in: rebuild with `--features {feature}`")]
    NotCompiled { backend: &'static str, feature: &'static str },
    /// A rank did not arrive in time.
    #[error("{op} timed out after {seconds}s waiting for rank {rank}")]
    Timeout { op: &'static str, rank: usize, seconds: u64 },
    /// Buffers of the wrong size were passed.
    #[error("{op}: {reason}")]
    BadArgument { op: &'static str, reason: String },
}

/// The collective operations the step engine uses.
pub trait Communicator: Send {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Waits until every rank has arrived.
    fn barrier(&mut self) -> Result<(), CommError>;
}

/// The world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SelfComm;

impl Communicator for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}
