//! `switchyard train`.

use crate::coordinator_run::RunningCoordinator;
use crate::progress::ConsoleProgress;
use anyhow::{bail, Context, Result};
use checkpoint::CheckpointStore;
use clap::Args;
use std::path::PathBuf;
use worker::api::{checkpoint_url, Resume, RunOptions};
use worker::coordination::{configured_token, coordinator_addr_from_env, CoordinatorLink, ADDR_VAR, TOKEN_VAR};
use worker::train::train;
use worker::{Backend, JobConfig};

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
    /// Continue from the newest committed checkpoint if there is one, else start fresh
    /// (for jobs a scheduler starts again: Slurm requeue, restarted pods).
    #[arg(long, conflicts_with_all = ["resume", "resume_from"])]
    resume_if_any: bool,
    /// Continue from a specific checkpoint step, e.g. file:///x/checkpoints/step-00000100.
    #[arg(long, value_name = "STEP_URL")]
    resume_from: Option<String>,
    /// Number of ranks (same as --set parallel.ranks=N).
    #[arg(long)]
    ranks: Option<usize>,
    /// Collective backend: local (threads of this process) or mpi (processes; runs mpirun
    /// unless already started by mpirun/srun) (same as --set parallel.backend=...).
    #[arg(long, value_name = "local|mpi|nccl")]
    backend: Option<Backend>,
    /// Stop with a checkpoint at this step (the schedule still spans train.steps; --resume continues exactly).
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// Print only summary lines (no progress bar).
    #[arg(long)]
    quiet: bool,
    /// MPI across machines: host:slots entries for mpirun (same as --set launch.hosts=[...]).
    #[arg(long, value_delimiter = ',', value_name = "HOST:SLOTS,...")]
    hosts: Vec<String>,
    /// Register with this coordinator (host:port) instead of running one (`switchyard worker`).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// When a rank fails, restart the job from its last committed checkpoint, up to this many times.
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_restarts: u32,
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
    if !args.hosts.is_empty() {
        overrides.push(format!("launch.hosts={}", toml_list(&args.hosts)));
    }
    let mut job = JobConfig::load(args.config.as_deref(), &overrides)?;
    // MPI ranks and NCCL processes (one per GPU) learn their rank from their launcher.
    let launched = job.parallel.backend.ranks_are_processes().then(collectives::launch::launched_rank).flatten();
    // Under mpirun/srun the launcher says how many ranks there are.
    if let (Some(size), None) = (launched.as_ref().and_then(|l| l.size), args.ranks) {
        overrides.push(format!("parallel.ranks={size}"));
        job = JobConfig::load(args.config.as_deref(), &overrides)?;
    }
    let run_dir = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&job.name));
    let mut resume = match (args.resume, args.resume_from.clone()) {
        (_, Some(url)) => Resume::From(url),
        (true, None) => Resume::Latest,
        (false, None) if args.resume_if_any => Resume::LatestOrFresh,
        (false, None) => Resume::No,
    };
    if let Some(addr) = &args.coordinator {
        // A worker of a job whose coordinator runs elsewhere.
        if job.parallel.backend == Backend::Mpi && launched.is_none() {
            bail!("with --coordinator and --backend mpi, start the ranks with your launcher (mpirun, srun)");
        }
        let token = configured_token(&job.coordinator)?
            .context("a worker needs the job's token: set SWITCHYARD_TOKEN (or [coordinator] token_file)")?;
        let link = CoordinatorLink { addr: addr.clone(), token };
        return run_here(&job, &args, &run_dir, resume, Some(link), launched.as_ref().is_none_or(|l| l.rank == 0));
    }
    if let Some(rank) = launched {
        // One rank of an MPI job: its coordinator (if any) is in the environment.
        return run_here(&job, &args, &run_dir, resume, CoordinatorLink::from_env(), rank.rank == 0);
    }
    if job.parallel.backend == Backend::Mpi {
        // Checked here so a bad layout is reported once, not by every rank.
        job.parallel_dims()?;
    }
    let mut attempt = 0;
    loop {
        // A fresh coordinator per attempt: the ranks of a restart register anew.
        let coordinator = RunningCoordinator::start(&job, &run_dir)?;
        eprintln!("{}", coordinator.banner());
        let result = if job.parallel.backend == Backend::Mpi {
            run_mpi(&job, &resume, &coordinator)
        } else {
            run_here(&job, &args, &run_dir, resume.clone(), Some(coordinator.link()), true)
        };
        let lost = coordinator.first_lost();
        drop(coordinator);
        let error = match result {
            Ok(()) => return Ok(()),
            // Pre-emption is the scheduler's decision, not a failure to retry.
            Err(e) if e.is::<Preempted>() => return Err(e),
            Err(e) if attempt < args.max_restarts => e,
            Err(e) => return Err(e),
        };
        attempt += 1;
        eprintln!("error: {error:#}");
        if let (Some(rank), false) = (lost, job.launch.hosts.is_empty()) {
            job = without_host_of(job, rank as usize, &args, &overrides)?;
        }
        let store = CheckpointStore::open_with(&checkpoint_url(&job, &run_dir), &job.checkpoint.store_options())?;
        resume = match store.latest_step()? {
            Some(step) => {
                eprintln!(
                    "restart {attempt}/{}: resuming from step {step} ({})",
                    args.max_restarts,
                    store.step_url(step)
                );
                Resume::Latest
            }
            None => {
                eprintln!("restart {attempt}/{}: no checkpoint was committed yet, starting over", args.max_restarts);
                Resume::No
            }
        };
    }
}

/// `switchyard worker`: `train` with a coordinator that runs elsewhere.
pub fn run_worker(mut args: TrainArgs) -> Result<()> {
    if args.coordinator.is_none() {
        args.coordinator = coordinator_addr_from_env();
    }
    if args.coordinator.is_none() {
        bail!(
            "switchyard worker needs its coordinator: --coordinator host:port, {ADDR_VAR}=host:port, \
             or MASTER_ADDR (and MASTER_PORT, default 29500)"
        );
    }
    run(args)
}

/// A TOML list of strings, for an override.
fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The job without the host that ran `lost_rank` (mpirun fills each host's
/// slots in order), on the ranks that remain; the layout is recomputed and
/// checked for the smaller world.
fn without_host_of(job: JobConfig, lost_rank: usize, args: &TrainArgs, overrides: &[String]) -> Result<JobConfig> {
    let mut first = 0;
    let mut remaining = Vec::new();
    let mut gone = None;
    for entry in &job.launch.hosts {
        let slots: usize = entry.rsplit_once(':').and_then(|(_, n)| n.parse().ok()).unwrap_or(1);
        if (first..first + slots).contains(&lost_rank) {
            gone = Some(entry.clone());
        } else {
            remaining.push(entry.clone());
        }
        first += slots;
    }
    let Some(gone) = gone else {
        return Ok(job);
    };
    let world: usize =
        remaining.iter().map(|e| e.rsplit_once(':').and_then(|(_, n)| n.parse().ok()).unwrap_or(1)).sum();
    if world == 0 {
        bail!("host {gone} (rank {lost_rank}) is gone and no host remains");
    }
    eprintln!("host {gone} (rank {lost_rank}) is gone: continuing on {} with {world} rank(s)", remaining.join(","));
    let mut overrides = overrides.to_vec();
    overrides.push(format!("parallel.ranks={world}"));
    overrides.push(format!("launch.hosts={}", toml_list(&remaining)));
    JobConfig::load(args.config.as_deref(), &overrides)
        .with_context(|| format!("the job cannot continue on {world} rank(s) without {gone}"))
}

/// Trains in this process: every rank as a thread, or this process's rank of an MPI job.
fn run_here(
    job: &JobConfig,
    args: &TrainArgs,
    run_dir: &std::path::Path,
    resume: Resume,
    coordinator: Option<CoordinatorLink>,
    lead: bool,
) -> Result<()> {
    let mut progress = ConsoleProgress::new(job, run_dir, args.quiet)?;
    let opts = RunOptions { run_dir: run_dir.to_path_buf(), resume, stop_at: args.stop_at, coordinator };
    let summary = train(job, &opts, &mut progress).context("training failed")?;
    if lead {
        progress.finish(&summary, job, run_dir);
    }
    if summary.preempted {
        let run_dir = run_dir.display().to_string();
        return Err(Preempted { step: summary.final_step, run_dir, quiet: !lead }.into());
    }
    Ok(())
}

/// The job stopped on SIGTERM after committing a checkpoint; `main` exits
/// with [`worker::preemption::PREEMPTED_EXIT_CODE`] so schedulers see a
/// terminated job (Slurm requeues it, Kubernetes restarts the pod).
#[derive(Debug)]
pub struct Preempted {
    pub step: u64,
    pub run_dir: String,
    /// A rank other than rank 0 of a multi-process job: rank 0 says it.
    pub quiet: bool,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.step == 0 {
            return write!(f, "stopped on SIGTERM; the ranks committed a checkpoint before exiting (see above)");
        }
        write!(f, "stopped on SIGTERM at step {} after committing its checkpoint in {}", self.step, self.run_dir)
    }
}

impl std::error::Error for Preempted {}

/// Runs the ranks as processes under mpirun: this command line again, with
/// the attempt's resume choice and the coordinator in the environment.
fn run_mpi(job: &JobConfig, resume: &Resume, coordinator: &RunningCoordinator) -> Result<()> {
    let mut forwarded = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        match arg.as_str() {
            "--resume" | "--resume-if-any" => {}
            // The attempt decides these below.
            "--resume-from" | "--max-restarts" | "--ranks" | "--hosts" => {
                given.next();
            }
            a if ["--resume-from=", "--max-restarts=", "--ranks=", "--hosts="].iter().any(|p| a.starts_with(p)) => {}
            _ => forwarded.push(arg),
        }
    }
    forwarded.extend(["--ranks".to_string(), job.parallel.ranks.to_string()]);
    if !job.launch.hosts.is_empty() {
        forwarded.extend(["--hosts".to_string(), job.launch.hosts.join(",")]);
    }
    match resume {
        Resume::No => {}
        Resume::Latest => forwarded.push("--resume".into()),
        Resume::LatestOrFresh => forwarded.push("--resume-if-any".into()),
        Resume::From(url) => forwarded.extend(["--resume-from".to_string(), url.clone()]),
    }
    let link = coordinator.link();
    let env = [(ADDR_VAR, link.addr), (TOKEN_VAR, link.token)];
    let code = crate::mpirun::run_self(job.parallel.ranks, &forwarded, &env, &job.launch)?;
    if code != 0 && worker::preemption::requested() {
        return Err(Preempted { step: 0, run_dir: String::new(), quiet: false }.into());
    }
    if code != 0 {
        bail!("the MPI job failed (mpirun exited with {code}); the ranks' messages are above");
    }
    Ok(())
}
