//! `switchyard simulate calibrate`: measures this machine with the
//! project's own kernels and collectives and describes it as a cluster
//! file: one node, one device (the CPU, whose cores the ranks share).
//!
//! Every figure is the fastest of repeated timings (a shared machine's
//! slow spells measure the other processes): matrix products through `model::gemm` by size on one core and
//! on all cores, the model's RMSNorm as the elementwise rate, AdamW as the
//! optimizer rate, all-to-all-v and all-reduce on the local backend
//! (threads), and the per-step cost of the training loop itself from a real
//! job too small to compute anything.

use super::shape_of;
use crate::run::step_summary::read_metrics;
use anyhow::{bail, Context, Result};
use collectives::local::LocalWorld;
use collectives::Communicator;
use model::gemm::{matmul_nn, matmul_nt, matmul_tn};
use model::optim::{adamw_update, AdamwStep, AdamwTensor};
use simulator::cluster::Cluster;
use simulator::shape::Routing;
use simulator::step::{kernel_parts, kernel_parts_on_threads, predict, KernelParts, Options};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use worker::metrics::StepMetrics;

/// Sizes `s` of the linear layers on the measured curves (`4s x s -> 2s`).
const GEMM_SIZES: [usize; 7] = [4, 8, 16, 32, 64, 128, 256];

/// What calibration found, written out by [`Calibration::to_toml`].
#[derive(Debug, Clone)]
pub struct Calibration {
    pub cores: usize,
    pub curve_core: Vec<[f64; 2]>,
    pub curve_device: Vec<[f64; 2]>,
    pub elementwise_gbps: f64,
    pub elementwise_gbps_core: f64,
    /// Share of the isolated kernels' speed a real training step sustains.
    pub efficiency: f64,
    pub kernel_overhead_us: f64,
    pub optimizer_mparams_core: f64,
    pub ranks: usize,
    pub alltoall_latency_us: f64,
    pub alltoall_gbps: f64,
    pub allreduce_latency_us: f64,
    pub allreduce_gbps: f64,
    pub step_overhead_us: f64,
    /// A one-thread rank's sustained share and launch cost (see
    /// `device.one_thread_efficiency`).
    pub one_thread_efficiency: f64,
    pub one_thread_kernel_overhead_us: f64,
    /// Ranks' compute spread between all-to-alls (see `host.arrival_spread`),
    /// and whether its job's ranks were MPI processes (else threads).
    pub arrival_spread: f64,
    pub spread_over_mpi: bool,
    pub memory_gib: f64,
}

/// Seconds per call of `f`: the fastest of `samples` timings, each at
/// least `min_s` long (calls are batched up to that). The fastest, as in
/// `bench alltoall`: on a shared machine the slower samples measure the
/// other processes, and the point is this machine's own speed.
fn fastest_per_call(samples: usize, min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    f();
    let once = started.elapsed().as_secs_f64().max(1e-7);
    let batch = ((min_s / once).ceil() as usize).clamp(1, 100_000);
    (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed().as_secs_f64() / batch as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// A linear layer's three products at one size: `[m, k] x [n, k]^T`
/// forward, `[m, n] x [n, k]` input gradient, `[n, m]^T... x [m, k]` weight
/// gradient, with `m = 4s` rows (tokens), `k = s`, `n = 2s` (d to ffn):
/// FLOPs of one product, and TFLOP/s over the three.
fn linear_tflops(s: usize) -> [f64; 2] {
    let (m, k, n) = (4 * s, s, 2 * s);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let dy: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32 * 0.1).collect();
    let (mut y, mut dx, mut dw) = (vec![0.0f32; m * n], vec![0.0f32; m * k], vec![0.0f32; n * k]);
    let seconds = fastest_per_call(5, 0.01, || {
        matmul_nt(m, k, n, &x, &w, &mut y, false);
        matmul_nn(m, n, k, &dy, &w, &mut dx, false);
        matmul_tn(n, m, k, &dy, &x, &mut dw, true);
    });
    let flops = 2.0 * (m * k * n) as f64;
    [flops, 3.0 * flops / seconds / 1e12]
}

/// Runs every benchmark; `ranks` for the collectives; `exe` runs the tiny job.
pub fn measure(ranks: usize, exe: &Path, scratch: &Path) -> Result<Calibration> {
    // Passes spread each measurement over several seconds, so that a busy
    // spell of another process (seconds long) cannot spoil all of its samples.
    let mut best: Option<Calibration> = None;
    let mut jobs = [(f64::INFINITY, f64::INFINITY); 2];
    let mut one_thread_jobs = [(f64::INFINITY, f64::INFINITY); 2];
    for pass in 1..=PASSES {
        eprintln!("calibrate: pass {pass}/{PASSES}");
        let found = measure_kernels(ranks)?;
        best = Some(match best {
            None => found,
            Some(b) => b.faster(&found),
        });
        eprintln!("calibrate: two real 1-rank jobs (the training loop's launch and per-step costs) ...");
        for (j, sets) in [&TINY_JOB[..], &REFERENCE_JOB[..]].into_iter().enumerate() {
            let (compute, outside) = job_times(exe, sets, None, &scratch.join(format!("calibrate-{j}-{pass}")))?;
            jobs[j] = (jobs[j].0.min(compute), jobs[j].1.min(outside));
        }
        eprintln!("calibrate: the same two jobs on one thread (an MPI rank given one core) ...");
        for (j, sets) in [&TINY_JOB[..], &REFERENCE_JOB[..]].into_iter().enumerate() {
            let dir = scratch.join(format!("calibrate-one-{j}-{pass}"));
            let (compute, outside) = job_times(exe, sets, Some(1), &dir)?;
            one_thread_jobs[j] = (one_thread_jobs[j].0.min(compute), one_thread_jobs[j].1.min(outside));
        }
    }
    let mut found = best.expect("at least one pass");
    let efficiency;
    (found.kernel_overhead_us, efficiency, found.step_overhead_us) = loop_overheads(&found, jobs, None)?;
    let one_thread;
    (found.one_thread_kernel_overhead_us, one_thread, _) = loop_overheads(&found, one_thread_jobs, Some(1))?;
    found.efficiency = efficiency;
    found.one_thread_efficiency = one_thread;
    eprintln!("calibrate: a real 2-rank job (how far apart ranks reach their all-to-alls) ...");
    found.spread_over_mpi = mpi_available();
    let mut spreads: Vec<f64> = (1..=PASSES)
        .map(|pass| arrival_spread(&found, exe, &scratch.join(format!("spread-{pass}"))))
        .collect::<Result<_>>()?;
    spreads.sort_by(f64::total_cmp);
    found.arrival_spread = spreads[spreads.len() / 2];
    Ok(found)
}

/// Passes over every measurement; each figure keeps its best pass.
const PASSES: usize = 3;

/// One pass of the kernel and collective benchmarks.
fn measure_kernels(ranks: usize) -> Result<Calibration> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("calibrate: {cores} core(s); matrix products on one core ...");
    let one_core = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("cannot start a 1-thread pool")?;
    let curve_core: Vec<[f64; 2]> = GEMM_SIZES.iter().map(|&s| one_core.install(|| linear_tflops(s))).collect();
    eprintln!("calibrate: matrix products on all cores ...");
    let curve_device: Vec<[f64; 2]> = GEMM_SIZES.iter().map(|&s| linear_tflops(s)).collect();

    eprintln!("calibrate: elementwise rate (the model's RMSNorm), kernel overhead, AdamW ...");
    let (rows, d) = (16384, 256);
    let x: Vec<f32> = (0..rows * d).map(|i| (i % 13) as f32 * 0.1).collect();
    let w = vec![1.0f32; d];
    let (mut y, mut r) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    let bytes = (2 * rows * d * 4) as f64;
    let elementwise_gbps = bytes / fastest_per_call(5, 0.02, || rmsnorm(&x, &w, &mut y, &mut r)) / 1e9;
    let elementwise_gbps_core =
        bytes / one_core.install(|| fastest_per_call(5, 0.02, || rmsnorm(&x, &w, &mut y, &mut r))) / 1e9;
    let n = 1 << 20;
    let cfg = model::optim::OptimConfig::default();
    let (mut p, g, mut m, mut v) = (vec![0.1f32; n], vec![0.01f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let adam = fastest_per_call(5, 0.02, || {
        let tensor = AdamwTensor { param: &mut p, exp_avg: &mut m, exp_avg_sq: &mut v };
        adamw_update(AdamwStep { cfg: &cfg, lr: 1e-3, t: 1 }, true, tensor, &g);
    });
    let optimizer_mparams_core = n as f64 / adam / 1e6;

    eprintln!("calibrate: all-to-all-v and all-reduce, {ranks} ranks as threads ...");
    // Two sizes per collective: the small one is latency, the slope bandwidth.
    let (small, large) = (1024usize, 1 << 18);
    let a2a = |values: usize| collective_time(ranks, values, true);
    let (t_small, t_large) = (a2a(small)?, a2a(large)?);
    let remote = |values: usize| (values * 4) as f64 * (ranks - 1) as f64 / ranks as f64;
    let alltoall_gbps = (remote(large) - remote(small)) / (t_large - t_small).max(1e-9) / 1e9;
    let alltoall_latency_us = (t_small - remote(small) / (alltoall_gbps * 1e9)).max(0.0) * 1e6;
    let ar = |values: usize| collective_time(ranks, values, false);
    let (r_small, r_large) = (ar(small)?, ar(large)?);
    let bus = |values: usize| 2.0 * (values * 4) as f64 * (ranks - 1) as f64 / ranks as f64;
    let allreduce_gbps = (bus(large) - bus(small)) / (r_large - r_small).max(1e-9) / 1e9;
    let allreduce_latency_us = (r_small - bus(small) / (allreduce_gbps * 1e9)).max(0.0) * 1e6;

    Ok(Calibration {
        cores,
        curve_core,
        curve_device,
        elementwise_gbps,
        elementwise_gbps_core,
        efficiency: 1.0,
        kernel_overhead_us: 0.0,
        optimizer_mparams_core,
        ranks,
        alltoall_latency_us,
        alltoall_gbps,
        allreduce_latency_us,
        allreduce_gbps,
        step_overhead_us: 0.0,
        one_thread_efficiency: 1.0,
        one_thread_kernel_overhead_us: 0.0,
        arrival_spread: 0.0,
        spread_over_mpi: false,
        memory_gib: memory_gib(),
    })
}

fn rmsnorm(x: &[f32], w: &[f32], y: &mut [f32], r: &mut [f32]) {
    model::ops::rmsnorm::rmsnorm_forward(x, w, 1e-5, y, r);
}

/// Seconds (fastest of 7 repeats) of one all-to-all-v (every rank sends `values` f32 in
/// all, split evenly) or all-reduce of `values`, the slowest rank's.
fn collective_time(ranks: usize, values: usize, all_to_all: bool) -> Result<f64> {
    let comms = LocalWorld::new(ranks, Duration::from_secs(60));
    let times: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut comm| {
                scope.spawn(move || -> Result<f64> {
                    let per = values / ranks;
                    let send = vec![1.0f32; per * ranks];
                    let counts = vec![per; ranks];
                    let mut recv = collectives::MessageBuffer::new();
                    let mut buf = vec![1.0f32; values];
                    let iters = if values > 10_000 { 20 } else { 200 };
                    let mut samples = Vec::new();
                    for _ in 0..7 {
                        comm.barrier()?;
                        let t = Instant::now();
                        for _ in 0..iters {
                            if all_to_all {
                                comm.all_to_all_v_into(&send, &counts, &mut recv)?;
                            } else {
                                comm.all_reduce_sum(&mut buf)?;
                            }
                        }
                        let mine = [t.elapsed().as_secs_f64() / iters as f64];
                        let all = comm.all_gather_v(&mine.map(|x| x as f32))?;
                        samples.push(all.values.iter().fold(0f32, |a, &b| a.max(b)) as f64);
                    }
                    // The fastest repeat, as for the kernels.
                    Ok(samples.into_iter().fold(f64::INFINITY, f64::min))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a calibration rank panicked")).collect()
    });
    times.into_iter().next().expect("rank 0")
}

/// The machine's memory (GiB), from /proc/meminfo.
fn memory_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(1.0, |kib| kib / (1u64 << 20) as f64)
}

/// The tiny job whose steps are nearly all training-loop overhead.
pub const TINY_JOB: [&str; 13] = [
    "model.d_model=8",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_hidden=8",
    "model.n_experts=2",
    "model.top_k=1",
    "model.seq_len=8",
    "train.global_batch_size=1",
    "train.micro_batch_size=1",
    "train.steps=40",
    "checkpoint.every=0",
    "train.log_every=1000000",
];

/// Fits what the kernels' own timings leave out, from two real 1-rank
/// jobs: the cost per launch (a parallel region: waking the pool, waiting
/// for it) and the share of the isolated kernels' speed a real step
/// sustains (fresh buffers, copies, cache misses between kernels: the
/// `efficiency` of matrix and elementwise work alike). The tiny job is
/// nearly all launches, the reference job mostly kernel work; their two
/// compute times give both (a 2x2 linear system). Per step: the tiny job's
/// time outside compute and gradient sync, less the predicted optimizer and
/// bookkeeping. `best`: each job's median compute and outside time, the
/// best run of the passes; `threads`: the jobs ran on that many threads
/// (else on every core). Returns (launch us, efficiency, step us).
fn loop_overheads(found: &Calibration, best: [(f64, f64); 2], threads: Option<usize>) -> Result<(f64, f64, f64)> {
    let cluster = Cluster::parse(&found.to_toml())?;
    let mut parts = Vec::new();
    for sets in [&TINY_JOB[..], &REFERENCE_JOB[..]] {
        let overrides: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let job = worker::JobConfig::load(None, &overrides)?;
        let shape = shape_of(&job, Routing::default())?;
        let kernels = match threads {
            Some(t) => kernel_parts_on_threads(&shape, &cluster, t),
            None => kernel_parts(&shape, &cluster),
        };
        parts.push((kernels, predict(&shape, &cluster, Options::default()).other_s));
    }
    // compute_j = busy_j / efficiency + launch x launches_j.
    let busy = |p: &KernelParts| p.gemm_s + p.stream_s;
    let (p0, p1) = (parts[0].0, parts[1].0);
    let (c0, c1) = (best[0].0, best[1].0);
    let det = busy(&p0) * p1.launches - busy(&p1) * p0.launches;
    let (mut slowdown, mut launch) =
        ((c0 * p1.launches - c1 * p0.launches) / det, (busy(&p0) * c1 - busy(&p1) * c0) / det);
    if !(slowdown.is_finite() && launch.is_finite()) || slowdown < 1.0 || launch < 0.0 {
        // Noise can push the fit out of range: then the kernels as measured
        // alone, and the tiny job's difference on its launches.
        slowdown = 1.0;
        launch = ((c0 - busy(&p0)) / p0.launches).max(0.0);
    }
    let step_us = (best[0].1 - parts[0].1).max(0.0) * 1e6;
    Ok((launch * 1e6, 1.0 / slowdown, step_us))
}

/// A 1-rank job of mostly elementwise work for its size (d_model 128, 8
/// sequences of 32 tokens, 4 experts top-1), unlike the sweeps it is checked on.
pub const REFERENCE_JOB: [&str; 14] = [
    "model.d_model=128",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=256",
    "model.n_experts=4",
    "model.top_k=1",
    "model.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.steps=24",
    "checkpoint.every=0",
    "train.log_every=1000000",
    "parallel.ranks=1",
];

/// Median compute time, and median time outside compute and gradient
/// sync, per step of a real job with `sets` overrides.
fn job_times(exe: &Path, sets: &[&str], threads: Option<usize>, run_dir: &Path) -> Result<(f64, f64)> {
    let steps = run_job(exe, sets, threads, run_dir)?;
    // The first steps warm up; the last one saves the final checkpoint.
    let timed = &steps[5..steps.len() - 1];
    let median = |f: &dyn Fn(&StepMetrics) -> f64| {
        let mut v: Vec<f64> = timed.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&|m| m.compute_s), median(&|m| m.step_time_s - m.compute_s - m.sync_s)))
}

/// The reference job on 2 ranks: the spread of a rank's compute between
/// all-to-alls that explains the waiting the other terms do not (`found`'s
/// prediction with no spread: turns of ranks sharing cores and the
/// measured load skew), `rest = spread x E[max of 2 normals] x compute`;
/// 0 when they explain it all. The ranks are MPI processes of one thread
/// each where this build has MPI (as ranks on separate machines are: they
/// do not contend for cores), else threads.
fn arrival_spread(found: &Calibration, exe: &Path, run_dir: &Path) -> Result<f64> {
    let mut sets: Vec<String> =
        REFERENCE_JOB.iter().filter(|s| !s.starts_with("parallel.ranks")).map(|s| s.to_string()).collect();
    sets.extend(["parallel.ranks=2", "train.micro_batch_size=4", "overlap.mode=\"off\""].map(String::from));
    let backend = if found.spread_over_mpi { "mpi" } else { "local" };
    sets.push(format!("parallel.backend=\"{backend}\""));
    let s = crate::run::step_summary::StepSummary::of(&run_job(exe, &sets, None, run_dir)?, 5)?;
    let job = worker::JobConfig::load(None, &sets)?;
    let cluster = Cluster::parse(&found.to_toml())?;
    let routing = Routing { imbalance: s.load_skew() };
    let explained = predict(&shape_of(&job, routing)?, &cluster, Options::default()).waiting_s;
    let rest = (s.alltoall_peer_wait_s - explained).max(0.0);
    Ok(rest / (simulator::step::expected_max_of_normals(2) * s.compute_s.max(1e-9)))
}

/// The metrics of a real job with `sets` overrides (on `threads` threads
/// when given), its run folder removed after.
fn run_job(exe: &Path, sets: &[impl AsRef<str>], threads: Option<usize>, run_dir: &Path) -> Result<Vec<StepMetrics>> {
    let _ = std::fs::remove_dir_all(run_dir);
    let mut cmd = Command::new(exe);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    cmd.args(["train", "--quiet", "--run-dir"]).arg(run_dir);
    for set in sets {
        cmd.args(["--set", set.as_ref()]);
    }
    let out = cmd.output().context("cannot start a calibration job")?;
    if !out.status.success() {
        bail!("a calibration job failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let steps = read_metrics(run_dir);
    let _ = std::fs::remove_dir_all(run_dir);
    steps
}

/// Whether this build has MPI and `mpirun` is installed (the spread job
/// then runs as MPI processes).
fn mpi_available() -> bool {
    collectives::mpi::COMPILED && Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

impl Calibration {
    /// Per figure, the better of two passes: higher rates, lower latencies.
    fn faster(&self, other: &Self) -> Self {
        let curve = |a: &[[f64; 2]], b: &[[f64; 2]]| a.iter().zip(b).map(|(p, q)| [p[0], p[1].max(q[1])]).collect();
        Self {
            curve_core: curve(&self.curve_core, &other.curve_core),
            curve_device: curve(&self.curve_device, &other.curve_device),
            elementwise_gbps: self.elementwise_gbps.max(other.elementwise_gbps),
            elementwise_gbps_core: self.elementwise_gbps_core.max(other.elementwise_gbps_core),
            optimizer_mparams_core: self.optimizer_mparams_core.max(other.optimizer_mparams_core),
            alltoall_latency_us: self.alltoall_latency_us.min(other.alltoall_latency_us),
            alltoall_gbps: self.alltoall_gbps.max(other.alltoall_gbps),
            allreduce_latency_us: self.allreduce_latency_us.min(other.allreduce_latency_us),
            allreduce_gbps: self.allreduce_gbps.max(other.allreduce_gbps),
            ..self.clone()
        }
    }

    /// The cluster file, every number with how it was measured.
    pub fn to_toml(&self) -> String {
        let curve = |c: &[[f64; 2]]| {
            let points: Vec<String> = c.iter().map(|[f, t]| format!("[{f:.0}, {t:.6}]")).collect();
            format!("[{}]", points.join(", "))
        };
        let peak = self.curve_device.iter().map(|p| p[1]).fold(0.0, f64::max);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            r#"# This machine ({host_name}), measured by `switchyard simulate calibrate`
# with the project's own kernels and collectives ({build} build; each
# figure the best of {passes} passes of repeated timings, as a shared
# machine's slow spells measure the other processes). One node, one device: the CPU, whose {cores} core(s) the
# ranks share (ranks are threads; a rank's matrix products and elementwise
# kernels spread over every core through rayon).
name = "this machine: {cores}-core CPU, ranks as threads (calibrated)"
topology = "flat"

[node]
count = 1
devices = 1

[device]
# Best of the all-core matrix_curve_device below.
matrix_tflops = {peak:.6}
# The share of the kernels' speed (both curves, and the elementwise rates
# below) that a real step sustains: fitted with kernel_overhead_us on two
# real 1-rank jobs, see [host].
matrix_efficiency = {eff:.4}
# [flops of one product, TFLOP/s] of a linear layer's three products through
# model::gemm (forward x W^T, input gradient dy W, weight gradient dy^T x),
# tokens 4s, in s, out 2s, s = {sizes:?}: inside a 1-thread pool (one core),
# and on every core.
matrix_curve_core = {core_curve}
matrix_curve_device = {device_curve}
# The model's RMSNorm forward over 16384 x 256 values (bytes read + written
# per second): the rate of the elementwise kernels, on all cores and on one.
memory_gbps = {ew:.3}
memory_efficiency = {eff:.4}
memory_gbps_core = {ew_core:.3}
# /proc/meminfo MemTotal.
memory_gib = {mem:.1}
cores = {cores}
# Per parallel region (waking the thread pool and waiting for it), fitted
# with the efficiencies on two real 1-rank jobs (see [host]).
kernel_overhead_us = {overhead:.2}
# The same fit with the two jobs on one thread (RAYON_NUM_THREADS=1, as
# mpirun gives each of as many ranks as cores), against the one-core curve
# and rate: what a rank on one core sustains and pays per parallel region.
one_thread_efficiency = {eff_one:.4}
one_thread_kernel_overhead_us = {overhead_one:.2}

# All-to-all-v on the local backend, {ranks} ranks (threads), 4 KiB and 1 MiB per
# rank: latency = the small exchange, bandwidth = the slope (remote bytes per rank).
# All-reduce the same way (bus bytes 2 (p-1)/p per rank).
[intra_node]
bandwidth_gbps = {a2a_gbps:.3}
latency_us = {a2a_lat:.2}
allreduce_gbps = {ar_gbps:.3}
allreduce_latency_us = {ar_lat:.2}

[precision]
# switchyard trains in fp32 and keeps AdamW's two moments on every rank.
param_bytes = 4
grad_bytes = 4
optimizer_bytes = 8
activation_bytes = 4
shard_optimizer = false

[host]
# AdamW (model::optim::adamw_update) over 2^20 parameters on one core.
optimizer_mparams_per_s_core = {adam:.3}
# Two real 1-rank jobs, best of {passes} runs each, median step: one of d_model 8,
# 1 layer, 8 tokens per step (nearly all launches) and one of d_model 128,
# 256 tokens, 4 experts (mostly kernel work) give the launch overhead and
# the efficiencies above. The tiny job's time outside compute and
# gradient sync, minus the predicted optimizer, is the training loop's own
# cost per step (data, metrics, coordinator report, timers).
step_overhead_us = {step:.1}
# The reference job on 2 ranks ({spread_ranks}), median of {passes} runs: the
# slowest rank's waiting for the other at the all-to-alls that the turns of
# ranks sharing the cores and the measured load skew do not explain, over
# 0.564 (the expected larger of two standard normals) x its compute.
arrival_spread = {spread:.4}
"#,
            host_name = host.trim(),
            passes = PASSES,
            build = if cfg!(debug_assertions) { "debug" } else { "release" },
            cores = self.cores,
            sizes = GEMM_SIZES,
            core_curve = curve(&self.curve_core),
            device_curve = curve(&self.curve_device),
            eff = self.efficiency,
            ew = self.elementwise_gbps,
            ew_core = self.elementwise_gbps_core,
            mem = self.memory_gib,
            overhead = self.kernel_overhead_us,
            eff_one = self.one_thread_efficiency,
            overhead_one = self.one_thread_kernel_overhead_us,
            ranks = self.ranks,
            a2a_gbps = self.alltoall_gbps,
            a2a_lat = self.alltoall_latency_us,
            ar_gbps = self.allreduce_gbps,
            ar_lat = self.allreduce_latency_us,
            adam = self.optimizer_mparams_core,
            step = self.step_overhead_us,
            spread = self.arrival_spread,
            spread_ranks = if self.spread_over_mpi { "MPI processes of one thread each" } else { "threads" },
        )
    }
}
