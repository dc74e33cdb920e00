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
    /// Mixture-of-Transformers: a token's modality id is not below `modalities`.
    #[error(
        "modality id {modality} at token {position} of the micro-batch is outside [model] modalities = {modalities}; \
         the data marks more modalities than the model has: raise modalities or re-prepare the data"
    )]
    ModalityOutOfRange { modality: u8, position: usize, modalities: usize },
    /// The expert executor was handed something it cannot run at `layer`
    /// (a plan or buffer of the wrong shape, an expert this rank lacks, a
    /// backward pass without its forward): a bug in the caller.
    #[error("expert compute failed at layer {layer}: {reason}")]
    Executor { layer: usize, reason: String },
    /// The attention shards cannot split this micro-batch and its heads.
    #[error("{shards} attention shards: {reason}")]
    Shards { shards: usize, reason: String },
    /// Communication between ranks failed inside an executor or a shard
    /// group; `source` is the communicator's own error, kept so callers can
    /// tell an abort or a timeout by its type.
    #[error("communication between ranks failed: {source}")]
    Comm { source: Box<dyn std::error::Error + Send + Sync + 'static> },
}

impl ModelError {
    /// A [`ModelError::Comm`] carrying `source`.
    pub fn comm(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ModelError::Comm { source: Box::new(source) }
    }

    /// A [`ModelError::Executor`] at `layer`.
    pub fn executor(layer: usize, reason: impl Into<String>) -> Self {
        ModelError::Executor { layer, reason: reason.into() }
    }
}
