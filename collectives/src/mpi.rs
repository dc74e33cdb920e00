//! The `mpi` backend: ranks are processes (on one or many nodes) started by
//! `mpirun`, `srun --mpi=pmix` or any MPI launcher (DESIGN sections 3, 10).
//!
//! Built with the cargo feature `mpi` over the system's OpenMPI; without it
//! [`MpiWorld::init`] returns [`CommError::NotCompiled`]. Every collective is
//! started as an MPI immediate operation and polled against its deadline.
//! MPI cannot cancel a collective, and may still read or write the buffers
//! of one that timed out, so a timeout is fatal for the whole job: the rank
//! asks its peers which of them reached the same operation (a roll call on a
//! separate communicator), prints the [`CommError::Timeout`] naming the
//! operation and the missing rank(s), and calls `MPI_Abort`, which ends every
//! rank (a stopped one included) and makes the launcher exit non-zero.

#[cfg(feature = "mpi")]
mod ffi_util;
#[cfg(feature = "mpi")]
mod roll_call;
#[cfg(feature = "mpi")]
mod world;
#[cfg(feature = "mpi")]
pub use world::{MpiComm, MpiWorld};

#[cfg(not(feature = "mpi"))]
mod stub;
#[cfg(not(feature = "mpi"))]
pub use stub::MpiWorld;

/// Marks the calling thread as a communication thread, whose waits on MPI
/// requests sleep briefly between tests instead of spinning (it shares the
/// cores with the rank's computation). Does nothing without MPI.
pub fn mark_background_thread() {
    #[cfg(feature = "mpi")]
    ffi_util::mark_background();
}

/// Whether a rank may run collectives on a second thread while its main
/// thread runs others (`MPI_THREAD_MULTIPLE`); always true without MPI.
pub fn comm_threads_allowed() -> bool {
    #[cfg(feature = "mpi")]
    return world::THREAD_MULTIPLE.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "mpi"))]
    true
}

/// Whether this binary was built with the MPI backend.
pub const COMPILED: bool = cfg!(feature = "mpi");
