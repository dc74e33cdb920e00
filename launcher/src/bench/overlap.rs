//! `switchyard bench overlap`: what each overlap technique buys.
//!
//! Every variant is a real `switchyard train` of the same job: all
//! techniques off, each one on alone, and all on. From its metrics.jsonl
//! (slowest rank per step, median over the steps after warm-up):
//! - communication: all-to-all, gradient buckets and sync, hidden or not;
//! - exposed: the part no computation hid (every lane of a rank waiting);
//! - compute: step time less exposed communication;
//! - step / max(compute, communication), both measured with every
//!   technique off (where nothing overlaps, so each is its own time): the
//!   ideal overlap would make the step as long as the longer of the two,
//!   1.0x. (With overlap on, communication measured on the threads also
//!   counts waits for peers and two lanes' transfers sharing the link, so
//!   it is not a bound.)
//!
//! Communication must be a real share of the step for this to say
//! anything: scripts/bench-overlap.sh runs it over network-namespace hosts
//! with rate-limited links.

use super::median;
use crate::run::step_summary::read_metrics;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use worker::metrics::StepMetrics;

/// Steps left out (thread pools, allocators and TCP windows warming up).
const WARMUP_STEPS: usize = 3;

/// What `switchyard bench overlap` measures.
pub struct OverlapBench {
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub ranks: usize,
    pub backend: String,
    pub launcher: Option<PathBuf>,
    pub chunks: usize,
    pub steps: u64,
    pub rounds: usize,
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    variant: String,
    step_s: f64,
    compute_s: f64,
    comm_s: f64,
    exposed_s: f64,
    /// Exposed communication over step time.
    exposed_share: f64,
    /// Step time over max(compute, communication) of the all-off variant.
    step_over_bound: f64,
    /// All-off step time over this one.
    speedup: f64,
    overlap_efficiency: f64,
    loss_at_end: f64,
}

/// The overlap switches of each variant.
fn variants(chunks: usize) -> Vec<(String, Vec<String>)> {
    let off = |key: &str| -> String {
        match key {
            "chunks" => "overlap.chunks=1".into(),
            "grad_bucket_mib" => "overlap.grad_bucket_mib=0".into(),
            other => format!("overlap.{other}=false"),
        }
    };
    let on = |key: &str| -> String {
        match key {
            "chunks" => format!("overlap.chunks={chunks}"),
            // Small enough that a layer of the tiny job fills a bucket.
            "grad_bucket_mib" => "overlap.grad_bucket_mib=0.1".into(),
            other => format!("overlap.{other}=true"),
        }
    };
    let keys = ["chunks", "parallel_block", "interleave", "grad_bucket_mib"];
    // Mode "on": the switches decide on every backend, threads included.
    let with_mode =
        |sets: Vec<String>| -> Vec<String> { std::iter::once("overlap.mode=\"on\"".to_string()).chain(sets).collect() };
    let mut out = vec![("all off".to_string(), with_mode(keys.iter().map(|k| off(k)).collect()))];
    for key in keys {
        let label = match key {
            "chunks" => format!("chunks={chunks}"),
            "grad_bucket_mib" => "grad buckets".into(),
            other => other.replace('_', " "),
        };
        let sets = keys.iter().map(|k| if *k == key { on(k) } else { off(k) }).collect();
        out.push((format!("{label} only"), with_mode(sets)));
    }
    out.push(("all on".to_string(), with_mode(keys.iter().map(|k| on(k)).collect())));
    out
}

/// Runs every variant and prints the table.
pub fn run(bench: OverlapBench) -> Result<()> {
    if bench.steps as usize <= WARMUP_STEPS {
        bail!("--steps must be more than the {WARMUP_STEPS} warm-up steps");
    }
    if bench.ranks < 2 && bench.launcher.is_none() {
        bail!("--ranks must be at least 2: one rank has nothing to overlap");
    }
    let scratch = std::env::temp_dir().join(format!("switchyard-bench-overlap-{}", std::process::id()));
    let variants = variants(bench.chunks);
    // Rounds alternate the variants, so a slow spell of the machine hits
    // them alike; each variant keeps its fastest round.
    let mut best: Vec<Option<Row>> = variants.iter().map(|_| None).collect();
    for round in 1..=bench.rounds {
        for (i, (variant, sets)) in variants.iter().enumerate() {
            eprintln!("bench overlap: round {round}/{}: {variant} ...", bench.rounds);
            let run_dir = scratch.join(format!("variant-{i}"));
            let _ = std::fs::remove_dir_all(&run_dir);
            train(&bench, sets, &run_dir).with_context(|| format!("variant `{variant}`"))?;
            let row = summarise(variant.clone(), &read_metrics(&run_dir)?)?;
            if best[i].as_ref().is_none_or(|b| row.step_s < b.step_s) {
                best[i] = Some(row);
            }
        }
    }
    let mut rows: Vec<Row> = best.into_iter().flatten().collect();
    let bound = rows[0].compute_s.max(rows[0].comm_s);
    let reference = rows[0].step_s;
    for row in &mut rows {
        row.step_over_bound = row.step_s / bound;
        row.speedup = reference / row.step_s;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if bench.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&bench, &rows);
    }
    Ok(())
}

fn train(bench: &OverlapBench, sets: &[String], run_dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to run the training jobs")?;
    let mut cmd = match &bench.launcher {
        Some(launcher) => {
            let mut cmd = Command::new(launcher);
            cmd.arg(&exe).arg("train");
            cmd
        }
        None => {
            let mut cmd = Command::new(&exe);
            cmd.args(["train", "--ranks", &bench.ranks.to_string()]);
            cmd
        }
    };
    cmd.args(["--quiet", "--backend", &bench.backend, "--run-dir"]).arg(run_dir);
    match &bench.config {
        Some(config) => {
            cmd.arg("--config").arg(config);
        }
        // Parallel blocks, so that attention can run while the MoE rows
        // travel, and two micro-batches per rank, so that they can interleave.
        None => {
            let batch = format!("train.global_batch_size={}", bench.ranks * 16);
            cmd.args(["--set", "model.block=\"parallel\"", "--set", "train.micro_batch_size=8", "--set", &batch]);
        }
    }
    let steps = format!("train.steps={}", bench.steps);
    let fixed = [steps.as_str(), "checkpoint.every=0", "train.log_every=1000000"];
    for set in bench.overrides.iter().map(String::as_str).chain(fixed).chain(sets.iter().map(String::as_str)) {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "the training job failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn summarise(variant: String, steps: &[StepMetrics]) -> Result<Row> {
    if steps.len() <= WARMUP_STEPS {
        bail!("{} step(s) recorded: need more than the {WARMUP_STEPS} warm-up steps", steps.len());
    }
    let timed = &steps[WARMUP_STEPS..];
    let of = |f: fn(&StepMetrics) -> f64| median(timed.iter().map(f).collect());
    let step_s = of(|m| m.step_time_s);
    let comm_s = of(|m| m.comm_s);
    let exposed_s = of(|m| m.exposed_comm_s.min(m.comm_s));
    let compute_s = (step_s - exposed_s).max(0.0);
    Ok(Row {
        variant,
        step_s,
        compute_s,
        comm_s,
        exposed_s,
        exposed_share: exposed_s / step_s,
        step_over_bound: f64::NAN,
        speedup: f64::NAN,
        overlap_efficiency: of(|m| m.overlap_efficiency),
        loss_at_end: steps.last().map_or(f64::NAN, |m| m.loss),
    })
}

fn print_table(bench: &OverlapBench, rows: &[Row]) {
    let how = match &bench.launcher {
        Some(l) => format!("ranks started by {}", l.display()),
        None => format!("{} ranks", bench.ranks),
    };
    println!(
        "switchyard bench overlap ({} backend, {how}; per step: slowest rank, median after {WARMUP_STEPS} warm-up steps; \
         fastest of {} round(s))",
        bench.backend, bench.rounds
    );
    println!();
    println!(
        "| variant | step | vs all off | compute | communication | exposed | exposed share | step / max(compute, comm) | overlap efficiency | loss at end |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for r in rows {
        println!(
            "| {} | {} | {:.2}x | {} | {} | {} | {:.0}% | {:.2}x | {:.0}% | {:.4} |",
            r.variant,
            ms(r.step_s),
            r.speedup,
            ms(r.compute_s),
            ms(r.comm_s),
            ms(r.exposed_s),
            r.exposed_share * 100.0,
            r.step_over_bound,
            r.overlap_efficiency * 100.0,
            r.loss_at_end
        );
    }
    if let (Some(off), Some(on)) = (rows.first(), rows.last()) {
        // A stricter bound: the same transfers took less time in some
        // variants (on a communication thread, or cut in chunks) than with
        // everything off; perfect overlap would then give max(compute, that).
        let fastest_comm = rows.iter().map(|r| r.comm_s).fold(f64::INFINITY, f64::min);
        let strict = on.step_s / off.compute_s.max(fastest_comm);
        println!();
        println!(
            "all on is {:.2}x faster than all off; it takes {:.2}x max(compute, communication) with both measured \
             with everything off, max({}, {}) (target <= 1.15x), and {:.2}x max({}, {}) with the fastest \
             communication any variant measured",
            on.speedup,
            on.step_over_bound,
            ms(off.compute_s),
            ms(off.comm_s),
            strict,
            ms(off.compute_s),
            ms(fastest_comm)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_turns_on_one_technique() {
        let v = variants(4);
        assert_eq!(v.len(), 6);
        assert!(v[0].1[1..].iter().all(|s| s.ends_with("=false") || s.ends_with("=1") || s.ends_with("=0")));
        assert!(v.iter().all(|(_, sets)| sets[0] == "overlap.mode=\"on\""));
        assert!(
            v[1].1.contains(&"overlap.chunks=4".to_string()) && v[1].1.contains(&"overlap.interleave=false".into())
        );
        assert!(v[5].1.contains(&"overlap.grad_bucket_mib=0.1".to_string()));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
