//! The passes of one step: every micro-batch of this rank, forward and
//! backward, on one lane or two (`crate::micro_batches`), with gradients
//! accumulated into fresh buffers.

use super::groups::shorter;
use super::step_metrics::LocalStep;
use super::RankRun;
use crate::error::WorkerError;
use crate::micro_batches::{run_micro_batches, Lane, StepInputs};

/// What the passes measured.
pub(crate) struct StepPasses {
    pub step: LocalStep,
    /// Time the gradient buckets' all-reduces ran, when there were buckets
    /// (they then already summed the layers' dense gradients).
    pub bucket_s: Option<f64>,
}

impl RankRun<'_> {
    /// Runs the step's micro-batches and returns what they measured.
    pub(super) fn passes(&mut self) -> Result<StepPasses, WorkerError> {
        for (_, g) in self.grads.tensors_mut() {
            g.fill(0.0);
        }
        let per_rank = self.job.train.global_batch_size / self.dims.dp;
        let inputs = StepInputs {
            job: self.job,
            dims: self.dims,
            rope: &self.rope,
            weights: &self.state.weights,
            placement: &self.placement,
            attn_placement: self.attn_placement.as_ref(),
            scales: self.scales,
            data: &self.data,
            step: self.state.step,
            first_sequence: self.dims.dp_rank(self.rank) * per_rank,
            techniques: self.techniques,
            exposure: &self.exposure,
            row_budget: self.row_budget,
            ep_nodes: &self.ep_nodes,
        };
        let groups = &mut self.groups;
        let mut lane_a = Lane {
            ep: groups.ep.as_mut(),
            pipe: groups.ep_pipe.as_ref(),
            tp: shorter(&mut groups.tp),
            grads: &mut self.grads,
        };
        let mut lane_b = match (groups.second.as_mut(), self.grads_b.as_mut()) {
            (Some(second), Some(grads)) => {
                grads.tensors_mut().into_iter().for_each(|(_, g)| g.fill(0.0));
                Some(Lane { ep: second.ep.as_mut(), pipe: second.pipe.as_ref(), tp: shorter(&mut second.tp), grads })
            }
            _ => None,
        };
        let passes =
            run_micro_batches(&inputs, &mut lane_a, lane_b.as_mut(), self.accumulation, groups.grad_pipe.as_ref())?;
        let mut step = LocalStep { compute_s: passes.wall_s, ..Default::default() };
        for r in &passes.results {
            step.dispatch.add(&r.dispatch);
            step.add(&r.stats);
        }
        Ok(StepPasses { step, bucket_s: passes.bucket_s })
    }
}
