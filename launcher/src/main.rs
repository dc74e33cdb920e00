//! `switchyard`: train, evaluate and inspect Mixture-of-Experts models.
//!
//! Thin on purpose: parse the command line, then call the command's module.

mod bench;
mod ckpt;
mod data;
mod deploy;
mod eval;
mod experiments;
mod format;
mod run;
mod trace;
mod watch;

use clap::{Parser, Subcommand};

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
    Train(run::TrainArgs),
    /// The job's coordinator alone (Slurm, Kubernetes): workers register with it.
    Coordinator(run::coordinator_cmd::CoordinatorArgs),
    /// One worker process (or its ranks) of a job whose coordinator runs elsewhere:
    /// `train` options plus --coordinator host:port (or SWITCHYARD_COORDINATOR).
    Worker(run::TrainArgs),
    /// Mean next-token cross-entropy of a checkpoint on a text file.
    Eval(eval::EvalArgs),
    /// Look at checkpoints: list steps, inspect, verify, export to safetensors.
    #[command(subcommand)]
    Ckpt(ckpt::CkptCommand),
    /// Prepare training data.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Kubernetes: render a job's manifests (docs/kubernetes.md).
    #[command(subcommand)]
    K8s(deploy::k8s::K8sCommand),
    /// Run on Slurm: render an sbatch script, or render and submit it.
    #[command(subcommand)]
    Slurm(deploy::slurm::SlurmCommand),
    /// Measured scaling experiment: train every point of a grid of config values,
    /// write results.csv/json and plots.
    Sweep(experiments::sweep::SweepArgs),
    /// Predicted scaling: an analytic model of a step of the job on a cluster file (one
    /// point, or a sweep grid -> the sweep's results files and plots); `calibrate`
    /// measures this machine into a cluster file.
    Simulate(experiments::simulate::SimulateArgs),
    /// Serve a run folder's dashboard (the page a running job's coordinator serves at /).
    Dashboard(watch::DashboardArgs),
    /// Write a run folder's dashboard as one self-contained HTML file.
    Report(watch::ReportArgs),
    /// Benchmarks (print a table; --json for machines).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// oneDNN (loaded when a product needs it) runs on OpenMP, whose threads
/// by default spin for a while after each product, holding a core that
/// switchyard's own threads need for the next one: on the 2-core AMD EPYC
/// the tiny job in bf16 ran 13-16k tokens/s spinning and 23k sleeping
/// (docs/kernels.md). So the
/// threads sleep unless the user set a wait policy. Set here, before any
/// thread starts (the variables are read when libgomp loads). Benchmark
/// peers (PyTorch) run without it: see `bench::python_peer`.
fn quiet_openmp_threads() {
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && std::env::var_os("GOMP_SPINCOUNT").is_none() {
        // SAFETY (of set_var): the process has one thread here.
        std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
        std::env::set_var(bench::OMP_POLICY_OURS, "1");
    }
}

/// glibc's malloc returns a large freed block to the kernel (munmap, or a
/// trim of the heap's top) and the next step faults it in again, zeroed:
/// with 4096-token micro-batches the kernel's page faults and TLB
/// shootdowns took about a fifth of the step. Blocks up to 64 MiB now
/// stay in the heap for reuse, and the heap's top is trimmed beyond 256
/// MiB free. On the 2-core AMD EPYC, 12-step runs of the tiny job at 4096-token
/// micro-batches: 21-23k tokens/s before, 26-31k after; the D512 job
/// 2.0-2.2k before, 2.3k after; the default job and peak RSS unchanged
/// within run-to-run spread (docs/kernels.md).
///
/// One arena for every thread: with glibc's default of one per thread,
/// a block that a worker thread allocated and the main thread freed goes
/// back to the worker's arena, and each arena keeps its own high-water
/// mark, so the resident set grew over the first steps (the default job:
/// 59 MiB after step 1, 69 MiB after 60 steps). With one arena it stays
/// at 62 MiB, at the same tokens/s: a step makes under ten thousand
/// allocations, too few for the shared lock to matter (docs/kernels.md,
/// Memory).
fn keep_freed_blocks_for_reuse() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc's tuning values; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// glibc's per-thread cache of small freed blocks (`tcache`, up to seven
/// blocks of each size to 1 KiB) keeps those blocks marked in use, so the
/// free space around them cannot merge and the next large buffer goes to
/// the top of the heap: the default job's peak RSS was 58.2-58.6 MiB with
/// it and 54.1-54.7 MiB without (`bench layer --memory-only`, AMD EPYC),
/// and 1000 steps took 84.4-86.5 s with it, 78.0-89.2 s without. Only
/// the environment can turn it off (`GLIBC_TUNABLES`, read when the
/// program loads), so the binary starts itself once more with it set,
/// unless the user's `GLIBC_TUNABLES` already says how many to keep. If
/// that start fails, this one carries on with the cache. Benchmark peers
/// get the user's value back (`bench::as_users_run_it`).
fn without_malloc_tcache() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const SETTING: &str = "glibc.malloc.tcache_count=0";
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if current.contains("glibc.malloc.tcache_count") {
            return;
        }
        let value = if current.is_empty() { SETTING.to_string() } else { format!("{current}:{SETTING}") };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "switchyard".into());
        // Returns only if the exec failed.
        let _ = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", value)
            .env(bench::TUNABLES_BEFORE, current)
            .exec();
    }
}

fn main() -> std::process::ExitCode {
    without_malloc_tcache();
    keep_freed_blocks_for_reuse();
    quiet_openmp_threads();
    let cli = Cli::parse();
    let trace_file = match &cli.command {
        Command::Train(args) | Command::Worker(args) => args.trace_file(),
        _ => None,
    };
    let timeline = trace::install(trace_file.is_some());
    if let Some(timeline) = &timeline {
        coordinator::dashboard::set_live_trace(timeline.clone());
    }
    // A launcher of MPI ranks merges their files at the end: none may be left from before.
    if let Some(path) = trace_file.as_deref().filter(|_| collectives::launch::launched_rank().is_none()) {
        trace::remove_rank_files(path);
    }
    if matches!(cli.command, Command::Train(_) | Command::Worker(_) | Command::Coordinator(_)) {
        // SIGTERM (scancel, pre-emption, pod eviction) = checkpoint, then stop;
        // also in a launcher that only waits for mpirun, and in a coordinator,
        // so that they outlive their ranks' last checkpoint.
        worker::preemption::install();
    }
    let result = match cli.command {
        Command::Train(args) => run::run(args),
        Command::Coordinator(args) => run::coordinator_cmd::run(args),
        Command::Worker(args) => run::run_worker(args),
        Command::Eval(args) => eval::run(args),
        Command::Ckpt(cmd) => ckpt::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::K8s(cmd) => deploy::k8s::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Slurm(cmd) => deploy::slurm::run(cmd),
        Command::Sweep(args) => experiments::sweep::run(args),
        Command::Simulate(args) => experiments::simulate::run(args),
        Command::Dashboard(args) => watch::serve(args),
        Command::Report(args) => watch::report(args),
    };
    // Also after a failure: the timeline shows where it stopped.
    if let (Some(timeline), Some(path)) = (&timeline, &trace_file) {
        match timeline.write(path) {
            Ok(out) => eprintln!("trace: {} (open it in ui.perfetto.dev or chrome://tracing)", out.display()),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if err.is::<run::Preempted>() => {
            if !err.downcast_ref::<run::Preempted>().is_some_and(|p| p.quiet) {
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
