//! Checkpoint commits (DESIGN section 6). Every rank writes its own shard
//! and reports it; once all have, the coordinator checks the shards, writes
//! manifest.json (the commit point), then `latest`, deletes steps beyond
//! `keep_last`, and tells the ranks. A step some rank never reported (it
//! died, or its upload failed) is never committed, so the previous
//! committed step stays what a resume loads.
//!
//! Commits run on their own thread, in the order steps completed: the
//! store's API is blocking and must stay off the service's runtime.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use checkpoint::{CheckpointStore, Manifest, ShardReport, StoreOptions};

use wire::protocol::ShardWritten;

/// Where a job's checkpoints are committed.
#[derive(Debug, Clone)]
pub struct CommitTarget {
    /// Checkpoint root URL (any scheme `checkpoint` opens).
    pub url: String,
    pub options: StoreOptions,
    /// Committed steps kept; older ones are deleted after each commit.
    pub keep_last: usize,
}

/// A commit that finished: what the launcher prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub step: u64,
    /// The step folder's URL (what `--resume-from` takes).
    pub url: String,
    /// Shard bytes over all ranks.
    pub bytes: u64,
    /// Slowest rank's upload, and the commit itself (checks, manifest, prune).
    pub upload_s: f64,
    pub commit_s: f64,
    /// Unfinished multipart uploads of earlier saves (of processes killed
    /// while uploading) that this commit aborted, or why it could not.
    pub abandoned_uploads: Result<Vec<String>, String>,
    /// Why deleting the steps beyond `keep_last` failed, if it did: the
    /// step is committed all the same, and the next commit prunes again.
    pub prune_failed: Option<String>,
}

/// The shards reported so far for one step.
struct PendingSave {
    reports: Vec<Option<Option<ShardReport>>>,
    manifest: Option<Manifest>,
    bytes: u64,
    upload_s: f64,
}

/// What a report changed.
pub(crate) enum Progress {
    /// More ranks must report.
    Waiting,
    /// Every rank reported: this manifest is ready to commit.
    Complete { manifest: Box<Manifest>, bytes: u64, upload_s: f64 },
    /// The step cannot be committed; the reason names the rank.
    Failed { step: u64, reason: String },
}

/// Saves in progress, by step.
#[derive(Default)]
pub(crate) struct PendingSaves {
    steps: BTreeMap<u64, PendingSave>,
}

impl PendingSaves {
    /// Adds one rank's report for a job of `world` ranks.
    pub fn add(&mut self, world: usize, written: ShardWritten) -> Progress {
        let (rank, step) = (written.rank, written.step);
        let failed = |reason: String| Progress::Failed { step, reason };
        let report = match written.outcome {
            Err(why) => return failed(format!("rank {rank} could not write its shard of step {step}: {why}")),
            Ok(None) => None,
            Ok(Some(json)) => match serde_json::from_str::<ShardReport>(&json) {
                Ok(report) => Some(report),
                Err(e) => return failed(format!("rank {rank} sent an unreadable shard report for step {step}: {e}")),
            },
        };
        let pending = self.steps.entry(step).or_insert_with(|| PendingSave {
            reports: vec![None; world],
            manifest: None,
            bytes: 0,
            upload_s: 0.0,
        });
        if let Some(json) = written.manifest {
            match serde_json::from_str::<Manifest>(&json) {
                Ok(manifest) => pending.manifest = Some(manifest),
                Err(e) => return failed(format!("rank {rank} sent an unreadable manifest for step {step}: {e}")),
            }
        }
        pending.reports[rank as usize] = Some(report);
        pending.bytes += written.bytes;
        pending.upload_s = pending.upload_s.max(written.upload_s);
        if pending.reports.iter().any(Option::is_none) {
            return Progress::Waiting;
        }
        let done = self.steps.remove(&step).expect("the entry was just used");
        // Older incomplete saves can no longer complete: a rank reports in step order.
        self.steps.retain(|&s, _| s > step);
        let Some(mut manifest) = done.manifest else {
            return failed(format!("every rank reported step {step} but rank 0 sent no manifest"));
        };
        for report in done.reports.into_iter().flatten().flatten() {
            manifest.add_shard(report);
        }
        Progress::Complete { manifest: Box::new(manifest), bytes: done.bytes, upload_s: done.upload_s }
    }
}

/// The thread that commits complete steps, in order.
pub(crate) struct Committer {
    jobs: mpsc::Sender<(Box<Manifest>, u64, f64)>,
}

impl Committer {
    /// Starts the thread; `done` hears every outcome (`Err((step, reason))`
    /// for a failed commit). The store is opened at the first commit, so a
    /// job refused at start (bad data, bad layout) leaves no folder behind.
    pub fn start(target: CommitTarget, done: impl Fn(Result<Committed, (u64, String)>) + Send + 'static) -> Self {
        let (jobs, queue) = mpsc::channel::<(Box<Manifest>, u64, f64)>();
        std::thread::Builder::new()
            .name("checkpoint-commit".into())
            .spawn(move || {
                let mut store = None;
                for (manifest, bytes, upload_s) in queue {
                    let started = Instant::now();
                    let step = manifest.step;
                    if store.is_none() {
                        match CheckpointStore::open_with(&target.url, &target.options) {
                            Ok(opened) => store = Some(opened),
                            Err(e) => {
                                done(Err((step, e.to_string())));
                                continue;
                            }
                        }
                    }
                    let store = store.as_ref().expect("opened above");
                    // Once the manifest and `latest` are written the step is
                    // committed: what fails after (pruning, aborting old
                    // uploads) is cleanup, reported, never a failed checkpoint.
                    let result = store
                        .commit(&manifest)
                        .map(|()| Committed {
                            step,
                            url: store.step_url(step),
                            bytes,
                            upload_s,
                            prune_failed: store.prune(target.keep_last).err().map(|e| e.to_string()),
                            abandoned_uploads: store.abort_abandoned_uploads(Some(step)).map_err(|e| e.to_string()),
                            commit_s: started.elapsed().as_secs_f64(),
                        })
                        .map_err(|e| (step, e.to_string()));
                    done(result);
                }
            })
            .expect("spawn the checkpoint commit thread");
        Self { jobs }
    }

    /// Queues a complete step for commit.
    pub fn commit(&self, manifest: Box<Manifest>, bytes: u64, upload_s: f64) {
        let _ = self.jobs.send((manifest, bytes, upload_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(rank: u32, step: u64, outcome: Result<Option<String>, String>) -> ShardWritten {
        let manifest = (rank == 0).then(|| serde_json::to_string(&Manifest::new(step, 0, "test")).unwrap());
        ShardWritten { rank, step, outcome, manifest, bytes: 10, upload_s: 0.5 }
    }

    #[test]
    fn a_step_completes_when_every_rank_reported() {
        let mut saves = PendingSaves::default();
        let report = ShardReport { file: "shards/rank-00001.safetensors".into(), size_bytes: 8, tensors: vec![] };
        let json = serde_json::to_string(&report).unwrap();
        assert!(matches!(saves.add(3, written(1, 20, Ok(Some(json)))), Progress::Waiting));
        assert!(matches!(saves.add(3, written(2, 20, Ok(None))), Progress::Waiting));
        match saves.add(3, written(0, 20, Ok(None))) {
            Progress::Complete { manifest, bytes, .. } => {
                assert_eq!(manifest.step, 20);
                assert_eq!(manifest.shards.len(), 1, "ranks with nothing to write add no shard");
                assert_eq!(bytes, 30);
            }
            _ => panic!("all three ranks reported"),
        }
    }

    #[test]
    fn a_failed_rank_fails_the_step_naming_it() {
        let mut saves = PendingSaves::default();
        assert!(matches!(saves.add(2, written(0, 5, Ok(None))), Progress::Waiting));
        match saves.add(2, written(1, 5, Err("connection refused".into()))) {
            Progress::Failed { step, reason } => {
                assert_eq!(step, 5);
                assert!(reason.contains("rank 1") && reason.contains("connection refused"), "{reason}");
            }
            _ => panic!("a failed shard fails the step"),
        }
    }
}
