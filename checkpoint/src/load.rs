//! Loading: find committed steps, read manifests and tensors (checksummed).

use std::collections::BTreeMap;

use futures::future::try_join_all;

use crate::error::{Error, Result};
use crate::layout::{self, LATEST, MANIFEST};
use crate::manifest::{self, Manifest, TensorEntry};
use crate::shard;
use crate::store_handle::CheckpointStore;

/// Tensors read from a checkpoint: name → (shape, values).
pub type LoadedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The objects of one step folder.
pub(crate) struct StepListing {
    /// Whether manifest.json exists.
    pub committed: bool,
    /// Every object in the folder, relative to the root.
    pub objects: Vec<String>,
    /// Their total size in bytes.
    pub num_bytes: u64,
}

impl CheckpointStore {
    /// Steps that have a manifest (committed), ascending.
    pub fn committed_steps(&self) -> Result<Vec<u64>> {
        self.run(async {
            let steps = self.scan().await?;
            Ok(steps.into_iter().filter_map(|(step, l)| l.committed.then_some(step)).collect())
        })
    }

    /// The step to resume from: the one `latest` names if its manifest
    /// exists, else the newest committed step; `None` if nothing is committed.
    pub fn latest_step(&self) -> Result<Option<u64>> {
        self.run(async {
            if let Some(step) = self.latest_pointer().await? {
                let manifest_rel = layout::in_step(step, MANIFEST);
                if self.io.size(&manifest_rel).await?.is_some() {
                    return Ok(Some(step));
                }
            }
            let steps = self.scan().await?;
            Ok(steps.into_iter().rev().find_map(|(step, l)| l.committed.then_some(step)))
        })
    }

    /// Read and check the manifest of a committed `step`.
    pub fn read_manifest(&self, step: u64) -> Result<Manifest> {
        self.run(self.fetch_manifest(step))
    }

    /// Read the tensors of `step` whose names pass `filter`, verifying each
    /// one's size and CRC-32 against `manifest`.
    pub fn read_tensors(&self, step: u64, manifest: &Manifest, filter: impl Fn(&str) -> bool) -> Result<LoadedTensors> {
        if manifest.step != step {
            return Err(Error::InvalidManifest {
                url: self.io.url(&layout::in_step(step, MANIFEST)),
                reason: format!("it is for step {}, not step {step}", manifest.step),
            });
        }
        // Group by shard so each file is fetched with one ranged request.
        let mut by_shard: BTreeMap<&str, Vec<&TensorEntry>> = BTreeMap::new();
        for t in manifest.tensors.iter().filter(|t| filter(&t.name)) {
            by_shard.entry(t.shard.as_str()).or_default().push(t);
        }
        let reads = by_shard.into_iter().map(|(file, entries)| self.read_shard_tensors(step, manifest, file, entries));
        let per_shard = self.run(try_join_all(reads))?;
        Ok(per_shard.into_iter().flatten().collect())
    }

    async fn read_shard_tensors(
        &self,
        step: u64,
        manifest: &Manifest,
        file: &str,
        entries: Vec<&TensorEntry>,
    ) -> Result<Vec<(String, (Vec<usize>, Vec<f32>))>> {
        let rel = layout::in_step(step, file);
        let url = self.io.url(&rel);
        // A short or missing file would otherwise surface as an opaque
        // range error from the store; name it as corruption instead.
        let expected = manifest.shards.iter().find(|s| s.file == file).map(|s| s.size_bytes);
        match (self.io.size(&rel).await?, expected) {
            (None, _) => return Err(Error::CorruptShard { url, reason: "the shard file is missing".into() }),
            (Some(found), Some(expected)) if found != expected => {
                return Err(Error::CorruptShard {
                    url,
                    reason: format!("it has {found} bytes, the manifest says {expected}"),
                })
            }
            _ => {}
        }
        // The header too (it ends where the first tensor starts), checked
        // against the manifest: a damaged header can make other readers
        // (safetensors, `ckpt export`) see different tensors than ours.
        let in_shard: Vec<&TensorEntry> = manifest.tensors.iter().filter(|t| t.shard == file).collect();
        let header_end = in_shard.iter().map(|t| t.offset).min().unwrap_or(0);
        let ranges: Vec<_> =
            std::iter::once(0..header_end).chain(entries.iter().map(|t| t.offset..t.offset + t.length)).collect();
        let mut parts = self.io.get_ranges(&rel, &ranges).await?.into_iter();
        let header = parts.next().unwrap_or_default();
        check_header(&header, &in_shard, &url)?;
        entries
            .into_iter()
            .zip(parts)
            .map(|(t, bytes)| {
                check_tensor_bytes(t, &bytes, &url)?;
                Ok((t.name.clone(), (t.shape.clone(), shard::decode_f32(&bytes))))
            })
            .collect()
    }

    /// Fetch and parse the manifest of `step`.
    pub(crate) async fn fetch_manifest(&self, step: u64) -> Result<Manifest> {
        let rel = layout::in_step(step, MANIFEST);
        let url = self.io.url(&rel);
        let Some(bytes) = self.io.get(&rel).await? else {
            return Err(Error::NotCommitted { step, root: self.url().to_string(), url });
        };
        let manifest = Manifest::from_json(&bytes, &url)?;
        if manifest.step != step {
            return Err(Error::InvalidManifest {
                url,
                reason: format!(
                    "it says step {} but lies in the folder of step {step}; the checkpoint \
                     was copied or renamed, move it back",
                    manifest.step
                ),
            });
        }
        manifest.check_consistent().map_err(|reason| Error::InvalidManifest { url, reason })?;
        Ok(manifest)
    }

    /// The step named by `latest`, if it exists and parses.
    pub(crate) async fn latest_pointer(&self) -> Result<Option<u64>> {
        let text = self.io.get(LATEST).await?;
        Ok(text.and_then(|bytes| {
            let text = String::from_utf8_lossy(&bytes);
            layout::parse_step_dir(text.trim())
        }))
    }

    /// Every step folder under the root, with its objects, by step.
    pub(crate) async fn scan(&self) -> Result<BTreeMap<u64, StepListing>> {
        let mut steps: BTreeMap<u64, StepListing> = BTreeMap::new();
        for (rel, size) in self.io.list().await? {
            let Some((dir, rest)) = rel.split_once('/') else {
                continue;
            };
            let Some(step) = layout::parse_step_dir(dir) else {
                continue;
            };
            let listing =
                steps.entry(step).or_insert(StepListing { committed: false, objects: Vec::new(), num_bytes: 0 });
            listing.committed |= rest == MANIFEST;
            listing.objects.push(rel);
            listing.num_bytes += size;
        }
        Ok(steps)
    }
}

/// Check a shard's safetensors header (`prefix`: the file's first bytes)
/// against the manifest's entries of that shard (`in_shard`: all of them):
/// the same tensors, each with the same dtype, shape and bytes.
pub(crate) fn check_header(prefix: &[u8], in_shard: &[&TensorEntry], url: &str) -> Result<()> {
    let (data_start, header) = shard::parse_header(prefix).map_err(|reason| Error::CorruptShard {
        url: url.to_string(),
        reason: format!("its safetensors header: {reason}"),
    })?;
    if header.len() != in_shard.len() {
        return Err(Error::CorruptShard {
            url: url.to_string(),
            reason: format!("its header lists {} tensors, the manifest {}", header.len(), in_shard.len()),
        });
    }
    for t in in_shard {
        let corrupt = |reason: String| Error::CorruptTensor { url: url.to_string(), tensor: t.name.clone(), reason };
        let Some(info) = header.get(&t.name) else {
            return Err(corrupt("it is missing from the shard's header".into()));
        };
        let (begin, end) = info.data_offsets;
        let agrees = info.dtype == t.dtype
            && info.shape == t.shape
            && data_start.checked_add(begin) == Some(t.offset)
            && end.checked_sub(begin) == Some(t.length);
        if !agrees {
            return Err(corrupt(format!(
                "the shard header says {} {:?} at bytes {}..{}, the manifest says {} {:?} at {}..{}",
                info.dtype,
                info.shape,
                data_start.saturating_add(begin),
                data_start.saturating_add(end),
                t.dtype,
                t.shape,
                t.offset,
                t.offset + t.length
            )));
        }
    }
    Ok(())
}

/// Check a tensor's bytes against its manifest entry: dtype this build can
/// decode, length, checksum.
pub(crate) fn check_tensor_bytes(t: &TensorEntry, bytes: &[u8], url: &str) -> Result<()> {
    let corrupt = |reason: String| Error::CorruptTensor { url: url.to_string(), tensor: t.name.clone(), reason };
    if manifest::expected_length(t) != Some(t.length) {
        return Err(corrupt(format!(
            "dtype {} with shape {:?} cannot be {} bytes (this build reads F32 only)",
            t.dtype, t.shape, t.length
        )));
    }
    if bytes.len() as u64 != t.length {
        return Err(corrupt(format!("read {} bytes, the manifest says {}", bytes.len(), t.length)));
    }
    let crc = crc32fast::hash(bytes);
    if crc != t.crc32 {
        return Err(corrupt(format!("CRC-32 mismatch: manifest has {:08x}, data has {crc:08x}", t.crc32)));
    }
    Ok(())
}
