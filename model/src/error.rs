//! Errors of the model crate.

/// What went wrong in model code that the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A `[model]` setting is impossible; `key` names the setting.
    #[error("invalid [model] setting `{key}`: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    /// A tensor had a different shape from the one the config implies.
    #[error("tensor `{name}` has shape {found:?}, the config needs {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A named tensor the config needs is absent.
    #[error("tensor `{name}` is missing")]
    MissingTensor { name: String },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    /// The expert executor failed (in parallel runs: a collective failed).
    #[error("expert compute failed: {0}")]
    Executor(String),
}
