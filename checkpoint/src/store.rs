//! Every object_store call of the crate, in one place, so that retries with
//! backoff, multipart uploads and metrics can later wrap them here.
//!
//! Paths given to and returned from this module are relative to the
//! checkpoint root (e.g. `step-00000020/manifest.json`).

use std::ops::Range;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::uploads::PendingUpload;

/// Parts uploading at once in a streamed upload: two keeps the link busy
/// while the next part is filled, and bounds memory to about three parts
/// (two in flight, one filling) whatever the object's size.
const PARTS_IN_FLIGHT: usize = 2;

/// Fault injection for the test suites: a tracked multipart upload stalls
/// this many milliseconds once its first part is stored, so a test can kill
/// the process while the upload is unfinished.
pub const PART_STALL_VAR: &str = "SWITCHYARD_FAULT_PART_STALL_MS";

fn injected_part_stall() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var(PART_STALL_VAR).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// An object's bytes produced piece by piece, so an upload never needs the
/// whole object in memory. Each piece is borrowed only until the next call.
pub(crate) trait ByteSource {
    /// The next bytes of the object; `None` once all of it was produced.
    fn next_piece(&mut self) -> Option<&[u8]>;
}

/// Async access to the objects under one checkpoint root.
pub(crate) struct ObjectIo {
    store: Arc<dyn ObjectStore>,
    /// The same store's upload-by-id interface, for stores whose abandoned
    /// uploads keep their parts (buckets); `None` for local folders.
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
    prefix: Path,
    display_url: String,
}

impl ObjectIo {
    /// Access objects of `store` under `prefix`; `display_url` names the root in messages.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        multipart: Option<Arc<dyn MultipartStore>>,
        prefix: Path,
        display_url: String,
    ) -> Self {
        Self { store, multipart, prefix, display_url }
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
    /// On buckets the upload is recorded by a marker while it runs, so a
    /// killed process's upload can be aborted later (see [`crate::uploads`]).
    pub async fn put_streamed(&self, rel: &str, part_bytes: usize, source: &mut dyn ByteSource) -> Result<u64> {
        // Zero-sized parts would never fill.
        assert!(part_bytes > 0, "part size must be positive");
        match &self.multipart {
            Some(multipart) => self.put_tracked(multipart, rel, part_bytes, source).await,
            None => self.put_untracked(rel, part_bytes, source).await,
        }
    }

    /// A multipart upload whose id a marker object records until it ends.
    async fn put_tracked(
        &self,
        multipart: &Arc<dyn MultipartStore>,
        rel: &str,
        part_bytes: usize,
        source: &mut dyn ByteSource,
    ) -> Result<u64> {
        let path = self.path(rel);
        let upload_id = multipart.create_multipart(&path).await.map_err(|e| self.err("start uploading", rel, e))?;
        let upload = PendingUpload { object: rel.to_string(), upload_id };
        let marker = upload.marker();
        let uploaded = async {
            self.put(&marker, upload.to_json()).await?;
            self.put_parts(multipart, rel, &upload.upload_id, part_bytes, source).await
        }
        .await;
        if uploaded.is_err() {
            // Drop the parts already sent; the upload error is the one to report.
            let _ = multipart.abort_multipart(&path, &upload.upload_id).await;
        }
        let unmarked = self.delete_all(rel, std::slice::from_ref(&marker)).await;
        let written = uploaded?;
        unmarked?;
        Ok(written)
    }

    /// The parts of upload `upload_id` of `rel`, at most [`PARTS_IN_FLIGHT`]
    /// sending at once, then the completion.
    async fn put_parts(
        &self,
        multipart: &Arc<dyn MultipartStore>,
        rel: &str,
        upload_id: &str,
        part_bytes: usize,
        source: &mut dyn ByteSource,
    ) -> Result<u64> {
        let path = self.path(rel);
        let mut sending: JoinSet<object_store::Result<(usize, PartId)>> = JoinSet::new();
        let mut sent: Vec<(usize, PartId)> = Vec::new();
        let mut part = Vec::with_capacity(part_bytes);
        let mut parts = 0;
        let mut written = 0u64;
        let send = |part: Vec<u8>, index: usize, sending: &mut JoinSet<_>| {
            let (multipart, path, id) = (multipart.clone(), path.clone(), upload_id.to_string());
            sending.spawn(async move {
                multipart.put_part(&path, &id, index, PutPayload::from(part)).await.map(|done| (index, done))
            });
        };
        while let Some(mut piece) = source.next_piece() {
            written += piece.len() as u64;
            while !piece.is_empty() {
                let take = piece.len().min(part_bytes - part.len());
                part.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if part.len() == part_bytes {
                    // Back pressure: without it every filled part would start sending.
                    while sending.len() >= PARTS_IN_FLIGHT {
                        sent.push(self.part_sent(&mut sending, rel).await?);
                    }
                    send(std::mem::replace(&mut part, Vec::with_capacity(part_bytes)), parts, &mut sending);
                    parts += 1;
                    if let Some(stall) = (parts == 1).then(injected_part_stall).flatten() {
                        sent.push(self.part_sent(&mut sending, rel).await?);
                        std::thread::sleep(stall);
                    }
                }
            }
            // The runtime has one thread: give started part uploads a turn
            // to make progress while the next piece is being produced.
            tokio::task::yield_now().await;
        }
        if !part.is_empty() || parts == 0 {
            send(part, parts, &mut sending);
        }
        while !sending.is_empty() {
            sent.push(self.part_sent(&mut sending, rel).await?);
        }
        sent.sort_by_key(|(index, _)| *index);
        let sent = sent.into_iter().map(|(_, part)| part).collect();
        multipart
            .complete_multipart(&path, &upload_id.to_string(), sent)
            .await
            .map_err(|e| self.err("write", rel, e))?;
        Ok(written)
    }

    /// The next part upload of `sending` to end, when it succeeded.
    async fn part_sent(
        &self,
        sending: &mut JoinSet<object_store::Result<(usize, PartId)>>,
        rel: &str,
    ) -> Result<(usize, PartId)> {
        match sending.join_next().await.expect("only called while parts are sending") {
            Ok(result) => result.map_err(|e| self.err("write", rel, e)),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// A multipart upload nothing records: for local folders, whose parts
    /// go to one staging file.
    async fn put_untracked(&self, rel: &str, part_bytes: usize, source: &mut dyn ByteSource) -> Result<u64> {
        let upload =
            self.store.put_multipart(&self.path(rel)).await.map_err(|e| self.err("start uploading", rel, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes);
        let mut written = 0u64;
        loop {
            // Back pressure before producing more: without it `write` would
            // start a new part whenever one fills, however many are pending.
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                // Abort so the store drops the parts already sent; the write error is the one to report.
                let _ = writer.abort().await;
                return Err(self.err("write", rel, e));
            }
            let Some(piece) = source.next_piece() else { break };
            writer.write(piece);
            written += piece.len() as u64;
            tokio::task::yield_now().await;
        }
        // finish() aborts the upload itself when it fails.
        writer.finish().await.map_err(|e| self.err("write", rel, e))?;
        Ok(written)
    }

    /// Abort the multipart upload `upload_id` of `rel`; one that already
    /// ended (completed or aborted) is fine.
    pub async fn abort_upload(&self, rel: &str, upload_id: &str) -> Result<()> {
        let Some(multipart) = &self.multipart else { return Ok(()) };
        match multipart.abort_multipart(&self.path(rel), &upload_id.to_string()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("abort the unfinished upload of", rel, e)),
        }
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
        self.list_under("").await
    }

    /// [`Self::list`] of the objects under the folder `rel` ("" = the root).
    pub async fn list_under(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        let folder = if rel.is_empty() { self.prefix.clone() } else { self.path(rel) };
        let prefix = (!folder.as_ref().is_empty()).then_some(&folder);
        let metas: Vec<_> = self.store.list(prefix).try_collect().await.map_err(|e| self.err("list", rel, e))?;
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
