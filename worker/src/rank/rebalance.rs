//! Balanced placement (`[parallel] placement = "balanced"`): every
//! `rebalance_every` steps a new plan is made from the expert loads
//! measured since the last one, and taken when it is clearly better.

use super::nodes::ep_nodes;
use super::RankRun;
use crate::checkpointing::SaveKind;
use crate::error::WorkerError;
use crate::metrics::PlacementReport;
use crate::state::TrainState;
use layout::{Placement, PlacementPlan};

impl RankRun<'_> {
    /// Adds the step's tokens per expert to the loads, and at a re-plan
    /// step moves the experts to a better plan. Returns the busiest rank's
    /// load over the mean before and after, when experts moved.
    pub(super) fn maybe_rebalance(
        &mut self,
        tokens_per_expert: &[Vec<usize>],
    ) -> Result<Option<(f64, f64)>, WorkerError> {
        let job = self.job;
        for (acc, layer) in self.expert_loads.iter_mut().zip(tokens_per_expert) {
            acc.iter_mut().zip(layer).for_each(|(a, &t)| *a += t as f64);
        }
        let step = self.state.step;
        let due = step < self.end && step.is_multiple_of(job.parallel.rebalance_every);
        if job.parallel.placement != Placement::Balanced || !due {
            return Ok(None);
        }
        let dims = self.dims;
        let redundant = if job.parallel.redundant_experts == 0 { dims.ep } else { job.parallel.redundant_experts };
        let plan = PlacementPlan::balanced_on_nodes(&self.expert_loads, &ep_nodes(&dims, &self.nodes, 0), redundant);
        let before = max_over_mean(&self.placement, &self.expert_loads);
        let after = max_over_mean(&plan, &self.expert_loads);
        self.expert_loads.iter_mut().for_each(|l| l.fill(0.0));
        // Only a clearly better plan is worth moving experts for.
        if plan == self.placement || after >= before * 0.98 {
            return Ok(None);
        }
        // Expert weights and their optimizer state move to their new ranks
        // through a committed checkpoint of this step, loaded onto the new
        // plan: the same path as a resume on another layout.
        self.save_checkpoint(SaveKind::InPlace)?;
        self.saver.finish()?;
        let ep_rank = dims.ep_rank(self.rank);
        self.state = TrainState::load(self.saver.store(), step, job, &plan, ep_rank)?;
        self.cut_to_this_shard();
        self.grads = self.state.weights.zeros_like();
        // The second lane holds gradients of the new placement's experts too.
        self.grads_b = self.grads_b.as_ref().map(|_| self.state.weights.zeros_like());
        self.placement = plan;
        self.placement_news = Some(self.placement_report("rebalanced", Some((before, after))));
        Ok(Some((before, after)))
    }

    /// The plan now, for the metrics row (rank 0's reports it).
    pub(super) fn placement_report(&self, reason: &str, balance: Option<(f64, f64)>) -> PlacementReport {
        let mut ep_ranks = vec![Vec::new(); self.dims.ep];
        for world_rank in 0..self.dims.world {
            ep_ranks[self.dims.ep_rank(world_rank)].push(world_rank);
        }
        PlacementReport {
            reason: reason.to_string(),
            owners: self.placement.owners.clone(),
            ep_ranks,
            nodes: self.nodes.clone(),
            balance,
        }
    }
}

/// The busiest rank's expert tokens over the mean, worst layer, under `plan`.
fn max_over_mean(plan: &PlacementPlan, loads: &[Vec<f64>]) -> f64 {
    plan.rank_loads(loads)
        .iter()
        .map(|ranks| {
            let mean = ranks.iter().sum::<f64>() / ranks.len() as f64;
            if mean > 0.0 {
                ranks.iter().cloned().fold(0.0, f64::max) / mean
            } else {
                1.0
            }
        })
        .fold(1.0, f64::max)
}
