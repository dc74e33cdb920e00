//! `switchyard simulate validate`: the step model checked part by part
//! where the network is real. Network-namespace hosts on this machine
//! (`scripts/netns-hosts.sh`, one rank per host), every link shaped with
//! tc's token bucket to each of the given rates; at every rate the link is
//! measured (a two-host all-to-all, `bench alltoall`'s ranks), then every
//! point of a grid is trained through mpirun over the hosts in rounds and
//! predicted with the calibrated machine and the measured link. Measured
//! and predicted compute, all-to-all transfer, waiting for peers and step
//! time go into one table, `results.json` and one chart per rate.
//!
//! What is taken from the measured run rather than predicted: the
//! router's load skew (busiest rank's expert rows over the mean), which
//! the prediction is given as its imbalance. Overlap is off in every run,
//! so the parts are measured apart. Needs root (namespaces and tc).

use crate::experiments::simulate::{job_overlap, shape_of};
use crate::experiments::sweep::grid::{Grid, Point};
use crate::run::step_summary::{read_metrics, StepSummary};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use simulator::cluster::{Cluster, Link, Topology};
use simulator::shape::Routing;
use simulator::step::{predict, Options, Prediction};
use std::path::{Path, PathBuf};
use std::process::Command;
use worker::JobConfig;

/// What `simulate validate` is asked.
pub struct Validate {
    pub config: PathBuf,
    /// Grid file; absent: [`DEFAULT_GRID`].
    pub grid: Option<PathBuf>,
    /// tc rates (`100mbit`, `1gbit`, ...).
    pub rates: Vec<String>,
    /// This machine's cluster file (`simulate calibrate`); absent: calibrated first.
    pub cluster: Option<PathBuf>,
    pub rounds: usize,
    pub out: PathBuf,
}

/// Ranks (one per host), experts and top-k.
pub const DEFAULT_GRID: &str =
    "steps = 12\nwarmup = 3\n[axes]\nparallel.ranks = [2, 4]\nmodel.n_experts = [4, 8]\nmodel.top_k = [1, 2]\n";

/// Sizes (KiB per rank) the link probe times: the small one is the
/// latency, the slope to the large one the bandwidth.
const PROBE_KIB: [usize; 2] = [4, 64];

/// One point at one rate, measured and predicted (seconds per step).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub rate: String,
    pub point: String,
    pub ranks: usize,
    pub measured: Parts,
    pub predicted: Parts,
    /// Busiest rank's expert rows over the mean, measured (given to the prediction).
    pub imbalance: f64,
}

/// A step and the parts the model predicts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Parts {
    pub step_s: f64,
    pub compute_s: f64,
    pub transfer_s: f64,
    pub waiting_s: f64,
    /// Gradient all-reduce and norm.
    pub sync_s: f64,
    /// The rest of the step (optimizer, bookkeeping).
    pub other_s: f64,
}

impl Parts {
    fn measured(m: &StepSummary) -> Self {
        let (transfer_s, waiting_s) = (m.alltoall_transfer_s, m.alltoall_peer_wait_s);
        Self { step_s: m.step_s, compute_s: m.compute_s, transfer_s, waiting_s, sync_s: m.sync_s, other_s: m.other_s }
    }

    fn predicted(p: &Prediction) -> Self {
        let (transfer_s, waiting_s) = (p.exchange_s, p.waiting_s);
        Self { step_s: p.step_s, compute_s: p.compute_s, transfer_s, waiting_s, sync_s: p.sync_s, other_s: p.other_s }
    }
}

/// The measured link at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredLink {
    pub rate: String,
    pub latency_us: f64,
    pub bandwidth_gbps: f64,
}

/// Runs the validation and prints its table.
pub fn run(v: Validate) -> Result<()> {
    preflight()?;
    std::fs::create_dir_all(&v.out).with_context(|| format!("cannot create {}", v.out.display()))?;
    let out = std::path::absolute(&v.out)?;
    let config = std::path::absolute(&v.config)
        .with_context(|| format!("cannot resolve the job config path {}", v.config.display()))?;
    let grid = match &v.grid {
        Some(path) => Grid::load(path)?,
        None => Grid::parse(DEFAULT_GRID)?,
    };
    let points = grid.points();
    let mut jobs = Vec::new();
    for point in &points {
        let job = JobConfig::load(Some(&config), &job_sets(point, grid.steps))
            .with_context(|| format!("the grid point {}", point.label()))?;
        jobs.push(job);
    }
    let hosts = jobs.iter().map(|j| j.parallel.ranks).max().unwrap_or(2);
    if !(2..=MAX_HOSTS).contains(&hosts) {
        bail!("simulate validate runs one rank per namespace host: 2 to {MAX_HOSTS} ranks per point, got {hosts}");
    }
    let machine = match &v.cluster {
        Some(path) => Cluster::load(path)?,
        None => calibrate(&out)?,
    };
    let _hosts = NamespaceHosts::up(hosts)?;
    let mut rows = Vec::new();
    let mut links = Vec::new();
    for rate in &v.rates {
        shape_links(hosts, rate)?;
        eprintln!("validate: {rate}: measuring the link (all-to-all between two hosts) ...");
        let link = probe_link(rate)?;
        eprintln!(
            "validate: {rate}: latency {:.0} us, bandwidth {:.4} GB/s per host and direction",
            link.latency_us, link.bandwidth_gbps
        );
        let cluster = namespace_cluster(&machine, hosts, &link);
        // Kept beside the results: `simulate --cluster` of it explains any row.
        let file = out.join(format!("cluster-{rate}.toml"));
        let header = format!(
            "# `simulate validate`: the calibrated machine as {hosts} namespace hosts; [inter_node] is\n\
             # the link at {rate} measured by a two-host all-to-all (latency: 4 KiB per rank;\n\
             # bandwidth: the slope to {} KiB).\n",
            PROBE_KIB[1]
        );
        std::fs::write(&file, header + &toml::to_string(&cluster)?)
            .with_context(|| format!("cannot write {}", file.display()))?;
        for (point, job) in points.iter().zip(&jobs) {
            let mut best: Option<StepSummary> = None;
            for round in 1..=v.rounds {
                eprintln!("validate: {rate}: {} round {round}/{} ...", point.label(), v.rounds);
                let dir = out.join("runs").join(rate).join(point.id());
                let s = train_on_hosts(&config, point, &grid, job.parallel.ranks, &dir)?;
                if best.as_ref().is_none_or(|b| s.step_s < b.step_s) {
                    best = Some(s);
                }
            }
            let m = best.context("no rounds (--rounds must be at least 1)")?;
            let imbalance = m.load_skew();
            let p = predict(
                &shape_of(job, Routing { imbalance })?,
                &cluster,
                Options { overlap: job_overlap(job, &cluster) },
            );
            rows.push(Row {
                rate: rate.clone(),
                point: point.label(),
                ranks: job.parallel.ranks,
                measured: Parts::measured(&m),
                predicted: Parts::predicted(&p),
                imbalance,
            });
        }
        links.push(link);
    }
    let table = table(&machine, &links, &rows, v.rounds);
    print!("{table}");
    std::fs::write(out.join("table.md"), &table)?;
    let json = serde_json::json!({ "cluster": machine.name, "links": links, "rows": rows });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    for rate in &v.rates {
        let of = |f: fn(&Parts) -> f64| -> Vec<(f64, f64)> {
            rows.iter().filter(|r| &r.rate == rate).map(|r| (f(&r.measured) * 1e3, f(&r.predicted) * 1e3)).collect()
        };
        let series = vec![
            ("step".to_string(), of(|p| p.step_s)),
            ("compute".to_string(), of(|p| p.compute_s)),
            ("all-to-all transfer".to_string(), of(|p| p.transfer_s)),
            ("waiting for peers".to_string(), of(|p| p.waiting_s)),
        ];
        let title = format!("predicted against measured, links at {rate} (light lines: 20% off)");
        let files = crate::experiments::sweep::plots::agreement(&out, &format!("validate_{rate}"), &title, &series)?;
        for f in files {
            eprintln!("  {}", f.display());
        }
    }
    eprintln!("validate: table, results.json and plots in {}", out.display());
    Ok(())
}

/// Namespace hosts `scripts/netns-hosts.sh` can make.
const MAX_HOSTS: usize = 4;

/// Root, the tools, and an MPI build, checked before anything starts.
fn preflight() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("simulate validate makes network namespaces and shapes links with tc: run it as root (sudo)");
    }
    if !collectives::mpi::COMPILED {
        bail!("simulate validate trains over MPI: build with --features mpi (cargo build --release --features mpi)");
    }
    for (tool, package) in
        [("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux"), ("mpirun", "openmpi-bin")]
    {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.status.success();
        if !found {
            bail!("simulate validate needs `{tool}`: apt-get install {package}");
        }
    }
    for script in ["scripts/netns-hosts.sh", "scripts/netns-rsh.sh", "scripts/netns-mpirun.sh"] {
        if !Path::new(script).exists() {
            bail!("simulate validate uses {script}: run it from the repository root");
        }
    }
    Ok(())
}

/// `simulate calibrate` into the results folder.
fn calibrate(out: &Path) -> Result<Cluster> {
    let path = out.join("cluster.toml");
    eprintln!("validate: no --cluster: calibrating this machine first ({}) ...", path.display());
    let exe = std::env::current_exe()?;
    let status = Command::new(exe).args(["simulate", "calibrate", "--out"]).arg(&path).status()?;
    if !status.success() {
        bail!("simulate calibrate failed ({status})");
    }
    Ok(Cluster::load(&path)?)
}

/// The hosts for as long as the value lives.
struct NamespaceHosts;

impl NamespaceHosts {
    fn up(count: usize) -> Result<Self> {
        let status = Command::new("scripts/netns-hosts.sh").args(["up", &count.to_string()]).status()?;
        if !status.success() {
            bail!("scripts/netns-hosts.sh up {count} failed ({status})");
        }
        Ok(Self)
    }
}

impl Drop for NamespaceHosts {
    fn drop(&mut self) {
        let _ = Command::new("scripts/netns-hosts.sh").arg("down").status();
    }
}

/// The token bucket's depth: a few frames, so a message larger than it
/// moves at the rate (a deep bucket lets each exchange of a step through
/// at the bridge's speed after a pause, and the link is no longer a rate).
const BURST: &str = "8kb";

/// Every host's link limited to `rate` both ways (tbf, as
/// scripts/bench-overlap.sh does, with a shallower bucket).
fn shape_links(hosts: usize, rate: &str) -> Result<()> {
    for i in 1..=hosts {
        let (veth, ns) = (format!("sy-v{i}"), format!("sy-h{i}"));
        let tbf = ["root", "tbf", "rate", rate, "burst", BURST, "latency", "100ms"];
        let outside = Command::new("tc").args(["qdisc", "replace", "dev", &veth]).args(tbf).status()?;
        let inside = Command::new("tc").args(["-n", &ns, "qdisc", "replace", "dev", "eth0"]).args(tbf).status()?;
        if !(outside.success() && inside.success()) {
            bail!("tc could not limit the links to {rate} (a tc rate such as 100mbit or 1gbit)");
        }
    }
    Ok(())
}

/// mpirun over the first `ranks` hosts, one rank each, from inside the
/// first host (`scripts/netns-mpirun.sh`, which holds the options that
/// keep every byte on the bridge); the program and its arguments follow.
fn mpirun_on_hosts(ranks: usize) -> Command {
    let hosts: Vec<String> = (1..=ranks).map(|i| format!("10.77.0.{i}:1")).collect();
    let script = std::path::absolute("scripts/netns-mpirun.sh").unwrap_or_else(|_| "scripts/netns-mpirun.sh".into());
    let mut cmd = Command::new(script);
    cmd.args(["-n", &ranks.to_string(), "--host", &hosts.join(",")]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cmd.env("RAYON_NUM_THREADS", (cores / ranks).max(1).to_string());
    cmd
}

/// Latency (the small exchange) and bandwidth (the slope: remote bytes
/// per host) of an all-to-all between two hosts at this rate.
fn probe_link(rate: &str) -> Result<MeasuredLink> {
    let exe = std::env::current_exe()?;
    let kib: Vec<String> = PROBE_KIB.iter().map(|k| k.to_string()).collect();
    let out = mpirun_on_hosts(2)
        .arg(exe)
        .args(["bench", "alltoall", "--backend", "mpi", "--probe-kib", &kib.join(",")])
        .output()
        .context("cannot start mpirun for the link probe")?;
    if !out.status.success() {
        bail!("the link probe failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rows = crate::bench::alltoall::parse_probe(&out.stdout)?;
    let [(b0, t0), (b1, t1)] = rows[..] else { bail!("the link probe gave {} sizes, not 2", rows.len()) };
    if t1 <= t0 {
        bail!(
            "the link probe at {rate} took {:.0} us for {} KiB and {:.0} us for {} KiB: no bandwidth to fit \
             (another process busy on this machine? run again)",
            t0 * 1e6,
            b0 >> 10,
            t1 * 1e6,
            b1 >> 10
        );
    }
    // Half of each rank's bytes go to the other host. The small exchange
    // is the latency, as `simulate calibrate` takes it (tbf's burst lets it
    // through at the bridge's own speed).
    let gbps = (b1 - b0) as f64 / 2.0 / (t1 - t0) / 1e9;
    Ok(MeasuredLink { rate: rate.to_string(), latency_us: t0 * 1e6, bandwidth_gbps: gbps })
}

/// The calibrated machine as `hosts` namespace nodes of one device each,
/// all sharing its cores, joined by the measured link.
fn namespace_cluster(machine: &Cluster, hosts: usize, link: &MeasuredLink) -> Cluster {
    let mut c = machine.clone();
    c.name = format!("{} as {hosts} namespace hosts, links at {}", machine.name, link.rate);
    c.topology = Topology::TwoLevel;
    c.node.count = hosts;
    c.node.devices = 1;
    c.node.one_machine = true;
    c.inter_node = Some(Link {
        bandwidth_gbps: link.bandwidth_gbps,
        latency_us: link.latency_us,
        allreduce_gbps: None,
        allreduce_latency_us: None,
    });
    c
}

/// A measured sweep point's overrides (the grid's steps), with overlap off.
fn job_sets(point: &Point, steps: u64) -> Vec<String> {
    let mut sets = crate::experiments::sweep::point::measured_sets(point, steps);
    sets.push("overlap.mode=\"off\"".to_string());
    sets
}

/// One training run of `point` over the hosts; its summary after warm-up.
fn train_on_hosts(config: &Path, point: &Point, grid: &Grid, ranks: usize, dir: &Path) -> Result<StepSummary> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // The ranks are started by this mpirun, one per host.
    let mut run = mpirun_on_hosts(ranks);
    run.arg(std::env::current_exe()?).args(["train", "--quiet", "--backend", "mpi", "--config"]);
    run.arg(config).arg("--run-dir").arg(dir);
    for set in job_sets(point, grid.steps) {
        run.args(["--set", &set]);
    }
    let out = run.output().context("cannot start mpirun over the namespace hosts")?;
    std::fs::write(dir.join("output.log"), [&out.stdout[..], &out.stderr[..]].concat()).ok();
    if !out.status.success() {
        bail!(
            "training {} over the namespace hosts failed ({}); its output is in {}",
            point.label(),
            out.status,
            dir.join("output.log").display()
        );
    }
    StepSummary::of(&read_metrics(dir)?, grid.warmup as usize)
}

/// The markdown table of every row, with per-part errors.
fn table(machine: &Cluster, links: &[MeasuredLink], rows: &[Row], rounds: usize) -> String {
    let ms = |s: f64| format!("{:.2}", s * 1e3);
    let err = |m: f64, p: f64| if m > 0.0 { format!("{:+.0}%", 100.0 * (p - m) / m) } else { "-".into() };
    let pair = |m: f64, p: f64| format!("{} / {} ({})", ms(m), ms(p), err(m, p));
    let mut t = format!(
        "switchyard simulate validate on {} (best of {rounds} round(s); ms per step, measured / predicted (error))\n\n",
        machine.name
    );
    for l in links {
        t += &format!(
            "links at {}: measured latency {:.0} us, bandwidth {:.4} GB/s\n",
            l.rate, l.latency_us, l.bandwidth_gbps
        );
    }
    t += "\n| rate | point | step | compute | all-to-all transfer | waiting for peers | gradient sync | other | load skew |\n";
    t += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let (m, p) = (&r.measured, &r.predicted);
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            r.rate,
            r.point,
            pair(m.step_s, p.step_s),
            pair(m.compute_s, p.compute_s),
            pair(m.transfer_s, p.transfer_s),
            pair(m.waiting_s, p.waiting_s),
            pair(m.sync_s, p.sync_s),
            pair(m.other_s, p.other_s),
            r.imbalance
        );
    }
    let worst = |f: fn(&Parts) -> f64| {
        rows.iter()
            .filter(|r| f(&r.measured) > 0.0)
            .map(|r| ((f(&r.predicted) - f(&r.measured)) / f(&r.measured)).abs())
            .fold(0.0, f64::max)
    };
    t += &format!(
        "\nworst error: step {:.0}%, compute {:.0}%, transfer {:.0}%, waiting {:.0}%\n",
        100.0 * worst(|p| p.step_s),
        100.0 * worst(|p| p.compute_s),
        100.0 * worst(|p| p.transfer_s),
        100.0 * worst(|p| p.waiting_s)
    );
    t
}
