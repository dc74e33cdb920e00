//! The job's control plane (DESIGN section 2): workers register here, get
//! their rank and placement plan, report metrics and checkpoint shards.
//! For now it holds the pieces a single-process job needs; the coordinator
//! issue adds the tokio service and the wire protocol (`protocol`).

pub mod placement;
