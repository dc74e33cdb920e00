//! The job's control plane (DESIGN section 2): workers register here, get
//! their rank, the parallel layout and the placement plan, report metrics
//! and checkpoint shards: the plain values every layout needs, the wire
//! protocol (`protocol`), the tokio service (`server`) and the worker's
//! side of it (`client`).

pub mod client;
pub mod commit;
mod http;
pub mod parallel_dims;
pub mod placement;
pub mod protocol;
pub mod server;

pub use parallel_dims::{LayoutError, ModelSizes, ParallelDims};
pub use placement::PlacementPlan;
