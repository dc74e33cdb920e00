//! Training and evaluation data (DESIGN sections 4 and 7).
//!
//! - [`builtin`]: a generated corpus with a known entropy floor;
//! - [`prepare`] / [`prepared`]: text files → token shards → memory;
//! - [`tokenizer`]: byte-level or Hugging Face tokenizer.json;
//! - [`sampler`]: global sequence `i` of a step, independent of the layout;
//! - [`eval`]: evaluation windows;
//! - [`config`]: the `[data]` section.

pub mod builtin;
pub mod config;
pub mod error;
pub mod eval;
pub mod prepare;
pub mod prepared;
pub mod sampler;
pub mod tokenizer;

pub use builtin::BuiltinCorpus;
pub use config::DataConfig;
pub use error::{DataError, EncodeError};
pub use eval::eval_windows;
pub use prepare::{prepare, prepare_with_modalities, prepare_with_shard_size, PrepareReport, DEFAULT_SHARD_TOKENS};
pub use prepared::{PreparedData, PreparedIndex, ShardEntry};
pub use sampler::{DataCursor, DataSource, StepSlice, DATA_STREAM_TAG};
pub use tokenizer::{HfTokenizer, Tokenizer};
