//! Errors of a worker.
//!
//! Every variant keeps its cause as a typed source: the launcher tells an
//! abort (this rank stopped because another failed) from a root cause by
//! type, and `{:#}` chains show the whole path to the failure.

use wire::ClientError;

/// What stopped a rank.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    #[error(transparent)]
    Comm(#[from] collectives::CommError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(
        "the launcher started {started} ranks but [parallel] ranks = {configured}: start as many ranks as the \
         config asks for (mpirun -n {configured}), or set --ranks {started}"
    )]
    WorldSize { started: usize, configured: usize },
    #[error("cannot start a communication thread: {0}")]
    CommThread(#[source] std::io::Error),
    #[error("rank {rank} sent a value this rank cannot read: {source}")]
    Garbled { rank: usize, source: serde_json::Error },
    #[error("rank {rank}: {source}")]
    Coordinator { rank: usize, source: ClientError },
    #[error(
        "rank {rank}: this rank's {what} differs from the coordinator's ({detail}): start every worker with the \
         same --config and --set options as the coordinator"
    )]
    NotTheSameJob { rank: usize, what: &'static str, detail: String },
    #[error("stopped by the coordinator: {reason}")]
    Stopped { reason: String },
    #[error("a rank thread panicked (a bug): see the message above")]
    RankPanicked,
    /// The aux-loss-free expert bias must be the same on every rank.
    #[error(
        "ranks {ranks:?} route with another expert bias than rank 0: the ranks no longer compute one model (a bug); \
         resume from the last checkpoint, and report it with the run folder"
    )]
    BiasMismatch { ranks: Vec<usize> },
    /// A checkpoint that cannot be loaded into this job (resume, eval, export).
    #[error("cannot load the checkpoint {url}: {reason}")]
    Incompatible { url: String, reason: String },
    /// `--resume` where nothing was committed.
    #[error(
        "cannot resume: there is no committed checkpoint at {url}. Start without --resume, or point --run-dir / \
         [checkpoint] url at the run to continue"
    )]
    NothingToResume { url: String },
    /// A fresh start where checkpoints already are: starting would overwrite them.
    #[error(
        "the checkpoints at {url} already hold step {step}: add --resume to continue that run, or pick another \
         --run-dir so nothing saved is overwritten"
    )]
    RunFolderInUse { url: String, step: u64 },
    /// Training data that the model cannot read.
    #[error("the data {source_name} does not fit the model: {reason}")]
    DataDoesNotFit { source_name: String, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("the loss became {loss} at step {step}: training diverged. Lower [optim] lr or raise warmup_steps, and resume from the last checkpoint")]
    NonFinite { step: u64, loss: f64 },
}

impl WorkerError {
    /// True when this rank stopped only because another rank failed.
    pub fn is_abort(&self) -> bool {
        let comm = match self {
            Self::Comm(e) => Some(e),
            // Failures of the expert executor's or shard group's collectives
            // keep the CommError as their source.
            Self::Model(model::ModelError::Comm { source }) => source.downcast_ref::<collectives::CommError>(),
            _ => None,
        };
        matches!(comm, Some(collectives::CommError::Aborted { .. }))
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.display().to_string(), source }
    }

    /// A failure talking to the coordinator; its stop order stays a stop.
    pub fn coordinator(rank: usize, source: ClientError) -> Self {
        match source {
            ClientError::Stopped { reason } => Self::Stopped { reason },
            source => Self::Coordinator { rank, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use collectives::CommError;

    #[test]
    fn an_abort_is_recognised_by_type_through_the_model_error() {
        let aborted = CommError::Aborted { op: "all_to_all_v", rank: 1, reason: "rank 0 failed".into() };
        assert!(WorkerError::Comm(aborted.clone()).is_abort());
        assert!(WorkerError::Model(model::ModelError::comm(aborted)).is_abort());
        let timeout = CommError::Timeout { op: "all_to_all_v", rank: 1, missing: vec![0], seconds: 1.0 };
        assert!(!WorkerError::Model(model::ModelError::comm(timeout)).is_abort());
        // An executor's own message mentioning an abort is not one.
        assert!(!WorkerError::Model(model::ModelError::executor(0, "was aborted")).is_abort());
    }
}
