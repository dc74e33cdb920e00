//! `switchyard ckpt export`: one step as a single safetensors file.

use anyhow::Result;
use checkpoint::is_optimizer_state;
use std::path::Path;
use std::time::Instant;

use crate::ckpt::open_step;
use crate::format::human_bytes;

/// Exports the model tensors of a step (and the optimizer moments with
/// `with_optimizer`) to `to`.
pub fn run(arg: &str, to: &Path, with_optimizer: bool) -> Result<()> {
    let (store, step) = open_step(arg)?;
    let started = Instant::now();
    let report = store.export_safetensors(step, |name| with_optimizer || !is_optimizer_state(name), to)?;
    println!(
        "exported {} tensors ({}) of {} to {} in {:.2}s",
        report.num_tensors,
        human_bytes(report.num_bytes as f64),
        store.step_url(step),
        to.display(),
        started.elapsed().as_secs_f64()
    );
    if report.num_skipped > 0 {
        println!("left out {} optimizer-state tensors (--with-optimizer keeps them)", report.num_skipped);
    }
    Ok(())
}
