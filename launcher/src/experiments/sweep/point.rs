//! One sweep point: a real `switchyard train` in its own run folder, its
//! peak memory taken from the kernel, its metrics reduced to a result row.

use super::SweepLauncher;
use crate::experiments::sweep::grid::Point;
use crate::experiments::sweep::results::PointResult;
use crate::run::step_summary::{read_metrics, StepSummary};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;
use worker::Backend;

/// What every point of a sweep shares.
pub struct PointJob {
    pub config: PathBuf,
    pub launcher: SweepLauncher,
    pub steps: u64,
    pub warmup: u64,
}

/// Runs `point` in `run_dir` (emptied first: metrics files append) and
/// measures it; a failed job is a failed row, not an error.
pub fn run(job: &PointJob, point: &Point, run_dir: &Path) -> PointResult {
    let start = Instant::now();
    let measured = measure(job, point, run_dir);
    let mut row = PointResult::blank(point, "measured", job.launcher.as_str(), job.steps, job.warmup);
    match measured {
        Ok((s, ranks, peak_mib)) => {
            row.ranks = Some(ranks);
            row.tokens_per_step = Some(s.tokens_per_step);
            row.tokens_per_s = Some(s.tokens_per_s);
            row.step_s = Some(s.step_s);
            row.compute_s = Some(s.compute_s);
            row.exposed_comm_s = Some(s.alltoall_s + s.sync_s);
            row.alltoall_s = Some(s.alltoall_s);
            row.alltoall_peer_wait_s = Some(s.alltoall_peer_wait_s);
            row.alltoall_transfer_s = Some(s.alltoall_transfer_s);
            row.sync_s = Some(s.sync_s);
            row.other_s = Some(s.other_s);
            row.alltoall_bytes_per_step = Some(s.alltoall_bytes_per_step);
            row.expert_rows_max = Some(s.expert_rows_max);
            row.expert_rows_mean = Some(s.expert_rows_mean);
            row.peak_rss_process_mib = peak_mib;
            // Threads of one process share one resident set: per rank it is
            // only known where every rank is its own process.
            row.peak_rss_per_rank_mib = peak_mib.filter(|_| job.launcher == SweepLauncher::Mpi);
            row.loss_at_end = Some(s.loss_at_end);
        }
        Err(e) => {
            row.status = "failed".into();
            row.error = Some(format!("{e:#}"));
        }
    }
    row.wall_s = start.elapsed().as_secs_f64();
    row
}

/// The overrides a measured run of `point` is given: the point's values,
/// `steps` steps, no checkpoint before the end, no periodic log lines.
pub fn measured_sets(point: &Point, steps: u64) -> Vec<String> {
    let mut sets = point.overrides();
    sets.extend([format!("train.steps={steps}"), "checkpoint.every=0".into(), "train.log_every=1000000".into()]);
    sets
}

fn measure(job: &PointJob, point: &Point, run_dir: &Path) -> Result<(StepSummary, usize, Option<f64>)> {
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir).with_context(|| format!("cannot empty {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let exe = std::env::current_exe().context("cannot find this program to run the training jobs")?;
    let mut cmd = Command::new(exe);
    let backend = match job.launcher {
        SweepLauncher::Slurm => None,
        SweepLauncher::Local => Some(Backend::Local),
        SweepLauncher::Mpi => Some(Backend::Mpi),
    };
    match backend {
        None => {
            cmd.args(["slurm", "submit", "--config"]).arg(&job.config).arg("--run-dir").arg(run_dir);
        }
        Some(backend) => {
            cmd.args(["train", "--quiet", "--config"]).arg(&job.config).arg("--run-dir").arg(run_dir);
            cmd.args(["--backend", backend.as_str()]);
        }
    }
    for set in measured_sets(point, job.steps) {
        cmd.args(["--set", &set]);
    }
    let (status, output, peak_kib) = run_measured(cmd)?;
    std::fs::write(run_dir.join("output.log"), &output).ok();
    if !status.success() {
        bail!("training failed ({status}): {}", error_lines(&output));
    }
    let peak_kib = if job.launcher == SweepLauncher::Slurm { wait_for_slurm_job(&output, run_dir)? } else { peak_kib };
    let steps = read_metrics(run_dir)?;
    let ranks = steps.last().map_or(0, |m| m.per_rank.len());
    let summary = StepSummary::of(&steps, job.warmup as usize)?;
    Ok((summary, ranks, peak_kib.map(|kib| kib as f64 / 1024.0)))
}

/// Waits for the job `slurm submit` printed (`submitted job <id> ...`) to
/// leave the queue, then checks from its output that every rank finished.
/// Peak memory is not known this way (`None`).
fn wait_for_slurm_job(submit_output: &str, run_dir: &Path) -> Result<Option<u64>> {
    let id = submit_output
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .with_context(|| format!("slurm submit did not say which job it submitted: {submit_output}"))?
        .to_string();
    loop {
        let out = Command::new("squeue").args(["-h", "-j", &id]).output().context("cannot run squeue")?;
        // squeue forgets finished jobs after a while and then errors: both mean gone.
        if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let log_path = run_dir.join(format!("slurm-{id}.out"));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !log.contains("workers exited 0, coordinator 0") {
        bail!("Slurm job {id} failed ({}): {}", log_path.display(), error_lines(&log));
    }
    Ok(None)
}

/// Runs `cmd` with stdout and stderr in one buffer and reaps it with
/// `wait4`, whose resource usage gives the peak resident set (KiB) of the
/// largest process among the child and the descendants it waited for
/// (mpirun's ranks), which `std::process` does not expose.
fn run_measured(mut cmd: Command) -> Result<(ExitStatus, String, Option<u64>)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start the training job")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Read both pipes at once: a job that fills one while we block on the other would hang.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut err_text = String::new();
    let _ = stderr.read_to_string(&mut err_text);
    let out_text = reader.join().unwrap_or_default();
    let mut raw_status = 0;
    // SAFETY: rusage is plain old data, and the pid is our own child, not yet reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let reaped = loop {
        let r = unsafe { libc::wait4(pid, &mut raw_status, 0, &mut usage) };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    if reaped != pid {
        bail!("cannot wait for the training job: {}", std::io::Error::last_os_error());
    }
    // On Linux ru_maxrss is in KiB.
    let peak = (usage.ru_maxrss > 0).then_some(usage.ru_maxrss as u64);
    Ok((ExitStatus::from_raw(raw_status), out_text + &err_text, peak))
}

/// The lines of a failed job's output that say why: its `error:` lines, else its last lines.
fn error_lines(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines.iter().copied().filter(|l| l.contains("error")).collect();
    let chosen = if errors.is_empty() { &lines[lines.len().saturating_sub(3)..] } else { &errors[..] };
    chosen.join(" | ")
}
