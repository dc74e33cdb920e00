//! The coordinator of a job the launcher runs on this machine: started
//! before the ranks, it prints where its `/status` and `/metrics` are,
//! reports lost ranks and refused connections as they happen, and stops
//! with the launcher.

use anyhow::{Context, Result};
use coordinator::commit::{CommitTarget, Committed};
use coordinator::server::{Coordinator, Event, ServerConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::api::checkpoint_url;
use worker::config::CoordinatorConfig;
use worker::coordination::{configured_token, CoordinatorLink};
use worker::JobConfig;

/// A running coordinator and the thread that prints its events.
pub struct RunningCoordinator {
    link: CoordinatorLink,
    http: Option<SocketAddr>,
    done: Arc<AtomicBool>,
    first_lost: Arc<Mutex<Option<u32>>>,
    watcher: Option<JoinHandle<()>>,
}

impl RunningCoordinator {
    /// Starts the coordinator for `job` on the configured (or free local) ports.
    /// Across hosts (`[launch] hosts`) it listens on every interface and
    /// tells ranks to reach it at the first host, where the launcher runs.
    /// A restart (`restart` > 0) serves its dashboard where the first
    /// attempt did (`http_addr`), so an open page goes on drawing the run.
    pub fn start(job: &JobConfig, run_dir: &Path, restart: u32, http_addr: Option<SocketAddr>) -> Result<Self> {
        let cfg = &job.coordinator;
        let token = job_token(cfg)?;
        let first_host = job.launch.hosts.first().map(|h| h.split(':').next().unwrap_or(h).to_string());
        let default_bind = if first_host.is_some() { "0.0.0.0:0" } else { "127.0.0.1:0" };
        let http = http_addr.map_or_else(|| cfg.http_addr.clone(), |a| a.to_string());
        let coordinator = start_server(job, run_dir, token.clone(), &cfg.addr, &http, default_bind, restart)?;
        let bound = coordinator.addr();
        let addr = match first_host {
            Some(host) if bound.ip().is_unspecified() => format!("{host}:{}", bound.port()),
            _ => bound.to_string(),
        };
        let link = CoordinatorLink { addr, token };
        let http = coordinator.http_addr();
        let done = Arc::new(AtomicBool::new(false));
        let first_lost = Arc::new(Mutex::new(None));
        let watcher = {
            let done = Arc::clone(&done);
            let first_lost = Arc::clone(&first_lost);
            std::thread::Builder::new().name("coordinator-events".into()).spawn(move || {
                // After the first loss the others are told to stop, so their
                // closing connections are consequences, not news.
                let mut stopping = false;
                let mut deadline = None;
                loop {
                    if done.load(Ordering::Relaxed) {
                        // Let the coordinator take in the ranks' last reports
                        // (metrics lines, goodbyes) before it goes away.
                        let until = *deadline.get_or_insert_with(|| std::time::Instant::now() + Duration::from_secs(5));
                        let settled = coordinator.status().ranks.iter().all(|r| r.health != "healthy");
                        if settled || std::time::Instant::now() > until {
                            break;
                        }
                    }
                    match coordinator.next_event(Duration::from_millis(50)) {
                        Some(Event::Lost { rank, host, reason }) if !stopping => {
                            stopping = true;
                            *first_lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(rank);
                            eprintln!("coordinator: rank {rank} on {host} is lost: {reason}; stopping every rank")
                        }
                        Some(Event::Refused { peer, reason }) => {
                            eprintln!("coordinator: refused a connection from {peer}: {reason}")
                        }
                        Some(Event::MetricsFailed { reason }) => {
                            eprintln!("coordinator: cannot write the run's metrics ({reason}); training goes on")
                        }
                        Some(Event::CheckpointFailed { step, reason }) => {
                            eprintln!("coordinator: checkpoint step {step} failed: {reason}; stopping every rank")
                        }
                        Some(Event::Committed(c)) => {
                            for line in cleanup_lines(&c) {
                                eprintln!("coordinator: {line}")
                            }
                        }
                        _ => {}
                    }
                }
            })?
        };
        Ok(Self { link, http, done, first_lost, watcher: Some(watcher) })
    }

    /// The rank lost first, if one was.
    pub fn first_lost(&self) -> Option<u32> {
        *self.first_lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What ranks need to register.
    pub fn link(&self) -> CoordinatorLink {
        self.link.clone()
    }

    /// Where the dashboard, `/status` and `/metrics` are served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// One line saying where to watch the job.
    pub fn banner(&self) -> String {
        match self.http {
            Some(http) => {
                format!(
                    "coordinator {} | dashboard http://{http}/ | status http://{http}/status | metrics http://{http}/metrics",
                    self.link.addr
                )
            }
            None => format!("coordinator {}", self.link.addr),
        }
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

/// Starts a coordinator for `job` with `token` on `addr` / `http_addr`
/// (`default_bind` where one is empty), for the job's `restart`-th restart.
pub fn start_server(
    job: &JobConfig,
    run_dir: &Path,
    token: String,
    addr: &str,
    http_addr: &str,
    default_bind: &str,
    restart: u32,
) -> Result<Coordinator> {
    let parse = |text: &str, key: &str| -> Result<SocketAddr> {
        let text = if text.is_empty() { default_bind } else { text };
        text.parse().with_context(|| format!("{key} = \"{text}\" is not host:port (e.g. 0.0.0.0:29500)"))
    };
    let (bind, http_bind) = (parse(addr, "coordinator.addr")?, parse(http_addr, "coordinator.http_addr")?);
    let timeout = Duration::from_secs_f64(job.coordinator.heartbeat_timeout_s);
    let dims = job.parallel_dims()?;
    let server = ServerConfig {
        world: job.parallel.ranks,
        token,
        config_toml: job.to_toml(),
        dims: Some(dims),
        plan: Some(layout::PlacementPlan::contiguous(job.model.n_layers, job.model.n_experts, dims.ep)),
        attn_plan: worker::attn_dispatch::attn_expert_plan(job, dims.ep),
        heartbeat: (timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(2)),
        heartbeat_timeout: timeout,
        register_timeout: Duration::from_secs(10),
        // The coordinator writes the run's metrics.jsonl from the ranks' reports.
        metrics_path: Some(run_dir.join("metrics.jsonl")),
        // The coordinator commits every checkpoint once all ranks wrote their shards.
        checkpoint: Some(CommitTarget {
            url: checkpoint_url(job, run_dir),
            options: job.checkpoint.store_options(),
            keep_last: job.checkpoint.keep_last,
        }),
        restart,
    };
    Coordinator::start(server, bind, Some(http_bind))
        .with_context(|| format!("cannot start the coordinator on {bind} / {http_bind}"))
}

/// The job's token as configured, or a fresh random one (ranks started
/// by this launcher get it from us).
fn job_token(cfg: &CoordinatorConfig) -> Result<String> {
    if let Some(token) = configured_token(cfg)? {
        return Ok(token);
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom to make the job's token; set SWITCHYARD_TOKEN")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// One line for a committed checkpoint.
pub fn commit_line(c: &Committed) -> String {
    let line = format!(
        "checkpoint step {} committed: {} ({:.1} MiB, slowest upload {:.2}s, commit {:.2}s)",
        c.step,
        c.url,
        c.bytes as f64 / (1u64 << 20) as f64,
        c.upload_s,
        c.commit_s
    );
    std::iter::once(line).chain(cleanup_lines(c)).collect::<Vec<_>>().join("\n")
}

/// What a commit's cleanup did or could not do: old steps it could not
/// delete, unfinished uploads of killed processes it aborted.
pub fn cleanup_lines(c: &Committed) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(reason) = &c.prune_failed {
        lines.push(format!(
            "warning: step {} is committed, but deleting the steps beyond keep_last failed ({reason}); they stay \
             until a later commit deletes them",
            c.step
        ));
    }
    match &c.abandoned_uploads {
        Ok(aborted) if aborted.is_empty() => {}
        Ok(aborted) => lines.push(format!(
            "aborted {} unfinished upload(s) of an earlier, interrupted save: {}",
            aborted.len(),
            aborted.join(", ")
        )),
        Err(reason) => lines.push(format!(
            "warning: could not abort the unfinished uploads of an earlier save ({reason}); the next commit tries \
             again, or a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them"
        )),
    }
    lines
}
