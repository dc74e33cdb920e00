//! The jobs the tests size: the built-in job as `switchyard` loads it.

use crate::shape::{JobSizes, RankShape, Routing};
use worker::JobConfig;

/// `job`'s shape, as the launcher builds it.
pub fn shape_of(job: &JobConfig, routing: Routing) -> RankShape {
    let sizes = JobSizes {
        model: job.model.clone(),
        micro_batch_size: job.train.micro_batch_size,
        global_batch_size: job.train.global_batch_size,
        ranks_are_processes: job.parallel.backend != worker::Backend::Local,
        dims: job.parallel_dims().expect("a valid test layout"),
        attn_experts_partitioned: job.parallel.attn_expert_placement == worker::AttnExpertPlacement::Partitioned,
    };
    RankShape::of(&sizes, routing)
}
