//! `switchyard data prepare`: text files → a prepared data folder.
//!
//! Each input file is one document. Documents are tokenized and simply
//! concatenated, with no separator token: the byte vocabulary has no spare
//! id for one, and the model is trained on fixed windows of the stream
//! anyway, so a window may span a document boundary (as in GPT-2-style
//! packing without EOS).

use crate::data::error::DataError;
use crate::data::prepared::{ModalitySpan, PreparedIndex, ShardEntry, FORMAT_VERSION, INDEX_FILE};
use crate::data::tokenizer::Tokenizer;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Tokens per shard file (256 MiB of `u32`): large enough that a corpus has
/// few files, small enough to copy and checksum one at a time.
pub const DEFAULT_SHARD_TOKENS: u64 = 64 << 20;

/// What `prepare` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareReport {
    /// Input files read.
    pub documents: u64,
    /// Tokens written over all shards.
    pub tokens: u64,
    /// Shard files written.
    pub shards: usize,
    /// Bytes of input text read.
    pub bytes: u64,
}

/// Tokenizes `inputs` (files, or folders searched recursively) into shards
/// and an `index.json` in `out_dir`, which must be empty or absent.
pub fn prepare(inputs: &[PathBuf], out_dir: &Path, tokenizer: &Tokenizer) -> Result<PrepareReport, DataError> {
    prepare_with_shard_size(inputs, out_dir, tokenizer, DEFAULT_SHARD_TOKENS)
}

/// [`prepare`] with a chosen number of tokens per shard (tests use tiny shards).
pub fn prepare_with_shard_size(
    inputs: &[PathBuf],
    out_dir: &Path,
    tokenizer: &Tokenizer,
    shard_tokens: u64,
) -> Result<PrepareReport, DataError> {
    prepare_marked(inputs, out_dir, tokenizer, shard_tokens, false)
}

/// [`prepare`] marking each document's modality (Mixture-of-Transformers):
/// the documents of the `i`-th input (file or folder) are modality `i`.
pub fn prepare_with_modalities(
    inputs: &[PathBuf],
    out_dir: &Path,
    tokenizer: &Tokenizer,
) -> Result<PrepareReport, DataError> {
    prepare_marked(inputs, out_dir, tokenizer, DEFAULT_SHARD_TOKENS, true)
}

fn prepare_marked(
    inputs: &[PathBuf],
    out_dir: &Path,
    tokenizer: &Tokenizer,
    shard_tokens: u64,
    modality_per_input: bool,
) -> Result<PrepareReport, DataError> {
    assert!(shard_tokens > 0, "shard size must be positive");
    if modality_per_input && inputs.len() > u8::MAX as usize {
        return Err(DataError::BadInput {
            path: inputs[0].clone(),
            reason: format!("{} inputs, but modality ids stop at 255: give at most 255 inputs", inputs.len()),
        });
    }
    let files = collect_documents(inputs)?;
    ensure_empty_dir(out_dir)?;

    let mut writer = ShardWriter::new(out_dir, shard_tokens);
    let mut bytes = 0u64;
    let mut modality_spans: Vec<ModalitySpan> = Vec::new();
    let mut written = 0u64;
    for (path, input) in &files {
        let text = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        bytes += text.len() as u64;
        let ids = tokenizer.encode(&text).map_err(|source| DataError::Encode { path: path.clone(), source })?;
        let modality = *input as u8;
        if modality_per_input && !ids.is_empty() && modality_spans.last().is_none_or(|s| s.modality != modality) {
            modality_spans.push(ModalitySpan { first_token: written, modality });
        }
        written += ids.len() as u64;
        writer.write(&ids)?;
    }
    let files: Vec<PathBuf> = files.into_iter().map(|(path, _)| path).collect();
    let shards = writer.finish()?;
    let total_tokens: u64 = shards.iter().map(|s| s.tokens).sum();
    if total_tokens == 0 {
        return Err(DataError::BadInput {
            path: inputs[0].clone(),
            reason: "the input files hold no text; give files with content".into(),
        });
    }

    let tokenizer_name = tokenizer.index_name();
    if let Tokenizer::HuggingFace(hf) = tokenizer {
        // A copy next to the shards keeps the folder self-describing: eval
        // on raw text must use exactly the tokenizer the data was made with.
        let dest = out_dir.join(tokenizer_name);
        std::fs::copy(hf.path(), &dest).map_err(|e| DataError::io(&dest, e))?;
    }
    let index = PreparedIndex {
        format_version: FORMAT_VERSION,
        vocab: tokenizer.vocab_size(),
        tokenizer: tokenizer_name.to_string(),
        shards: shards.clone(),
        total_tokens,
        documents: files.len() as u64,
        modality_spans,
    };
    write_index(out_dir, &index)?;
    Ok(PrepareReport { documents: files.len() as u64, tokens: total_tokens, shards: shards.len(), bytes })
}

/// Input files in a stable order: inputs as given, each folder's files
/// sorted by path, hidden files and folders (names starting with `.`)
/// skipped so editor and VCS debris never becomes training data.
/// Each file comes with the index of the input it was found under.
fn collect_documents(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, usize)>, DataError> {
    let mut files = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let meta = std::fs::metadata(input).map_err(|e| DataError::BadInput {
            path: input.clone(),
            reason: format!("cannot read it ({e}); give existing files or folders"),
        })?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            // `PathBuf` orders component by component, which is the order of
            // a depth-first walk with each folder's entries sorted by name.
            found.sort();
            files.extend(found.into_iter().map(|path| (path, i)));
        } else {
            files.push((input.clone(), i));
        }
    }
    if files.is_empty() {
        return Err(DataError::BadInput {
            path: inputs.first().cloned().unwrap_or_default(),
            reason: "no input files found (hidden files are skipped)".into(),
        });
    }
    Ok(files)
}

/// Adds every non-hidden file under `dir` to `out`. Symbolic links to files
/// are followed; links to folders are not, so a link cycle cannot loop.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| DataError::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            out.push(path);
        }
    }
    Ok(())
}

/// Creates `dir` or checks it is empty, so old shards cannot linger.
fn ensure_empty_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    if entries.next().is_some() {
        return Err(DataError::OutputNotEmpty { dir: dir.to_path_buf() });
    }
    Ok(())
}

/// Writes the index through a temporary file and a rename: the index marks
/// the folder complete, so it must never be seen half-written.
fn write_index(dir: &Path, index: &PreparedIndex) -> Result<(), DataError> {
    let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
    let path = dir.join(INDEX_FILE);
    let json = serde_json::to_string_pretty(index).expect("index serialises");
    std::fs::write(&tmp, json + "\n").map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
}

/// Streams tokens into `tokens-NNNNN.bin` files of at most `shard_tokens`.
struct ShardWriter {
    dir: PathBuf,
    shard_tokens: u64,
    current: Option<(PathBuf, BufWriter<File>)>,
    shards: Vec<ShardEntry>,
}

impl ShardWriter {
    fn new(dir: &Path, shard_tokens: u64) -> Self {
        Self { dir: dir.to_path_buf(), shard_tokens, current: None, shards: Vec::new() }
    }

    fn write(&mut self, mut ids: &[u32]) -> Result<(), DataError> {
        while !ids.is_empty() {
            if self.current.is_none() {
                self.open_next()?;
            }
            let entry = self.shards.last_mut().expect("open shard has an entry");
            let room = (self.shard_tokens - entry.tokens) as usize;
            let (now, rest) = ids.split_at(room.min(ids.len()));
            let (path, file) = self.current.as_mut().expect("shard is open");
            let mut buf = Vec::with_capacity(now.len() * 4);
            for id in now {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            file.write_all(&buf).map_err(|e| DataError::io(&*path, e))?;
            entry.tokens += now.len() as u64;
            if entry.tokens == self.shard_tokens {
                self.close_current()?;
            }
            ids = rest;
        }
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), DataError> {
        let name = format!("tokens-{:05}.bin", self.shards.len());
        let path = self.dir.join(&name);
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        self.current = Some((path, BufWriter::new(file)));
        self.shards.push(ShardEntry { file: name, tokens: 0 });
        Ok(())
    }

    fn close_current(&mut self) -> Result<(), DataError> {
        if let Some((path, file)) = self.current.take() {
            let file = file.into_inner().map_err(|e| DataError::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| DataError::io(&path, e))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardEntry>, DataError> {
        self.close_current()?;
        Ok(self.shards)
    }
}
