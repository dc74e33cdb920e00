//! `switchyard coordinator`: the job's coordinator on its own, for
//! launchers that start roles separately (Slurm, Kubernetes). Workers are
//! `switchyard worker --coordinator host:port ...` with the same config
//! and token. It prints one aggregated line per step and exits when every
//! rank said goodbye (0 when all finished well), or non-zero after a rank
//! was lost (every other rank is told to stop).

use crate::run::coordinator_process::{commit_line, start_server};
use crate::run::Preempted;
use anyhow::{bail, Context, Result};
use clap::Args;
use coordinator::server::Event;
use std::path::PathBuf;
use std::time::Duration;
use worker::coordination::configured_token;
use worker::JobConfig;

/// Arguments of `switchyard coordinator`.
#[derive(Args)]
pub struct CoordinatorArgs {
    /// Job config (TOML), the same the workers use; default: the built-in tiny job.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.steps=100 (repeatable; workers need the same).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Number of ranks to wait for (same as --set parallel.ranks=N).
    #[arg(long)]
    ranks: Option<usize>,
    /// host:port for workers; default [coordinator] addr, else 0.0.0.0:29500.
    #[arg(long)]
    addr: Option<String>,
    /// host:port for /status and /metrics; default [coordinator] http_addr, else 0.0.0.0:29501.
    #[arg(long)]
    http_addr: Option<String>,
    /// Run folder (default runs/<job name>): checkpoints go to <run dir>/checkpoints
    /// unless [checkpoint] url names a shared store, which jobs over several machines need.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

/// Runs the coordinator until the job ends.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(ranks) = args.ranks {
        overrides.push(format!("parallel.ranks={ranks}"));
    }
    let job = JobConfig::load(args.config.as_deref(), &overrides)?;
    let token = configured_token(&job.coordinator)?.context(
        "a coordinator started on its own needs the job's token, and so do its workers: set SWITCHYARD_TOKEN \
         (or [coordinator] token_file) for both",
    )?;
    let or_default = |flag: &Option<String>, configured: &str, default: &str| {
        flag.clone().unwrap_or_else(|| if configured.is_empty() { default.into() } else { configured.into() })
    };
    let addr = or_default(&args.addr, &job.coordinator.addr, "0.0.0.0:29500");
    let http = or_default(&args.http_addr, &job.coordinator.http_addr, "0.0.0.0:29501");
    let run_dir = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&job.name));
    let coordinator = start_server(&job, &run_dir, token, &addr, &http, "0.0.0.0:0", 0)?;
    let world = job.parallel.ranks;
    let http = coordinator.http_addr().expect("started with HTTP");
    println!(
        "coordinator {} waiting for {world} rank(s) | dashboard http://{http}/ | status http://{http}/status | metrics http://{http}/metrics",
        coordinator.addr()
    );
    let (mut done, mut failures) = (0, Vec::new());
    let mut asked_to_stop = false;
    while done < world {
        // SIGTERM or Ctrl-C here (a coordinator pod deleted): every rank
        // saves the current step, then the job stops as if they had the signal.
        if worker::preemption::requested() && !asked_to_stop {
            let signal = worker::preemption::signal_name();
            println!("{signal}: asking every rank to save a checkpoint of the current step and stop");
            coordinator.ask_to_save_and_stop(&format!("the coordinator got {signal}"));
            asked_to_stop = true;
        }
        let Some(event) = coordinator.next_event(Duration::from_millis(200)) else {
            continue;
        };
        match event {
            Event::Registered { rank, host, pid } => println!("rank {rank} registered from {host} (pid {pid})"),
            Event::Refused { peer, reason } => println!("refused {peer}: {reason}"),
            Event::Step(s) => println!(
                "step {} | loss {:.4} | {:.0} tok/s | step {:.3}s | expert rows per rank {:?} | dropped {}",
                s.step, s.loss, s.tokens_per_s, s.step_time_s, s.expert_rows_per_rank, s.dropped
            ),
            Event::Committed(c) => println!("{}", commit_line(&c)),
            Event::MetricsFailed { reason } => println!("cannot write the run's metrics ({reason}); training goes on"),
            Event::CheckpointFailed { step, reason } => {
                println!("checkpoint step {step} failed: {reason}; every rank was told to stop");
                failures.push(format!("checkpoint step {step}: {reason}"));
            }
            Event::Lost { rank, host, reason } => {
                println!("rank {rank} on {host} is lost: {reason}; every rank was told to stop");
                failures.push(format!("rank {rank} on {host}: {reason}"));
                done += 1;
            }
            Event::Finished { rank, ok } => {
                println!("rank {rank} finished{}", if ok { "" } else { " with an error" });
                if !ok {
                    failures.push(format!("rank {rank} ended with an error (see its log)"));
                }
                done += 1;
            }
        }
    }
    if !failures.is_empty() {
        bail!("the job failed: {}", failures.join("; "));
    }
    println!("every rank finished");
    if asked_to_stop {
        return Err(Preempted { step: 0, run_dir: String::new(), quiet: false }.into());
    }
    Ok(())
}
