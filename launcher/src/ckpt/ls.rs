//! `switchyard ckpt ls`: the step folders of a checkpoint root.

use anyhow::{bail, Result};
use checkpoint::{step_dir_name, CheckpointStore, StepFolder};

use crate::ckpt::utc_time;
use crate::format::human_bytes;

/// What one table row says about a step beyond what the listing knows.
struct Row {
    state: String,
    tokens: String,
    shards: String,
    created: String,
}

/// Lists every step folder under `root`, committed or not.
pub fn run(root: &str) -> Result<()> {
    let store = CheckpointStore::open_existing(root)?;
    let listing = store.list_steps()?;
    if listing.steps.is_empty() {
        // A step folder given by mistake is a common slip: point at its root.
        if let Ok((parent, _)) = checkpoint::parse_step_url(root) {
            bail!(
                "{} holds no step folders: it is a step folder itself; list its root: switchyard ckpt ls {parent}",
                store.url()
            );
        }
        bail!(
            "no checkpoint steps under {}: nothing was saved there yet, or this is not a checkpoint root \
             (a run keeps its checkpoints in <run dir>/checkpoints)",
            store.url()
        );
    }
    let latest = listing.latest;
    let rows: Vec<(&StepFolder, Row)> =
        listing.steps.iter().map(|folder| (folder, row(&store, folder, latest))).collect();

    println!("checkpoint root {}", store.url());
    let state_width = rows.iter().map(|(_, r)| r.state.len()).max().unwrap_or(0).max("state".len());
    let tokens_width = rows.iter().map(|(_, r)| r.tokens.len()).max().unwrap_or(0).max("tokens".len());
    println!(
        "{:>10}  {:<state_width$}  {:>tokens_width$}  {:>6}  {:>10}  created (UTC)",
        "step", "state", "tokens", "shards", "size"
    );
    for (folder, row) in &rows {
        println!(
            "{:>10}  {:<state_width$}  {:>tokens_width$}  {:>6}  {:>10}  {}",
            folder.step,
            row.state,
            row.tokens,
            row.shards,
            human_bytes(folder.num_bytes as f64),
            row.created
        );
    }
    print_latest(&store, &listing.steps, latest)?;
    Ok(())
}

/// A committed step's row comes from its manifest; an unreadable manifest
/// is shown in the row rather than failing the whole listing.
fn row(store: &CheckpointStore, folder: &StepFolder, latest: Option<u64>) -> Row {
    let latest_mark = if latest == Some(folder.step) { ", latest" } else { "" };
    if !folder.committed {
        return Row {
            state: format!("uncommitted (no manifest){latest_mark}"),
            tokens: "-".into(),
            shards: folder.num_shard_files.to_string(),
            created: "-".into(),
        };
    }
    match store.read_manifest(folder.step) {
        Ok(manifest) => Row {
            state: format!("committed{latest_mark}"),
            tokens: manifest.tokens_seen.to_string(),
            shards: manifest.shards.len().to_string(),
            created: utc_time(manifest.created_unix_s),
        },
        Err(err) => Row {
            state: format!("committed, manifest unreadable{latest_mark}"),
            tokens: "-".into(),
            shards: folder.num_shard_files.to_string(),
            created: format!("({err})"),
        },
    }
}

/// The closing line: what `latest` names and what a resume would load,
/// spelled out when the two differ.
fn print_latest(store: &CheckpointStore, steps: &[StepFolder], latest: Option<u64>) -> Result<()> {
    let resume = store.latest_step()?;
    let named_ok = latest.is_some_and(|l| steps.iter().any(|s| s.step == l && s.committed));
    match (latest, resume) {
        (Some(l), _) if named_ok => println!("latest: {} ({})", step_dir_name(l), store.step_url(l)),
        (Some(l), Some(r)) => println!(
            "latest names {}, which is not committed; a resume loads {} instead ({})",
            step_dir_name(l),
            step_dir_name(r),
            store.step_url(r)
        ),
        (None, Some(r)) => {
            println!(
                "no `latest` file; a resume loads the newest committed step, {} ({})",
                step_dir_name(r),
                store.step_url(r)
            )
        }
        (_, None) => println!("no committed step: nothing here can be resumed or inspected"),
    }
    Ok(())
}
