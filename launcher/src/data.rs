//! `switchyard data prepare`.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use worker::data::Tokenizer;

/// Data subcommands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text files into a training data folder (token shards + index.json).
    Prepare {
        /// Files or folders (recursed) of text; each file is one document.
        #[arg(long = "input", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Output folder; use it as `[data] source`.
        #[arg(long)]
        out: PathBuf,
        /// A Hugging Face tokenizer.json; default: bytes (vocab 256).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Mark modalities for Mixture-of-Transformers (`[model] modalities`):
        /// the documents of the i-th --input are modality i.
        #[arg(long)]
        modality_per_input: bool,
    },
    /// Write held-out text from the built-in corpus (for `switchyard eval`).
    Sample {
        /// Output text file.
        #[arg(long)]
        out: PathBuf,
        /// Number of sequences of 256 bytes.
        #[arg(long, default_value_t = worker::data::config::HELD_OUT_SEQUENCES)]
        sequences: usize,
        /// Seed of the sample; training draws from seeds' own streams, so any seed is held out.
        #[arg(long, default_value_t = worker::data::config::HELD_OUT_SEED)]
        seed: u64,
    },
}

/// Runs a data subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare { inputs, out, tokenizer, modality_per_input } => {
            let tokenizer = match &tokenizer {
                Some(path) => Tokenizer::load(path)?,
                None => Tokenizer::Byte,
            };
            let report = if modality_per_input {
                worker::data::prepare_with_modalities(&inputs, &out, &tokenizer)
            } else {
                worker::data::prepare(&inputs, &out, &tokenizer)
            }
            .with_context(|| format!("data prepare into {} failed", out.display()))?;
            if modality_per_input {
                for (i, input) in inputs.iter().enumerate() {
                    println!("modality {i}: the documents of {}", input.display());
                }
            }
            println!(
                "prepared {} documents, {} tokens (vocab {}) in {} shard(s) under {}",
                report.documents,
                report.tokens,
                tokenizer.vocab_size(),
                report.shards,
                out.display()
            );
            println!("train on it: switchyard train --set data.source={}", out.display());
            Ok(())
        }
        DataCommand::Sample { out, sequences, seed } => {
            let corpus = worker::data::BuiltinCorpus::new();
            let text = corpus.held_out_text(sequences, seed);
            std::fs::write(&out, &text).with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {} bytes of the built-in corpus to {} (entropy floor {:.3} nats, unigram {:.3})",
                text.len(),
                out.display(),
                corpus.entropy_floor_nats(),
                corpus.unigram_entropy_nats()
            );
            Ok(())
        }
    }
}
