//! The step simulator behind `switchyard simulate`: an analytic model of
//! one training step of any job layout on any cluster.
//!
//! `shape` sizes one rank's share of the step from the job's sizes;
//! `kernels` lists what it computes (matrix products with their FLOPs,
//! elementwise passes with their bytes), `traffic` what it exchanges (every
//! collective, bytes per link level), `memory` what it holds; `step` times
//! all of it against a `cluster` file. Measuring this machine into a
//! cluster file (`switchyard simulate calibrate`) runs real kernels and is
//! the launcher's job; so is printing.

pub mod cluster;
pub mod kernels;
pub mod memory;
pub mod shape;
pub mod step;
pub mod traffic;

#[cfg(test)]
mod test_jobs;

pub use cluster::{Cluster, ClusterError};
pub use shape::{JobSizes, RankShape, Routing};
