//! Scaling experiments: `sweep` trains every point of a grid for real,
//! `simulate` predicts the same grid (or one point) on a cluster file with
//! the step model of the `simulator` crate; both write the same results files
//! and plots.

pub mod simulate;
pub mod sweep;
