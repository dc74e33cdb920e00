//! `switchyard sweep`: a measured scaling experiment. Every point of a grid
//! of config values is a real training job; the results land in one folder
//! as `results.csv`, `results.json` and plots. A failed point is recorded
//! and the sweep goes on; running the same command again skips the points
//! already measured and retries the failed ones.

pub mod grid;
pub mod plots;
pub mod point;
pub mod results;

use anyhow::{bail, Context, Result};
use clap::Args;
use grid::Grid;
use point::PointJob;
use results::PointResult;
use std::path::PathBuf;

/// Arguments of `switchyard sweep`.
#[derive(Args)]
pub struct SweepArgs {
    /// Job config (TOML) every point starts from.
    #[arg(long)]
    config: PathBuf,
    /// The grid: steps per point and [axes] of config keys with lists of values.
    #[arg(long)]
    grid: PathBuf,
    /// How each point's ranks run: local (threads), mpi (processes under mpirun) or
    /// slurm (each point a job submitted with `switchyard slurm submit`, one node).
    #[arg(long, value_enum, default_value_t = SweepLauncher::Local)]
    launcher: SweepLauncher,
    /// Results folder; default sweeps/<grid file name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Steps per point (overrides the grid's `steps`).
    #[arg(long)]
    steps: Option<u64>,
}

/// How a sweep runs each point's ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepLauncher {
    /// Threads of one process.
    Local,
    /// Processes under mpirun.
    Mpi,
    /// A one-node job submitted with `switchyard slurm submit`.
    Slurm,
}

impl SweepLauncher {
    /// The name written in the results files.
    pub fn as_str(self) -> &'static str {
        match self {
            SweepLauncher::Local => "local",
            SweepLauncher::Mpi => "mpi",
            SweepLauncher::Slurm => "slurm",
        }
    }
}

/// Runs the points not yet measured, then writes the results and plots.
pub fn run(args: SweepArgs) -> Result<()> {
    let mut grid = Grid::load(&args.grid)?;
    if let Some(steps) = args.steps {
        if steps <= grid.warmup {
            bail!("--steps {steps} must be more than the grid's warmup ({})", grid.warmup);
        }
        grid.steps = steps;
    }
    // Checked once here rather than failing every point the same way.
    worker::JobConfig::load(Some(&args.config), &[]).context("the sweep's --config does not load")?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("sweeps").join(args.grid.file_stem().map_or("sweep".into(), |s| s.to_string_lossy().into_owned()))
    });
    std::fs::create_dir_all(out.join("points")).with_context(|| format!("cannot create {}", out.display()))?;
    let job = PointJob {
        // Absolute, so the jobs do not depend on where they run.
        config: std::fs::canonicalize(&args.config)
            .with_context(|| format!("cannot find {}", args.config.display()))?,
        launcher: args.launcher,
        steps: grid.steps,
        warmup: grid.warmup,
    };
    let axes: Vec<String> = grid.axes.iter().map(|a| a.key.clone()).collect();
    let previous = results::load(&out)?;
    let points = grid.points();
    let mut rows: Vec<PointResult> = Vec::new();
    let (mut ran, mut skipped, mut failed) = (0, 0, 0);
    for (i, point) in points.iter().enumerate() {
        let id = point.id();
        let label = format!("point {}/{} {}", i + 1, points.len(), point.label());
        let done = previous.iter().find(|r| r.id == id && r.ok() && same_job(r, &job));
        let row = match done {
            Some(row) => {
                eprintln!("{label} ... skipped (done: {})", summary(row));
                skipped += 1;
                row.clone()
            }
            None => {
                eprintln!("{label} ...");
                let row = point::run(&job, point, &out.join("points").join(&id));
                eprintln!("{label} {}", summary(&row));
                ran += 1;
                row
            }
        };
        failed += usize::from(!row.ok());
        rows.push(row);
        // After every point, so that an interrupted sweep resumes from here;
        // rows of points still to come are kept until they are reached.
        let pending = previous.iter().filter(|r| points[i + 1..].iter().any(|p| p.id() == r.id));
        let kept: Vec<PointResult> = rows.iter().chain(pending).cloned().collect();
        results::save(&out, &axes, &kept)?;
    }
    let plots = crate::experiments::sweep::plots::draw(&out, &grid, &rows)?;
    eprintln!(
        "sweep: {} point(s): {ran} run, {skipped} skipped (already done), {failed} failed; results in {}",
        points.len(),
        out.display()
    );
    for plot in plots {
        eprintln!("  {}", plot.display());
    }
    Ok(())
}

/// A finished point counts as done only for the same steps and launcher.
fn same_job(row: &PointResult, job: &PointJob) -> bool {
    row.steps == job.steps && row.warmup == job.warmup && row.launcher == job.launcher.as_str()
}

/// The result as the progress line shows it.
fn summary(row: &PointResult) -> String {
    match (row.ok(), row.tokens_per_s, row.step_s) {
        (true, Some(tps), Some(step)) => format!(
            "ok: {tps:.0} tokens/s, step {:.1} ms (compute {:.1}, comm {:.1}, other {:.1}; \
             all-to-all {:.1} waiting for peers + {:.1} transfer), loss {:.3}",
            step * 1e3,
            row.compute_s.unwrap_or(0.0) * 1e3,
            row.exposed_comm_s.unwrap_or(0.0) * 1e3,
            row.other_s.unwrap_or(0.0) * 1e3,
            row.alltoall_peer_wait_s.unwrap_or(0.0) * 1e3,
            row.alltoall_transfer_s.unwrap_or(0.0) * 1e3,
            row.loss_at_end.unwrap_or(f64::NAN)
        ),
        _ => format!("FAILED: {}", row.error.as_deref().unwrap_or("unknown error")),
    }
}
