//! `ParallelDims`: the two foldings of the ranks (DESIGN section 3), checked
//! once, before anything starts.
//!
//! Dense part: `attn_tp x dp = world`. Expert part: `ep x edp = world`.
//! Rank r sits in data-parallel replica `r / attn_tp` at attention shard
//! `r % attn_tp`, and in expert-parallel group `r / ep` at position `r % ep`.

use serde::{Deserialize, Serialize};

/// The parallel layout of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelDims {
    pub world: usize,
    /// Attention shards (head groups) per data-parallel replica.
    pub attn_tp: usize,
    /// Data-parallel replicas of the dense part.
    pub dp: usize,
    /// Ranks the experts of one replica are spread over.
    pub ep: usize,
    /// Replicas of each expert (expert data parallelism).
    pub edp: usize,
}

/// A layout that cannot work, with the `[parallel]` or `[model]` key to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    pub key: &'static str,
    pub reason: String,
}

// Written by hand rather than with thiserror: this crate has no dependency
// but serde, so the simulator and `ckpt inspect` link nothing else for it.
impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid parallel layout: {}: {}", self.key, self.reason)
    }
}

impl std::error::Error for LayoutError {}

/// The model sizes a layout must divide.
#[derive(Debug, Clone, Copy)]
pub struct ModelSizes {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_experts: usize,
}

impl ParallelDims {
    /// Checks and derives the layout. `ep == 0` picks the largest divisor of
    /// `world` that also divides `n_experts` (all ranks when possible).
    pub fn new(world: usize, attn_tp: usize, ep: usize, sizes: ModelSizes) -> Result<Self, LayoutError> {
        let bad = |key: &'static str, reason: String| Err(LayoutError { key, reason });
        if world == 0 {
            return bad("parallel.ranks", "must be at least 1".into());
        }
        if attn_tp == 0 || !world.is_multiple_of(attn_tp) {
            return bad("parallel.attn_tp", format!("{attn_tp} attention shards do not divide {world} ranks"));
        }
        if !sizes.n_heads.is_multiple_of(attn_tp) || !sizes.n_kv_heads.is_multiple_of(attn_tp) {
            return bad(
                "parallel.attn_tp",
                format!(
                    "{attn_tp} attention shards must divide n_heads = {} and n_kv_heads = {}",
                    sizes.n_heads, sizes.n_kv_heads
                ),
            );
        }
        let ep = if ep == 0 {
            (1..=world).rev().find(|&e| world.is_multiple_of(e) && sizes.n_experts.is_multiple_of(e)).unwrap_or(1)
        } else {
            ep
        };
        if !world.is_multiple_of(ep) {
            return bad("parallel.ep", format!("expert parallelism {ep} does not divide {world} ranks"));
        }
        if !sizes.n_experts.is_multiple_of(ep) {
            return bad(
                "parallel.ep",
                format!("n_experts = {} cannot be split evenly over {ep} ranks: pick ep dividing it", sizes.n_experts),
            );
        }
        Ok(Self { world, attn_tp, dp: world / attn_tp, ep, edp: world / ep })
    }

    /// The data-parallel replica of `rank`.
    pub fn dp_rank(&self, rank: usize) -> usize {
        rank / self.attn_tp
    }

    /// The attention shard (head group and token slice) of `rank` in its replica.
    pub fn tp_rank(&self, rank: usize) -> usize {
        rank % self.attn_tp
    }

    /// The position of `rank` in its expert-parallel group.
    pub fn ep_rank(&self, rank: usize) -> usize {
        rank % self.ep
    }

    /// The expert-data-parallel replica (which copy of the experts) of `rank`.
    pub fn edp_rank(&self, rank: usize) -> usize {
        rank / self.ep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: ModelSizes = ModelSizes { n_heads: 4, n_kv_heads: 2, n_experts: 8 };

    #[test]
    fn layouts_fold_the_same_ranks_two_ways() {
        let d = ParallelDims::new(4, 2, 0, SIZES).unwrap();
        assert_eq!((d.dp, d.ep, d.edp), (2, 4, 1));
        assert_eq!((d.dp_rank(3), d.ep_rank(3), d.edp_rank(3)), (1, 3, 0));
        let d = ParallelDims::new(8, 1, 4, SIZES).unwrap();
        assert_eq!((d.dp, d.ep, d.edp), (8, 4, 2));
        // Auto ep with 6 ranks and 8 experts: 2 divides both.
        assert_eq!(ParallelDims::new(6, 1, 0, SIZES).unwrap().ep, 2);
    }

    #[test]
    fn impossible_layouts_name_the_key() {
        let err = |w, tp, ep| ParallelDims::new(w, tp, ep, SIZES).unwrap_err();
        assert_eq!(err(4, 3, 0).key, "parallel.attn_tp");
        assert_eq!(err(4, 4, 0).key, "parallel.attn_tp"); // kv heads 2
        assert_eq!(err(6, 1, 3).key, "parallel.ep"); // 8 experts
        assert_eq!(err(4, 1, 3).key, "parallel.ep"); // 3 does not divide 4
        assert_eq!(err(0, 1, 0).key, "parallel.ranks");
    }
}
