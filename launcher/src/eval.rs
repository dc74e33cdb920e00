//! `switchyard eval`.

use anyhow::{bail, Context, Result};
use checkpoint::CheckpointStore;
use clap::Args;
use layout::placement::PlacementPlan;
use std::path::PathBuf;
use worker::state::TrainState;
use worker::JobConfig;

/// Arguments of `switchyard eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint step (`<url>/step-XXXXXXXX`) or a checkpoint root (its newest step).
    #[arg(long)]
    checkpoint: String,
    /// Text file to evaluate on.
    #[arg(long)]
    data: PathBuf,
    /// Print one JSON object: {"loss": .., "tokens": .., "windows": ..}.
    #[arg(long)]
    json: bool,
    /// Also write the first window's logits to this file, as JSON
    /// {"seq_len", "vocab", "tokens", "logits": [seq_len x vocab]}, to
    /// compare with another tool (docs/interop.md).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Mixture-of-Transformers (`[model] modalities`): score the text as
    /// this modality, through its own weights.
    #[arg(long, default_value_t = 0)]
    modality: u8,
}

/// Evaluates a checkpoint on a text file.
pub fn run(args: EvalArgs) -> Result<()> {
    let (store, step) = match checkpoint::parse_step_url(&args.checkpoint) {
        Ok((root, step)) => (CheckpointStore::open(&root)?, step),
        Err(_) => {
            let store = CheckpointStore::open(&args.checkpoint)?;
            let step = store.latest_step()?.with_context(|| {
                format!("no committed checkpoint under {}: pass a step folder or a checkpoint root", args.checkpoint)
            })?;
            (store, step)
        }
    };
    let manifest = store.read_manifest(step)?;
    let job: JobConfig = serde_json::from_value(manifest.config.clone())
        .with_context(|| format!("the config saved in {} cannot be read by this version", store.step_url(step)))?;
    let plan = PlacementPlan::contiguous(job.model.n_layers, job.model.n_experts, 1);
    let state = TrainState::load(&store, step, &job, (&plan, None), 0)?;
    if args.modality as usize >= job.model.modalities {
        bail!(
            "--modality {}: the model has [model] modalities = {}: give 0..{}",
            args.modality,
            job.model.modalities,
            job.model.modalities - 1
        );
    }
    let tokenizer = job.data.job_tokenizer()?;
    let text = std::fs::read(&args.data).with_context(|| format!("cannot read --data {}", args.data.display()))?;
    let tokens = tokenizer.encode(&text).with_context(|| format!("cannot tokenize {}", args.data.display()))?;
    if tokens.len() < job.model.seq_len + 1 {
        bail!(
            "{} has {} tokens, fewer than one window of seq_len + 1 = {}: give a longer text",
            args.data.display(),
            tokens.len(),
            job.model.seq_len + 1
        );
    }
    let result = worker::eval::evaluate(&job.model, &state.weights, &tokens, args.modality)?;
    if let Some(path) = &args.logits_out {
        let logits = worker::eval::first_window_logits(&job.model, &state.weights, &tokens, args.modality)?;
        let dump = serde_json::json!({
            "seq_len": job.model.seq_len,
            "vocab": job.model.vocab,
            "tokens": &tokens[..job.model.seq_len + 1],
            "logits": logits,
        });
        std::fs::write(path, dump.to_string())
            .with_context(|| format!("cannot write --logits-out {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "eval {}: loss {:.4} nats over {} tokens in {} windows of {} (step {step})",
            args.data.display(),
            result.loss,
            result.tokens,
            result.windows,
            job.model.seq_len
        );
    }
    Ok(())
}

/// The tokenizer.json a job's tokens came from: its prepared folder's copy,
/// else `[data] tokenizer` when that is a file; None for bytes.
pub fn tokenizer_file(job: &JobConfig) -> Option<PathBuf> {
    job.data.tokenizer_file()
}
