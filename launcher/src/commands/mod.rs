//! One module per subcommand.

pub mod bench;
pub mod bench_alltoall;
pub mod bench_checkpoint;
pub mod bench_layer;
pub mod bench_overlap;
pub mod bench_step;
pub mod bench_turns;
pub mod ckpt;
mod ckpt_export;
mod ckpt_inspect;
mod ckpt_ls;
pub mod coordinator;
pub mod data;
pub mod eval;
pub mod k8s;
pub mod simulate;
pub mod simulate_table;
pub mod slurm;
mod slurm_script;
pub mod sweep;
mod sweep_grid;
mod sweep_plots;
mod sweep_point;
mod sweep_results;
pub mod train;
