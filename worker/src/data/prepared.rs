//! A prepared data folder: `index.json` plus `tokens-NNNNN.bin` shards.
//!
//! Shards are raw little-endian `u32` token ids, so any tool can read them
//! and a shard's size alone tells how many tokens it holds — which is how
//! truncation is detected. The index is written last by `prepare`, so a
//! folder without one was never finished.

use crate::data::error::DataError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Version of the folder layout; bump when shards or index change meaning.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the index inside a prepared folder.
pub const INDEX_FILE: &str = "index.json";

/// Contents of `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreparedIndex {
    pub format_version: u32,
    /// Every token id is below this.
    pub vocab: usize,
    /// `"byte"`, or `"tokenizer.json"` for the copy inside the folder.
    pub tokenizer: String,
    pub shards: Vec<ShardEntry>,
    pub total_tokens: u64,
    /// Number of input documents (files) concatenated into the stream.
    pub documents: u64,
    /// Mixture-of-Transformers: where each run of one modality starts
    /// (`prepare --modality-per-input`); absent: no modalities marked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modality_spans: Vec<ModalitySpan>,
}

/// From token `first_token` on (until the next span), the stream is
/// modality `modality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModalitySpan {
    pub first_token: u64,
    pub modality: u8,
}

/// One shard file and how many tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: u64,
}

/// A prepared folder read into memory as one token stream.
#[derive(Debug)]
pub struct PreparedData {
    dir: PathBuf,
    index: PreparedIndex,
    tokens: Vec<u32>,
    /// Each token's modality (from the index's spans); empty when unmarked.
    modality: Vec<u8>,
    /// The window order of the epoch asked for last: sequences of one step
    /// almost always share an epoch, and a shuffle costs O(windows).
    pub(crate) order_cache: Mutex<Option<EpochOrder>>,
}

/// The shuffled window order of one epoch.
#[derive(Debug)]
pub(crate) struct EpochOrder {
    pub seed: u64,
    pub epoch: u64,
    pub len: usize,
    pub windows: Arc<Vec<u64>>,
}

impl PreparedData {
    /// Reads `dir/index.json` and every shard it lists, checking sizes and
    /// token ids.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let index_path = dir.join(INDEX_FILE);
        let text = match std::fs::read_to_string(&index_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingIndex { dir: dir.to_path_buf() })
            }
            Err(e) => return Err(DataError::io(&index_path, e)),
        };
        let bad = |reason: String| DataError::BadIndex { path: index_path.clone(), reason };
        let index: PreparedIndex = serde_json::from_str(&text).map_err(|e| bad(format!("not a valid index: {e}")))?;
        if index.format_version != FORMAT_VERSION {
            return Err(bad(format!("format_version {} is not the supported {FORMAT_VERSION}", index.format_version)));
        }
        let listed: u64 = index.shards.iter().map(|s| s.tokens).sum();
        if listed != index.total_tokens {
            return Err(bad(format!("shards hold {listed} tokens but total_tokens is {}", index.total_tokens)));
        }

        let mut tokens = Vec::with_capacity(index.total_tokens as usize);
        for shard in &index.shards {
            // A bare file name only: an index must not point outside its folder.
            if shard.file.is_empty() || Path::new(&shard.file).file_name() != Some(shard.file.as_ref()) {
                return Err(bad(format!("shard name `{}` is not a plain file name", shard.file)));
            }
            read_shard(&dir.join(&shard.file), shard.tokens, index.vocab, &mut tokens)?;
        }
        let modality = expand_spans(&index.modality_spans, index.total_tokens).map_err(bad)?;
        Ok(Self { dir: dir.to_path_buf(), index, tokens, modality, order_cache: Mutex::new(None) })
    }

    /// Each token's modality id, aligned with [`PreparedData::tokens`];
    /// empty when the folder marks none.
    pub fn modality(&self) -> &[u8] {
        &self.modality
    }

    /// The folder this was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `index.json`.
    pub fn index(&self) -> &PreparedIndex {
        &self.index
    }

    /// Vocabulary size recorded by `prepare`.
    pub fn vocab(&self) -> usize {
        self.index.vocab
    }

    /// All shards' tokens, concatenated in index order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The tokenizer.json copied into the folder, if not byte-level.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        (self.index.tokenizer != "byte").then(|| self.dir.join(&self.index.tokenizer))
    }
}

/// Appends one shard's tokens to `out` after checking its size and ids.
/// One modality id per token from the index's spans (which must start at
/// token 0 and ascend within the stream); empty without spans.
fn expand_spans(spans: &[ModalitySpan], total: u64) -> Result<Vec<u8>, String> {
    if spans.is_empty() {
        return Ok(Vec::new());
    }
    if spans[0].first_token != 0 {
        return Err(format!("modality_spans must start at token 0, the first starts at {}", spans[0].first_token));
    }
    let mut out = Vec::with_capacity(total as usize);
    for (i, span) in spans.iter().enumerate() {
        let end = spans.get(i + 1).map_or(total, |next| next.first_token);
        if end <= span.first_token || end > total {
            return Err(format!(
                "modality_spans[{i}] starts at token {} but the next starts at {end} (of {total} tokens): spans must ascend",
                span.first_token
            ));
        }
        out.resize(end as usize, span.modality);
    }
    Ok(out)
}

fn read_shard(path: &Path, expected_tokens: u64, vocab: usize, out: &mut Vec<u32>) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 != expected_tokens * 4 {
        return Err(DataError::ShardSizeMismatch {
            path: path.to_path_buf(),
            expected_tokens,
            found_bytes: bytes.len() as u64,
        });
    }
    for (position, chunk) in bytes.chunks_exact(4).enumerate() {
        let token = u32::from_le_bytes(chunk.try_into().expect("chunks of 4"));
        if token as usize >= vocab {
            return Err(DataError::TokenOutOfVocab {
                path: path.to_path_buf(),
                position: position as u64,
                token,
                vocab,
            });
        }
        out.push(token);
    }
    Ok(())
}
