//! Errors of the data layer.
//!
//! Every variant names the file or setting involved and, where the fix is not
//! obvious, says what to do: these messages reach users directly.

use std::path::PathBuf;

/// What went wrong while preparing, opening or sampling training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A `[data]` setting is unusable; `key` names the setting.
    #[error("invalid [data] setting `{key}`: {reason}")]
    InvalidConfig { key: &'static str, reason: String },

    /// A prepared-data folder has no `index.json` (never prepared, or the
    /// preparation did not finish: the index is written last).
    #[error(
        "{} has no index.json: run `switchyard data prepare <files or folders> --out {}` first",
        dir.display(),
        dir.display()
    )]
    MissingIndex { dir: PathBuf },

    /// `index.json` exists but cannot be used.
    #[error("{}: {reason}; re-run `switchyard data prepare` into an empty folder", path.display())]
    BadIndex { path: PathBuf, reason: String },

    /// A shard file is shorter or longer than `index.json` says.
    #[error(
        "shard {} holds {found_bytes} bytes but index.json says {expected_tokens} tokens \
         ({} bytes): the file is truncated or was replaced; re-run `switchyard data prepare`",
        path.display(),
        expected_tokens * 4
    )]
    ShardSizeMismatch { path: PathBuf, expected_tokens: u64, found_bytes: u64 },

    /// A shard holds a token id the vocabulary does not have.
    #[error(
        "shard {} has token id {token} at position {position}, outside the vocabulary of {vocab}: \
         the shard is corrupt or was prepared with another tokenizer; re-run `switchyard data prepare`",
        path.display()
    )]
    TokenOutOfVocab { path: PathBuf, position: u64, token: u32, vocab: usize },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The data cannot give the model's `[model] modalities`
    /// (Mixture-of-Transformers): `data` names the corpus or folder.
    #[error("[model] modalities = {modalities} with data {data}: {reason}")]
    Modalities { data: String, modalities: usize, reason: String },

    /// An input given to `prepare` does not exist or holds no documents.
    #[error("{}: {reason}", path.display())]
    BadInput { path: PathBuf, reason: String },

    /// `prepare` refuses to mix its output with an earlier run's shards.
    #[error(
        "output folder {} is not empty: remove it or choose another folder, so that no stale shards remain",
        dir.display()
    )]
    OutputNotEmpty { dir: PathBuf },

    /// A document could not be tokenized.
    #[error("could not tokenize {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: EncodeError,
    },

    /// A tokenizer.json was given but this binary was built without the
    /// Hugging Face tokenizer.
    #[error(
        "{} is a Hugging Face tokenizer, but this build has no support for it: \
         it was built with --no-default-features; rebuild without that flag (or with \
         `--features worker/hf-tokenizer`)",
        path.display()
    )]
    HfTokenizerNotCompiled { path: PathBuf },

    /// A tokenizer.json could not be loaded.
    #[error("could not load tokenizer {}: {reason}", path.display())]
    TokenizerLoad { path: PathBuf, reason: String },

    /// The data is too short for even one training sequence.
    #[error(
        "{what} has {tokens} tokens, fewer than one training sequence of {len} tokens \
         (seq_len + 1): add more text or lower [model] seq_len"
    )]
    TooShort { what: String, tokens: u64, len: usize },
}

/// Why a tokenizer could not encode a piece of text.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Hugging Face tokenizers work on text, not arbitrary bytes.
    #[error("not valid UTF-8 after byte {valid_up_to}; use the byte tokenizer for binary data")]
    NotUtf8 { valid_up_to: usize },
    /// The tokenizer library failed.
    #[error("{0}")]
    Tokenizer(String),
}

impl DataError {
    /// Wraps an IO error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
