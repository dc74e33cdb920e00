//! Collective communication between ranks (DESIGN sections 3 and 4).
//!
//! One [`Communicator`] trait with backends: `local` (ranks are threads of
//! one process, [`local::LocalWorld`]), `mpi` (feature `mpi`) and `nccl`
//! (feature `cuda`). [`SelfComm`] is the world of one rank.
//!
//! Every operation is collective: all ranks of the group call it, in the
//! same order. Every operation has a deadline: a rank that does not arrive
//! in time makes the others fail with [`CommError::Timeout`] naming the
//! operation and the missing rank(s), never hang. Reductions sum in rank
//! order, so every rank gets bit-identical results and results do not
//! depend on timing.

pub mod buffers;
pub mod comm_thread;
pub mod launch;
pub mod local;
pub mod mpi;
pub mod nccl;
pub mod stop;
pub mod stream_copy;
pub mod trace_rank;

pub use buffers::MessageBuffer;
use std::time::Duration;

/// Checks the counts `rank` received (`got`, one per sender) against those
/// it `expected`; else the error names the first sender that disagrees.
pub(crate) fn check_received_counts(
    op: &'static str,
    rank: usize,
    expected: &[usize],
    got: &[usize],
) -> Result<(), CommError> {
    let reason = if expected.len() != got.len() {
        format!(
            "rank {rank} passed {} receive counts for a group of {}: pass one count per rank",
            expected.len(),
            got.len()
        )
    } else if let Some(src) = (0..got.len()).find(|&r| expected[r] != got[r]) {
        format!(
            "rank {src} sent {} values where rank {rank} expected {}: the ranks disagree on the counts",
            got[src], expected[src]
        )
    } else {
        return Ok(());
    };
    Err(CommError::BadArgument { op, reason })
}

/// Errors of collective operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// The backend was not compiled into this binary.
    #[error("the `{backend}` backend is not compiled into this binary: rebuild with `--features {feature}`")]
    NotCompiled { backend: &'static str, feature: &'static str },
    /// One or more ranks did not arrive before the deadline.
    #[error(
        "{op} timed out after {seconds:.0}s on rank {rank}: rank(s) {missing:?} never arrived \
         (stopped, killed or stuck); raise [parallel] collective_timeout_s if they are only slow"
    )]
    Timeout { op: &'static str, rank: usize, missing: Vec<usize>, seconds: f64 },
    /// Buffers or counts of the wrong size were passed.
    #[error("{op}: {reason}")]
    BadArgument { op: &'static str, reason: String },
    /// The group was shut down because another rank failed.
    #[error("{op} on rank {rank}: the group was aborted: {reason}")]
    Aborted { op: &'static str, rank: usize, reason: String },
    /// An error reported by the transport (MPI, NCCL).
    #[error("{op}: {reason}")]
    Transport { op: &'static str, reason: String },
}

/// A non-blocking operation in flight; `wait` returns its result.
pub trait PendingOp: Send {
    /// Blocks until the operation completed everywhere it needs to (or its
    /// deadline passed) and returns the received values.
    fn wait(self: Box<Self>) -> Result<Received, CommError>;
}

/// What a non-blocking operation delivers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Received {
    pub values: MessageBuffer<f32>,
    /// For all-to-all-v: how many values came from each rank.
    pub counts: Vec<usize>,
}

/// A started non-blocking operation.
pub struct Pending(pub Box<dyn PendingOp>);

impl Pending {
    /// Waits for completion.
    pub fn wait(self) -> Result<Received, CommError> {
        self.0.wait()
    }
}

/// The collective operations the step engine uses.
pub trait Communicator: Send {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// The deadline of every operation.
    fn timeout(&self) -> Duration;
    /// Waits until every rank has arrived.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// Copies `buf` of rank `root` into `buf` of every rank (all the same length).
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Element-wise sum over all ranks, in place (same length everywhere).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// [`Communicator::all_reduce_sum`] in f64 (losses, norms).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError>;
    /// Every rank's `send` (any length), concatenated in rank order, with the lengths.
    fn all_gather_v(&mut self, send: &[f32]) -> Result<Received, CommError>;
    /// [`Communicator::all_gather_v`] of integers (counts, ids).
    fn all_gather_u64(&mut self, send: &[u64]) -> Result<Vec<Vec<u64>>, CommError>;
    /// Sums `send` over ranks and gives rank r the block `counts[r]` of the
    /// sum (blocks in rank order; `send.len() == sum(counts)` everywhere).
    fn reduce_scatter_sum(&mut self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>, CommError>;
    /// Sends `send_counts[r]` consecutive values of `send` to rank r (blocks
    /// in rank order); returns what every rank sent here, in rank order, with
    /// the counts. Zero counts are allowed.
    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> Result<Received, CommError>;
    /// [`Communicator::all_to_all_v`] into `recv` (replaced), whose
    /// allocation a backend may reuse across calls; returns the counts.
    fn all_to_all_v_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<Vec<usize>, CommError> {
        let got = self.all_to_all_v(send, send_counts)?;
        *recv = got.values;
        Ok(got.counts)
    }
    /// [`Communicator::all_to_all_v_into`] when this rank already knows how
    /// many values every rank sends it (`recv_counts`, in rank order), as a
    /// combine knows from its dispatch: no counts travel first, which is
    /// what MPI's own `MPI_Alltoallv` asks of its callers. The counts must
    /// agree with what the peers send: where a rank expects more than it
    /// got, the call fails naming the sender; on MPI, where it expects less
    /// (or nothing), the job ends naming the sender (or times out), since
    /// MPI may still be using the buffers.
    fn all_to_all_v_known_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<(), CommError> {
        let got = self.all_to_all_v_into(send, send_counts, recv)?;
        check_received_counts("all_to_all_v", self.rank(), recv_counts, &got)
    }
    /// [`Communicator::all_to_all_v`] of integers (routing metadata).
    fn all_to_all_v_u64(&mut self, send: &[u64], send_counts: &[usize]) -> Result<(Vec<u64>, Vec<usize>), CommError>;
    /// Non-blocking [`Communicator::all_to_all_v`]: returns at once; the
    /// transfer progresses while the caller computes.
    fn start_all_to_all_v(&mut self, send: Vec<f32>, send_counts: Vec<usize>) -> Result<Pending, CommError>;
    /// Non-blocking [`Communicator::all_reduce_sum`]; `Received::values` is the sum.
    fn start_all_reduce_sum(&mut self, buf: Vec<f32>) -> Result<Pending, CommError>;
    /// Splits the group: ranks with the same `color` form a new group,
    /// ordered by `key` (then by rank).
    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>, CommError>;
}

/// The world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SelfComm;

/// A finished operation, for backends that complete at once.
struct Done(Received);

impl PendingOp for Done {
    fn wait(self: Box<Self>) -> Result<Received, CommError> {
        Ok(self.0)
    }
}

impl Communicator for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        Duration::MAX
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _buf: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather_v(&mut self, send: &[f32]) -> Result<Received, CommError> {
        Ok(Received { values: send.into(), counts: vec![send.len()] })
    }
    fn all_gather_u64(&mut self, send: &[u64]) -> Result<Vec<Vec<u64>>, CommError> {
        Ok(vec![send.to_vec()])
    }
    fn reduce_scatter_sum(&mut self, send: &[f32], _counts: &[usize]) -> Result<Vec<f32>, CommError> {
        Ok(send.to_vec())
    }
    fn all_to_all_v(&mut self, send: &[f32], _send_counts: &[usize]) -> Result<Received, CommError> {
        Ok(Received { values: send.into(), counts: vec![send.len()] })
    }
    fn all_to_all_v_u64(&mut self, send: &[u64], _send_counts: &[usize]) -> Result<(Vec<u64>, Vec<usize>), CommError> {
        Ok((send.to_vec(), vec![send.len()]))
    }
    fn start_all_to_all_v(&mut self, send: Vec<f32>, _send_counts: Vec<usize>) -> Result<Pending, CommError> {
        let counts = vec![send.len()];
        Ok(Pending(Box::new(Done(Received { values: send.into(), counts }))))
    }
    fn start_all_reduce_sum(&mut self, buf: Vec<f32>) -> Result<Pending, CommError> {
        Ok(Pending(Box::new(Done(Received { values: buf.into(), counts: vec![] }))))
    }
    fn split(&mut self, _color: usize, _key: usize) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(SelfComm))
    }
}
