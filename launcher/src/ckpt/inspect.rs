//! `switchyard ckpt inspect`: one step's manifest, for people.

use anyhow::Result;
use checkpoint::{is_optimizer_state, Manifest, TensorEntry};
use layout::{ParallelDims, PlacementPlan};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::ckpt::{open_step, read_manifest, utc_time};
use crate::format::human_bytes;

/// Prints what the step holds, or its manifest as JSON with `json`.
pub fn run(arg: &str, json: bool) -> Result<()> {
    let (store, step) = open_step(arg)?;
    let manifest = read_manifest(&store, step)?;
    if json {
        // Serialised from the parsed manifest: the same fields, in the same
        // order and layout as the manifest.json switchyard wrote.
        println!("{}", serde_json::to_string_pretty(&manifest)?);
        return Ok(());
    }
    println!("{}", store.step_url(step));
    let field = |name: &str, value: &dyn std::fmt::Display| println!("{name:<15} {value}");
    field("format version", &manifest.format_version);
    field("step", &manifest.step);
    field("tokens seen", &manifest.tokens_seen);
    field("code version", &manifest.code_version);
    field("created", &format!("{} UTC", utc_time(manifest.created_unix_s)));
    field("parallel", &parallel_summary(&manifest.parallel));
    // DeepSeek-style dense first layers hold no experts whatever the plan lists.
    let dense_layers = manifest.config["model"]["first_dense_layers"].as_u64().unwrap_or(0) as usize;
    let (plan_line, plan_layers) = plan_summary(&manifest.plan, dense_layers);
    field("plan", &plan_line);
    for line in plan_layers {
        println!("  {line}");
    }
    field("data cursor", &manifest.data_cursor);
    field("schedule", &manifest.schedule);
    println!();
    println!("config");
    for line in config_text(&manifest.config).lines() {
        if line.is_empty() {
            println!();
        } else {
            println!("  {line}");
        }
    }
    println!();
    print_tensors(&manifest);
    Ok(())
}

/// The dims as the two foldings of DESIGN section 3; a manifest from
/// another version that does not parse is shown as its JSON.
fn parallel_summary(value: &Value) -> String {
    match serde_json::from_value::<ParallelDims>(value.clone()) {
        Ok(d) => format!(
            "world {} | dense: attn_tp {} x dp {} | experts: ep {} x edp {}",
            d.world, d.attn_tp, d.dp, d.ep, d.edp
        ),
        Err(_) => value.to_string(),
    }
}

/// A headline plus one line per run of layers with the same placement,
/// e.g. `layers 0-1: rank 0: experts 0-3 | rank 1: experts 4-7`.
fn plan_summary(value: &Value, dense_layers: usize) -> (String, Vec<String>) {
    let Ok(plan) = serde_json::from_value::<PlacementPlan>(value.clone()) else {
        return (value.to_string(), Vec::new());
    };
    let num_experts = plan.owners.first().map_or(0, Vec::len);
    let replicas: usize = plan.owners.iter().flatten().map(|ranks| ranks.len().saturating_sub(1)).sum();
    let headline = format!(
        "{} expert-parallel ranks, {} layers x {num_experts} experts, {replicas} extra replicas",
        plan.num_ranks,
        plan.owners.len()
    );
    let mut lines = Vec::new();
    let mut start = dense_layers.min(plan.owners.len());
    match start {
        0 => {}
        1 => lines.push("layer 0: a dense FFN, no experts".to_string()),
        n => lines.push(format!("layers 0-{}: dense FFNs, no experts", n - 1)),
    }
    while start < plan.owners.len() {
        // Layers usually share a placement (always, with contiguous blocks): one line for the run.
        let end =
            (start..plan.owners.len()).take_while(|&l| plan.owners[l] == plan.owners[start]).last().unwrap_or(start);
        let layers = if end == start { format!("layer {start}") } else { format!("layers {start}-{end}") };
        lines.push(format!("{layers}: {}", layer_placement(&plan.owners[start], plan.num_ranks)));
        start = end + 1;
    }
    (headline, lines)
}

/// `rank 0: experts 0-3 | rank 1: experts 4-7` for one layer's owners
/// (expert → ranks); a replicated expert appears under each of its ranks.
fn layer_placement(owners: &[Vec<usize>], num_ranks: usize) -> String {
    let mut by_rank: BTreeMap<usize, Vec<usize>> = (0..num_ranks).map(|r| (r, Vec::new())).collect();
    for (expert, ranks) in owners.iter().enumerate() {
        for &rank in ranks {
            by_rank.entry(rank).or_default().push(expert);
        }
    }
    let parts: Vec<_> = by_rank
        .into_iter()
        .map(|(rank, experts)| {
            if experts.is_empty() {
                format!("rank {rank}: none")
            } else {
                format!("rank {rank}: experts {}", ranges(&experts))
            }
        })
        .collect();
    parts.join(" | ")
}

/// Sorted ids as ranges: [0, 1, 2, 5, 7, 8] → `0-2,5,7-8`.
fn ranges(ids: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        out.push(if i == j { ids[i].to_string() } else { format!("{}-{}", ids[i], ids[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// The config as the run folder's config.toml has it (same keys, same
/// order, auth token left out); a config this version cannot read is shown
/// as TOML of its JSON, or as the JSON itself when even that fails.
fn config_text(config: &Value) -> String {
    if let Ok(job) = serde_json::from_value::<worker::JobConfig>(config.clone()) {
        return job.to_toml();
    }
    toml::to_string_pretty(config)
        .unwrap_or_else(|_| serde_json::to_string_pretty(config).unwrap_or_else(|_| config.to_string()))
}

/// The tensor table: model tensors first, then optimizer state, each in
/// manifest order (the model's own order, rank by rank).
fn print_tensors(manifest: &Manifest) {
    let (model, optim): (Vec<&TensorEntry>, Vec<&TensorEntry>) =
        manifest.tensors.iter().partition(|t| !is_optimizer_state(&t.name));
    let total: u64 = manifest.tensors.iter().map(|t| t.length).sum();
    println!(
        "tensors: {} in {} shards, {} ({} model, {} optimizer state)",
        manifest.tensors.len(),
        manifest.shards.len(),
        human_bytes(total as f64),
        model.len(),
        optim.len()
    );
    let rows: Vec<[String; 5]> = model
        .iter()
        .chain(&optim)
        .map(|t| {
            let shape: Vec<_> = t.shape.iter().map(usize::to_string).collect();
            [
                t.name.clone(),
                t.dtype.clone(),
                format!("[{}]", shape.join(", ")),
                shard_name(&t.shard),
                t.length.to_string(),
            ]
        })
        .collect();
    let header = ["name", "dtype", "shape", "shard", "bytes"].map(String::from);
    let widths: Vec<usize> =
        (0..5).map(|c| rows.iter().chain([&header]).map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in [&header].into_iter().chain(&rows) {
        println!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
    }
}

/// `shards/rank-00001.safetensors` → `rank-00001`: the rank is what matters.
fn shard_name(file: &str) -> String {
    let name = file.strip_prefix("shards/").unwrap_or(file);
    name.strip_suffix(".safetensors").unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn plan_summary_groups_equal_layers_and_counts_replicas() {
        let contiguous = serde_json::to_value(PlacementPlan::contiguous(3, 8, 2)).unwrap();
        let (headline, lines) = plan_summary(&contiguous, 0);
        assert_eq!(headline, "2 expert-parallel ranks, 3 layers x 8 experts, 0 extra replicas");
        assert_eq!(lines, ["layers 0-2: rank 0: experts 0-3 | rank 1: experts 4-7"]);
        let (_, lines) = plan_summary(&contiguous, 1);
        assert_eq!(
            lines,
            ["layer 0: a dense FFN, no experts", "layers 1-2: rank 0: experts 0-3 | rank 1: experts 4-7"]
        );

        // Layer 1 replicates expert 0 on rank 1 and leaves rank 2 empty.
        let plan = json!({"num_ranks": 3, "owners": [[[0], [1], [2]], [[0, 1], [1], [1]]]});
        let (headline, lines) = plan_summary(&plan, 0);
        assert!(headline.ends_with("1 extra replicas"), "{headline}");
        assert_eq!(
            lines,
            [
                "layer 0: rank 0: experts 0 | rank 1: experts 1 | rank 2: experts 2",
                "layer 1: rank 0: experts 0 | rank 1: experts 0-2 | rank 2: none"
            ]
        );
        // Not a plan this version knows: shown as it is.
        assert_eq!(plan_summary(&json!({"x": 1}), 0).0, r#"{"x":1}"#);
    }
}
