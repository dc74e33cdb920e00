//! `switchyard ckpt`: look at checkpoints without training — list a root's
//! steps, inspect one, verify its bytes, export its model.
//!
//! Everything here opens roots read-only ([`CheckpointStore::open_existing`]),
//! so a mistyped path is an error rather than a new empty folder.

pub mod export;
pub mod hf;
pub mod hf_import;
pub mod inspect;
pub mod ls;
pub mod upcycle;

use anyhow::{anyhow, Context, Result};
use checkpoint::{CheckpointStore, Manifest};
use clap::Subcommand;
use std::path::PathBuf;
use std::time::Instant;

/// Checkpoint subcommands.
#[derive(Subcommand)]
pub enum CkptCommand {
    /// One line per step folder: committed or not, `latest`, tokens, shards, size, creation time.
    Ls {
        /// Checkpoint root: a local folder (e.g. runs/tiny/checkpoints) or a URL (file:///...).
        root: String,
    },
    /// What a step holds: format, step, tokens, layout, placement plan, config and tensors.
    Inspect {
        /// A step folder (<root>/step-XXXXXXXX) or a checkpoint root (its newest committed step).
        step: String,
        /// Print the manifest JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Re-read every shard of a step and check sizes, headers and checksums.
    Verify {
        /// A step folder (<root>/step-XXXXXXXX) or a checkpoint root (its newest committed step).
        step: String,
    },
    /// Read a Hugging Face model folder (Llama, Mistral, Qwen2, Mixtral,
    /// Qwen2-MoE) into a new run folder, ready for `train --resume`.
    Import(ImportArgs),
    /// Sparse Upcycling: a one-expert (dense) model into E experts, each a
    /// copy of its FFN, with a new router (docs/interop.md).
    Upcycle(crate::ckpt::upcycle::UpcycleArgs),
    /// Write a step's model: one safetensors file with switchyard's names
    /// (DESIGN section 5), or with `--format hf` a Hugging Face model folder
    /// that `transformers` loads (Mixtral or Qwen2-MoE; docs/interop.md).
    Export {
        /// A step folder (<root>/step-XXXXXXXX) or a checkpoint root (its newest committed step).
        step: String,
        /// The safetensors file to write (replaced if it exists), or with
        /// `--format hf` the folder to create (refused if it exists).
        #[arg(long)]
        to: PathBuf,
        /// `safetensors` (switchyard's names) or `hf` (a transformers model folder).
        #[arg(long, default_value = "safetensors")]
        format: ExportFormat,
        /// Also write the AdamW moments (`optim.<name>.exp_avg` / `.exp_avg_sq`; safetensors only).
        #[arg(long)]
        with_optimizer: bool,
        /// `--format hf`: the largest weights file, in MiB, before the
        /// export is sharded with an index (transformers' default, 5 GB).
        #[arg(long, default_value_t = 4768.0)]
        shard_mib: f64,
    },
}

/// `ckpt import`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A Hugging Face model folder (config.json, model.safetensors or an index).
    #[arg(long)]
    pub from: PathBuf,
    /// The run folder to create: its checkpoints/ gets step 0, config.toml the job.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Tokens per training sequence of the imported job.
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Further settings of the job, as in `train --set` (e.g. data.source=...).
    #[arg(long = "set")]
    pub sets: Vec<String>,
}

/// What `ckpt export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One safetensors file, switchyard's tensor names.
    Safetensors,
    /// A Hugging Face model folder (config.json, model.safetensors, ...).
    Hf,
}

/// Runs `ckpt import`.
fn import(args: ImportArgs) -> Result<()> {
    crate::ckpt::hf_import::run(&args.from, &args.run_dir, args.seq_len, &args.sets)
}

/// Runs a checkpoint subcommand.
pub fn run(cmd: CkptCommand) -> Result<()> {
    match cmd {
        CkptCommand::Ls { root } => crate::ckpt::ls::run(&root),
        CkptCommand::Inspect { step, json } => crate::ckpt::inspect::run(&step, json),
        CkptCommand::Verify { step } => verify(&step),
        CkptCommand::Import(args) => import(args),
        CkptCommand::Upcycle(args) => crate::ckpt::upcycle::run(args),
        CkptCommand::Export { step, to, format: ExportFormat::Safetensors, with_optimizer, .. } => {
            crate::ckpt::export::run(&step, &to, with_optimizer)
        }
        CkptCommand::Export { step, to, format: ExportFormat::Hf, with_optimizer, shard_mib } => {
            if with_optimizer {
                anyhow::bail!("--with-optimizer: a Hugging Face folder holds the model only; export --format safetensors for the moments");
            }
            crate::ckpt::hf::run(&step, &to, (shard_mib * 1048576.0).max(1024.0) as u64)
        }
    }
}

/// `ckpt verify`: the library re-reads everything; its error names the
/// shard and tensor, so it is passed through unchanged.
fn verify(arg: &str) -> Result<()> {
    let (store, step) = open_step(arg)?;
    let started = Instant::now();
    let report = store.verify(step)?;
    println!(
        "ok: {} shards, {} tensors, {:.2} MiB checked in {:.2}s ({})",
        report.num_shards,
        report.num_tensors,
        report.num_bytes as f64 / (1u64 << 20) as f64,
        started.elapsed().as_secs_f64(),
        store.step_url(step)
    );
    Ok(())
}

/// The root and step an argument names: a step folder, or a root standing
/// for its newest committed step (as `eval --checkpoint` takes them).
pub(crate) fn open_step(arg: &str) -> Result<(CheckpointStore, u64)> {
    if let Ok((root, step)) = checkpoint::parse_step_url(arg) {
        return Ok((CheckpointStore::open_existing(&root)?, step));
    }
    let store = CheckpointStore::open_existing(arg)?;
    let step = store.latest_step()?.with_context(|| {
        format!(
            "no committed checkpoint under {}: pass a step folder (<root>/step-XXXXXXXX) or a root \
             that holds a committed step; `switchyard ckpt ls {arg}` lists what is there",
            store.url()
        )
    })?;
    Ok((store, step))
}

/// The manifest of `step`; when the step is not committed, the error also
/// lists the steps that are, since that is what the user needs next.
pub(crate) fn read_manifest(store: &CheckpointStore, step: u64) -> Result<Manifest> {
    store.read_manifest(step).map_err(|err| {
        if !matches!(err, checkpoint::Error::NotCommitted { .. }) {
            return err.into();
        }
        match store.committed_steps() {
            Ok(steps) if !steps.is_empty() => {
                let steps: Vec<_> = steps.iter().map(u64::to_string).collect();
                anyhow!("{err}; committed steps there: {}", steps.join(", "))
            }
            _ => err.into(),
        }
    })
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time, without a date crate: days
/// to a civil date by Howard Hinnant's algorithm (proleptic Gregorian).
pub(crate) fn utc_time(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_matches_known_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        // `date -u -d @951782400`: the leap day of a year divisible by 400.
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_time(4_107_542_399), "2100-02-28 23:59:59");
    }
}
