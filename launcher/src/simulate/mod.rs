//! The step simulator behind `switchyard simulate`: an analytic model of
//! one training step of any job layout on any cluster.
//!
//! `shape` sizes one rank's share of the step from the job config;
//! `kernels` lists what it computes (matrix products with their FLOPs,
//! elementwise passes with their bytes), `traffic` what it exchanges (every
//! collective, bytes per link level), `memory` what it holds; `step` times
//! all of it against a `cluster` file; `calibrate` measures this machine
//! into one.

pub mod calibrate;
pub mod cluster;
pub mod kernels;
pub mod memory;
pub mod shape;
pub mod step;
pub mod traffic;
