//! The placement plan: which rank owns each global expert id.
//!
//! Ranks here are positions in an expert-parallel group (`0..ep`); with
//! `edp > 1` every group holds the same plan, so expert `e` lives on global
//! ranks `owner + i * ep`.

use serde::{Deserialize, Serialize};

/// `[parallel] placement`: how the plan is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// [`PlacementPlan::contiguous`] for the whole run.
    Contiguous,
    /// Re-planned from measured expert loads ([`PlacementPlan::balanced_on_nodes`]).
    Balanced,
    /// Routing groups aligned with nodes ([`PlacementPlan::grouped`]): with
    /// group-limited routing a token's experts are on at most `topk_groups` nodes.
    Grouped,
}

/// Per layer, for every global expert id, the ranks that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementPlan {
    pub num_ranks: usize,
    /// `owners[layer][expert]` = ranks holding that expert.
    pub owners: Vec<Vec<Vec<usize>>>,
    /// The node (machine) of each rank, when the plan was made knowing them:
    /// tokens then go to a replica on their own node when there is one.
    /// (`default` reads plans saved before this field; it is always written,
    /// since the wire codec, bincode, cannot skip fields.)
    #[serde(default)]
    pub nodes: Vec<usize>,
}

impl PlacementPlan {
    /// Contiguous blocks: with E experts over R ranks, rank r holds
    /// experts `r*E/R .. (r+1)*E/R` in every layer.
    pub fn contiguous(num_layers: usize, num_experts: usize, num_ranks: usize) -> Self {
        let per_rank = num_experts.div_ceil(num_ranks);
        let layer: Vec<Vec<usize>> = (0..num_experts).map(|e| vec![e / per_rank]).collect();
        Self { num_ranks, owners: vec![layer; num_layers], nodes: Vec::new() }
    }

    /// DeepSeek-V3's node-limited layout: the `n_groups` routing groups
    /// (consecutive expert ids) go to the nodes in order, `n_groups / nodes`
    /// whole groups each, and a node's experts are spread over its ranks in
    /// contiguous blocks. `nodes[position]` is the node of each
    /// expert-parallel position. The number of nodes must divide `n_groups`.
    pub fn grouped(
        num_layers: usize,
        num_experts: usize,
        n_groups: usize,
        nodes: &[usize],
    ) -> Result<Self, crate::LayoutError> {
        let mut node_ids: Vec<usize> = nodes.to_vec();
        node_ids.sort_unstable();
        node_ids.dedup();
        let n_nodes = node_ids.len();
        if n_groups < 2 || !n_groups.is_multiple_of(n_nodes) || !num_experts.is_multiple_of(n_groups) {
            let reason = format!(
                "placement = \"grouped\" puts whole routing groups on each node: [model] n_groups = {n_groups} must be \
                 at least 2, divide n_experts = {num_experts} and be a multiple of the {n_nodes} node(s) the \
                 expert-parallel ranks run on"
            );
            return Err(crate::LayoutError { key: "placement", reason });
        }
        let per_node = num_experts / n_nodes;
        let mut layer = vec![Vec::new(); num_experts];
        for (i, &node) in node_ids.iter().enumerate() {
            let ranks: Vec<usize> = (0..nodes.len()).filter(|&r| nodes[r] == node).collect();
            let per_rank = per_node.div_ceil(ranks.len());
            for (j, owners) in layer[i * per_node..(i + 1) * per_node].iter_mut().enumerate() {
                owners.push(ranks[j / per_rank]);
            }
        }
        let several = n_nodes > 1;
        Ok(Self {
            num_ranks: nodes.len(),
            owners: vec![layer; num_layers],
            nodes: if several { nodes.to_vec() } else { Vec::new() },
        })
    }

    /// The first owner of expert `expert` in `layer` (it writes the expert's checkpoint).
    pub fn owner(&self, layer: usize, expert: usize) -> usize {
        self.owners[layer][expert][0]
    }

    /// The replica of `expert` that rank `source` sends its tokens to: one
    /// on the source's own node if the plan knows nodes and there is one
    /// (keeping traffic off the network between machines), and sources are
    /// spread over the candidates, the same way on every rank.
    pub fn owner_for(&self, layer: usize, expert: usize, source: usize) -> usize {
        let replicas = &self.owners[layer][expert];
        if let Some(&node) = self.nodes.get(source) {
            let local: Vec<usize> = replicas.iter().copied().filter(|&r| self.nodes.get(r) == Some(&node)).collect();
            if !local.is_empty() {
                // Index by the source's position among its node's ranks, so
                // the ranks of one node spread over the local replicas.
                let position = self.nodes[..source].iter().filter(|&&n| n == node).count();
                return local[position % local.len()];
            }
        }
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
        Self::balanced_on_nodes(loads, &vec![0; num_ranks], redundant)
    }

    /// [`Self::balanced`] for ranks on several nodes (`nodes[rank]` = its
    /// node): the replicas of an expert go to different nodes first, so
    /// each node's tokens find a local copy of the hot experts (see
    /// [`Self::owner_for`]); within that, the least-loaded rank.
    pub fn balanced_on_nodes(loads: &[Vec<f64>], nodes: &[usize], redundant: usize) -> Self {
        let num_ranks = nodes.len();
        let owners = loads.iter().map(|layer| balance_layer(layer, nodes, redundant)).collect();
        let several = nodes.iter().any(|&n| n != nodes[0]);
        Self { num_ranks, owners, nodes: if several { nodes.to_vec() } else { Vec::new() } }
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

fn balance_layer(load: &[f64], nodes: &[usize], redundant: usize) -> Vec<Vec<usize>> {
    let num_ranks = nodes.len();
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
        // A node without a copy of `e` yet beats one that has one.
        let node_has_copy = |r: usize| owners[e].iter().any(|&o: &usize| nodes[o] == nodes[r]);
        let rank = (0..num_ranks)
            .filter(|&r| rank_slots[r] < slots && !owners[e].contains(&r))
            .min_by(|&a, &b| {
                (node_has_copy(a), rank_load[a])
                    .partial_cmp(&(node_has_copy(b), rank_load[b]))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            })
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

    #[test]
    fn node_aware_plans_keep_hot_experts_on_every_node_and_tokens_local() {
        // Ranks 0,1 on node 0 and ranks 2,3 on node 1; expert 0 is hot.
        let nodes = [0, 0, 1, 1];
        let loads = vec![vec![800.0, 100.0, 100.0, 100.0, 100.0, 100.0, 50.0, 50.0]];
        let plan = PlacementPlan::balanced_on_nodes(&loads, &nodes, 4);
        let per_rank = &plan.rank_loads(&loads)[0];
        let max_over_mean = per_rank.iter().cloned().fold(0.0, f64::max) / (per_rank.iter().sum::<f64>() / 4.0);
        assert!(max_over_mean <= 1.10, "{:?} {max_over_mean}", plan.owners);
        // Every replicated expert has a copy on both nodes, and each rank
        // sends its tokens for it to its own node.
        for (e, replicas) in plan.owners[0].iter().enumerate() {
            if replicas.len() >= 2 {
                let on: std::collections::BTreeSet<usize> = replicas.iter().map(|&r| nodes[r]).collect();
                assert_eq!(on.len(), 2, "expert {e} replicas {replicas:?} sit on one node");
                for source in 0..4 {
                    assert_eq!(nodes[plan.owner_for(0, e, source)], nodes[source], "expert {e} from rank {source}");
                }
            }
        }
        assert_eq!(plan.nodes, nodes);
        // On one node the plan is the plain balanced one.
        assert_eq!(PlacementPlan::balanced_on_nodes(&loads, &[0; 4], 4), PlacementPlan::balanced(&loads, 4, 4));
    }

    #[test]
    fn grouped_plans_put_whole_groups_on_each_node() {
        // Positions 0 and 2 on node 0, 1 and 3 on node 1 (not node-major);
        // 16 experts in 4 groups of 4: groups 0-1 on node 0, 2-3 on node 1.
        let nodes = [0, 1, 0, 1];
        let plan = PlacementPlan::grouped(2, 16, 4, &nodes).unwrap();
        for e in 0..16 {
            let owner = plan.owner(1, e);
            assert_eq!(nodes[owner], e / 8, "expert {e} on position {owner}");
        }
        assert_eq!(plan.owned_by(0)[0], (0..4).collect::<Vec<_>>());
        assert_eq!(plan.owned_by(2)[0], (4..8).collect::<Vec<_>>());
        assert_eq!(plan.owned_by(3)[0], (12..16).collect::<Vec<_>>());
        // 3 nodes cannot take 4 groups whole.
        let err = PlacementPlan::grouped(1, 12, 4, &[0, 1, 2]).unwrap_err();
        assert!(err.reason.contains("multiple of the 3 node(s)"), "{err}");
        assert!(PlacementPlan::grouped(1, 8, 1, &[0, 0]).is_err(), "one group cannot be grouped");
    }

    #[test]
    fn plans_saved_before_nodes_existed_still_load() {
        let old = r#"{"num_ranks":2,"owners":[[[0],[1]]]}"#;
        let plan: PlacementPlan = serde_json::from_str(old).unwrap();
        assert!(plan.nodes.is_empty());
        assert_eq!(plan.owner_for(0, 1, 0), 1);
    }

    #[test]
    fn packing_without_redundant_slots() {
        let loads = vec![vec![800.0, 100.0, 100.0, 100.0, 100.0, 100.0, 50.0, 50.0]];
        let packed = PlacementPlan::balanced(&loads, 4, 0);
        assert!(packed.owners[0].iter().all(|r| r.len() == 1));
    }
}
