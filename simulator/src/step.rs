//! One training step's time on a cluster: the kernels of the busiest rank
//! timed against the device, the collectives against the links, and the
//! optimizer and bookkeeping around them.
//!
//! Ranks sharing a device (CPU ranks as threads, more ranks than cores)
//! run in lockstep, so each kernel takes the longer of its own time and
//! the time the device needs for every rank's copy of it: a kernel that
//! keeps `u` of the device's `C` cores busy for `tau` seconds on its own
//! takes `tau x max(1, R u / C)` when `R` ranks run it at once. A GPU rank
//! owns its device (`C = u = R = 1`), and this reduces to `tau`.

use super::cluster::{Cluster, Placement};
use super::kernels::{model_flops_per_step, Kernels, Part};
use super::memory::RankMemory;
use super::shape::RankShape;
use super::traffic::{collectives, dense_params, expert_params, moves_expert_rows, Collective, Kind, LinkBytes, Phase};

/// What the simulator is asked beyond the job and the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Options {
    /// Communication hidden behind compute (chunked dispatch, bucketed
    /// gradient all-reduce): the step is then max-based, not a sum.
    pub overlap: bool,
}

/// The prediction for one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub step_s: f64,
    /// Forward + backward kernels of the busiest rank.
    pub compute_s: f64,
    /// Communication not hidden behind compute (all-to-all, attention
    /// shards, gradient sync with the norm).
    pub exposed_comm_s: f64,
    /// All-to-all and attention-shard exchanges alone, before overlap:
    /// their transfer (latency and bytes over the links).
    pub exchange_s: f64,
    /// Time at the all-to-alls spent waiting for the last peer to arrive,
    /// of the rank that waits most (see [`waiting`]).
    pub waiting_s: f64,
    /// Gradient all-reduce and global norm, before overlap.
    pub sync_s: f64,
    /// Optimizer, gradient zeroing, metrics, per-step host work.
    pub other_s: f64,
    pub tokens_per_step: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per step over the devices' peak.
    pub mfu: f64,
    pub model_flops_per_step: f64,
    /// Expert-row bytes per step between different ranks, all ranks, per level.
    pub alltoall_bytes: LinkBytes,
    pub memory: RankMemory,
    pub placement: Placement,
    /// Expert rows per rank per step: busiest and mean (as the sweep reports them).
    pub expert_rows_max: f64,
    pub expert_rows_mean: f64,
    /// Matrix FLOPs per step of the busiest rank, in all and by part.
    pub rank_flops: f64,
    pub flops_by_part: Vec<(Part, f64)>,
}

/// Predicts one step of the job of shape `s` on `cluster`.
pub fn predict(s: &RankShape, cluster: &Cluster, options: Options) -> Prediction {
    let at = Placement::of(cluster, s.ranks);
    let device = Timing::new(cluster, &at, s);
    let kernels = Kernels::of(s);
    let compute_s = device.kernels(&kernels);
    // Ranks whose kernels contend for the cores, with all-to-alls between
    // their kernels, take turns: each computes at its own speed and waits
    // at the exchange while the others compute (measured: docs/scaling.md,
    // `simulate validate`), so what sharing adds is waiting, not compute.
    // The step is the same.
    let alone = Timing { ranks: 1.0, ..Timing::new(cluster, &at, s) };
    let (compute_s, turns_s) = if s.ep > 1 {
        let alone_s = alone.kernels(&kernels);
        (alone_s, compute_s - alone_s)
    } else {
        (compute_s, 0.0)
    };

    let comms = collectives(s, &cluster.precision);
    let phase = |p: Phase| comms.iter().filter(|c| c.phase == p).map(|c| device.collective(c)).sum::<f64>();
    let exchange_s = phase(Phase::Exchange);
    // The norm reads every gradient once, on the rank's own thread.
    let params = dense_params(s).0 + dense_params(s).1 + expert_params(s);
    let grad_bytes = params * cluster.precision.grad_bytes;
    let sync_s = phase(Phase::GradSync) + device.serial_stream(grad_bytes, 1.0);
    let optimizer_params =
        if cluster.precision.shard_optimizer { dense_params(s).0 / s.dp as f64 + expert_params(s) } else { params };
    let other_s = device.optimizer(optimizer_params)
        + device.serial_stream(grad_bytes, 1.0) // zeroing the gradients
        + phase(Phase::Bookkeeping)
        + device.host_overhead();

    let waiting_s = turns_s + waiting(s, cluster, &kernels, &alone, compute_s);
    let comm_s = exchange_s + waiting_s + sync_s;
    let (compute_part, exposed_comm_s) =
        if options.overlap { (compute_s, (comm_s - compute_s).max(0.0)) } else { (compute_s, comm_s) };
    let step_s = compute_part + exposed_comm_s + other_s;
    let model_flops = model_flops_per_step(s);
    let devices_used = s.ranks.div_ceil(at.ranks_per_device) as f64;
    let peak = cluster.device.matrix_tflops * 1e12 * devices_used;
    let rows: Vec<&Collective> = comms.iter().filter(|c| moves_expert_rows(c)).collect();
    let alltoall_bytes = rows.iter().fold(LinkBytes::default(), |acc, c| {
        let b = c.link_bytes(&at);
        let n = c.count * s.ranks as f64;
        LinkBytes { intra: acc.intra + b.intra * n, inter: acc.inter + b.inter * n }
    });
    let per_step = |rows: f64| rows * (s.moe_layers * s.micro_batches) as f64;
    let parts = [Part::Attention, Part::Router, Part::Experts, Part::SharedExperts, Part::DenseFfn, Part::Head];
    Prediction {
        step_s,
        compute_s,
        exposed_comm_s,
        exchange_s,
        waiting_s,
        sync_s,
        other_s,
        tokens_per_step: s.tokens_per_step as f64,
        tokens_per_s: s.tokens_per_step as f64 / step_s,
        mfu: model_flops / step_s / peak,
        model_flops_per_step: model_flops,
        alltoall_bytes,
        memory: RankMemory::of(s, &cluster.precision),
        placement: at,
        expert_rows_max: per_step(s.expert_rows_max),
        expert_rows_mean: per_step(s.expert_rows_mean),
        rank_flops: kernels.flops(),
        flops_by_part: parts.iter().map(|&p| (p, kernels.flops_of(p))).collect(),
    }
}

/// Seconds per step that the rank waiting most spends at the all-to-alls
/// before its last peer arrives (measured as `alltoall_peer_wait_s`),
/// besides the turns of ranks sharing cores (in [`predict`]).
/// Two causes, added:
/// - load imbalance: the busiest rank computes `imbalance` x the mean
///   expert rows; the least loaded is taken to be as far below the mean
///   (at least none), and waits for the difference of their expert time;
/// - arrival spread: each rank's compute between two exchanges varies by
///   `host.arrival_spread` (standard deviation over mean), independently
///   per rank and call; a rank then waits on average the expected maximum
///   of the group's `ep` arrivals less its own, `spread x E[max of ep
///   standard normals]` of each segment, and the segments sum to the
///   step's compute.
fn waiting(s: &RankShape, cluster: &Cluster, kernels: &Kernels, device: &Timing, compute_s: f64) -> f64 {
    if s.ep <= 1 {
        return 0.0;
    }
    let spread = cluster.host.arrival_spread * expected_max_of_normals(s.ep) * compute_s;
    let experts = Kernels {
        gemms: kernels.gemms.iter().filter(|g| g.part == Part::Experts).cloned().collect(),
        streams: Vec::new(),
    };
    let imbalance = if s.expert_rows_mean > 0.0 { (s.expert_rows_max / s.expert_rows_mean).max(1.0) } else { 1.0 };
    let lightest = (2.0 - imbalance).max(0.0);
    spread + device.kernels(&experts) * (imbalance - lightest) / imbalance
}

/// `E[max(z_1..z_n)]` of `n` independent standard normals (0 for one):
/// 0.564 for 2, 1.029 for 4, 1.424 for 8. By quadrature of
/// `x d/dx Phi(x)^n` over [-8, 8].
pub fn expected_max_of_normals(n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let (steps, lo, hi) = (4000, -8.0f64, 8.0f64);
    let h = (hi - lo) / steps as f64;
    let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    // Phi by the trapezoid rule as x advances; E[max] = int x n phi Phi^(n-1).
    let (mut cdf, mut sum) = (0.0f64, 0.0f64);
    for i in 0..steps {
        let (x0, x1) = (lo + i as f64 * h, lo + (i + 1) as f64 * h);
        let next = cdf + 0.5 * h * (pdf(x0) + pdf(x1));
        let f = |x: f64, c: f64| x * n as f64 * pdf(x) * c.powi(n as i32 - 1);
        sum += 0.5 * h * (f(x0, cdf) + f(x1, next));
        cdf = next;
    }
    sum
}

/// The busiest rank's kernel time in parts: what calibration fits the
/// elementwise rate and the launch overhead with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelParts {
    /// Matrix products.
    pub gemm_s: f64,
    /// Elementwise passes.
    pub stream_s: f64,
    /// Kernel launches (parallel regions on a CPU).
    pub launches: f64,
}

/// [`KernelParts`] of one step of `s`.
pub fn kernel_parts(s: &RankShape, cluster: &Cluster) -> KernelParts {
    let at = Placement::of(cluster, s.ranks);
    Timing::new(cluster, &at, s).kernel_parts(&Kernels::of(s))
}

/// [`kernel_parts`] of a rank whose kernels run on `threads` of the
/// device's cores (calibration of a one-thread rank).
pub fn kernel_parts_on_threads(s: &RankShape, cluster: &Cluster, threads: usize) -> KernelParts {
    let at = Placement::of(cluster, s.ranks);
    Timing::with_threads(cluster, &at, threads as f64).kernel_parts(&Kernels::of(s))
}

/// Every kernel kind of the busiest rank with its seconds per step
/// (launch overheads included), and every collective with its seconds:
/// where the predicted time goes.
pub fn breakdown(s: &RankShape, cluster: &Cluster) -> Vec<BreakdownRow> {
    let at = Placement::of(cluster, s.ranks);
    let timing = Timing::new(cluster, &at, s);
    let kernels = Kernels::of(s);
    let mut out = Vec::new();
    for g in &kernels.gemms {
        let one = Kernels { gemms: vec![g.clone()], streams: Vec::new() };
        let amount = Amount::Flops(g.flops_each * g.count);
        out.push(BreakdownRow { name: g.name.to_string(), amount, seconds: timing.kernels(&one) });
    }
    for st in &kernels.streams {
        let one = Kernels { gemms: Vec::new(), streams: vec![st.clone()] };
        let amount = Amount::Bytes(st.values * cluster.precision.activation_bytes);
        out.push(BreakdownRow { name: st.name.to_string(), amount, seconds: timing.kernels(&one) });
    }
    for c in collectives(s, &cluster.precision) {
        out.push(BreakdownRow {
            name: c.name.to_string(),
            amount: Amount::Calls(c.count),
            seconds: timing.collective(&c),
        });
    }
    out
}

/// One line of [`breakdown`]: a kernel or collective, how much it does per
/// step, and its predicted time. The caller formats it (the model has no
/// presentation code).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakdownRow {
    pub name: String,
    pub amount: Amount,
    pub seconds: f64,
}

/// How much a breakdown row does per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// Floating-point operations of a matrix product.
    Flops(f64),
    /// Bytes an elementwise pass streams.
    Bytes(f64),
    /// Calls of a collective.
    Calls(f64),
}

/// Kernel and collective times on one device, for ranks placed as given.
struct Timing<'a> {
    cluster: &'a Cluster,
    at: Placement,
    /// Ranks sharing the device.
    ranks: f64,
    cores: f64,
    /// Cores one rank's kernels can use: all of the device's (threads of
    /// one process share its pool), or for ranks that are processes their
    /// `cores / ranks` share, the thread pool `mpirun` gives each rank.
    threads: f64,
    /// Sustained shares and launch cost for this rank's thread count.
    matrix_efficiency: f64,
    memory_efficiency: f64,
    launch_us: f64,
}

impl<'a> Timing<'a> {
    /// Ranks of `s` placed as `at`: threads of one process share the
    /// device's pool; processes (MPI) get `cores / ranks` threads each, as
    /// `mpirun` gives them.
    fn new(cluster: &'a Cluster, at: &Placement, s: &RankShape) -> Self {
        let (ranks, cores) = (at.ranks_sharing_cores as f64, cluster.device.cores as f64);
        let threads = if s.ranks_are_processes { (cores / ranks).floor().max(1.0) } else { cores };
        Self::with_threads(cluster, at, threads)
    }

    /// Ranks placed as `at`, each on `threads` of the device's cores.
    fn with_threads(cluster: &'a Cluster, at: &Placement, threads: f64) -> Self {
        let d = &cluster.device;
        let (ranks, cores) = (at.ranks_sharing_cores as f64, d.cores as f64);
        let one_thread = match (threads <= 1.0 && cores > 1.0, d.one_thread_efficiency, d.one_thread_kernel_overhead_us)
        {
            (true, Some(e), Some(l)) => Some((e, l)),
            _ => None,
        };
        let (matrix_efficiency, memory_efficiency, launch_us) = match one_thread {
            Some((e, l)) => (e, e, l),
            None => (d.matrix_efficiency, d.memory_efficiency, d.kernel_overhead_us),
        };
        Self { cluster, at: *at, ranks, cores, threads, matrix_efficiency, memory_efficiency, launch_us }
    }

    /// `tau` seconds alone on `used` cores, with every rank of the device doing the same.
    fn shared(&self, tau: f64, used: f64) -> f64 {
        tau * (self.ranks * used / self.cores).max(1.0)
    }

    /// A device without measured product curves: a GPU, where every kernel is a launch.
    fn gpu(&self) -> bool {
        self.cluster.device.matrix_curve_core.is_empty()
    }

    fn launches(&self, n: f64) -> f64 {
        self.shared(n * self.launch_us * 1e-6, 1.0)
    }

    /// Seconds of the kernels, launch overheads included.
    fn kernels(&self, k: &Kernels) -> f64 {
        let parts = self.kernel_parts(k);
        parts.gemm_s + parts.stream_s + self.launches(parts.launches)
    }

    fn kernel_parts(&self, k: &Kernels) -> KernelParts {
        let mut parts = KernelParts::default();
        for g in &k.gemms {
            let (tau, used) = self.gemm(g.flops_each, g.concurrent);
            let calls = g.count / g.concurrent;
            parts.gemm_s += self.shared(tau, used) * calls;
            // A GPU product is a kernel launch; a CPU product's call cost is
            // in its measured curve, except a batch of products run as
            // parallel tasks, which is one parallel region.
            if self.gpu() || g.concurrent >= 2.0 {
                parts.launches += calls;
            }
        }
        for st in &k.streams {
            let bytes = st.values * self.cluster.precision.activation_bytes;
            parts.stream_s += if st.parallel { self.parallel_stream(bytes) } else { self.serial_stream(bytes, 1.0) };
            // On a CPU a serial pass is a plain loop; a parallel one a region.
            if self.gpu() || st.parallel {
                parts.launches += st.launches;
            }
        }
        parts
    }

    /// Seconds and cores busy for `concurrent` products of `flops` each, run at once.
    fn gemm(&self, flops: f64, concurrent: f64) -> (f64, f64) {
        let d = &self.cluster.device;
        if d.matrix_curve_core.is_empty() {
            // A GPU: one (batched or grouped) kernel at the sustained rate.
            return (concurrent * flops / (d.matrix_tflops * self.matrix_efficiency * 1e12), 1.0);
        }
        let core = interpolate(&d.matrix_curve_core, flops) * 1e12 * self.matrix_efficiency;
        if concurrent >= 2.0 {
            // Independent small products as parallel tasks, one core each.
            let used = concurrent.min(self.threads);
            return (concurrent * flops / (core * used), used);
        }
        let whole = if d.matrix_curve_device.is_empty() {
            core
        } else {
            interpolate(&d.matrix_curve_device, flops) * 1e12 * self.matrix_efficiency
        };
        let rate = whole.max(core);
        let rate = rate.min(core * self.threads);
        (flops / rate, (rate / core).clamp(1.0, self.threads))
    }

    fn parallel_stream(&self, bytes: f64) -> f64 {
        let d = &self.cluster.device;
        let share = self.threads / self.cores;
        self.shared(bytes / (d.memory_gbps * share * self.memory_efficiency * 1e9), self.threads)
    }

    /// `bytes` streamed by the rank's own thread, `times` over.
    fn serial_stream(&self, bytes: f64, times: f64) -> f64 {
        let d = &self.cluster.device;
        let core = d.memory_gbps_core.map_or(d.memory_gbps / self.cores, |c| c) * self.memory_efficiency;
        self.shared(times * bytes / (core * 1e9), 1.0)
    }

    /// AdamW over `params` parameters on the rank's own thread.
    fn optimizer(&self, params: f64) -> f64 {
        let rate = self.cluster.host.optimizer_mparams_per_s_core;
        if rate > 0.0 {
            self.shared(params / (rate * 1e6), 1.0)
        } else {
            // Reads parameter, gradient and two moments, writes three of them.
            self.serial_stream(params * 4.0 * 7.0, 1.0)
        }
    }

    fn host_overhead(&self) -> f64 {
        self.shared(self.cluster.host.step_overhead_us * 1e-6, 1.0)
    }

    /// One collective's time per step: latency plus the slower link level's
    /// bytes (the levels move at once).
    fn collective(&self, c: &Collective) -> f64 {
        let cluster = self.cluster;
        if c.group <= 1 || c.count == 0.0 {
            return 0.0;
        }
        let bytes = c.link_bytes(&self.at);
        let (intra, inter) = (&cluster.intra_node, cluster.between_nodes());
        let reduce = c.kind == Kind::Reduce;
        let gbps = |l: &super::cluster::Link| {
            if reduce {
                l.allreduce_gbps.unwrap_or(l.bandwidth_gbps)
            } else {
                l.bandwidth_gbps
            }
        };
        let alpha = |l: &super::cluster::Link| {
            if reduce {
                l.allreduce_latency_us.unwrap_or(l.latency_us)
            } else {
                l.latency_us
            }
        };
        let spans_nodes = bytes.inter > 0.0;
        let latency = if spans_nodes { alpha(intra).max(alpha(inter)) } else { alpha(intra) } * 1e-6;
        let transfer = (bytes.intra / (gbps(intra) * 1e9)).max(bytes.inter / (gbps(inter) * 1e9));
        // Copies and wake-ups of rank threads need a core, like any kernel.
        c.count * self.shared(latency + transfer, 1.0)
    }
}

/// Log-log interpolation in a `[x, y]` curve; the ends extend flat.
pub fn interpolate(curve: &[[f64; 2]], x: f64) -> f64 {
    match curve {
        [] => f64::NAN,
        [only] => only[1],
        _ => {
            if x <= curve[0][0] {
                return curve[0][1];
            }
            for w in curve.windows(2) {
                let ([x0, y0], [x1, y1]) = (w[0], w[1]);
                if x <= x1 {
                    let u = (x.ln() - x0.ln()) / (x1.ln() - x0.ln());
                    return (y0.ln() + u * (y1.ln() - y0.ln())).exp();
                }
            }
            curve[curve.len() - 1][1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Routing;
    use worker::JobConfig;

    fn h100() -> Cluster {
        Cluster::parse(include_str!("../../examples/clusters/h100-8x-nvlink-ib400.toml")).unwrap()
    }

    fn shape(sets: &[&str]) -> RankShape {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::test_jobs::shape_of(&JobConfig::load(None, &sets).unwrap(), Routing::default())
    }

    #[test]
    fn split_adds_up_and_overlap_takes_the_max() {
        let s = shape(&["parallel.ranks=16", "train.global_batch_size=128"]);
        let off = predict(&s, &h100(), Options { overlap: false });
        assert!((off.compute_s + off.exposed_comm_s + off.other_s - off.step_s).abs() < 1e-15);
        assert!((off.exposed_comm_s - off.exchange_s - off.waiting_s - off.sync_s).abs() < 1e-15);
        let on = predict(&s, &h100(), Options { overlap: true });
        let expected = on.compute_s.max(on.exchange_s + on.waiting_s + on.sync_s) + on.other_s;
        assert!((on.step_s - expected).abs() < 1e-15 && on.step_s <= off.step_s);
        assert!(on.tokens_per_s >= off.tokens_per_s && off.mfu > 0.0 && off.mfu < 1.0);
    }

    #[test]
    fn all_to_all_leaves_the_node_only_past_eight_ranks() {
        let inside = predict(&shape(&["parallel.ranks=8", "train.micro_batch_size=4"]), &h100(), Options::default());
        assert!(inside.alltoall_bytes.intra > 0.0 && inside.alltoall_bytes.inter == 0.0);
        let s = shape(&["parallel.ranks=16", "model.n_experts=16", "train.global_batch_size=128"]);
        let across = predict(&s, &h100(), Options::default());
        // 7 of the 15 peers share the node.
        let ratio = across.alltoall_bytes.intra / across.alltoall_bytes.inter;
        assert!((ratio - 7.0 / 8.0).abs() < 1e-12, "{ratio}");
    }

    #[test]
    fn ranks_sharing_a_device_share_its_time() {
        // A device of 2 cores at 1 TFLOP/s on every product: one rank alone
        // on a 1-core product takes t; four ranks on two cores take 2t each.
        let mut cpu = h100();
        cpu.node.count = 1;
        cpu.node.devices = 1;
        cpu.device.cores = 2;
        cpu.device.matrix_efficiency = 1.0;
        cpu.device.matrix_curve_core = vec![[1.0, 1.0]];
        cpu.device.matrix_curve_device = vec![[1.0, 1.0]];
        let at = Placement::of(&cpu, 4);
        assert_eq!(at.ranks_per_device, 4);
        let threads = shape(&["parallel.ranks=4", "train.micro_batch_size=4"]);
        let timing = Timing::new(&cpu, &at, &threads);
        let (tau, used) = timing.gemm(1e12, 1.0);
        assert_eq!((tau, used), (1.0, 1.0));
        assert_eq!(timing.shared(tau, used), 2.0);
        // Two independent products run on both cores at once.
        assert_eq!(timing.gemm(1e12, 2.0), (1.0, 2.0));
    }

    #[test]
    fn expected_maximum_of_normals_matches_the_tables() {
        // Order-statistics tables (e.g. Harter 1961): 0.5642, 1.0294, 1.4236.
        for (n, want) in [(1, 0.0), (2, 0.5642), (4, 1.0294), (8, 1.4236)] {
            assert!((expected_max_of_normals(n) - want).abs() < 1e-3, "n={n}: {}", expected_max_of_normals(n));
        }
    }

    #[test]
    fn ranks_wait_for_imbalance_and_spread_and_one_rank_never_waits() {
        let mut c = h100();
        let balanced = shape(&["parallel.ranks=8", "train.micro_batch_size=4"]);
        assert_eq!(predict(&balanced, &c, Options::default()).waiting_s, 0.0);
        let sets = ["parallel.ranks=8".to_string(), "train.micro_batch_size=4".to_string()];
        let job = JobConfig::load(None, &sets).unwrap();
        let skewed = crate::test_jobs::shape_of(&job, Routing { imbalance: 1.5 });
        let p = predict(&skewed, &c, Options::default());
        assert!(p.waiting_s > 0.0 && p.waiting_s < p.compute_s, "{p:?}");
        assert!((p.exposed_comm_s - p.exchange_s - p.waiting_s - p.sync_s).abs() < 1e-15);
        c.host.arrival_spread = 0.1;
        let spread = predict(&balanced, &c, Options::default());
        let want = 0.1 * expected_max_of_normals(8) * spread.compute_s;
        assert!((spread.waiting_s - want).abs() < 1e-12 * want.max(1.0), "{} vs {want}", spread.waiting_s);
        let one = shape(&["parallel.ranks=1", "train.micro_batch_size=4"]);
        assert_eq!(predict(&one, &c, Options::default()).waiting_s, 0.0);
    }

    #[test]
    fn one_thread_ranks_use_their_own_efficiency_and_take_turns_past_the_cores() {
        let mut cpu = h100();
        cpu.node.count = 4;
        cpu.node.devices = 1;
        cpu.node.one_machine = true;
        cpu.device.cores = 2;
        cpu.device.matrix_curve_core = vec![[1.0, 1.0]];
        cpu.device.matrix_curve_device = vec![[1.0, 2.0]];
        cpu.device.one_thread_efficiency = Some(0.5);
        cpu.device.one_thread_kernel_overhead_us = Some(0.0);
        let mpi = |ranks: &str| shape(&[ranks, "train.micro_batch_size=4", "parallel.backend=\"mpi\""]);
        // 2 MPI ranks on 2 cores: one thread each, at the one-thread share of the core rate.
        let two = Timing::new(&cpu, &Placement::of(&cpu, 2), &mpi("parallel.ranks=2"));
        assert_eq!((two.threads, two.matrix_efficiency), (1.0, 0.5));
        assert_eq!(two.gemm(1e12, 1.0), (2.0, 1.0));
        // 1 rank: both cores, the whole-device curve and efficiency.
        let one = Timing::new(&cpu, &Placement::of(&cpu, 1), &mpi("parallel.ranks=1"));
        assert_eq!((one.threads, one.matrix_efficiency), (2.0, cpu.device.matrix_efficiency));
        // 2 thread ranks share one pool of both cores.
        let threads = Timing::new(&cpu, &Placement::of(&cpu, 2), &shape(&["parallel.ranks=2"]));
        assert_eq!(threads.threads, 2.0);
        // 4 ranks on 2 cores take turns: what sharing adds is waiting.
        let s = mpi("parallel.ranks=4");
        let p = predict(&s, &cpu, Options::default());
        let alone = Timing { ranks: 1.0, ..Timing::new(&cpu, &Placement::of(&cpu, 4), &s) }.kernels(&Kernels::of(&s));
        assert!((p.compute_s - alone).abs() < 1e-12 && p.waiting_s >= p.compute_s, "{p:?}");
    }

    #[test]
    fn deepseek_v3_stage_with_communication_hidden_lands_near_the_published_rate() {
        // docs/scaling.md: 1,543 tokens/s per H800 from 180K GPU hours per
        // trillion tokens; one of 16 pipeline stages, no bubble.
        let h800 = Cluster::parse(include_str!("../../examples/clusters/h800-8x-nvlink-ib400.toml")).unwrap();
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/deepseek-v3.toml"));
        let job = JobConfig::load(Some(path), &[]).unwrap();
        let s = crate::test_jobs::shape_of(&job, Routing::default());
        let p = predict(&s, &h800, Options { overlap: true });
        let per_gpu = p.tokens_per_s / 2048.0;
        assert!((per_gpu / 1543.0 - 1.0).abs() < 0.15, "{per_gpu} tokens/s per GPU");
        // EP64 spans 8 nodes: most expert rows leave the node.
        assert!(p.alltoall_bytes.inter > 4.0 * p.alltoall_bytes.intra, "{:?}", p.alltoall_bytes);
    }

    #[test]
    fn curves_interpolate_log_log() {
        let curve = [[1e3, 1.0], [1e5, 100.0]];
        assert!((interpolate(&curve, 1e4) - 10.0).abs() < 1e-9);
        assert_eq!(interpolate(&curve, 1.0), 1.0);
        assert_eq!(interpolate(&curve, 1e9), 100.0);
    }
}
