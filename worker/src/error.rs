//! Errors of a worker.

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
    #[error("{0}")]
    Layout(String),
    #[error("{0}")]
    Coordinator(String),
    #[error("stopped by the coordinator: {0}")]
    Stopped(String),
    #[error("a rank thread panicked (a bug): see the message above")]
    RankPanicked,
    #[error("cannot resume from {url}: {reason}")]
    Incompatible { url: String, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("the loss became {loss} at step {step}: training diverged. Lower [optim] lr or raise warmup_steps, and resume from the last checkpoint")]
    NonFinite { step: u64, loss: f64 },
}

impl WorkerError {
    /// True when this rank stopped only because another rank failed.
    pub fn is_abort(&self) -> bool {
        matches!(self, Self::Comm(collectives::CommError::Aborted { .. }))
            || matches!(self, Self::Model(model::ModelError::Executor(m)) if m.contains("was aborted"))
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.display().to_string(), source }
    }
}
