//! Multipart uploads a killed process left unfinished.
//!
//! A shard larger than one part goes to S3 (GCS, Azure) as a multipart
//! upload. When the writing process dies half-way, the parts already sent
//! stay in the bucket, invisible to listings and billed, until someone
//! aborts the upload by its id, which died with the process. So while an
//! upload runs, a small marker object records its object and id:
//!
//! ```text
//! <root>/uploads/step-00001200/<hash>.json   {"object": "...", "upload_id": "..."}
//! ```
//!
//! The marker is written right after the upload is created and deleted
//! right after it completes or is aborted, so a marker that outlives its
//! save names an abandoned upload. [`CheckpointStore::abort_abandoned_uploads`]
//! aborts those: the trainer calls it at start-up (no save in flight) and
//! after each commit (every upload of the committed step and of earlier
//! ones has finished by then). A process killed between creating an upload
//! and writing its marker (one request) leaves an upload no marker names;
//! a bucket lifecycle rule (`AbortIncompleteMultipartUpload`) covers that.
//!
//! Local folders need none of this: their parts go to one staging file.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layout;
use crate::store_handle::CheckpointStore;

/// Folder of the markers, beside the step folders.
pub(crate) const UPLOADS_DIR: &str = "uploads";

/// What a marker holds: enough to abort the upload.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PendingUpload {
    /// The object being uploaded, relative to the root.
    pub object: String,
    /// The store's id of the multipart upload.
    pub upload_id: String,
}

impl PendingUpload {
    /// The marker's path: in a folder named after the object's step folder
    /// (so cleanup can tell which saves are over), under a name unique to
    /// this upload (one object may be uploaded twice: a re-saved step).
    pub fn marker(&self) -> String {
        let folder = self.object.split_once('/').map_or("other", |(first, _)| first);
        let object = crc32fast::hash(self.object.as_bytes());
        let id = crc32fast::hash(self.upload_id.as_bytes());
        format!("{UPLOADS_DIR}/{folder}/{object:08x}{id:08x}.json")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("two strings serialize")
    }
}

/// The step whose save wrote the marker at `rel`, when `rel` is a marker.
fn marker_step(rel: &str) -> Option<u64> {
    let (folder, _name) = rel.strip_prefix(UPLOADS_DIR)?.strip_prefix('/')?.split_once('/')?;
    layout::parse_step_dir(folder)
}

impl CheckpointStore {
    /// Abort the multipart uploads of saves that will never finish them:
    /// those of steps up to `up_to` (all when `None`). Returns the objects
    /// whose uploads were aborted. Stores without multipart markers (local
    /// folders) have nothing to abort.
    ///
    /// Call with `None` only when no save is in flight (start-up), and with
    /// the step just committed otherwise: a save of a later step may be
    /// running, and its markers are left alone.
    pub fn abort_abandoned_uploads(&self, up_to: Option<u64>) -> Result<Vec<String>> {
        self.run(async {
            let mut aborted = Vec::new();
            for (rel, _) in self.io.list_under(UPLOADS_DIR).await? {
                let Some(step) = marker_step(&rel) else { continue };
                if up_to.is_some_and(|last| step > last) {
                    continue;
                }
                // A marker that cannot be read is someone's damaged object,
                // not ours to guess at: keep it and go on.
                let Some(bytes) = self.io.get(&rel).await? else { continue };
                let Ok(upload) = serde_json::from_slice::<PendingUpload>(&bytes) else { continue };
                self.io.abort_upload(&upload.object, &upload.upload_id).await?;
                self.io.delete_all(UPLOADS_DIR, std::slice::from_ref(&rel)).await?;
                aborted.push(upload.object);
            }
            Ok(aborted)
        })
    }
}

#[cfg(test)]
mod tests {
    use object_store::path::Path;
    use object_store::PutPayload;

    use super::*;
    use crate::shard::TensorRef;

    /// An upload of `object` as a killed writer leaves it: created, marked,
    /// one part sent, never completed. Returns its id.
    fn abandon_upload(store: &CheckpointStore, object: &str) -> String {
        let multipart = store.io.multipart.clone().expect("memory:// stores track uploads");
        store
            .run(async {
                let path = Path::from(object);
                let id = multipart.create_multipart(&path).await.unwrap();
                let upload = PendingUpload { object: object.into(), upload_id: id.clone() };
                store.io.put(&upload.marker(), upload.to_json()).await?;
                multipart.put_part(&path, &id, 0, PutPayload::from(vec![1u8; 10])).await.unwrap();
                Ok(id)
            })
            .unwrap()
    }

    fn completes(store: &CheckpointStore, object: &str, id: &str) -> bool {
        let multipart = store.io.multipart.clone().unwrap();
        store
            .run(async { Ok(multipart.complete_multipart(&Path::from(object), &id.to_string(), vec![]).await.is_ok()) })
            .unwrap()
    }

    #[test]
    fn finished_uploads_leave_no_marker_and_abandoned_ones_are_aborted_up_to_a_step() {
        let store = CheckpointStore::open("memory://").unwrap();
        // A shard of several parts: a tracked upload that finishes.
        let data: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let shape = [1000];
        let tensors = [TensorRef { name: "w", shape: &shape, data: &data }];
        store.write_shard_with_part_size(10, "rank-00000", &tensors, 1024).unwrap();
        assert!(store.run(store.io.list_under(UPLOADS_DIR)).unwrap().is_empty(), "a finished upload's marker is gone");

        let old = abandon_upload(&store, "step-00000020/shards/rank-00001.safetensors");
        let newer = abandon_upload(&store, "step-00000030/shards/rank-00001.safetensors");
        assert_eq!(store.abort_abandoned_uploads(Some(10)).unwrap(), Vec::<String>::new(), "nothing up to step 10");
        assert_eq!(store.abort_abandoned_uploads(Some(20)).unwrap(), ["step-00000020/shards/rank-00001.safetensors"]);
        assert!(!completes(&store, "step-00000020/shards/rank-00001.safetensors", &old), "aborted");
        assert_eq!(store.abort_abandoned_uploads(None).unwrap(), ["step-00000030/shards/rank-00001.safetensors"]);
        assert!(!completes(&store, "step-00000030/shards/rank-00001.safetensors", &newer), "aborted");
        assert!(store.run(store.io.list_under(UPLOADS_DIR)).unwrap().is_empty(), "every marker is gone");
        assert_eq!(
            store.abort_abandoned_uploads(None).unwrap(),
            Vec::<String>::new(),
            "a second cleanup finds nothing"
        );
    }

    #[test]
    fn markers_are_filed_under_their_step() {
        let upload =
            PendingUpload { object: "step-00000020/shards/rank-00001.safetensors".into(), upload_id: "abc".into() };
        let marker = upload.marker();
        assert!(marker.starts_with("uploads/step-00000020/") && marker.ends_with(".json"), "{marker}");
        assert_eq!(marker_step(&marker), Some(20));
        let again = PendingUpload { upload_id: "abd".into(), ..upload };
        assert_ne!(again.marker(), marker, "two uploads of one object have two markers");
        assert_eq!(marker_step("uploads/notastep/x.json"), None);
        assert_eq!(marker_step("step-00000020/manifest.json"), None);
    }
}
