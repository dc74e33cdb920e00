//! Gradient synchronisation after a step's passes: the second lane's
//! gradients added in, replicated dense tensors summed over every rank,
//! attention shards over the ranks holding the same shard, experts (and
//! partitioned attention experts) over their replicas; then the global
//! gradient norm, each tensor counted once.

use super::groups::Groups;
use crate::error::WorkerError;
use crate::state::attn_expert_of;
use crate::sync::all_reduce_tensors;
use collectives::Communicator;
use layout::{ParallelDims, PlacementPlan};
use model::optim::sum_of_squares;
use model::shards::{shard_split, ShardSplit};
use model::weights::ExpertStore;
use model::{ModelConfig, ModelWeights};

/// Whether dense tensor `name` belongs to one layer (`layers.N.*`), which gradient buckets carry.
pub(crate) fn is_layer_tensor(name: &str) -> bool {
    name.starts_with("layers.")
}

/// Whether `name` is a partitioned attention expert's tensor.
fn is_partitioned(inputs: &SyncInputs, name: &str) -> bool {
    inputs.attn_placement.is_some() && attn_expert_of(name).is_some()
}

/// Whether `name` is cut over attention shards in this layout.
fn is_sharded(dims: &ParallelDims, name: &str, d_model: usize) -> bool {
    dims.attn_tp > 1 && shard_split(name, d_model) != ShardSplit::Replicated
}

/// What the sync needs to know of the step.
pub(crate) struct SyncInputs<'a> {
    pub cfg: &'a ModelConfig,
    pub dims: ParallelDims,
    pub ep_rank: usize,
    pub placement: &'a PlacementPlan,
    /// Where MoA's attention experts live when partitioned (each rank
    /// holds its own; empty tensors stand for the others).
    pub attn_placement: Option<&'a PlacementPlan>,
    /// Whether gradient buckets already summed the layers' dense
    /// gradients of both lanes over every rank.
    pub bucketed: bool,
}

/// Sums the gradients as the layout requires and returns the global norm
/// (before clipping).
pub(crate) fn sync_gradients(
    world: &mut dyn Communicator,
    groups: &mut Groups,
    grads: &mut ModelWeights,
    grads_b: Option<&ModelWeights>,
    inputs: &SyncInputs,
) -> Result<f64, WorkerError> {
    let SyncInputs { cfg, dims, bucketed, .. } = *inputs;
    if let Some(grads_b) = grads_b {
        let dense = grads.dense.tensors_mut().into_iter().zip(grads_b.dense.tensors());
        let dense = dense.filter(|((name, _), _)| !(bucketed && is_layer_tensor(name)));
        let experts = grads.experts.tensors_mut().into_iter().zip(grads_b.experts.tensors());
        for ((_, g), (_, b)) in dense.chain(experts) {
            g.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
    if dims.world > 1 {
        let (partitioned, dense): (Vec<_>, Vec<_>) =
            grads.dense.tensors_mut().into_iter().partition(|(name, _)| is_partitioned(inputs, name));
        if let Some(edp) = groups.edp.as_mut() {
            let held = partitioned.into_iter().filter(|(_, g)| !g.is_empty());
            all_reduce_tensors(edp.as_mut(), held.collect())?;
        }
        let (sharded, replicated): (Vec<_>, Vec<_>) =
            dense.into_iter().partition(|(name, _)| is_sharded(&dims, name, cfg.d_model));
        let replicated = replicated.into_iter().filter(|(name, _)| !bucketed || !is_layer_tensor(name));
        all_reduce_tensors(world, replicated.collect())?;
        if let Some(dp) = groups.dp.as_mut() {
            all_reduce_tensors(dp.as_mut(), sharded)?;
        }
    }
    if let Some(edp) = groups.edp.as_mut() {
        all_reduce_tensors(edp.as_mut(), grads.experts.tensors_mut())?;
    }
    sum_expert_replicas(groups.ep.as_mut(), inputs.placement, &mut grads.experts, cfg)?;
    global_norm(groups, grads, inputs)
}

/// The norm over every rank's gradients: replicated tensors are identical
/// everywhere now, so each attention shard counts once per shard group and
/// each expert once per expert-parallel group.
fn global_norm(groups: &mut Groups, grads: &ModelWeights, inputs: &SyncInputs) -> Result<f64, WorkerError> {
    let (mut dense_sq, mut shard_sq, mut expert_sq) = (0.0f64, [0.0f64], [0.0f64]);
    for (name, g) in grads.dense.tensors() {
        if is_partitioned(inputs, &name) {
            expert_sq[0] += sum_of_squares(g);
        } else if is_sharded(&inputs.dims, &name, inputs.cfg.d_model) {
            shard_sq[0] += sum_of_squares(g);
        } else {
            dense_sq += sum_of_squares(g);
        }
    }
    if let Some(tp) = groups.tp.as_mut() {
        tp.all_reduce_sum_f64(&mut shard_sq)?;
    }
    for (l, layer) in grads.experts.layers.iter().enumerate() {
        for (_, g) in layer.iter().filter(|(&e, _)| inputs.placement.owner(l, e) == inputs.ep_rank) {
            for t in [&g.w1, &g.w3, &g.w2] {
                expert_sq[0] += sum_of_squares(t);
            }
        }
    }
    groups.ep.all_reduce_sum_f64(&mut expert_sq)?;
    Ok((dense_sq + shard_sq[0] + expert_sq[0]).sqrt())
}

/// Sums the gradients of experts that have several owners in the plan
/// (replicas of hot experts) over the expert-parallel group, so every
/// replica applies the same update.
fn sum_expert_replicas(
    ep: &mut dyn Communicator,
    plan: &PlacementPlan,
    grads: &mut ExpertStore,
    cfg: &ModelConfig,
) -> Result<(), WorkerError> {
    let replicated: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| plan.owners[l][e].len() > 1)
        .collect();
    if replicated.is_empty() {
        return Ok(());
    }
    let size = 3 * cfg.ffn_hidden * cfg.d_model;
    let mut flat = vec![0.0f32; replicated.len() * size];
    for (slot, &(l, e)) in flat.chunks_exact_mut(size).zip(&replicated) {
        if let Some(g) = grads.layers[l].get(&e) {
            let n = g.w1.len();
            slot[..n].copy_from_slice(&g.w1);
            slot[n..2 * n].copy_from_slice(&g.w3);
            slot[2 * n..].copy_from_slice(&g.w2);
        }
    }
    ep.all_reduce_sum(&mut flat)?;
    for (slot, &(l, e)) in flat.chunks_exact(size).zip(&replicated) {
        if let Some(g) = grads.layers[l].get_mut(&e) {
            let n = g.w1.len();
            g.w1.copy_from_slice(&slot[..n]);
            g.w3.copy_from_slice(&slot[n..2 * n]);
            g.w2.copy_from_slice(&slot[2 * n..]);
        }
    }
    Ok(())
}
