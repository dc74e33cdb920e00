//! Saving: write shards, commit a step, and delete steps no longer wanted.

use futures::future::try_join_all;

use crate::error::{Error, Result};
use crate::layout::{self, LATEST, MANIFEST};
use crate::manifest::{Manifest, ShardReport, TensorEntry, DTYPE_F32};
use crate::shard::{self, ShardStream, TensorRef};
use crate::store_handle::CheckpointStore;

impl CheckpointStore {
    /// Write one rank's shard of `step` as `step-XXXXXXXX/shards/<shard>.safetensors`
    /// and report its tensors for the manifest. Rewriting a shard replaces it.
    ///
    /// The file is streamed: memory use stays at a few upload parts
    /// ([`StoreOptions::part_bytes`](crate::StoreOptions) each) however large the shard, so saving does not
    /// need a second copy of the tensors.
    pub fn write_shard(&self, step: u64, shard: &str, tensors: &[TensorRef<'_>]) -> Result<ShardReport> {
        self.write_shard_with_part_size(step, shard, tensors, self.part_bytes)
    }

    /// [`Self::write_shard`] with uploads in `part_bytes` parts, so tests can
    /// exercise multipart uploads without writing huge shards.
    pub(crate) fn write_shard_with_part_size(
        &self,
        step: u64,
        shard: &str,
        tensors: &[TensorRef<'_>],
        part_bytes: usize,
    ) -> Result<ShardReport> {
        layout::check_shard_name(shard)
            .map_err(|reason| Error::InvalidShardName { name: shard.to_string(), reason })?;
        let file = layout::shard_file(shard);
        let rel = layout::in_step(step, &file);
        shard::check_tensors(tensors).map_err(|(tensor, reason)| Error::InvalidTensor {
            url: self.io.url(&rel),
            tensor,
            reason,
        })?;
        let plan = shard::plan(tensors).map_err(|source| Error::Encode { url: self.io.url(&rel), source })?;
        let size_bytes = plan.size();
        let mut stream = ShardStream::new(&plan, tensors);
        if size_bytes <= part_bytes as u64 {
            // It fits in one part: a single put is one request instead of
            // three, and the buffer is no bigger than a part anyway.
            let bytes = shard::collect(&mut stream, size_bytes);
            self.run(self.io.put(&rel, bytes))?;
        } else {
            let written = self.run(self.io.put_streamed(&rel, part_bytes, &mut stream))?;
            debug_assert_eq!(written, size_bytes, "the plan and the stream disagree on {rel}");
        }
        let placed = stream.finish();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    use super::*;
    use crate::shard::reference;

    type Owned = (String, Vec<usize>, Vec<f32>);

    /// Tensors given out of name order (the file sorts them), with an empty
    /// one, a scalar, one spanning several conversion pieces and values whose
    /// bits a lossy path would change.
    fn tensors() -> Vec<Owned> {
        let ramp = |n: usize, k: f32| (0..n).map(|i| i as f32 * k - 3.0).collect::<Vec<_>>();
        let mut odd = ramp(12, 0.5);
        odd[..4].copy_from_slice(&[-0.0, f32::MIN_POSITIVE / 8.0, f32::NEG_INFINITY, f32::from_bits(0x7fc0_1234)]);
        vec![
            ("z.big".into(), vec![3, 50_000], ramp(150_000, 0.001)),
            ("a.odd".into(), vec![3, 4], odd),
            ("m.empty".into(), vec![0, 7], vec![]),
            ("b.scalar".into(), vec![], vec![42.5]),
            ("c.mid".into(), vec![1000], ramp(1000, 1.25)),
        ]
    }

    fn refs(tensors: &[Owned]) -> Vec<TensorRef<'_>> {
        tensors.iter().map(|(name, shape, data)| TensorRef { name, shape, data }).collect()
    }

    /// Write `tensors` with `part_bytes` parts into a fresh memory store,
    /// commit, and check bytes, report and a bit-exact read back.
    fn check_write(tensors: &[Owned], part_bytes: usize) -> ShardReport {
        let shared = Arc::new(InMemory::new());
        let store = CheckpointStore::from_object_store(shared.clone(), "ck", "memory://ck").unwrap();
        let report = store.write_shard_with_part_size(3, "rank-00000", &refs(tensors), part_bytes).unwrap();

        let path = object_store::path::Path::from("ck/step-00000003/shards/rank-00000.safetensors");
        let bytes = store.run(async { Ok(shared.get(&path).await.unwrap().bytes().await.unwrap()) }).unwrap();
        let expected = reference::serialize(&refs(tensors));
        assert!(bytes[..] == expected[..], "part size {part_bytes}: bytes differ from safetensors::serialize");
        assert_eq!(report.size_bytes, expected.len() as u64);
        for entry in &report.tensors {
            let range = entry.offset as usize..(entry.offset + entry.length) as usize;
            assert_eq!(entry.crc32, crc32fast::hash(&expected[range]), "crc of {}", entry.name);
        }

        let mut manifest = Manifest::new(3, 0, "test");
        manifest.add_shard(report.clone());
        store.commit(&manifest).unwrap();
        let loaded = store.read_tensors(3, &manifest, |_| true).unwrap();
        assert_eq!(loaded.len(), tensors.len());
        for (name, shape, data) in tensors {
            let (got_shape, got) = &loaded[name];
            assert_eq!(got_shape, shape, "shape of {name}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(got) == bits(data), "values of {name} (part size {part_bytes})");
        }
        store.verify(3).unwrap();
        report
    }

    #[test]
    fn streamed_shard_is_byte_identical_to_safetensors_serialize() {
        let tensors = tensors();
        // One put (fits in a part), then multipart with parts splitting the
        // header, tensors and conversion pieces at awkward places.
        let single = check_write(&tensors, crate::StoreOptions::default().part_bytes);
        for part_bytes in [8, 1000, 65_536, 300_001] {
            let streamed = check_write(&tensors, part_bytes);
            assert_eq!(streamed, single, "report with part size {part_bytes}");
        }
        // The report lists tensors in the order given, as before.
        let names: Vec<_> = single.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["z.big", "a.odd", "m.empty", "b.scalar", "c.mid"]);
    }

    #[test]
    fn streamed_shard_of_only_empty_tensors() {
        let tensors: Vec<Owned> = vec![("e".into(), vec![0], vec![]), ("d".into(), vec![2, 0], vec![])];
        // The header alone exceeds an 8-byte part.
        let report = check_write(&tensors, 8);
        assert!(report.tensors.iter().all(|t| t.length == 0 && t.crc32 == 0));
    }

    #[test]
    fn multipart_shard_on_local_files_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        let tensors = tensors();
        let file = dir.path().join("step-00000005/shards/rank-00001.safetensors");
        // A larger shard first, so a rewrite that failed to truncate would show.
        let mut bigger = tensors.clone();
        bigger[0].2.extend_from_slice(&[1.0; 1000]);
        bigger[0].1 = vec![1, 151_000];
        store.write_shard_with_part_size(5, "rank-00001", &refs(&bigger), 4096).unwrap();
        let report = store.write_shard_with_part_size(5, "rank-00001", &refs(&tensors), 4096).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert!(bytes == reference::serialize(&refs(&tensors)), "local multipart bytes differ");
        assert_eq!(report.size_bytes, bytes.len() as u64);
        // Nothing but the shard is left behind (no staging files).
        let names: Vec<_> =
            std::fs::read_dir(file.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["rank-00001.safetensors"]);
    }
}
