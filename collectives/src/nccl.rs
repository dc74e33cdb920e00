//! The `nccl` backend (GPU ranks). Its implementation belongs to the GPU
//! work (cudarc's NCCL binding, feature `cuda`), which needs a GPU machine
//! to be built and checked; until then every build answers with a clear
//! error instead of a backend that was never run.

use crate::{CommError, Communicator};

/// Stands in for an NCCL world; it cannot be made yet.
#[derive(Debug)]
pub struct NcclWorld(());

impl NcclWorld {
    /// Always an error: [`CommError::NotCompiled`] without the `cuda`
    /// feature, [`CommError::Transport`] (not implemented) with it.
    pub fn init(_rank: usize, _size: usize) -> Result<Box<dyn Communicator>, CommError> {
        if cfg!(feature = "cuda") {
            Err(CommError::Transport {
                op: "nccl init",
                reason: "the NCCL backend is not implemented yet; use backend = \"mpi\" or \"local\"".into(),
            })
        } else {
            Err(CommError::NotCompiled { backend: "nccl", feature: "cuda" })
        }
    }
}
