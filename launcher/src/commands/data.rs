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
    },
}

/// Runs a data subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare { inputs, out, tokenizer } => {
            let tokenizer = match &tokenizer {
                Some(path) => Tokenizer::load(path)?,
                None => Tokenizer::Byte,
            };
            let report = worker::data::prepare(&inputs, &out, &tokenizer)
                .with_context(|| format!("data prepare into {} failed", out.display()))?;
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
    }
}
