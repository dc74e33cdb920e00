//! The placement plan: which rank owns each global expert id.
//!
//! Ranks here are positions in an expert-parallel group (`0..ep`); with
//! `edp > 1` every group holds the same plan, so expert `e` lives on global
//! ranks `owner + i * ep`.

use serde::{Deserialize, Serialize};

/// Per layer, for every global expert id, the ranks that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementPlan {
    pub num_ranks: usize,
    /// `owners[layer][expert]` = ranks holding that expert.
    pub owners: Vec<Vec<Vec<usize>>>,
}

impl PlacementPlan {
    /// Contiguous blocks: with E experts over R ranks, rank r holds
    /// experts `r*E/R .. (r+1)*E/R` in every layer.
    pub fn contiguous(num_layers: usize, num_experts: usize, num_ranks: usize) -> Self {
        let per_rank = num_experts.div_ceil(num_ranks);
        let layer: Vec<Vec<usize>> = (0..num_experts).map(|e| vec![e / per_rank]).collect();
        Self { num_ranks, owners: vec![layer; num_layers] }
    }

    /// The first owner of expert `expert` in `layer`.
    pub fn owner(&self, layer: usize, expert: usize) -> usize {
        self.owners[layer][expert][0]
    }

    /// Per layer, the expert ids that `rank` holds.
    pub fn owned_by(&self, rank: usize) -> Vec<Vec<usize>> {
        self.owners.iter().map(|layer| (0..layer.len()).filter(|&e| layer[e].contains(&rank)).collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_blocks_cover_every_expert_once() {
        let plan = PlacementPlan::contiguous(2, 8, 4);
        assert_eq!(plan.owned_by(1), vec![vec![2, 3], vec![2, 3]]);
        let all: usize = (0..4).map(|r| plan.owned_by(r)[0].len()).sum();
        assert_eq!(all, 8);
    }
}
