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

    /// The first owner of expert `expert` in `layer` (it writes the expert's checkpoint).
    pub fn owner(&self, layer: usize, expert: usize) -> usize {
        self.owners[layer][expert][0]
    }

    /// The replica of `expert` that rank `source` sends its tokens to:
    /// sources are spread over the replicas, the same way on every rank.
    pub fn owner_for(&self, layer: usize, expert: usize, source: usize) -> usize {
        let replicas = &self.owners[layer][expert];
        replicas[source % replicas.len()]
    }

    /// Balanced placement from measured expert loads (tokens per expert,
    /// per layer), after DeepSeek's EPLB: give the `redundant` extra slots to
    /// the experts with the highest load per replica (replicating the hot
    /// ones), then pack replicas heaviest first onto the least-loaded rank
    /// that has a free slot and no copy of that expert yet. Every rank gets
    /// `ceil((experts + redundant) / ranks)` slots. Deterministic: the same
    /// loads give the same plan on every rank.
    pub fn balanced(loads: &[Vec<f64>], num_ranks: usize, redundant: usize) -> Self {
        let owners = loads.iter().map(|layer| balance_layer(layer, num_ranks, redundant)).collect();
        Self { num_ranks, owners }
    }

    /// Tokens each rank would compute under this plan for `loads`, per layer,
    /// with every expert's tokens split evenly over its replicas.
    pub fn rank_loads(&self, loads: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.owners
            .iter()
            .zip(loads)
            .map(|(layer, load)| {
                let mut per_rank = vec![0.0; self.num_ranks];
                for (replicas, &l) in layer.iter().zip(load) {
                    replicas.iter().for_each(|&r| per_rank[r] += l / replicas.len() as f64);
                }
                per_rank
            })
            .collect()
    }

    /// Per layer, the expert ids that `rank` holds.
    pub fn owned_by(&self, rank: usize) -> Vec<Vec<usize>> {
        self.owners.iter().map(|layer| (0..layer.len()).filter(|&e| layer[e].contains(&rank)).collect()).collect()
    }
}

fn balance_layer(load: &[f64], num_ranks: usize, redundant: usize) -> Vec<Vec<usize>> {
    let experts = load.len();
    // A replica per extra slot, to the expert with the most load per copy
    // (never more copies than ranks).
    let mut copies = vec![1usize; experts];
    for _ in 0..redundant {
        let hottest = (0..experts)
            .filter(|&e| copies[e] < num_ranks)
            .max_by(|&a, &b| (load[a] / copies[a] as f64).total_cmp(&(load[b] / copies[b] as f64)).then(b.cmp(&a)));
        match hottest {
            Some(e) => copies[e] += 1,
            None => break,
        }
    }
    let slots = (experts + redundant).div_ceil(num_ranks);
    let mut items: Vec<(f64, usize)> =
        (0..experts).flat_map(|e| std::iter::repeat_n((load[e] / copies[e] as f64, e), copies[e])).collect();
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut rank_load = vec![0.0f64; num_ranks];
    let mut rank_slots = vec![0usize; num_ranks];
    let mut owners = vec![Vec::new(); experts];
    for (l, e) in items {
        let rank = (0..num_ranks)
            .filter(|&r| rank_slots[r] < slots && !owners[e].contains(&r))
            .min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)))
            .expect("slots for every replica: ranks * slots >= experts + redundant");
        owners[e].push(rank);
        rank_load[rank] += l;
        rank_slots[rank] += 1;
    }
    owners
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

    #[test]
    fn balanced_plans_even_out_skewed_loads() {
        // Expert 0 takes half the tokens.
        let loads = vec![vec![800.0, 100.0, 100.0, 100.0, 100.0, 100.0, 50.0, 50.0]];
        let max_over_mean = |plan: &PlacementPlan| {
            let per_rank = &plan.rank_loads(&loads)[0];
            per_rank.iter().cloned().fold(0.0, f64::max) / (per_rank.iter().sum::<f64>() / per_rank.len() as f64)
        };
        let contiguous = PlacementPlan::contiguous(1, 8, 4);
        let balanced = PlacementPlan::balanced(&loads, 4, 4);
        assert!(max_over_mean(&contiguous) > 1.9, "{}", max_over_mean(&contiguous));
        assert!(max_over_mean(&balanced) <= 1.10, "{:?} {}", balanced.owners, max_over_mean(&balanced));
        // Every expert has an owner, no rank holds an expert twice, slots are even.
        for replicas in &balanced.owners[0] {
            assert!(!replicas.is_empty());
            let mut unique = replicas.clone();
            unique.dedup();
            assert_eq!(unique.len(), replicas.len());
        }
        assert!((0..4).all(|r| balanced.owned_by(r)[0].len() == 3));
        assert_eq!(balanced, PlacementPlan::balanced(&loads, 4, 4), "deterministic");
        // Without extra slots it still packs, one copy per expert.
        let packed = PlacementPlan::balanced(&loads, 4, 0);
        assert!(packed.owners[0].iter().all(|r| r.len() == 1));
    }
}
