//! MoA's attention experts partitioned over the expert-parallel group
//! (`parallel.attn_expert_placement = "partitioned"`, docs/model.md): which
//! rank computes each row of a layer's attention experts, and the orders
//! that move the rows there and back. [`AllToAllExperts`](crate::dispatch::AllToAllExperts)
//! runs the exchanges; the model (`model::attention_experts`) asks for them.
//!
//! A layer's route is planned once per forward pass (a small exchange of
//! row counts) and serves all of the layer's eight row exchanges: in the
//! forward pass the inputs go to the owners and the queries come back,
//! the head outputs go and the projected outputs come back; the backward
//! pass moves their gradients along the same route.
//!
//! Legend: `r` the plan's rows (this rank's tokens' choices, grouped by
//! expert), `o` the rows this rank's experts compute (grouped by expert,
//! source rank by source rank within an expert).

use crate::config::{AttnExpertPlacement, JobConfig};
use layout::PlacementPlan;
use model::moe::DispatchPlan;

/// Where MoA's attention experts live when `job` partitions them over an
/// expert-parallel group of `ep` ranks: contiguous blocks of expert ids,
/// the same in every layer. None when they are replicated.
pub fn attn_expert_plan(job: &JobConfig, ep: usize) -> Option<PlacementPlan> {
    let partitioned = job.parallel.attn_expert_placement == AttnExpertPlacement::Partitioned;
    partitioned.then(|| PlacementPlan::contiguous(job.model.n_layers, job.model.attn_experts, ep))
}

/// The orders of one layer's exchanges on one rank.
#[derive(Debug, Clone)]
pub(crate) struct AttnRoute {
    /// The plan's rows in send order: owner by owner, each owner's experts
    /// in id order.
    pub send_order: Vec<usize>,
    /// Rows to / from each rank of the group.
    pub send_counts: Vec<usize>,
    pub recv_counts: Vec<usize>,
    /// For each row computed here (in `owned`'s order), its place among
    /// the rows received (source-major, each source's rows in expert order).
    pub local_order: Vec<usize>,
    /// The rows computed here, grouped by expert.
    pub owned: DispatchPlan,
}

/// What this rank tells each owner first: for every rank of the group, the
/// rows it will send of each of that rank's experts (in id order). Returns
/// the values (row counts as f32, exact below 2^24) and how many go to each rank.
pub(crate) fn counts_for_owners(plan: &DispatchPlan, owners: &[usize], ranks: usize) -> (Vec<f32>, Vec<usize>) {
    let mut values = Vec::with_capacity(owners.len());
    let mut per_rank = vec![0; ranks];
    for (r, n) in per_rank.iter_mut().enumerate() {
        for (e, _) in owners.iter().enumerate().filter(|(_, &o)| o == r) {
            values.push(plan.counts_e[e] as f32);
            *n += 1;
        }
    }
    (values, per_rank)
}

impl AttnRoute {
    /// The route of rank `me` of `ranks` for `plan`, given the counts
    /// every source sent it (`received[s * mine + k]`: rows from rank s of
    /// its k-th expert, `mine` the experts it owns).
    pub fn new(plan: &DispatchPlan, owners: &[usize], (me, ranks): (usize, usize), received: &[f32]) -> Self {
        let mut send_order = Vec::with_capacity(plan.num_rows());
        let mut send_counts = vec![0; ranks];
        for (r, count) in send_counts.iter_mut().enumerate() {
            for (e, _) in owners.iter().enumerate().filter(|(_, &o)| o == r) {
                send_order.extend(plan.offsets_e[e]..plan.offsets_e[e + 1]);
                *count += plan.counts_e[e];
            }
        }
        let mine: Vec<usize> = (0..owners.len()).filter(|&e| owners[e] == me).collect();
        let from = |s: usize, k: usize| received[s * mine.len() + k] as usize;
        let recv_counts: Vec<usize> = (0..ranks).map(|s| (0..mine.len()).map(|k| from(s, k)).sum()).collect();
        // Where source s's rows of my k-th expert start among the rows received.
        let mut start = vec![0; ranks * mine.len()];
        let mut at = 0;
        for s in 0..ranks {
            for k in 0..mine.len() {
                start[s * mine.len() + k] = at;
                at += from(s, k);
            }
        }
        let mut counts_e = vec![0; owners.len()];
        let mut local_order = Vec::with_capacity(at);
        for (k, &e) in mine.iter().enumerate() {
            for s in 0..ranks {
                let first = start[s * mine.len() + k];
                local_order.extend(first..first + from(s, k));
                counts_e[e] += from(s, k);
            }
        }
        let owned = DispatchPlan::grouped(counts_e, plan.top_k);
        Self { send_order, send_counts, recv_counts, local_order, owned }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan of `counts[e]` rows per expert.
    fn plan(counts: &[usize]) -> DispatchPlan {
        DispatchPlan::grouped(counts.to_vec(), 1)
    }

    #[test]
    fn rows_go_owner_by_owner_and_arrive_grouped_by_expert() {
        // 4 experts over 2 ranks: rank 0 owns 0 and 1, rank 1 owns 2 and 3.
        let owners = [0, 0, 1, 1];
        let (plan0, plan1) = (plan(&[1, 2, 0, 3]), plan(&[2, 0, 1, 1]));
        let (to_owners0, per_rank0) = counts_for_owners(&plan0, &owners, 2);
        let (to_owners1, per_rank1) = counts_for_owners(&plan1, &owners, 2);
        assert_eq!((to_owners0.clone(), per_rank0), (vec![1.0, 2.0, 0.0, 3.0], vec![2, 2]));
        assert_eq!(per_rank1, vec![2, 2]);
        // Rank 1 receives rank 0's counts of experts 2, 3, then its own.
        let received1 = [to_owners0[2..].to_vec(), to_owners1[2..].to_vec()].concat();
        let route = AttnRoute::new(&plan1, &owners, (1, 2), &received1);
        assert_eq!(route.send_order, vec![0, 1, 2, 3]);
        assert_eq!(route.send_counts, vec![2, 2]);
        assert_eq!(route.recv_counts, vec![3, 2]);
        // Received: from 0 [e3, e3, e3], from 1 [e2, e3]; computed: e2 (1 row), e3 (4 rows).
        assert_eq!(route.owned.counts_e, vec![0, 0, 1, 4]);
        assert_eq!(route.local_order, vec![3, 0, 1, 2, 4]);
    }

    #[test]
    fn a_rank_that_owns_nothing_sends_everything_and_computes_nothing() {
        // 1 expert over 2 ranks: rank 1 owns none.
        let owners = [0];
        let route = AttnRoute::new(&plan(&[3]), &owners, (1, 2), &[]);
        assert_eq!(route.send_counts, vec![3, 0]);
        assert_eq!(route.recv_counts, vec![0, 0]);
        assert_eq!(route.owned.num_rows(), 0);
    }
}
