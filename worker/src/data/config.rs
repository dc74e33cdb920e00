//! The `[data]` section of a job config (DESIGN section 7).

use crate::data::builtin::BuiltinCorpus;
use crate::data::error::DataError;
use crate::data::prepared::PreparedData;
use crate::data::sampler::DataSource;
use crate::data::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The built-in corpus's held-out text: sequences of 256 bytes drawn with
/// this seed (training draws from its own streams, so it is held out).
pub const HELD_OUT_SEQUENCES: usize = 64;
pub const HELD_OUT_SEED: u64 = 987_654_321;

/// Where training text comes from and how raw text is tokenized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `"builtin"`, or the path of a folder made by `switchyard data prepare`.
    pub source: String,
    /// `"byte"`, or the path of a tokenizer.json (used by eval on raw text).
    pub tokenizer: String,
    /// Validation during training (`[train] eval_every`): `"builtin"`, the
    /// built-in corpus's held-out text, a prepared folder or a text file;
    /// empty: none.
    pub eval_source: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { source: BUILTIN_SOURCE.into(), tokenizer: "byte".into(), eval_source: String::new() }
    }
}

/// `[data] source` naming the built-in corpus rather than a folder.
pub const BUILTIN_SOURCE: &str = "builtin";

impl DataConfig {
    /// Whether the job trains on the built-in corpus (not a prepared folder).
    pub fn is_builtin(&self) -> bool {
        self.source == BUILTIN_SOURCE
    }

    /// Checks the settings without touching the filesystem (the config may be
    /// validated on a machine that does not hold the data).
    pub fn validate(&self) -> Result<(), DataError> {
        if self.source.trim().is_empty() {
            return Err(DataError::InvalidConfig {
                key: "source",
                reason: "is empty; set it to \"builtin\" or to a folder made by `switchyard data prepare`".into(),
            });
        }
        if self.tokenizer != "byte" && !self.tokenizer.ends_with(".json") {
            return Err(DataError::InvalidConfig {
                key: "tokenizer",
                reason: format!(
                    "is {:?}; set it to \"byte\" or to the path of a Hugging Face tokenizer.json",
                    self.tokenizer
                ),
            });
        }
        Ok(())
    }

    /// Opens the training data the config names.
    pub fn open_source(&self) -> Result<DataSource, DataError> {
        self.validate()?;
        if self.is_builtin() {
            Ok(DataSource::Builtin(BuiltinCorpus::new()))
        } else {
            PreparedData::open(Path::new(&self.source)).map(DataSource::Prepared)
        }
    }

    /// Loads the tokenizer the config names.
    pub fn open_tokenizer(&self) -> Result<Tokenizer, DataError> {
        self.validate()?;
        Tokenizer::from_setting(&self.tokenizer)
    }

    /// The tokenizer.json the job's tokens came from: its prepared folder's
    /// copy, else `tokenizer` when that is a file; None for bytes.
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        if !self.is_builtin() {
            if let Ok(data) = PreparedData::open(Path::new(&self.source)) {
                if let Some(path) = data.tokenizer_path() {
                    return Some(path);
                }
            }
        }
        (self.tokenizer != "byte").then(|| PathBuf::from(&self.tokenizer))
    }

    /// The tokenizer that turns raw text into the job's tokens (eval and
    /// validation): the file of [`DataConfig::tokenizer_file`], else bytes.
    pub fn job_tokenizer(&self) -> Result<Tokenizer, DataError> {
        match self.tokenizer_file() {
            Some(path) => Tokenizer::load(&path),
            None => self.open_tokenizer(),
        }
    }

    /// The tokens of `eval_source`: the built-in corpus's held-out text
    /// (what `switchyard data sample` writes by default), a folder made by
    /// `switchyard data prepare` (its token stream), or a text file through
    /// the job's tokenizer.
    pub fn eval_tokens(&self) -> Result<Vec<u32>, DataError> {
        let source = self.eval_source.trim();
        if source == BUILTIN_SOURCE {
            let text = BuiltinCorpus::new().held_out_text(HELD_OUT_SEQUENCES, HELD_OUT_SEED);
            return Ok(text.into_iter().map(u32::from).collect());
        }
        let path = PathBuf::from(source);
        if path.is_dir() {
            // A folder made by `switchyard data prepare`: its tokens as they are.
            return Ok(PreparedData::open(&path)?.tokens().to_vec());
        }
        let text = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        self.job_tokenizer()?.encode(&text).map_err(|e| DataError::Encode { path, source: e })
    }
}
