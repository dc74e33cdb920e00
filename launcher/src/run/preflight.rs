//! Memory preflight: before any rank allocates, the memory each rank will
//! hold (the one memory model, `simulator::memory`: parameters, gradients,
//! AdamW moments, one micro-batch's activations, communication buffers)
//! against what this machine has, so a job that cannot fit is refused with
//! its numbers instead of being killed by the kernel (which on a shared
//! node may take other processes with it).
//!
//! The model is a lower bound of what a rank holds (measured at 1.10x of
//! it for a D512 job, more for tiny ones: `bench layer`), so a job it
//! refuses would not have fit. A dropless MoE's memory also depends on
//! the router: the check uses balanced routing, and warns when the worst
//! case (every routed row of a micro-batch on one rank's experts) would not
//! fit, since a skewed router early in training can get there.

use crate::format::human_bytes;
use anyhow::{bail, Result};
use simulator::cluster::Precision;
use simulator::memory::RankMemory;
use simulator::Routing;
use worker::JobConfig;

/// Bytes of memory this machine can still give, or `None` if unknown:
/// the smaller of the kernel's MemAvailable and what the cgroup's limit
/// (a container's, a Slurm job's) leaves.
pub fn available_bytes() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |line: &str| line.split_whitespace().nth(1)?.parse::<f64>().ok();
    let available = meminfo.lines().find(|l| l.starts_with("MemAvailable:")).and_then(kib)? * 1024.0;
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    let cgroup_left = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => {
            let (max, current) = (max.trim().parse::<f64>().ok(), current.trim().parse::<f64>().ok());
            max.zip(current).map(|(max, current)| (max - current).max(0.0))
        }
        _ => None,
    };
    Some(cgroup_left.map_or(available, |left| left.min(available)))
}

/// The memory of one rank of `job` under `routing`.
fn per_rank(job: &JobConfig, routing: Routing) -> Result<RankMemory> {
    let shape = crate::experiments::simulate::shape_of(job, routing)?;
    Ok(RankMemory::of(&shape, &Precision::default()))
}

/// The busiest rank's share of routed rows over the mean when every
/// token's experts are on one rank: `ep` times the share of a token's
/// top-k that one rank's experts can take.
fn worst_imbalance(job: &JobConfig) -> Result<f64> {
    let dims = job.parallel_dims()?;
    let (k, experts_here) = (job.model.top_k, job.model.n_experts / dims.ep.max(1));
    Ok(dims.ep as f64 * k.min(experts_here) as f64 / k as f64)
}

/// The memory `ranks` ranks of `job` hold together with balanced routing
/// (the model's lower bound), in bytes.
pub fn estimate_bytes(job: &JobConfig, ranks: usize) -> Result<f64> {
    Ok(per_rank(job, Routing::default())?.total() * ranks as f64)
}

/// The smallest memory a scheduler is asked for, MiB.
pub const MIN_REQUEST_MIB: u64 = 1024;

/// The memory to ask a scheduler for (a pod's request, Slurm's `--mem`)
/// for `ranks` CPU ranks of `job`: their memory by the model, plus a
/// quarter (measured: 1.10x of the model on a D512 job) and 256 MiB for the
/// program, its libraries and buffers (about 25 MiB measured with one
/// rank), in MiB, rounded up to 64, at least [`MIN_REQUEST_MIB`].
pub fn request_mib(job: &JobConfig, ranks: usize) -> Result<u64> {
    let bytes = estimate_bytes(job, ranks)? * 1.25 + (256u64 << 20) as f64;
    let mib = (bytes / (1u64 << 20) as f64).ceil() as u64;
    Ok(mib.next_multiple_of(64).max(MIN_REQUEST_MIB))
}

/// One line of the estimate, by kind.
fn breakdown(m: &RankMemory) -> String {
    format!(
        "parameters {}, gradients {}, AdamW moments {}, activations {}, communication buffers {}",
        human_bytes(m.params),
        human_bytes(m.grads),
        human_bytes(m.optimizer),
        human_bytes(m.activations),
        human_bytes(m.buffers)
    )
}

/// One line for the start: what the memory model says the ranks here need.
pub fn summary(job: &JobConfig, ranks_here: usize, available: f64) -> Result<String> {
    let rank = per_rank(job, Routing::default())?;
    Ok(format!(
        "memory check: about {} per rank by the model ({}), {ranks_here} rank(s) on this machine: {} of {} available",
        human_bytes(rank.total()),
        breakdown(&rank),
        human_bytes(rank.total() * ranks_here as f64),
        human_bytes(available)
    ))
}

/// Refuses `job` when `ranks_here` of its ranks cannot fit in `available`
/// bytes; returns a warning when only a skewed router's worst case would
/// not fit.
pub fn check(job: &JobConfig, ranks_here: usize, available: f64) -> Result<Option<String>> {
    let balanced = per_rank(job, Routing::default())?;
    let need = balanced.total() * ranks_here as f64;
    if need > available {
        bail!(
            "this job cannot fit in this machine's memory: each rank needs at least {} ({}), times {ranks_here} \
             rank(s) here is {}, but {} is available. Make the model or train.micro_batch_size smaller, use more \
             ranks (the experts are split over them), or spread \
             the ranks over more machines (--hosts, Slurm --nodes)",
            human_bytes(balanced.total()),
            breakdown(&balanced),
            human_bytes(need),
            human_bytes(available)
        );
    }
    let worst = per_rank(job, Routing { imbalance: worst_imbalance(job)? })?;
    let worst_need = worst.total() * ranks_here as f64;
    Ok((worst_need > available).then(|| {
        format!(
            "with balanced routing each rank needs about {} ({} in all here), but if the router sends every \
             token of a micro-batch to one rank's experts (dropless MoE, early in training) a rank needs {} \
             ({} here), more than the {} available. The ranks hold their experts to what fits: past it the step \
             fails naming the layer, rank and expert (parallel.expert_overflow = \"cap\" drops the excess rows \
             instead); model.capacity_factor bounds every expert from the start",
            human_bytes(balanced.total()),
            human_bytes(need),
            human_bytes(worst.total()),
            human_bytes(worst_need),
            human_bytes(available)
        )
    }))
}

/// Rows one rank's experts can take from one layer's exchange of a
/// micro-batch before `ranks_here` ranks outgrow `available` bytes: the
/// balanced rows plus what the memory left over holds at the model's
/// bytes per routed row (its saved activations in every layer, its
/// exchange buffers). The ranks hold their experts to it
/// (`parallel.max_expert_rows = 0`); `None` when one rank's experts can
/// only get its own rows (no expert parallelism).
pub fn expert_rows_that_fit(job: &JobConfig, ranks_here: usize, available: f64) -> Result<Option<usize>> {
    let shape = crate::experiments::simulate::shape_of(job, Routing::default())?;
    if shape.ep <= 1 || shape.expert_rows_max <= 0.0 {
        return Ok(None);
    }
    let precision = Precision::default();
    let balanced = RankMemory::of(&shape, &precision).total();
    let mut doubled = shape.clone();
    doubled.expert_rows_max *= 2.0;
    let per_row = (RankMemory::of(&doubled, &precision).total() - balanced) / shape.expert_rows_max;
    let spare = (available / ranks_here.max(1) as f64 - balanced).max(0.0);
    Ok(Some((shape.expert_rows_max + spare / per_row).floor() as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(sets: &[&str]) -> JobConfig {
        JobConfig::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_job_that_fits_passes_and_one_that_cannot_is_refused_with_its_numbers() {
        let tiny = job(&[]);
        assert!(check(&tiny, 1, 16e9).unwrap().is_none(), "the default job fits in 16 GB");
        let huge = job(&["model.vocab=1000000000"]);
        let err = check(&huge, 1, 16e9).unwrap_err().to_string();
        assert!(err.contains("cannot fit") && err.contains("parameters") && err.contains("available"), "{err}");
        // Two ranks on one machine need twice one of them.
        let pair = job(&["parallel.ranks=2"]);
        let one = per_rank(&pair, Routing::default()).unwrap().total();
        assert!(check(&pair, 1, one * 1.5).is_ok() && check(&pair, 2, one * 1.5).is_err());
    }

    #[test]
    fn a_skewed_routers_worst_case_is_a_warning_and_capacity_bounds_it() {
        let dropless = job(&["parallel.ranks=4"]);
        assert_eq!(worst_imbalance(&dropless).unwrap(), 4.0, "top-2 of 2 experts per rank: all on one rank");
        let balanced = per_rank(&dropless, Routing::default()).unwrap().total();
        let worst = per_rank(&dropless, Routing { imbalance: 4.0 }).unwrap().total();
        assert!(worst > balanced);
        let between = (balanced + worst) / 2.0;
        let warning = check(&dropless, 1, between).unwrap().expect("a warning");
        assert!(warning.contains("capacity_factor"), "{warning}");
        let capped = job(&["parallel.ranks=4", "model.capacity_factor=1.0"]);
        let capped_worst = per_rank(&capped, Routing { imbalance: 4.0 }).unwrap().total();
        assert!(capped_worst < worst, "capacity bounds the worst case");
    }

    #[test]
    fn the_expert_row_budget_is_what_the_spare_memory_holds() {
        let four = job(&["parallel.ranks=4"]);
        let balanced = per_rank(&four, Routing::default()).unwrap().total();
        let shape = crate::experiments::simulate::shape_of(&four, Routing::default()).unwrap();
        let mean = shape.expert_rows_max;
        // With no memory to spare, the balanced rows; the worst case fits
        // exactly when the memory holds the worst case.
        assert_eq!(expert_rows_that_fit(&four, 1, balanced).unwrap(), Some(mean.floor() as usize));
        let worst = per_rank(&four, Routing { imbalance: 4.0 }).unwrap().total();
        let rows = expert_rows_that_fit(&four, 1, worst).unwrap().unwrap() as f64;
        assert!((rows - 4.0 * mean).abs() <= 1.0, "{rows} rows vs 4 x {mean}");
        // Two ranks on the machine share it.
        assert!(expert_rows_that_fit(&four, 2, worst).unwrap().unwrap() < rows as usize);
        assert_eq!(expert_rows_that_fit(&job(&[]), 1, 16e9).unwrap(), None, "one rank gets only its own rows");
    }
}
