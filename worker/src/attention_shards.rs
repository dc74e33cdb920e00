//! Attention shards over a communicator (`attn_tp > 1`): the model's
//! [`TokenShards`] hooks as collectives of the shard group, and the state's
//! attention tensors cut to this rank's heads or joined back for a
//! checkpoint (which always holds full tensors, so any layout can resume it).

use crate::error::WorkerError;
use crate::state::TrainState;
use collectives::Communicator;
use model::shards::{join_shards, shard_split, take_shard, ShardSplit, TokenShards};
use model::{ModelError, ModelWeights};

/// The shard group of one micro-batch: ranks with the same data-parallel index.
pub struct ShardGroup<'a> {
    pub comm: &'a mut dyn Communicator,
}

/// Keeps the communicator's error as the source, so an abort stays recognisable by type.
fn comm_error(e: collectives::CommError) -> ModelError {
    ModelError::comm(e)
}

impl TokenShards for ShardGroup<'_> {
    fn count(&self) -> usize {
        self.comm.size()
    }
    fn index(&self) -> usize {
        self.comm.rank()
    }
    fn gather_rows(&mut self, local: &[f32]) -> Result<Vec<f32>, ModelError> {
        Ok(self.comm.all_gather_v(local).map_err(comm_error)?.values.into_vec())
    }
    fn reduce_scatter_rows(&mut self, full: &[f32]) -> Result<Vec<f32>, ModelError> {
        let counts = vec![full.len() / self.count(); self.count()];
        self.comm.reduce_scatter_sum(full, &counts).map_err(comm_error)
    }
    fn sum_stats(&mut self, stats: &mut [f64]) -> Result<(), ModelError> {
        self.comm.all_reduce_sum_f64(stats).map_err(comm_error)
    }
}

/// Keeps only shard `index` of `count` of every attention tensor of the
/// weights and both optimizer moments.
pub fn cut_to_shard(state: &mut TrainState, d_model: usize, index: usize, count: usize) {
    for weights in [&mut state.weights, &mut state.exp_avg, &mut state.exp_avg_sq] {
        for (name, tensor) in weights.dense.tensors_mut() {
            let split = shard_split(&name, d_model);
            if split != ShardSplit::Replicated {
                *tensor = take_shard(split, tensor, index, count);
            }
        }
    }
}

/// A copy of `state` with full attention tensors, gathered over the shard group.
pub fn joined(state: &TrainState, comm: &mut dyn Communicator, d_model: usize) -> Result<TrainState, WorkerError> {
    let mut full = state.clone();
    for weights in [&mut full.weights, &mut full.exp_avg, &mut full.exp_avg_sq] {
        join_weights(weights, comm, d_model)?;
    }
    Ok(full)
}

fn join_weights(weights: &mut ModelWeights, comm: &mut dyn Communicator, d_model: usize) -> Result<(), WorkerError> {
    for (name, tensor) in weights.dense.tensors_mut() {
        let split = shard_split(&name, d_model);
        if split != ShardSplit::Replicated {
            let pieces = comm.all_gather_v(tensor)?.values;
            *tensor = join_shards(split, &pieces, comm.size());
        }
    }
    Ok(())
}
