//! Balanced placement (`[parallel] placement = "balanced"`): every
//! `rebalance_every` steps a new plan is made from the expert loads
//! measured since the last one, and taken when it is clearly better.
//! Partitioned attention experts are re-planned the same way from their
//! router's loads, without replicas (one owner each).

use super::nodes::ep_nodes;
use super::RankRun;
use crate::checkpointing::SaveKind;
use crate::error::WorkerError;
use crate::metrics::PlacementReport;
use crate::state::TrainState;
use layout::{Placement, PlacementPlan};

impl RankRun<'_> {
    /// Adds the step's tokens per expert (and per attention expert) to the
    /// loads, and at a re-plan step moves the experts to a better plan.
    /// Returns the busiest rank's load over the mean before and after (of
    /// the FFN experts, or the attention experts when only they moved),
    /// when experts moved.
    pub(super) fn maybe_rebalance(
        &mut self,
        tokens_per_expert: &[Vec<usize>],
        tokens_per_attn_expert: &[Vec<usize>],
    ) -> Result<Option<(f64, f64)>, WorkerError> {
        let job = self.job;
        add_loads(&mut self.expert_loads, tokens_per_expert);
        add_loads(&mut self.attn_loads, tokens_per_attn_expert);
        let step = self.state.step;
        let due = step < self.end && step.is_multiple_of(job.parallel.rebalance_every);
        if job.parallel.placement != Placement::Balanced || !due {
            return Ok(None);
        }
        let dims = self.dims;
        let redundant = if job.parallel.redundant_experts == 0 { dims.ep } else { job.parallel.redundant_experts };
        let plan = PlacementPlan::balanced_on_nodes(&self.expert_loads, &ep_nodes(&dims, &self.nodes, 0), redundant);
        let ffn = better(&self.placement, plan, &self.expert_loads);
        let attn = self.attn_placement.as_ref().and_then(|current| {
            better(current, PlacementPlan::balanced(&self.attn_loads, dims.ep, 0), &self.attn_loads)
        });
        self.expert_loads.iter_mut().chain(&mut self.attn_loads).for_each(|l| l.fill(0.0));
        let balance = match (&ffn, &attn) {
            (Some((_, balance)), _) | (None, Some((_, balance))) => *balance,
            (None, None) => return Ok(None),
        };
        let plan = ffn.map_or_else(|| self.placement.clone(), |(plan, _)| plan);
        let attn_plan = attn.map(|(plan, _)| plan).or_else(|| self.attn_placement.clone());
        // Expert weights and their optimizer state move to their new ranks
        // through a committed checkpoint of this step, loaded onto the new
        // plan: the same path as a resume on another layout.
        self.save_checkpoint(SaveKind::InPlace)?;
        self.saver.finish()?;
        let ep_rank = dims.ep_rank(self.rank);
        self.state = TrainState::load(self.saver.store(), step, job, (&plan, attn_plan.as_ref()), ep_rank)?;
        self.cut_to_this_shard();
        self.grads = self.state.weights.zeros_like();
        // The second lane holds gradients of the new placement's experts too.
        self.grads_b = self.grads_b.as_ref().map(|_| self.state.weights.zeros_like());
        (self.placement, self.attn_placement) = (plan, attn_plan);
        self.placement_news = Some(self.placement_report("rebalanced", Some(balance)));
        Ok(Some(balance))
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
            attn_owners: self.attn_placement.as_ref().map_or_else(Vec::new, |plan| plan.owners.clone()),
        }
    }
}

/// Adds one step's tokens per expert (per layer) to `loads`.
fn add_loads(loads: &mut [Vec<f64>], tokens: &[Vec<usize>]) {
    for (acc, layer) in loads.iter_mut().zip(tokens) {
        acc.iter_mut().zip(layer).for_each(|(a, &t)| *a += t as f64);
    }
}

/// `plan` with the busiest rank's load over the mean under `current` and
/// under it, when it is clearly better than `current` (only that is worth
/// moving experts for).
fn better(current: &PlacementPlan, plan: PlacementPlan, loads: &[Vec<f64>]) -> Option<(PlacementPlan, (f64, f64))> {
    let (before, after) = (max_over_mean(current, loads), max_over_mean(&plan, loads));
    (plan != *current && after < before * 0.98).then_some((plan, (before, after)))
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
