//! Checkpoints on object storage (DESIGN section 6).
//!
//! A checkpoint root holds one folder per step:
//!
//! ```text
//! <root>/step-00001200/shards/<shard>.safetensors   written first, by each rank
//! <root>/step-00001200/manifest.json                written LAST: its presence = committed
//! <root>/latest                                     text "step-00001200", after the manifest
//! <root>/uploads/step-00001200/<id>.json            while a multipart upload to a bucket runs
//! ```
//!
//! [`CheckpointStore`] is a blocking handle (the trainer is synchronous) that
//! owns a small tokio runtime to drive `object_store`. Fields owned by other
//! crates (job config, placement plan, data cursor, ...) travel as
//! `serde_json::Value` so this crate depends on none of ours.

mod error;
mod export;
mod layout;
mod listing;
mod load;
mod location;
mod manifest;
mod save;
mod shard;
mod store;
mod store_handle;
mod uploads;
mod verify;

pub use error::{Error, Result};
pub use export::{write_safetensors, ExportReport};
pub use layout::{parse_step_url, step_dir_name};
pub use listing::{RootListing, StepFolder};
pub use load::LoadedTensors;
pub use location::StoreOptions;
pub use manifest::{is_optimizer_state, Manifest, ShardReport, TensorEntry, DTYPE_F32, FORMAT_VERSION, OPTIM_PREFIX};
pub use shard::TensorRef;
pub use store::PART_STALL_VAR;
pub use store_handle::CheckpointStore;
pub use verify::VerifyReport;

/// The `object_store` version this crate is built against, for callers of
/// [`CheckpointStore::from_object_store`].
pub use object_store;
