//! Listing the step folders of a root, committed or not, for people
//! looking at a run (`switchyard ckpt ls`) rather than for loading.

use crate::error::Result;
use crate::layout;
use crate::store_handle::CheckpointStore;

/// One step folder under a checkpoint root, as found in storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFolder {
    /// The step the folder is named after.
    pub step: u64,
    /// Whether its manifest.json exists, i.e. the step is committed.
    pub committed: bool,
    /// Shard files present in the folder.
    pub num_shard_files: usize,
    /// Total size of every object in the folder, manifest included.
    pub num_bytes: u64,
}

/// Everything under a checkpoint root, as [`CheckpointStore::list_steps`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootListing {
    /// Every step folder, ascending by step.
    pub steps: Vec<StepFolder>,
    /// The step the `latest` object names, as written: it may name a step
    /// that has no manifest (or no folder), which is worth showing.
    pub latest: Option<u64>,
}

impl CheckpointStore {
    /// Every step folder under the root with its commit state and size, and
    /// what `latest` says. Reads no manifest, so it works on damaged roots.
    pub fn list_steps(&self) -> Result<RootListing> {
        self.run(async {
            let latest = self.latest_pointer().await?;
            let steps = self
                .scan()
                .await?
                .into_iter()
                .map(|(step, listing)| StepFolder {
                    step,
                    committed: listing.committed,
                    num_shard_files: listing
                        .objects
                        .iter()
                        .filter(|rel| rel.split_once('/').is_some_and(|(_, file)| layout::is_shard_file(file)))
                        .count(),
                    num_bytes: listing.num_bytes,
                })
                .collect();
            Ok(RootListing { steps, latest })
        })
    }
}
