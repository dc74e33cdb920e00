//! Attention shards (`attn_tp > 1`, DESIGN section 3): the ranks of one
//! shard group share a micro-batch. Each holds a contiguous slice of its
//! tokens for everything but attention, and a group of the heads for
//! attention: it gathers the normalised inputs of all the group's tokens,
//! runs its heads, and reduce-scatters the output projection's partial sums
//! back to the token slices (Megatron's sequence-parallel attention). The
//! router's load-balancing statistics are summed over the group so the aux
//! loss is the micro-batch's, exactly as on one rank.
//!
//! [`TokenShards`] is the communication the model needs for this; the
//! worker implements it over a communicator, [`NoShards`] is one shard.

use crate::error::ModelError;

/// The collective operations of one shard group (all calls are collective).
pub trait TokenShards {
    /// Shards in the group (`attn_tp`).
    fn count(&self) -> usize;
    /// This rank's shard: it holds token slice `index` and head group `index`.
    fn index(&self) -> usize;
    /// Every shard's rows `[t_local, d]`, concatenated in shard order: `[t, d]`.
    fn gather_rows(&mut self, local: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// Sums `[t, d]` partial rows over the group and returns this shard's slice.
    fn reduce_scatter_rows(&mut self, full: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// Sums small statistics over the group, in place.
    fn sum_stats(&mut self, stats: &mut [f64]) -> Result<(), ModelError>;
}

/// Sums f32 values over the shard group in place (through
/// [`TokenShards::sum_stats`], in f64).
pub fn sum_over_group(shards: &mut dyn TokenShards, values: &mut [f32]) -> Result<(), ModelError> {
    if shards.count() == 1 {
        return Ok(());
    }
    let mut sum: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    shards.sum_stats(&mut sum)?;
    values.iter_mut().zip(sum).for_each(|(v, s)| *v = s as f32);
    Ok(())
}

/// A group of one: every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoShards;

impl TokenShards for NoShards {
    fn count(&self) -> usize {
        1
    }
    fn index(&self) -> usize {
        0
    }
    fn gather_rows(&mut self, local: &[f32]) -> Result<Vec<f32>, ModelError> {
        Ok(local.to_vec())
    }
    fn reduce_scatter_rows(&mut self, full: &[f32]) -> Result<Vec<f32>, ModelError> {
        Ok(full.to_vec())
    }
    fn sum_stats(&mut self, _stats: &mut [f64]) -> Result<(), ModelError> {
        Ok(())
    }
}

/// How a named dense tensor is split over attention shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSplit {
    /// The same on every shard.
    Replicated,
    /// Contiguous blocks of rows (`wq`, `wk`, `wv`: one block of heads each).
    Rows,
    /// Contiguous blocks of columns of a `[d, width]` matrix (`wo`).
    Columns { rows: usize },
}

/// The split of tensor `name` (DESIGN section 5 names) in a model of width `d_model`.
pub fn shard_split(name: &str, d_model: usize) -> ShardSplit {
    // MoA's experts split by heads like the dense projections.
    let expert = |part: &str| name.contains(".attn.experts.") && name.ends_with(part);
    if name.ends_with(".attn.wq.weight")
        || name.ends_with(".attn.wk.weight")
        || name.ends_with(".attn.wv.weight")
        || expert(".wq.weight")
    {
        ShardSplit::Rows
    } else if name.ends_with(".attn.wo.weight") || expert(".wo.weight") {
        ShardSplit::Columns { rows: d_model }
    } else {
        ShardSplit::Replicated
    }
}

/// Shard `index` of `count` of a full tensor.
pub fn take_shard(split: ShardSplit, full: &[f32], index: usize, count: usize) -> Vec<f32> {
    match split {
        ShardSplit::Replicated => full.to_vec(),
        ShardSplit::Rows => {
            let block = full.len() / count;
            full[index * block..(index + 1) * block].to_vec()
        }
        ShardSplit::Columns { rows } => {
            let width = full.len() / rows;
            let block = width / count;
            full.chunks_exact(width).flat_map(|row| &row[index * block..(index + 1) * block]).copied().collect()
        }
    }
}

/// The full tensor from every shard's piece concatenated in shard order.
pub fn join_shards(split: ShardSplit, pieces: &[f32], count: usize) -> Vec<f32> {
    match split {
        ShardSplit::Replicated | ShardSplit::Rows => pieces.to_vec(),
        ShardSplit::Columns { rows } => {
            let piece = pieces.len() / count;
            let block = piece / rows;
            (0..rows)
                .flat_map(|r| (0..count).flat_map(move |s| &pieces[s * piece + r * block..s * piece + (r + 1) * block]))
                .copied()
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_join_back_to_the_full_tensor() {
        let full: Vec<f32> = (0..24).map(|i| i as f32).collect();
        for split in [ShardSplit::Rows, ShardSplit::Columns { rows: 3 }, ShardSplit::Replicated] {
            let pieces: Vec<f32> = (0..2).flat_map(|i| take_shard(split, &full, i, 2)).collect();
            if split != ShardSplit::Replicated {
                assert_eq!(join_shards(split, &pieces, 2), full, "{split:?}");
            }
        }
        // Columns of a [3, 8] matrix: shard 1 holds columns 4..8 of every row.
        assert_eq!(take_shard(ShardSplit::Columns { rows: 3 }, &full, 1, 2)[..4], [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(shard_split("layers.0.attn.wo.weight", 3), ShardSplit::Columns { rows: 3 });
        assert_eq!(shard_split("layers.0.attn_norm.weight", 3), ShardSplit::Replicated);
        assert_eq!(shard_split("layers.1.attn.experts.7.wq.weight", 3), ShardSplit::Rows);
        assert_eq!(shard_split("layers.1.attn.experts.7.wo.weight", 3), ShardSplit::Columns { rows: 3 });
        assert_eq!(shard_split("layers.1.attn.router.weight", 3), ShardSplit::Replicated);
    }
}
