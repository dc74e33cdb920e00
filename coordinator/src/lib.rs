//! The job's control plane (DESIGN section 2): workers register here, get
//! their rank, the parallel layout and the placement plan, report metrics
//! and checkpoint shards. For now it holds the plain values every layout
//! needs; the coordinator issue adds the tokio service and the wire
//! protocol (`protocol`).

pub mod parallel_dims;
pub mod placement;

pub use parallel_dims::{LayoutError, ModelSizes, ParallelDims};
pub use placement::PlacementPlan;
