//! The parallel layout of a job as plain values (DESIGN section 3): how the
//! ranks fold into attention shards, data-parallel replicas and
//! expert-parallel groups ([`ParallelDims`]), and which rank owns each
//! global expert id ([`PlacementPlan`], with the contiguous and balanced
//! placement algorithms). No I/O, no communication: the worker, the
//! coordinator, the simulator and the checkpoint tools share these values.

pub mod parallel_dims;
pub mod placement;

pub use parallel_dims::{LayoutError, ModelSizes, ParallelDims};
pub use placement::{Placement, PlacementPlan};
