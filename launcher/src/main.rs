//! `switchyard`: train, evaluate and inspect Mixture-of-Experts models.
//!
//! Thin on purpose: parse the command line, then call the command's module.

mod commands;
mod coordinator_run;
mod k8s;
mod mpirun;
mod progress;
mod simulate;
mod step_summary;

use clap::{Parser, Subcommand};

/// `malloc`, except that message buffers start on huge-page boundaries
/// (see `collectives::buffers`).
#[global_allocator]
static ALLOCATOR: collectives::buffers::HugePageAligned = collectives::buffers::HugePageAligned;

/// Train Mixture-of-Experts language models across many machines.
#[derive(Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (the built-in tiny job when no --config is given).
    Train(commands::train::TrainArgs),
    /// The job's coordinator alone (Slurm, Kubernetes): workers register with it.
    Coordinator(commands::coordinator::CoordinatorArgs),
    /// One worker process (or its ranks) of a job whose coordinator runs elsewhere:
    /// `train` options plus --coordinator host:port (or SWITCHYARD_COORDINATOR).
    Worker(commands::train::TrainArgs),
    /// Mean next-token cross-entropy of a checkpoint on a text file.
    Eval(commands::eval::EvalArgs),
    /// Look at checkpoints: list steps, inspect, verify, export to safetensors.
    #[command(subcommand)]
    Ckpt(commands::ckpt::CkptCommand),
    /// Prepare training data.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Kubernetes: render a job's manifests (docs/kubernetes.md).
    #[command(subcommand)]
    K8s(commands::k8s::K8sCommand),
    /// Run on Slurm: render an sbatch script, or render and submit it.
    #[command(subcommand)]
    Slurm(commands::slurm::SlurmCommand),
    /// Measured scaling experiment: train every point of a grid of config values,
    /// write results.csv/json and plots.
    Sweep(commands::sweep::SweepArgs),
    /// Predicted scaling: an analytic model of a step of the job on a cluster file (one
    /// point, or a sweep grid -> the sweep's results files and plots); `calibrate`
    /// measures this machine into a cluster file.
    Simulate(commands::simulate::SimulateArgs),
    /// Benchmarks (print a table; --json for machines).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Train(_) | Command::Worker(_) | Command::Coordinator(_)) {
        // SIGTERM (scancel, pre-emption, pod eviction) = checkpoint, then stop;
        // also in a launcher that only waits for mpirun, and in a coordinator,
        // so that they outlive their ranks' last checkpoint.
        worker::preemption::install();
    }
    let result = match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Coordinator(args) => commands::coordinator::run(args),
        Command::Worker(args) => commands::train::run_worker(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Ckpt(cmd) => commands::ckpt::run(cmd),
        Command::Data(cmd) => commands::data::run(cmd),
        Command::K8s(cmd) => commands::k8s::run(cmd),
        Command::Bench(cmd) => commands::bench::run(cmd),
        Command::Slurm(cmd) => commands::slurm::run(cmd),
        Command::Sweep(args) => commands::sweep::run(args),
        Command::Simulate(args) => commands::simulate::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if err.is::<commands::train::Preempted>() => {
            if !err.downcast_ref::<commands::train::Preempted>().is_some_and(|p| p.quiet) {
                eprintln!("{err}");
            }
            std::process::ExitCode::from(worker::preemption::PREEMPTED_EXIT_CODE as u8)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
