//! Full verification of a committed step: every shard re-read end to end.

use crate::error::{Error, Result};
use crate::layout;
use crate::load::{check_header, check_tensor_bytes};
use crate::manifest::TensorEntry;
use crate::store_handle::CheckpointStore;

/// What [`CheckpointStore::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The step verified.
    pub step: u64,
    /// Shard files read.
    pub num_shards: usize,
    /// Tensors whose checksums matched.
    pub num_tensors: usize,
    /// Bytes read, over all shard files.
    pub num_bytes: u64,
}

impl CheckpointStore {
    /// Re-read every shard of `step` and check its size, its safetensors
    /// header against the manifest, and every tensor's checksum.
    pub fn verify(&self, step: u64) -> Result<VerifyReport> {
        self.run(async {
            let manifest = self.fetch_manifest(step).await?;
            let mut report = VerifyReport { step, num_shards: 0, num_tensors: 0, num_bytes: 0 };
            // One shard in memory at a time keeps peak memory at the largest shard.
            for shard_entry in &manifest.shards {
                let rel = layout::in_step(step, &shard_entry.file);
                let url = self.io.url(&rel);
                let corrupt_shard = |reason: String| Error::CorruptShard { url: url.clone(), reason };
                let Some(bytes) = self.io.get(&rel).await? else {
                    return Err(corrupt_shard("the shard file is missing".into()));
                };
                if bytes.len() as u64 != shard_entry.size_bytes {
                    return Err(corrupt_shard(format!(
                        "it has {} bytes, the manifest says {}",
                        bytes.len(),
                        shard_entry.size_bytes
                    )));
                }
                let in_shard: Vec<&TensorEntry> =
                    manifest.tensors.iter().filter(|t| t.shard == shard_entry.file).collect();
                check_header(&bytes, &in_shard, &url)?;
                for t in in_shard {
                    let range = t.offset as usize..(t.offset + t.length) as usize;
                    check_tensor_bytes(t, &bytes[range], &url)?;
                    report.num_tensors += 1;
                }
                report.num_shards += 1;
                report.num_bytes += bytes.len() as u64;
            }
            Ok(report)
        })
    }
}
