//! The MPI backend of a binary built without the `mpi` feature.

use crate::{CommError, Communicator};
use std::time::Duration;

fn not_compiled() -> CommError {
    CommError::NotCompiled { backend: "mpi", feature: "mpi" }
}

/// Stands in for the MPI environment; it cannot be made.
#[derive(Debug)]
pub struct MpiWorld(());

impl MpiWorld {
    /// Always [`CommError::NotCompiled`]: rebuild with `--features mpi`.
    pub fn init() -> Result<Self, CommError> {
        Err(not_compiled())
    }

    /// Unreachable (no world can be made).
    pub fn world(&self, _timeout: Duration) -> Result<Box<dyn Communicator>, CommError> {
        Err(not_compiled())
    }

    /// Unreachable (no world can be made).
    pub fn library_all_to_all_v(
        &self,
        _send: &[f32],
        _send_counts: &[usize],
        _recv_counts: &[usize],
        _recv: &mut [f32],
    ) -> Result<(), CommError> {
        Err(not_compiled())
    }

    /// Unreachable (no world can be made).
    pub fn abort(&self, _message: &str, code: i32) -> ! {
        std::process::exit(code)
    }
}
