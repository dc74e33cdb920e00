//! Exporting a committed step as one standalone safetensors file, so any
//! safetensors reader can load the model without knowing about shards.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::shard::{self, ShardStream, TensorRef};
use crate::store::ByteSource;
use crate::store_handle::CheckpointStore;

/// What [`CheckpointStore::export_safetensors`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The step exported.
    pub step: u64,
    /// Tensors written to the file.
    pub num_tensors: usize,
    /// Tensors of the step the filter left out.
    pub num_skipped: usize,
    /// Size of the written file in bytes.
    pub num_bytes: u64,
}

impl CheckpointStore {
    /// Write the tensors of committed `step` whose names pass `filter` into
    /// one safetensors file at `path` (names verbatim, F32, row-major).
    ///
    /// Every tensor's checksum is verified while reading. The file is the
    /// same encoding as a shard (byte for byte what `safetensors::serialize`
    /// writes), streamed from the tensors read, so memory holds the tensors
    /// once and not a second, encoded copy. It is written to a temporary
    /// file next to `path` and renamed into place: a failed export leaves
    /// `path` as it was (absent or the previous file) and no partial file.
    pub fn export_safetensors(&self, step: u64, filter: impl Fn(&str) -> bool, path: &Path) -> Result<ExportReport> {
        let manifest = self.read_manifest(step)?;
        let tensors = self.read_tensors(step, &manifest, &filter)?;
        if tensors.is_empty() {
            return Err(Error::NothingToExport { step, root: self.url().to_string() });
        }
        let refs: Vec<TensorRef<'_>> =
            tensors.iter().map(|(name, (shape, data))| TensorRef { name, shape, data }).collect();
        let plan = shard::plan(&refs).map_err(|source| Error::Encode { url: path.display().to_string(), source })?;
        write_atomically(path, &mut ShardStream::new(&plan, &refs))?;
        Ok(ExportReport {
            step,
            num_tensors: refs.len(),
            num_skipped: manifest.tensors.len() - refs.len(),
            num_bytes: plan.size(),
        })
    }
}

/// Writes `tensors` (F32, row-major, in the given order) as one safetensors
/// file at `path`, atomically like [`CheckpointStore::export_safetensors`]:
/// for exports whose names or tensors differ from the checkpoint's (the
/// Hugging Face layout). Returns the file's size in bytes.
pub fn write_safetensors(path: &Path, tensors: &[TensorRef<'_>]) -> Result<u64> {
    let plan = shard::plan(tensors).map_err(|source| Error::Encode { url: path.display().to_string(), source })?;
    write_atomically(path, &mut ShardStream::new(&plan, tensors))?;
    Ok(plan.size())
}

/// Write `source` to a hidden temporary file beside `path`, flush it to
/// disk, then rename it over `path`; the temporary file is removed on failure.
fn write_atomically(path: &Path, source: &mut dyn ByteSource) -> Result<()> {
    let file_err = |op: &'static str, err: std::io::Error| Error::ExportFile {
        op,
        path: path.to_path_buf(),
        reason: err.to_string(),
    };
    let temp = temp_path(path).map_err(|err| file_err("write", err))?;
    let written = (|| {
        let mut file = File::create(&temp)?;
        while let Some(piece) = source.next_piece() {
            file.write_all(piece)?;
        }
        // Durable before the rename, so a crash leaves the old file or the
        // whole new one, never a renamed but empty one.
        file.sync_all()
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(file_err("write", err));
    }
    std::fs::rename(&temp, path).map_err(|err| {
        let _ = std::fs::remove_file(&temp);
        file_err("move the finished export to", err)
    })
}

/// `dir/.name.tmp-<pid>` for `dir/name`: same folder (so rename cannot
/// cross file systems), hidden, and unique per process.
fn temp_path(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path does not end in a file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(temp_name))
}
