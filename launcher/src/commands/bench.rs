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
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Layer { json } => crate::commands::bench_layer::run(json),
    }
}
