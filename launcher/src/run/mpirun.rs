//! Starting an MPI job from `switchyard train --backend mpi`: the launcher
//! runs `mpirun` on its own binary with the arguments of a typed launch
//! plan (`launch_plan.rs`), and each process it starts finds its rank in
//! the environment (see `collectives::launch::launched_rank`).

use anyhow::{bail, Context, Result};
use std::process::Command;
use worker::config::LaunchConfig;

/// Runs this binary with `args` as `ranks` MPI processes, on this machine
/// or on `launch.hosts`, with the variables `env` exported to every rank;
/// returns mpirun's exit code.
///
/// A stop asked of this process (SIGTERM, SIGINT: see
/// `worker::preemption`) is passed on as SIGUSR1, which mpirun forwards to
/// every rank: the ranks then save the step together and exit. mpirun runs
/// in its own process group, so that a Ctrl-C in the terminal reaches this
/// process only; mpirun itself would end the job on it without a save.
pub fn run_self(
    ranks: usize,
    args: &[String],
    env: &[(&str, String)],
    launch: &LaunchConfig,
    lost_rank: &dyn Fn() -> Option<u32>,
) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = self_command(ranks, args, env, Some(launch))?;
    // Outside the terminal's foreground group, a read of the terminal
    // would stop mpirun (SIGTTIN); the ranks read no input.
    cmd.process_group(0).stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().map_err(not_started)?;
    let mut forwarded = false;
    let mut lost_at = None;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for mpirun")? {
            return Ok(status.code().unwrap_or(1));
        }
        if worker::preemption::requested() && !forwarded {
            // SAFETY: kill(2) with a pid this process started and still waits for.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
            forwarded = true;
        }
        if let Some(rank) = lost_rank() {
            let since = *lost_at.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > MPIRUN_GRACE_AFTER_A_LOSS {
                // mpirun waits for its daemon on a host it cannot reach (a
                // cut link) and would never end: end it, so the job can
                // restart without that host.
                eprintln!(
                    "mpirun did not end {}s after rank {rank} was lost (it waits for a host it cannot reach): \
                     stopping it",
                    MPIRUN_GRACE_AFTER_A_LOSS.as_secs()
                );
                // SAFETY: kill(2) of the process group mpirun leads (process_group(0) above).
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let status = child.wait().context("cannot wait for mpirun")?;
                return Ok(status.code().unwrap_or(128 + libc::SIGKILL));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How long mpirun may go on after the coordinator declared a rank lost.
/// The other ranks stop within about a second of being told; mpirun then
/// ends unless it waits for a daemon on a host it cannot reach.
const MPIRUN_GRACE_AFTER_A_LOSS: std::time::Duration = std::time::Duration::from_secs(15);

/// `mpirun` starting this binary with `args` as `ranks` processes, each
/// given the variables `env`, placed as `launch` says.
pub fn self_command(
    ranks: usize,
    args: &[String],
    env: &[(&str, String)],
    launch: Option<&LaunchConfig>,
) -> Result<Command> {
    if !collectives::mpi::COMPILED {
        bail!(
            "--backend mpi needs a switchyard built with MPI: cargo build --release --features mpi \
             (OpenMPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev pkg-config)"
        );
    }
    let exe = std::env::current_exe().context("cannot find this program's path to start it under mpirun")?;
    let mut cmd = command(ranks);
    if let Some(launch) = launch {
        if !launch.hosts.is_empty() {
            cmd.args(["--host", &launch.hosts.join(",")]);
        }
        cmd.args(&launch.extra_args);
    }
    for (name, value) in env {
        cmd.args(["-x", name]).env(name, value);
    }
    cmd.arg(&exe).args(args);
    Ok(cmd)
}

/// `mpirun -n ranks` with switchyard's settings for one machine; add the program.
pub fn command(ranks: usize) -> Command {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Ranks on one machine share its cores: give each its part unless told.
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| (cores / ranks).max(1).to_string());
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", &ranks.to_string()]);
    if ranks > cores {
        cmd.arg("--oversubscribe");
    }
    // Each rank runs a thread pool; pinning it to one core would serialise it.
    cmd.args(["--bind-to", "none", "-x", "RAYON_NUM_THREADS"]);
    if std::env::var_os("RUST_LOG").is_some() {
        cmd.args(["-x", "RUST_LOG"]);
    }
    cmd.env("RAYON_NUM_THREADS", threads);
    // OpenMPI refuses to run as root (containers, CI) unless allowed.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// The error for an mpirun that could not be started.
pub fn not_started(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot run `mpirun` ({e}): --backend mpi on one machine needs OpenMPI (apt-get install openmpi-bin); \
         on a cluster start the ranks yourself, e.g. `srun --mpi=pmix -n 4 switchyard train --backend mpi`"
    )
}
