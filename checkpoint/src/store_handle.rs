//! [`CheckpointStore`]: opening a checkpoint root and bridging the blocking
//! API to object_store's async one.

use std::future::Future;
use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;
use tokio::runtime::{Builder, Handle, Runtime};

use crate::error::{Error, Result};
use crate::location::{self, Create, Location, StoreOptions};
use crate::store::ObjectIo;

/// A checkpoint root on object storage, with a blocking API.
///
/// Must not be used from inside an async runtime (that returns
/// [`Error::InsideAsyncRuntime`]); async services call it from
/// `spawn_blocking`.
pub struct CheckpointStore {
    pub(crate) io: ObjectIo,
    runtime: Runtime,
    /// Shards up to this size go in one put, larger ones in parts of this size.
    pub(crate) part_bytes: usize,
}

impl CheckpointStore {
    /// Open the checkpoint root at `url`: `file:///abs/path`, a plain local
    /// path (created if missing), `memory://` (a fresh, empty store per call),
    /// or a bucket: `s3://`, `gs://`, `az://` (default retry settings).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &StoreOptions::default())
    }

    /// [`Self::open`] with explicit retry settings for remote stores
    /// (`s3://bucket/prefix`, `gs://`, `az://`).
    pub fn open_with(url: &str, options: &StoreOptions) -> Result<Self> {
        Self::open_at(url, Create::IfMissing, options)
    }

    /// Open the checkpoint root at `url` for reading: like [`Self::open`],
    /// but a local folder that does not exist is [`Error::RootNotFound`]
    /// instead of being created.
    pub fn open_existing(url: &str) -> Result<Self> {
        Self::open_existing_with(url, &StoreOptions::default())
    }

    /// [`Self::open_existing`] with explicit retry settings for remote stores.
    pub fn open_existing_with(url: &str, options: &StoreOptions) -> Result<Self> {
        Self::open_at(url, Create::Never, options)
    }

    fn open_at(url: &str, create: Create, options: &StoreOptions) -> Result<Self> {
        let Location { store, multipart, prefix, display_url, part_bytes } = location::resolve(url, create, options)?;
        Self::build(ObjectIo::new(store, multipart, prefix, display_url), part_bytes)
    }

    /// Use an existing object store (e.g. one `InMemory` shared by a test's
    /// writer and reader) with keys under `prefix`; `display_url` names it in messages.
    pub fn from_object_store(store: Arc<dyn ObjectStore>, prefix: &str, display_url: &str) -> Result<Self> {
        let prefix = Path::from(prefix.trim_matches('/'));
        let display_url = location::redact(display_url);
        Self::build(ObjectIo::new(store, None, prefix, display_url), StoreOptions::default().part_bytes)
    }

    fn build(io: ObjectIo, part_bytes: usize) -> Result<Self> {
        // One thread is enough: the work is I/O, and local-file calls go to
        // tokio's blocking pool anyway.
        let runtime = Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Runtime { url: io.root_url().to_string(), source })?;
        // WriteMultipart loops forever on a zero part size; S3 wants 5 MiB+.
        Ok(Self { io, runtime, part_bytes: part_bytes.max(1) })
    }

    /// The root URL as shown to users (credentials removed).
    pub fn url(&self) -> &str {
        self.io.root_url()
    }

    /// The URL of one step's folder, e.g. `file:///x/checkpoints/step-00000100`
    /// (what `--resume-from` and `eval --checkpoint` take).
    pub fn step_url(&self, step: u64) -> String {
        format!("{}/{}", self.url().trim_end_matches('/'), crate::layout::step_dir_name(step))
    }

    /// Writes `bytes` as one object at `rel` (relative to the root) with a
    /// single plain object-store put: the baseline `switchyard bench
    /// checkpoint` compares shard writes against.
    pub fn put_object(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.run(self.io.put(rel, bytes))
    }

    /// Deletes objects by path relative to the root (missing ones are fine).
    pub fn delete_objects(&self, rels: &[String]) -> Result<()> {
        self.run(self.io.delete_all("", rels))
    }

    /// Run `work` to completion on the store's runtime.
    pub(crate) fn run<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        // block_on inside a runtime would panic; say what to do instead.
        if Handle::try_current().is_ok() {
            return Err(Error::InsideAsyncRuntime { url: self.url().to_string() });
        }
        self.runtime.block_on(work)
    }
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore").field("url", &self.url()).finish_non_exhaustive()
    }
}
