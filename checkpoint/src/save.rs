//! Saving: write shards, commit a step, and delete steps no longer wanted.

use futures::future::try_join_all;

use crate::error::{Error, Result};
use crate::layout::{self, LATEST, MANIFEST};
use crate::manifest::{Manifest, ShardReport, TensorEntry, DTYPE_F32};
use crate::shard::{self, TensorRef};
use crate::store_handle::CheckpointStore;

impl CheckpointStore {
    /// Write one rank's shard of `step` as `step-XXXXXXXX/shards/<shard>.safetensors`
    /// and report its tensors for the manifest. Rewriting a shard replaces it.
    pub fn write_shard(&self, step: u64, shard: &str, tensors: &[TensorRef<'_>]) -> Result<ShardReport> {
        layout::check_shard_name(shard)
            .map_err(|reason| Error::InvalidShardName { name: shard.to_string(), reason })?;
        let file = layout::shard_file(shard);
        let rel = layout::in_step(step, &file);
        shard::check_tensors(tensors).map_err(|(tensor, reason)| Error::InvalidTensor {
            url: self.io.url(&rel),
            tensor,
            reason,
        })?;
        let (bytes, placed) =
            shard::encode(tensors).map_err(|source| Error::Encode { url: self.io.url(&rel), source })?;
        let size_bytes = bytes.len() as u64;
        self.run(self.io.put(&rel, bytes))?;
        let tensors = tensors
            .iter()
            .zip(placed)
            .map(|(t, p)| TensorEntry {
                name: p.name,
                dtype: DTYPE_F32.to_string(),
                shape: t.shape.to_vec(),
                shard: file.clone(),
                offset: p.offset,
                length: p.length,
                crc32: p.crc32,
            })
            .collect();
        Ok(ShardReport { file, size_bytes, tensors })
    }

    /// Commit `manifest.step`: check every listed shard exists with its
    /// reported size, then write manifest.json (the commit point), then `latest`.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let step = manifest.step;
        let manifest_rel = layout::in_step(step, MANIFEST);
        manifest
            .check_consistent()
            .map_err(|reason| Error::InvalidManifest { url: self.io.url(&manifest_rel), reason })?;
        self.run(async {
            let checks = manifest.shards.iter().map(|shard| async move {
                let rel = layout::in_step(step, &shard.file);
                match self.io.size(&rel).await? {
                    None => Err(Error::ShardMissing { step, url: self.io.url(&rel) }),
                    Some(found) if found != shard.size_bytes => Err(Error::ShardSizeMismatch {
                        step,
                        url: self.io.url(&rel),
                        expected: shard.size_bytes,
                        found,
                    }),
                    Some(_) => Ok(()),
                }
            });
            try_join_all(checks).await?;
            self.io.put(&manifest_rel, manifest.to_json()).await?;
            // Readers fall back to the newest manifest when `latest` is stale
            // or missing, so a crash between these two writes is harmless.
            let latest = format!("{}\n", layout::step_dir_name(step));
            self.io.put(LATEST, latest.into_bytes()).await
        })
    }

    /// Delete every step folder that has no manifest (a save that never
    /// committed) and return their steps. Committed steps are never touched.
    ///
    /// Call only when no save is in flight (e.g. at start-up before training),
    /// since a step being written has no manifest yet either.
    pub fn cleanup_uncommitted(&self) -> Result<Vec<u64>> {
        self.run(async {
            let steps = self.scan().await?;
            let mut removed = Vec::new();
            for (step, listing) in steps.into_iter().filter(|(_, l)| !l.committed) {
                self.io.delete_all(&layout::step_dir_name(step), &listing.objects).await?;
                removed.push(step);
            }
            Ok(removed)
        })
    }

    /// Delete the oldest committed steps so that `keep_last` remain, and
    /// return them. The step `latest` names is always kept.
    pub fn prune(&self, keep_last: usize) -> Result<Vec<u64>> {
        self.run(async {
            let latest = self.latest_pointer().await?;
            let committed: Vec<_> = self.scan().await?.into_iter().filter(|(_, l)| l.committed).collect();
            let excess = committed.len().saturating_sub(keep_last);
            let mut removed = Vec::new();
            for (step, listing) in committed.into_iter().take(excess) {
                if Some(step) == latest {
                    continue;
                }
                let scope = layout::step_dir_name(step);
                // Manifest first: if we stop half-way the step is merely
                // uncommitted, never a committed step with shards missing.
                let manifest_rel = layout::in_step(step, MANIFEST);
                self.io.delete_all(&scope, std::slice::from_ref(&manifest_rel)).await?;
                let rest: Vec<_> = listing.objects.into_iter().filter(|rel| *rel != manifest_rel).collect();
                self.io.delete_all(&scope, &rest).await?;
                removed.push(step);
            }
            Ok(removed)
        })
    }
}
