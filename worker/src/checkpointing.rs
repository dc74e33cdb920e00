//! Saving checkpoints while training goes on (DESIGN section 6).
//!
//! A save costs the training step only a copy of this rank's share of the
//! state into host buffers; a background thread uploads it as the rank's
//! shard. At most one save is in flight: the next one first waits for it,
//! which bounds memory to one copy of the rank's state.
//!
//! The commit needs every rank's shard. With a coordinator, each upload
//! thread reports its shard there and the coordinator commits (manifest,
//! then `latest`, then pruning) without the ranks waiting. Without one
//! (library use, ranks under a bare mpirun) the ranks commit together at
//! the save itself: each waits for its upload, the reports are gathered
//! and rank 0 commits — correct, but training waits for the upload.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use checkpoint::{CheckpointStore, Manifest, ShardReport, TensorRef};
use collectives::Communicator;
use layout::{ParallelDims, PlacementPlan};
use wire::client::{CoordinatorClient, ShardSender};
use wire::protocol::ShardWritten;

use crate::config::JobConfig;
use crate::error::WorkerError;
use crate::state::{write_snapshot, OwnedTensor, ShardTensor, ShardWrites, TrainState};
use crate::sync::gather_json;

/// Fault injection for the test suite: every upload first sleeps this many
/// milliseconds, so a test can kill a process while one is in flight.
pub const UPLOAD_DELAY_VAR: &str = "SWITCHYARD_FAULT_UPLOAD_DELAY_MS";

fn injected_upload_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var(UPLOAD_DELAY_VAR).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// What a save cost the training loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveStall {
    /// Waiting for the previous save's upload to finish.
    pub waited_s: f64,
    /// Copying tensors (and, without a coordinator, uploading and committing).
    pub save_s: f64,
}

/// What an upload thread hands back: the shard's report, and the
/// snapshot's buffers for the next save to reuse.
type UploadResult = (Result<Option<ShardReport>, WorkerError>, Vec<OwnedTensor>);

/// Where a save's tensors go in the checkpoint: the job and its layout.
#[derive(Clone, Copy)]
pub(crate) struct SaveAt<'a> {
    pub job: &'a JobConfig,
    pub dims: &'a ParallelDims,
    pub placement: &'a PlacementPlan,
}

/// How a save writes its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveKind {
    /// Training goes on: copy the tensors, upload them from a thread.
    Background,
    /// The caller waits for it (the job's last save, a rebalance): write
    /// the tensors in place, on this thread, without a second copy.
    InPlace,
}

/// One rank's shard upload and its report to the coordinator.
struct Upload {
    store: Arc<CheckpointStore>,
    step: u64,
    rank: usize,
    sender: Option<ShardSender>,
    /// Rank 0's manifest, for the coordinator to commit.
    manifest_json: Option<String>,
}

impl Upload {
    /// Writes the shard and, with a coordinator, reports it there.
    fn run(self, tensors: &[TensorRef<'_>]) -> Result<Option<ShardReport>, WorkerError> {
        let started = Instant::now();
        if let Some(delay) = injected_upload_delay() {
            std::thread::sleep(delay);
        }
        let result = write_snapshot(&self.store, self.step, self.rank, tensors);
        if let Some(sender) = self.sender {
            let outcome = match &result {
                Ok(report) => Ok(report.as_ref().map(|r| serde_json::to_string(r).expect("reports serialise"))),
                Err(e) => Err(e.to_string()),
            };
            let bytes = result.as_ref().ok().and_then(Option::as_ref).map_or(0, |r| r.size_bytes);
            // A lost coordinator stops the job by itself; nothing to add here.
            let _ = sender.send(ShardWritten {
                rank: self.rank as u32,
                step: self.step,
                outcome,
                manifest: self.manifest_json,
                bytes,
                upload_s: started.elapsed().as_secs_f64(),
            });
        }
        result
    }
}

/// A rank's checkpoint writer.
pub(crate) struct Checkpointer<'c> {
    store: Arc<CheckpointStore>,
    client: Option<&'c CoordinatorClient>,
    keep_last: usize,
    /// The background upload still running, if any.
    in_flight: Option<JoinHandle<UploadResult>>,
    /// The last snapshot's buffers, reused by the next one.
    spare: Vec<OwnedTensor>,
    /// Newest step saved (written, perhaps not yet committed).
    last_saved: Option<u64>,
    /// Newest step committed without a coordinator (the ranks did it).
    committed_here: Option<u64>,
    /// Newest commit already handed out by [`Self::newly_committed`].
    announced: Option<u64>,
}

impl<'c> Checkpointer<'c> {
    pub fn new(store: CheckpointStore, client: Option<&'c CoordinatorClient>, keep_last: usize) -> Self {
        Self {
            store: Arc::new(store),
            client,
            keep_last,
            in_flight: None,
            spare: Vec::new(),
            last_saved: None,
            committed_here: None,
            announced: None,
        }
    }

    /// The store checkpoints go to.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Starts saving `state` (full tensors): every rank calls this at the
    /// same step. Dense tensors are written by rank 0; each expert by its
    /// owner in the first expert-data-parallel group.
    ///
    /// With [`SaveKind::Background`] the step's tensors are copied and
    /// uploaded by a thread while training goes on; [`SaveKind::InPlace`]
    /// writes them in place on this thread, so the end of a job never
    /// holds a second copy of the state.
    pub fn save(
        &mut self,
        comm: &mut dyn Communicator,
        at: SaveAt<'_>,
        state: &TrainState,
        kind: SaveKind,
    ) -> Result<SaveStall, WorkerError> {
        let started = Instant::now();
        self.wait_upload()?;
        let waited_s = started.elapsed().as_secs_f64();
        let rank = comm.rank();
        let (ep_rank, first_group) = (at.dims.ep_rank(rank), at.dims.edp_rank(rank) == 0);
        let writes_expert = |layer: usize, expert: usize| first_group && at.placement.owner(layer, expert) == ep_rank;
        let writes = ShardWrites { dense: rank == 0, expert: &writes_expert, attn_experts: first_group };
        let manifest = (rank == 0).then(|| state.manifest(at.job, at.dims, at.placement, Vec::new()));
        let upload = Upload {
            store: Arc::clone(&self.store),
            step: state.step,
            rank,
            sender: self.client.map(CoordinatorClient::shard_sender),
            manifest_json: manifest
                .as_ref()
                .filter(|_| self.client.is_some())
                .map(|m| serde_json::to_string(m).expect("a manifest serialises")),
        };
        self.last_saved = Some(state.step);
        let report = match kind {
            SaveKind::InPlace => {
                let tensors = state.shard_tensors(at.job, writes);
                let refs: Vec<TensorRef> = tensors.iter().map(ShardTensor::as_ref).collect();
                let _span = tracing::info_span!("checkpoint upload", step = state.step, in_place = true).entered();
                upload.run(&refs)?
            }
            SaveKind::Background => {
                let copy = tracing::info_span!("checkpoint copy", step = state.step).entered();
                let mut tensors = std::mem::take(&mut self.spare);
                state.snapshot_into(at.job, writes, &mut tensors);
                drop(copy);
                let step = state.step;
                let world_rank = collectives::trace_rank::get();
                let thread = std::thread::Builder::new()
                    .name(format!("checkpoint-upload-{step}"))
                    .spawn(move || {
                        collectives::trace_rank::inherit(world_rank);
                        let _span = tracing::info_span!("checkpoint upload", step).entered();
                        let refs: Vec<TensorRef> = tensors.iter().map(OwnedTensor::as_ref).collect();
                        let result = upload.run(&refs);
                        drop(refs);
                        (result, tensors)
                    })
                    .expect("spawn the checkpoint upload thread");
                self.in_flight = Some(thread);
                if self.client.is_some() {
                    None
                } else {
                    self.wait_upload()?
                }
            }
        };
        if self.client.is_none() {
            self.commit_together(comm, manifest, report)?;
        }
        Ok(SaveStall { waited_s, save_s: started.elapsed().as_secs_f64() - waited_s })
    }

    /// Waits until the newest save is committed (the end of the job, a
    /// rebalance that reloads from it); returns its step.
    pub fn finish(&mut self) -> Result<Option<u64>, WorkerError> {
        let Some(client) = self.client else {
            return Ok(self.committed_here);
        };
        self.wait_upload()?;
        let Some(step) = self.last_saved.filter(|&s| client.last_committed().is_none_or(|c| c < s)) else {
            return Ok(client.last_committed());
        };
        client.wait_committed(step).map_err(|e| WorkerError::coordinator(client.welcome().rank as usize, e))?;
        Ok(Some(step))
    }

    /// A step committed since the last call, if any (for the progress line).
    pub fn newly_committed(&mut self) -> Option<u64> {
        let newest = self.client.map_or(self.committed_here, CoordinatorClient::last_committed)?;
        if self.announced.is_some_and(|a| a >= newest) {
            return None;
        }
        self.announced = Some(newest);
        Some(newest)
    }

    /// Joins the running upload, if any; its error is this rank's error.
    fn wait_upload(&mut self) -> Result<Option<ShardReport>, WorkerError> {
        let Some(thread) = self.in_flight.take() else {
            return Ok(None);
        };
        let (result, buffers) = thread.join().map_err(|_| WorkerError::RankPanicked)?;
        self.spare = buffers;
        result
    }

    /// Without a coordinator: every rank has written its shard (`report`),
    /// the reports are gathered and rank 0 commits.
    fn commit_together(
        &mut self,
        comm: &mut dyn Communicator,
        manifest: Option<Manifest>,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError> {
        let reports: Vec<Option<ShardReport>> = gather_json(comm, &report)?;
        let step = self.last_saved.expect("a save was just made");
        if let Some(mut manifest) = manifest {
            for report in reports.into_iter().flatten() {
                manifest.add_shard(report);
            }
            self.store.commit(&manifest)?;
            // Committed: cleanup that fails is left to the next commit, as
            // the coordinator does (this path has no console to say so).
            let _ = self.store.prune(self.keep_last);
            let _ = self.store.abort_abandoned_uploads(Some(step));
        }
        comm.barrier()?;
        self.committed_here = Some(step);
        Ok(())
    }
}
