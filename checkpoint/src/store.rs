//! Every object_store call of the crate, in one place, so that retries with
//! backoff, multipart uploads and metrics can later wrap them here.
//!
//! Paths given to and returned from this module are relative to the
//! checkpoint root (e.g. `step-00000020/manifest.json`).

use std::ops::Range;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::error::{Error, Result};

/// Parts uploading at once in a streamed upload: two keeps the link busy
/// while the next part is filled, and bounds memory to about three parts
/// (two in flight, one filling) whatever the object's size.
const PARTS_IN_FLIGHT: usize = 2;

/// An object's bytes produced piece by piece, so an upload never needs the
/// whole object in memory. Each piece is borrowed only until the next call.
pub(crate) trait ByteSource {
    /// The next bytes of the object; `None` once all of it was produced.
    fn next_piece(&mut self) -> Option<&[u8]>;
}

/// Async access to the objects under one checkpoint root.
pub(crate) struct ObjectIo {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    display_url: String,
}

impl ObjectIo {
    /// Access objects of `store` under `prefix`; `display_url` names the root in messages.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, display_url: String) -> Self {
        Self { store, prefix, display_url }
    }

    /// The root as users should see it (no credentials).
    pub fn root_url(&self) -> &str {
        &self.display_url
    }

    /// The user-facing URL of a relative path.
    pub fn url(&self, rel: &str) -> String {
        // "memory://" already ends in a separator; don't trim it to "memory:".
        if self.display_url.ends_with('/') {
            format!("{}{rel}", self.display_url)
        } else {
            format!("{}/{rel}", self.display_url)
        }
    }

    fn path(&self, rel: &str) -> Path {
        let full = if self.prefix.as_ref().is_empty() { rel.to_string() } else { format!("{}/{rel}", self.prefix) };
        Path::from(full)
    }

    fn err(&self, op: &'static str, rel: &str, source: object_store::Error) -> Error {
        Error::Storage { op, url: self.url(rel), cause: source }
    }

    /// Write a whole object atomically (readers see all of it or nothing).
    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.store.put(&self.path(rel), PutPayload::from(bytes)).await.map(drop).map_err(|e| self.err("write", rel, e))
    }

    /// Write an object from `source` as a multipart upload of `part_bytes`
    /// parts, holding only a few parts in memory; returns the bytes written.
    /// Like [`Self::put`], readers see the object only once it is complete.
    pub async fn put_streamed(&self, rel: &str, part_bytes: usize, source: &mut dyn ByteSource) -> Result<u64> {
        // WriteMultipart loops forever on a zero part size.
        assert!(part_bytes > 0, "part size must be positive");
        let upload =
            self.store.put_multipart(&self.path(rel)).await.map_err(|e| self.err("start uploading", rel, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes);
        let mut written = 0u64;
        loop {
            // Back pressure before producing more: without it `write` would
            // start a new part whenever one fills, however many are pending.
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                // Abort so the store drops the parts already sent (S3 keeps
                // and bills them otherwise); the write error is the one to report.
                let _ = writer.abort().await;
                return Err(self.err("write", rel, e));
            }
            let Some(piece) = source.next_piece() else { break };
            writer.write(piece);
            written += piece.len() as u64;
            // The runtime has one thread: give started part uploads a turn
            // to make progress while the next piece is being produced.
            tokio::task::yield_now().await;
        }
        // finish() aborts the upload itself when it fails.
        writer.finish().await.map_err(|e| self.err("write", rel, e))?;
        Ok(written)
    }

    /// Read a whole object; `None` when it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let result = match self.store.get(&self.path(rel)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read", rel, e)),
        };
        let bytes = result.bytes().await.map_err(|e| self.err("read", rel, e))?;
        Ok(Some(bytes.to_vec()))
    }

    /// Read byte ranges of one object (the store may merge nearby ranges).
    pub async fn get_ranges(&self, rel: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>> {
        // Stores reject empty ranges, and empty tensors (a 0-row shape) are legal.
        let wanted: Vec<_> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
        let mut parts = if wanted.is_empty() {
            Vec::new()
        } else {
            self.store.get_ranges(&self.path(rel), &wanted).await.map_err(|e| self.err("read", rel, e))?
        }
        .into_iter();
        Ok(ranges
            .iter()
            .map(|r| if r.is_empty() { Vec::new() } else { parts.next().map_or_else(Vec::new, |b| b.to_vec()) })
            .collect())
    }

    /// Size of an object; `None` when it does not exist.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read the size of", rel, e)),
        }
    }

    /// Paths and sizes of every object under the root, recursively, in no
    /// particular order.
    pub async fn list(&self) -> Result<Vec<(String, u64)>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<_> = self.store.list(prefix).try_collect().await.map_err(|e| self.err("list", "", e))?;
        Ok(metas
            .into_iter()
            .filter_map(|meta| {
                let parts = meta.location.prefix_match(&self.prefix)?;
                let parts: Vec<_> = parts.map(|p| p.as_ref().to_string()).collect();
                Some((parts.join("/"), meta.size))
            })
            .collect())
    }

    /// Delete objects (possibly in one batch, in any order); ones already
    /// gone count as deleted, so an interrupted cleanup can simply run again.
    /// `scope` (e.g. the step folder) names them in errors.
    pub async fn delete_all(&self, scope: &str, rels: &[String]) -> Result<()> {
        let paths: Vec<_> = rels.iter().map(|rel| Ok(self.path(rel))).collect();
        let mut results = self.store.delete_stream(futures::stream::iter(paths).boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("delete objects in", scope, e)),
            }
        }
        Ok(())
    }
}
