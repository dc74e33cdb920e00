//! One module per subcommand.

pub mod bench;
pub mod bench_alltoall;
pub mod bench_layer;
pub mod bench_step;
pub mod coordinator;
pub mod data;
pub mod eval;
pub mod train;
