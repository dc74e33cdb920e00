//! `switchyard train`.

use crate::coordinator_run::RunningCoordinator;
use crate::progress::ConsoleProgress;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use worker::coordination::{CoordinatorLink, ADDR_VAR, TOKEN_VAR};
use worker::train::{train, Resume, RunOptions};
use worker::JobConfig;

/// Arguments of `switchyard train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Job config (TOML); default: the built-in examples/tiny.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run folder for config, log, metrics and checkpoints; default runs/<job name>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from the newest committed checkpoint of the run.
    #[arg(long, conflicts_with = "resume_from")]
    resume: bool,
    /// Continue from a specific checkpoint step, e.g. file:///x/checkpoints/step-00000100.
    #[arg(long, value_name = "STEP_URL")]
    resume_from: Option<String>,
    /// Number of ranks (same as --set parallel.ranks=N).
    #[arg(long)]
    ranks: Option<usize>,
    /// Collective backend: local (threads of this process) or mpi (processes; runs mpirun
    /// unless already started by mpirun/srun) (same as --set parallel.backend=...).
    #[arg(long)]
    backend: Option<String>,
    /// Stop with a checkpoint at this step (the schedule still spans train.steps; --resume continues exactly).
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// Print only summary lines (no progress bar).
    #[arg(long)]
    quiet: bool,
}

/// Runs a training job on this machine, or this process's rank of an MPI job.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(backend) = &args.backend {
        overrides.push(format!("parallel.backend=\"{backend}\""));
    }
    if let Some(ranks) = args.ranks {
        overrides.push(format!("parallel.ranks={ranks}"));
    }
    let mut job = JobConfig::load(args.config.as_deref(), &overrides)?;
    let launched = (job.parallel.backend == "mpi").then(collectives::mpi::launched_rank).flatten();
    // Under mpirun/srun the launcher says how many ranks there are.
    if let (Some(size), None) = (launched.as_ref().and_then(|l| l.size), args.ranks) {
        overrides.push(format!("parallel.ranks={size}"));
        job = JobConfig::load(args.config.as_deref(), &overrides)?;
    }
    // The launcher runs the job's coordinator; ranks it starts as processes
    // find it in the environment.
    let coordinator = match launched {
        None => Some(RunningCoordinator::start(&job)?),
        Some(_) => None,
    };
    if let Some(c) = &coordinator {
        eprintln!("{}", c.banner());
    }
    if job.parallel.backend == "mpi" && launched.is_none() {
        // Checked here so a bad layout is reported once, not by every rank.
        job.parallel_dims()?;
        let forwarded: Vec<String> = std::env::args().skip(1).collect();
        let link = coordinator.as_ref().expect("the launcher runs the coordinator").link();
        let env = [(ADDR_VAR, link.addr), (TOKEN_VAR, link.token)];
        let code = crate::mpirun::run_self(job.parallel.ranks, &forwarded, &env)?;
        if code != 0 {
            bail!("the MPI job failed (mpirun exited with {code}); the ranks' messages are above");
        }
        return Ok(());
    }
    let lead = launched.as_ref().is_none_or(|l| l.rank == 0);
    let run_dir = args.run_dir.unwrap_or_else(|| PathBuf::from("runs").join(&job.name));
    let resume = match (args.resume, args.resume_from) {
        (_, Some(url)) => Resume::From(url),
        (true, None) => Resume::Latest,
        (false, None) => Resume::No,
    };
    let mut progress = ConsoleProgress::new(&job, &run_dir, args.quiet)?;
    let link = coordinator.as_ref().map(RunningCoordinator::link).or_else(CoordinatorLink::from_env);
    let opts = RunOptions { run_dir: run_dir.clone(), resume, stop_at: args.stop_at, coordinator: link };
    let summary = train(&job, &opts, &mut progress).context("training failed")?;
    if lead {
        progress.finish(&summary, &job, &run_dir);
    }
    Ok(())
}
