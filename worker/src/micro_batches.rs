//! The forward and backward passes of one step's micro-batches on this
//! rank: one after another on one lane, or two at a time on two lanes when
//! micro-batches interleave (`[overlap] interleave`).
//!
//! A lane is a thread with its own groups (its all-to-all must not mix with
//! the other lane's) and its own gradient buffers; the step adds the second
//! lane's gradients into the first's afterwards. With buckets, the last
//! group of micro-batches hands each finished layer to the buckets.

use crate::attention_shards::ShardGroup;
use crate::config::JobConfig;
use crate::data::{DataSource, StepSlice};
use crate::dispatch::{AllToAllExperts, DispatchStats, RowBudget};
use crate::error::WorkerError;
use crate::overlap::exposure::Exposure;
use crate::overlap::grad_buckets::GradBuckets;
use crate::overlap::Techniques;
use collectives::comm_thread::CommThread;
use collectives::Communicator;
use layout::{ParallelDims, PlacementPlan};
use model::model::{forward_backward_with, ForwardStats, LossScales, MicroBatch, PassInputs, PassOptions};
use model::moe::LocalExperts;
use model::ops::rope::RopeTable;
use model::shards::NoShards;
use model::{DenseLayerWeights, ModelWeights};
use std::sync::Mutex;
use std::time::Instant;

/// What every micro-batch of a step shares.
pub struct StepInputs<'a> {
    pub job: &'a JobConfig,
    pub dims: ParallelDims,
    pub rope: &'a RopeTable,
    pub weights: &'a ModelWeights,
    pub placement: &'a PlacementPlan,
    /// Where MoA's attention experts live when partitioned.
    pub attn_placement: Option<&'a PlacementPlan>,
    pub scales: LossScales,
    pub data: &'a DataSource,
    pub step: u64,
    /// This rank's first sequence of the global batch.
    pub first_sequence: usize,
    pub techniques: Techniques,
    pub exposure: &'a Exposure,
    /// The bound on rows this rank's experts take per exchange.
    pub row_budget: Option<RowBudget>,
    /// The node of each rank of this rank's expert-parallel group.
    pub ep_nodes: &'a [usize],
}

/// The groups and gradient buffers micro-batches run on.
pub struct Lane<'g> {
    pub ep: &'g mut dyn Communicator,
    pub pipe: Option<&'g CommThread>,
    pub tp: Option<&'g mut dyn Communicator>,
    pub grads: &'g mut ModelWeights,
}

/// What one micro-batch's pass measured.
pub struct MicroResult {
    pub stats: ForwardStats,
    pub dispatch: DispatchStats,
}

type LayerHook<'h> = &'h mut (dyn FnMut(usize, &DenseLayerWeights) + Send);

/// Runs micro-batch `m` on `lane`, adding its gradients into the lane's buffers.
fn run_one(
    inputs: &StepInputs,
    lane: &mut Lane,
    m: usize,
    hook: Option<LayerHook>,
) -> Result<MicroResult, WorkerError> {
    let job = inputs.job;
    let cfg = &job.model;
    let micro = job.train.micro_batch_size;
    let at = StepSlice {
        seed: job.train.seed,
        step: inputs.step,
        global_batch_size: job.train.global_batch_size,
        first: inputs.first_sequence + m * micro,
        count: micro,
        len: cfg.seq_len + 1,
    };
    let (tokens, modality) = inputs.data.marked_batch_for_step(at, cfg.modalities)?;
    let mb = MicroBatch { tokens: &tokens, batch: micro, modality: &modality };
    let t = inputs.techniques;
    let opts = PassOptions {
        attention_during_moe: t.attention_during_moe,
        on_layer_grads: hook.map(|h| h as &mut dyn FnMut(usize, &DenseLayerWeights)),
    };
    let pass = PassInputs { cfg, rope: inputs.rope, dense: &inputs.weights.dense, mb, scales: inputs.scales };
    let grads = &mut *lane.grads;
    let mut experts = LocalExperts::new(cfg, &inputs.weights.experts, &mut grads.experts);
    let (stats, dispatch) = if inputs.dims.world == 1 {
        let stats = forward_backward_with(pass, &mut grads.dense, &mut experts, &mut NoShards, opts)?;
        (stats, DispatchStats::default())
    } else {
        let mut a2a = AllToAllExperts::new(cfg, &mut *lane.ep, inputs.placement, experts)
            .exposed_to(inputs.exposure)
            .with_row_budget(inputs.row_budget)
            .with_attention_experts(inputs.attn_placement)
            .on_nodes(inputs.ep_nodes.to_vec());
        if let (Some(pipe), Some(chunks)) = (lane.pipe, t.pipe_chunks) {
            a2a = a2a.pipelined(pipe, chunks);
        }
        let stats = match lane.tp.as_deref_mut() {
            Some(tp) => {
                let mut shards = ShardGroup { comm: tp };
                forward_backward_with(pass, &mut grads.dense, &mut a2a, &mut shards, opts)?
            }
            None => forward_backward_with(pass, &mut grads.dense, &mut a2a, &mut NoShards, opts)?,
        };
        (stats, a2a.stats)
    };
    Ok(MicroResult { stats, dispatch })
}

/// The micro-batches of a step in the groups they run in: one at a time,
/// or in pairs when interleaving (a lone first one when the count is odd,
/// so the last group, which feeds the buckets, is always a pair).
fn schedule(micro_batches: usize, pairs: bool) -> Vec<Vec<usize>> {
    if !pairs || micro_batches < 2 {
        return (0..micro_batches).map(|m| vec![m]).collect();
    }
    let lone = micro_batches % 2;
    let mut groups: Vec<Vec<usize>> = (0..lone).map(|m| vec![m]).collect();
    groups.extend((lone..micro_batches).step_by(2).map(|m| vec![m, m + 1]));
    groups
}

/// What a step's passes measured.
pub struct Passes {
    /// Each micro-batch's, in micro-batch order.
    pub results: Vec<MicroResult>,
    /// Wall time of all the passes (two lanes at once count once).
    pub wall_s: f64,
    /// Time the bucket all-reduces ran, when there were buckets.
    pub bucket_s: Option<f64>,
}

/// Runs every micro-batch of the step. With `bucket_pipe`, the dense layer
/// gradients of the last group go out in buckets during its backward pass
/// and come back summed over every rank (and both lanes) into `lane_a`'s
/// buffers.
pub fn run_micro_batches(
    inputs: &StepInputs,
    lane_a: &mut Lane,
    mut lane_b: Option<&mut Lane>,
    micro_batches: usize,
    bucket_pipe: Option<&CommThread>,
) -> Result<Passes, WorkerError> {
    let started = Instant::now();
    let groups = schedule(micro_batches, lane_b.is_some());
    let last_lanes = groups.last().map_or(1, Vec::len);
    let buckets = match (bucket_pipe, inputs.techniques.bucket_values) {
        (Some(pipe), Some(values)) => Some(Mutex::new(GradBuckets::new(pipe, values, last_lanes))),
        _ => None,
    };
    let hook_for = |last: bool| {
        let buckets = buckets.as_ref().filter(|_| last)?;
        Some(move |layer: usize, g: &DenseLayerWeights| {
            buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).layer_done(layer, g)
        })
    };
    let mut results = Vec::with_capacity(micro_batches);
    for (i, group) in groups.iter().enumerate() {
        let last = i + 1 == groups.len();
        inputs.exposure.set_lanes(group.len());
        match (group.as_slice(), lane_b.as_deref_mut()) {
            (&[m], _) => {
                let mut hook = hook_for(last);
                results.push(run_one(inputs, lane_a, m, hook.as_mut().map(|h| h as LayerHook))?);
            }
            (&[m0, m1], Some(lane_b)) => {
                let (mut hook_a, mut hook_b) = (hook_for(last), hook_for(last));
                let (a, b) = std::thread::scope(|s| {
                    let rank = collectives::trace_rank::get();
                    let second = s.spawn(move || {
                        collectives::trace_rank::inherit(rank);
                        run_one(inputs, lane_b, m1, hook_b.as_mut().map(|h| h as LayerHook))
                    });
                    let first = run_one(inputs, lane_a, m0, hook_a.as_mut().map(|h| h as LayerHook));
                    (first, second.join().expect("the second lane does not panic"))
                });
                results.push(a?);
                results.push(b?);
            }
            _ => unreachable!("groups are singles, or pairs with a second lane"),
        }
    }
    inputs.exposure.set_lanes(1);
    let wall_s = started.elapsed().as_secs_f64();
    let bucket_s = match buckets {
        Some(buckets) => {
            let buckets = buckets.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
            Some(buckets.finish(&mut lane_a.grads.dense.layers, inputs.exposure)?.as_secs_f64())
        }
        None => None,
    };
    Ok(Passes { results, wall_s, bucket_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_end_the_step() {
        assert_eq!(schedule(3, false), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(schedule(4, true), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(schedule(3, true), vec![vec![0], vec![1, 2]]);
        assert_eq!(schedule(1, true), vec![vec![0]]);
    }
}
