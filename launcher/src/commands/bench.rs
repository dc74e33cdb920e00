//! `switchyard bench`.

use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// MoE layer and full-step throughput against peak GEMM and JAX.
    Layer {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// All-to-all-v bandwidth, 4 KiB to 64 MiB per rank, against mpi4py's Alltoallv.
    Alltoall {
        /// Number of ranks.
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// local (threads) or mpi (processes; needs a build with --features mpi).
        #[arg(long, default_value = "local")]
        backend: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Layer { json } => crate::commands::bench_layer::run(json),
        BenchCommand::Alltoall { ranks, backend, json } => crate::commands::bench_alltoall::run(ranks, &backend, json),
    }
}
