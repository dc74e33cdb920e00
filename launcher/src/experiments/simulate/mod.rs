//! `switchyard simulate`: predicted step time, its split, traffic per link
//! level, memory per rank, tokens/s and MFU of a job on a cluster file,
//! for one point or for every point of a sweep grid (the sweep's own
//! `sweep.toml`, results files and plots, rows marked `predicted`).
//! `switchyard simulate calibrate` writes a cluster file for this machine.

pub mod calibrate;
pub mod table;
pub mod validate;

use crate::experiments::sweep::grid::{Grid, Point};
use crate::experiments::sweep::results::{self, PointResult};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use simulator::cluster::Cluster;
use simulator::shape::{JobSizes, RankShape, Routing};
use simulator::step::{breakdown, predict, Options, Prediction};
use std::path::{Path, PathBuf};
use worker::overlap::{dense_layer_values, RankLayout, Techniques};
use worker::JobConfig;

/// Arguments of `switchyard simulate`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimulateArgs {
    #[command(subcommand)]
    command: Option<SimulateCommand>,
    /// Job config (TOML) to simulate.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Cluster file (examples/clusters/, or `simulate calibrate` for this machine).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// A sweep grid (the same file as `switchyard sweep --grid`): predict every point.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Results folder for --grid; default simulations/<grid file name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A sweep's results folder: its measured rows join the predicted ones
    /// (same files and plots), and the table compares them.
    #[arg(long)]
    measured: Option<PathBuf>,
    /// Override a config key (repeatable), as for train.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Communication hidden behind compute (step = max, not sum). Also on
    /// when the job's `[overlap]` techniques apply (docs/overlap.md).
    #[arg(long)]
    overlap: bool,
    /// Also print every kernel and collective with its predicted time (one point).
    #[arg(long)]
    kernels: bool,
    /// Busiest expert-parallel rank's rows over the mean (1 = balanced router).
    #[arg(long, default_value_t = 1.0)]
    imbalance: f64,
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// Measure this machine (matrix products, elementwise rate, all-to-all,
    /// all-reduce, per-step overhead) and write a cluster file for it.
    Calibrate {
        /// Where to write the cluster file.
        #[arg(long, default_value = "cluster.toml")]
        out: PathBuf,
        /// Ranks (threads) for the collective benchmarks; default: the core count.
        #[arg(long)]
        ranks: Option<usize>,
    },
    /// Check the model part by part where the network is real: namespace
    /// hosts on this machine (one rank each), links shaped with tc to each
    /// rate, a grid trained over MPI and predicted; writes a table, results
    /// and plots. Needs root and a build with --features mpi.
    Validate {
        /// Job config trained and predicted.
        #[arg(long, default_value = "examples/sweeps/job.toml")]
        config: PathBuf,
        /// Grid file (sweep format, 2-4 ranks per point); default: ranks 2,4 x experts 4,8 x top_k 1,2.
        #[arg(long)]
        grid: Option<PathBuf>,
        /// Link rates (tc units), one validation each.
        #[arg(long, value_delimiter = ',', default_value = "100mbit,1gbit")]
        rates: Vec<String>,
        /// This machine's cluster file from `simulate calibrate`; default: calibrate first.
        #[arg(long)]
        cluster: Option<PathBuf>,
        /// Runs per point and rate; each keeps its fastest.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Results folder.
        #[arg(long, default_value = "validations/netns")]
        out: PathBuf,
    },
}

/// Runs `switchyard simulate`.
pub fn run(args: SimulateArgs) -> Result<()> {
    match args.command {
        Some(SimulateCommand::Calibrate { out, ranks }) => return run_calibrate(&out, ranks),
        Some(SimulateCommand::Validate { config, grid, rates, cluster, rounds, out }) => {
            if rounds == 0 {
                bail!("--rounds must be at least 1");
            }
            return validate::run(validate::Validate { config, grid, rates, cluster, rounds, out });
        }
        None => {}
    }
    let (Some(config), Some(cluster_path)) = (&args.config, &args.cluster) else {
        bail!("simulate needs --config job.toml and --cluster cluster.toml (or: switchyard simulate calibrate)");
    };
    if !(args.imbalance.is_finite() && args.imbalance >= 1.0) {
        bail!("--imbalance is the busiest rank's rows over the mean: 1 or more, got {}", args.imbalance);
    }
    let cluster = Cluster::load(cluster_path)?;
    let routing = Routing { imbalance: args.imbalance };
    let Some(grid_path) = &args.grid else {
        let job = JobConfig::load(Some(config), &args.overrides)?;
        let options = Options { overlap: args.overlap || job_overlap(&job, &cluster) };
        let shape = shape_of(&job, routing)?;
        let prediction = predict(&shape, &cluster, options);
        table::print_point(&job, &cluster, options, routing, &prediction);
        if args.kernels {
            table::print_breakdown(&breakdown(&shape, &cluster));
        }
        return Ok(());
    };
    let grid = Grid::load(grid_path)?;
    JobConfig::load(Some(config), &args.overrides).context("the simulation's --config does not load")?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("simulations")
            .join(grid_path.file_stem().map_or("grid".into(), |s| s.to_string_lossy().into_owned()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rows: Vec<PointResult> = grid
        .points()
        .iter()
        .map(|point| predict_point(config, &args.overrides, args.overlap, routing, &cluster, &grid, point))
        .collect();
    let measured = match &args.measured {
        Some(dir) => {
            let found = results::load(dir)?;
            if found.is_empty() {
                bail!("{} holds no sweep results (results.json)", dir.display());
            }
            found.into_iter().filter(|r| r.source == "measured").collect()
        }
        None => Vec::new(),
    };
    table::print_grid(&cluster, &rows, &measured);
    // Measured first, so that a chart's colours follow the grid's order per source.
    rows.splice(0..0, measured);
    let axes: Vec<String> = grid.axes.iter().map(|a| a.key.clone()).collect();
    results::save(&out, &axes, &rows)?;
    let plots = crate::experiments::sweep::plots::draw(&out, &grid, &rows)?;
    eprintln!("simulate: {} point(s) predicted; results in {}", grid.points().len(), out.display());
    for plot in plots {
        eprintln!("  {}", plot.display());
    }
    Ok(())
}

/// One grid point as a predicted results row (a layout that cannot work is a failed row).
fn predict_point(
    config: &Path,
    overrides: &[String],
    overlap: bool,
    routing: Routing,
    cluster: &Cluster,
    grid: &Grid,
    point: &Point,
) -> PointResult {
    let mut row = PointResult::blank(point, "predicted", "simulate", grid.steps, grid.warmup);
    let sets: Vec<String> = overrides.iter().cloned().chain(point.overrides()).collect();
    let predicted = JobConfig::load(Some(config), &sets).map_err(anyhow::Error::from).and_then(|job| {
        let options = Options { overlap: overlap || job_overlap(&job, cluster) };
        Ok((job.parallel.ranks, predict(&shape_of(&job, routing)?, cluster, options)))
    });
    match predicted {
        Ok((ranks, p)) => fill(&mut row, ranks, &p),
        Err(e) => {
            row.status = "failed".into();
            row.error = Some(format!("{e:#}"));
        }
    }
    row
}

fn fill(row: &mut PointResult, ranks: usize, p: &Prediction) {
    row.ranks = Some(ranks);
    row.tokens_per_step = Some(p.tokens_per_step);
    row.tokens_per_s = Some(p.tokens_per_s);
    row.step_s = Some(p.step_s);
    row.compute_s = Some(p.compute_s);
    row.exposed_comm_s = Some(p.exposed_comm_s);
    // Before overlap; with overlap on, the parts no longer add up to the exposed time.
    row.alltoall_s = Some(p.exchange_s + p.waiting_s);
    row.alltoall_peer_wait_s = Some(p.waiting_s);
    row.alltoall_transfer_s = Some(p.exchange_s);
    row.sync_s = Some(p.sync_s);
    row.other_s = Some(p.other_s);
    row.alltoall_bytes_per_step = Some(p.alltoall_bytes.intra + p.alltoall_bytes.inter);
    row.alltoall_intra_bytes_per_step = Some(p.alltoall_bytes.intra);
    row.alltoall_inter_bytes_per_step = Some(p.alltoall_bytes.inter);
    row.expert_rows_max = Some(p.expert_rows_max);
    row.expert_rows_mean = Some(p.expert_rows_mean);
    row.memory_per_rank_mib = Some(p.memory.total() / (1u64 << 20) as f64);
    row.mfu = Some(p.mfu);
}

/// Whether the job's overlap techniques apply to its layout, as a real
/// run decides (`[overlap]`, docs/overlap.md): its all-to-all travels
/// while ranks compute, or its gradients go out in buckets.
pub fn job_overlap(job: &JobConfig, cluster: &Cluster) -> bool {
    let Ok(dims) = job.parallel_dims() else { return false };
    let micro_batches = job.grad_accumulation(dims.dp);
    let layout = RankLayout {
        backend: job.parallel.backend,
        world: dims.world,
        attn_tp: dims.attn_tp,
        micro_batches,
        layer_grad_values: dense_layer_values(&job.model),
        threads_ok: true,
        // As the ranks land on the cluster's nodes.
        spans_nodes: simulator::cluster::Placement::of(cluster, dims.world).nodes > 1,
    };
    let t = Techniques::choose(&job.overlap, &layout);
    t.pipe_chunks.is_some() || t.bucket_values.is_some()
}

fn run_calibrate(out: &Path, ranks: Option<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ranks = ranks.unwrap_or(cores).max(2);
    let exe = std::env::current_exe().context("cannot find this program to run the calibration job")?;
    let scratch = std::env::temp_dir().join(format!("switchyard-calibrate-{}", std::process::id()));
    let started = std::time::Instant::now();
    let found = calibrate::measure(ranks, &exe, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let text = found?.to_toml();
    // Written only once it reads back as a valid cluster file.
    Cluster::parse(&text).context("calibration produced an invalid cluster file (a bug)")?;
    std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("calibrate: done in {:.1} s; wrote {}", started.elapsed().as_secs_f64(), out.display());
    Ok(())
}

/// `job`'s shape on one rank under `routing`, after checking its layout.
pub fn shape_of(job: &JobConfig, routing: Routing) -> Result<RankShape> {
    let sizes = JobSizes {
        model: job.model.clone(),
        micro_batch_size: job.train.micro_batch_size,
        global_batch_size: job.train.global_batch_size,
        ranks_are_processes: job.parallel.backend != worker::Backend::Local,
        dims: job.parallel_dims().context("the job's [parallel] layout")?,
        attn_experts_partitioned: job.parallel.attn_expert_placement == worker::AttnExpertPlacement::Partitioned,
    };
    Ok(RankShape::of(&sizes, routing))
}
