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

use checkpoint::{CheckpointStore, Manifest, ShardReport};
use collectives::Communicator;
use layout::{ParallelDims, PlacementPlan};
use wire::client::CoordinatorClient;
use wire::protocol::ShardWritten;

use crate::config::JobConfig;
use crate::error::WorkerError;
use crate::state::{write_snapshot, OwnedTensor, TrainState};
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

/// One save whose upload may still be running.
struct InFlight {
    step: u64,
    upload: JoinHandle<UploadResult>,
}

/// A rank's checkpoint writer.
pub(crate) struct Checkpointer<'c> {
    store: Arc<CheckpointStore>,
    client: Option<&'c CoordinatorClient>,
    keep_last: usize,
    in_flight: Option<InFlight>,
    /// The last snapshot's buffers, reused by the next one.
    spare: Vec<OwnedTensor>,
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
    pub fn save(
        &mut self,
        comm: &mut dyn Communicator,
        job: &JobConfig,
        dims: &ParallelDims,
        placement: &PlacementPlan,
        state: &TrainState,
    ) -> Result<SaveStall, WorkerError> {
        let started = Instant::now();
        self.wait_upload()?;
        let waited_s = started.elapsed().as_secs_f64();
        let rank = comm.rank();
        let (ep_rank, first_group) = (dims.ep_rank(rank), dims.edp_rank(rank) == 0);
        let writes_expert = |layer: usize, expert: usize| first_group && placement.owner(layer, expert) == ep_rank;
        let mut tensors = std::mem::take(&mut self.spare);
        state.snapshot_into(job, rank == 0, &writes_expert, &mut tensors);
        let manifest = (rank == 0).then(|| state.manifest(job, dims, placement, Vec::new()));
        let step = state.step;
        let store = Arc::clone(&self.store);
        let sender = self.client.map(CoordinatorClient::shard_sender);
        let manifest_json = manifest
            .as_ref()
            .filter(|_| sender.is_some())
            .map(|m| serde_json::to_string(m).expect("a manifest serialises"));
        let upload = std::thread::Builder::new()
            .name(format!("checkpoint-upload-{step}"))
            .spawn(move || {
                let upload_started = Instant::now();
                if let Some(delay) = injected_upload_delay() {
                    std::thread::sleep(delay);
                }
                let result = write_snapshot(&store, step, rank, &tensors);
                if let Some(sender) = sender {
                    let outcome = match &result {
                        Ok(report) => Ok(report.as_ref().map(|r| serde_json::to_string(r).expect("reports serialise"))),
                        Err(e) => Err(e.to_string()),
                    };
                    let bytes = result.as_ref().ok().and_then(Option::as_ref).map_or(0, |r| r.size_bytes);
                    let upload_s = upload_started.elapsed().as_secs_f64();
                    // A lost coordinator stops the job by itself; nothing to add here.
                    let _ = sender.send(ShardWritten {
                        rank: rank as u32,
                        step,
                        outcome,
                        manifest: manifest_json,
                        bytes,
                        upload_s,
                    });
                }
                (result, tensors)
            })
            .expect("spawn the checkpoint upload thread");
        self.in_flight = Some(InFlight { step, upload });
        if self.client.is_none() {
            self.commit_together(comm, manifest)?;
        }
        Ok(SaveStall { waited_s, save_s: started.elapsed().as_secs_f64() - waited_s })
    }

    /// Waits until the newest save is committed (the end of the job, a
    /// rebalance that reloads from it); returns its step.
    pub fn finish(&mut self) -> Result<Option<u64>, WorkerError> {
        let Some(client) = self.client else {
            return Ok(self.committed_here);
        };
        let Some(step) = self.in_flight.as_ref().map(|f| f.step) else {
            return Ok(client.last_committed());
        };
        self.wait_upload()?;
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
        let Some(flight) = self.in_flight.take() else {
            return Ok(None);
        };
        let (result, buffers) = flight.upload.join().map_err(|_| WorkerError::RankPanicked)?;
        self.spare = buffers;
        result
    }

    /// Without a coordinator: every rank waits for its upload, rank 0 commits.
    fn commit_together(&mut self, comm: &mut dyn Communicator, manifest: Option<Manifest>) -> Result<(), WorkerError> {
        let step = self.in_flight.as_ref().map(|f| f.step).expect("a save was just started");
        let report = self.wait_upload()?;
        let reports: Vec<Option<ShardReport>> = gather_json(comm, &report)?;
        if let Some(mut manifest) = manifest {
            for report in reports.into_iter().flatten() {
                manifest.add_shard(report);
            }
            self.store.commit(&manifest)?;
            self.store.prune(self.keep_last)?;
        }
        comm.barrier()?;
        self.committed_here = Some(step);
        Ok(())
    }
}
