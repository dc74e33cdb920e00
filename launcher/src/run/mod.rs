//! `switchyard train` and `switchyard worker`: resolve the job, run its
//! coordinator, start the ranks (threads here, or processes under mpirun
//! from a typed launch plan), and restart after a failure as the restart
//! policy says.
//!
//! Parts: `launch_plan` (how MPI ranks are started), `restart` (the policy,
//! pure functions), `mpirun`, `coordinator_process` (the coordinator of a
//! run on this machine), `coordinator_cmd` (`switchyard coordinator`),
//! `progress` (what the console shows) and `step_summary` (reading
//! metrics.jsonl back).

pub mod coordinator_cmd;
pub mod coordinator_process;
pub mod launch_plan;
pub mod mpirun;
pub mod preflight;
pub mod progress;
pub mod restart;
pub mod step_summary;

use crate::run::coordinator_process::RunningCoordinator;
use crate::run::launch_plan::RankLaunch;
use crate::run::progress::ConsoleProgress;
use crate::run::restart::{AttemptEnd, Next};
use anyhow::{bail, Context, Result};
use checkpoint::CheckpointStore;
use clap::Args;
use std::path::{Path, PathBuf};
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
    /// Write a timeline of every rank's phases (Chrome trace JSON: ui.perfetto.dev,
    /// chrome://tracing) to FILE, or without FILE to the run folder's trace.json, which
    /// the dashboard links; MPI ranks each write FILE.rank-N first, merged at the end.
    #[arg(long, value_name = "FILE")]
    trace: Option<Option<PathBuf>>,
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

/// A flag that stands for a config key (`--ranks` for `parallel.ranks`)
/// must not contradict a `--set` of that key: which one was meant cannot
/// be known, so neither silently wins.
fn flag_agrees_with_sets(sets: &[String], flag: &str, key: &str, value: &str) -> Result<()> {
    for set in sets {
        let Some((set_key, set_value)) = set.split_once('=') else { continue };
        let set_value = set_value.trim().trim_matches('"');
        if set_key.trim() == key && set_value != value {
            bail!("--{flag} {value} and --set {key}={set_value} disagree: give only one of them");
        }
    }
    Ok(())
}

/// Runs a training job on this machine, or this process's rank of an MPI job.
impl TrainArgs {
    /// `--trace FILE`, when given; `--trace` alone: the run folder's trace.json.
    pub fn trace_file(&self) -> Option<PathBuf> {
        if let Some(file) = self.trace.clone()? {
            return Some(file);
        }
        let run_dir = self.run_dir.clone().unwrap_or_else(|| {
            // The default run folder is named after the job.
            let name = JobConfig::load(self.config.as_deref(), &self.overrides).map(|job| job.name);
            PathBuf::from("runs").join(name.unwrap_or_default())
        });
        Some(run_dir.join(coordinator::dashboard::TRACE_FILE))
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(backend) = &args.backend {
        flag_agrees_with_sets(&args.overrides, "backend", "parallel.backend", &backend.to_string())?;
    }
    if let Some(ranks) = args.ranks {
        flag_agrees_with_sets(&args.overrides, "ranks", "parallel.ranks", &ranks.to_string())?;
    }
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
    // Once per job: by the launcher, or by rank 0 of ranks a user's own mpirun started.
    let first_to_read = launched.as_ref().is_none_or(|l| l.rank == 0 && CoordinatorLink::from_env().is_none());
    if first_to_read {
        for warning in job.warnings() {
            eprintln!("warning: {warning}");
        }
    }
    let mut rows_that_fit = None;
    if let (Some(ranks_here), Some(available)) =
        (ranks_on_this_machine(&job, launched.as_ref()), preflight::available_bytes())
    {
        if let Some(warning) = preflight::check(&job, ranks_here, available)? {
            eprintln!("warning: {warning}");
        }
        if first_to_read && !args.quiet {
            eprintln!("{}", preflight::summary(&job, ranks_here, available)?);
        }
        rows_that_fit = preflight::expert_rows_that_fit(&job, ranks_here, available)?;
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
        let lead = launched.as_ref().is_none_or(|l| l.rank == 0);
        return run_here(&job, &args, &run_dir, resume, Some(link), lead, rows_that_fit);
    }
    if let Some(rank) = launched {
        // One rank of an MPI job: its coordinator (if any) is in the environment.
        return run_here(&job, &args, &run_dir, resume, CoordinatorLink::from_env(), rank.rank == 0, rows_that_fit);
    }
    if job.parallel.backend == Backend::Mpi {
        // Checked here so a bad layout is reported once, not by every rank.
        job.parallel_dims()?;
    }
    let trace = args.trace_file();
    let mut restarts = 0;
    let mut dashboard = None;
    loop {
        // A fresh coordinator per attempt: the ranks of a restart register
        // anew; its dashboard stays where the first one was.
        let coordinator = RunningCoordinator::start(&job, &run_dir, restarts, dashboard)?;
        dashboard = coordinator.http_addr();
        eprintln!("{}", coordinator.banner());
        let result = if job.parallel.backend == Backend::Mpi {
            let launch = RankLaunch {
                job: &job,
                run_dir: &run_dir,
                resume: &resume,
                stop_at: args.stop_at,
                quiet: args.quiet,
                trace: trace.as_deref(),
            };
            run_mpi(&launch, &coordinator)
        } else {
            run_here(&job, &args, &run_dir, resume.clone(), Some(coordinator.link()), true, rows_that_fit)
        };
        let lost = coordinator.first_lost().map(|rank| rank as usize);
        drop(coordinator);
        let end = match &result {
            Ok(()) => AttemptEnd::Finished,
            // Pre-emption is the scheduler's decision, not a failure to retry.
            Err(e) if e.is::<Preempted>() => AttemptEnd::Preempted,
            Err(_) => AttemptEnd::Failed { lost_rank: lost },
        };
        let (attempt, drop_host_of) =
            match restart::after_attempt(end, restarts, args.max_restarts, !job.launch.hosts.is_empty()) {
                Next::Stop => {
                    if let (AttemptEnd::Failed { .. }, Some(hint)) = (end, resume_hint(&job, &run_dir)) {
                        eprintln!("{hint}");
                    }
                    return result;
                }
                Next::Restart { attempt, drop_host_of } => (attempt, drop_host_of),
            };
        restarts = attempt;
        if let Err(error) = result {
            eprintln!("error: {error:#}");
        }
        if let Some(rank) = drop_host_of {
            job = without_host_of(job, rank, &args, &overrides)?;
        }
        let store = CheckpointStore::open_with(&checkpoint_url(&job, &run_dir), &job.checkpoint.store_options())?;
        let latest = store.latest_step()?;
        match latest {
            Some(step) => eprintln!(
                "restart {attempt}/{}: resuming from step {step} ({})",
                args.max_restarts,
                store.step_url(step)
            ),
            None => {
                eprintln!("restart {attempt}/{}: no checkpoint was committed yet, starting over", args.max_restarts)
            }
        }
        resume = restart::resume_after_restart(latest);
    }
}

/// After a failed attempt that is not restarted (a rank killed, a node
/// lost): the step the run can resume from and the command that does it,
/// or `None` when no step was committed (or the store cannot be read).
fn resume_hint(job: &JobConfig, run_dir: &Path) -> Option<String> {
    // Opened as existing: a run that failed before its first commit (bad
    // data, say) must not leave a folder behind.
    let url = checkpoint_url(job, run_dir);
    let store = CheckpointStore::open_existing_with(&url, &job.checkpoint.store_options()).ok()?;
    let step = store.latest_step().ok()??;
    Some(format!(
        "the run's last committed checkpoint is step {step} ({}). Resume it with: {} \
         (or start runs with --max-restarts N to resume by themselves)",
        store.step_url(step),
        progress::resume_command(run_dir)
    ))
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

/// How many of the job's ranks this process answers for in the memory
/// preflight, which runs once per machine before any rank allocates: all
/// of them for a launcher (the ranks of its mpirun on this machine), the
/// machine's ranks for the first rank there of a job started by another
/// launcher (the others wait for it in their first collective), none
/// (`None`) for the other ranks, and for GPU jobs, whose memory is the
/// devices'.
fn ranks_on_this_machine(job: &JobConfig, launched: Option<&collectives::launch::LaunchedRank>) -> Option<usize> {
    if job.parallel.backend == Backend::Nccl {
        return None;
    }
    if launched.is_some() {
        return match collectives::launch::local_place() {
            Some((0, here)) => Some(here),
            Some(_) => None,
            None => launched.filter(|l| l.rank == 0).map(|_| 1),
        };
    }
    if job.parallel.backend == Backend::Mpi && !job.launch.hosts.is_empty() {
        // host:slots entries; the fullest machine decides.
        let slots = |h: &String| h.rsplit_once(':').and_then(|(_, n)| n.parse().ok()).unwrap_or(1);
        return job.launch.hosts.iter().map(slots).max();
    }
    Some(job.parallel.ranks)
}

/// A TOML list of strings, for an override.
fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The job without the host that ran `lost_rank`, on the ranks that
/// remain; the layout is recomputed and checked for the smaller world.
fn without_host_of(job: JobConfig, lost_rank: usize, args: &TrainArgs, overrides: &[String]) -> Result<JobConfig> {
    let Some(loss) = restart::without_host_of(&job.launch.hosts, lost_rank) else {
        return Ok(job);
    };
    let (gone, world) = (&loss.gone, loss.world);
    if world == 0 {
        bail!("host {gone} (rank {lost_rank}) is gone and no host remains");
    }
    eprintln!(
        "host {gone} (rank {lost_rank}) is gone: continuing on {} with {world} rank(s)",
        loss.remaining.join(",")
    );
    let mut overrides = overrides.to_vec();
    overrides.push(format!("parallel.ranks={world}"));
    overrides.push(format!("launch.hosts={}", toml_list(&loss.remaining)));
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
    expert_rows_that_fit: Option<usize>,
) -> Result<()> {
    let mut progress = ConsoleProgress::new(job, run_dir, args.quiet)?;
    let opts =
        RunOptions { run_dir: run_dir.to_path_buf(), resume, stop_at: args.stop_at, coordinator, expert_rows_that_fit };
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
            let why = if worker::preemption::requested() {
                format!("stopped on {}", worker::preemption::signal_name())
            } else {
                "stopped: a rank got a stop signal (SIGTERM, SIGINT or SIGUSR1)".to_string()
            };
            return write!(f, "{why}; the ranks committed a checkpoint before exiting (see above)");
        }
        let signal = worker::preemption::signal_name();
        write!(f, "stopped on {signal} at step {} after committing its checkpoint in {}", self.step, self.run_dir)
    }
}

impl std::error::Error for Preempted {}

/// Runs the ranks as processes under mpirun, started from the attempt's
/// typed launch plan, with the coordinator in the environment.
fn run_mpi(launch: &RankLaunch, coordinator: &RunningCoordinator) -> Result<()> {
    launch.write_config()?;
    let link = coordinator.link();
    let env = [(ADDR_VAR, link.addr), (TOKEN_VAR, link.token)];
    let job = launch.job;
    let code = mpirun::run_self(job.parallel.ranks, &launch.args(), &env, &job.launch, &|| coordinator.first_lost())?;
    // 143 from mpirun: a rank got the stop signal itself (and every rank
    // saved and stopped with it); the job stopped as if this process had.
    let preempted_rank = code == worker::preemption::PREEMPTED_EXIT_CODE;
    if code != 0 && (worker::preemption::requested() || preempted_rank) {
        return Err(Preempted { step: 0, run_dir: String::new(), quiet: false }.into());
    }
    if code != 0 {
        bail!("the MPI job failed (mpirun exited with {code}); the ranks' messages are above");
    }
    Ok(())
}
