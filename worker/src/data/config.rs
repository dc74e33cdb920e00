//! The `[data]` section of a job config (DESIGN section 7).

use crate::data::builtin::BuiltinCorpus;
use crate::data::error::DataError;
use crate::data::prepared::PreparedData;
use crate::data::sampler::DataSource;
use crate::data::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where training text comes from and how raw text is tokenized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `"builtin"`, or the path of a folder made by `switchyard data prepare`.
    pub source: String,
    /// `"byte"`, or the path of a tokenizer.json (used by eval on raw text).
    pub tokenizer: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { source: BUILTIN_SOURCE.into(), tokenizer: "byte".into() }
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
}
