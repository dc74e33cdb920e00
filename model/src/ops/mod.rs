//! Layer primitives, each with its forward and exact backward.
//!
//! Convention: backward functions ADD into their gradient outputs
//! (`dx += ...`, `dw += ...`), so residual branches and micro-batches
//! accumulate without extra buffers; the caller zeroes what it owns.
//! Every backward is checked against central finite differences in
//! `tests/gradients.rs`.

pub mod attention;
pub mod fast_exp;
pub mod loss;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
pub mod tiled_attention;
