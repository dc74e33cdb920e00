//! `switchyard ckpt export --format hf` as a user runs it: train a small
//! model, export it, load the folder with `transformers`
//! (`AutoModelForCausalLM.from_pretrained`, fp32, eager attention) and
//! compare its logits and loss with switchyard's on the same text
//! (`launcher/tests/hf/compare.py`; ./ci.sh installs torch and transformers).

mod common;

use common::{switchyard, text, EXE};
use std::path::Path;
use std::process::Command;

/// A small job (d 32, 2 layers, 16-token sequences) trained for 20 steps
/// in `dir/run` with `sets` on top; returns the checkpoint root.
fn train(dir: &Path, config: Option<&str>, sets: &[&str]) -> String {
    let run = dir.join("run");
    let mut args = vec!["train", "--quiet", "--run-dir", run.to_str().unwrap()];
    let example;
    if let Some(name) = config {
        example = format!("{}/../examples/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        args.extend(["--config", &example]);
    }
    let base = [
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden=48",
        "model.seq_len=16",
        "train.steps=20",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "checkpoint.every=0",
    ];
    for set in base.iter().chain(sets) {
        args.extend(["--set", set]);
    }
    let out = switchyard(&args, dir);
    assert!(out.status.success(), "{}", text(&out));
    run.join("checkpoints").display().to_string()
}

fn python(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf/compare.py");
    let out = Command::new("python3").arg(script).args(args).output().expect(
        "python3 runs (the Hugging Face tests need python3 with torch and transformers: ./ci.sh installs them)",
    );
    assert!(out.status.success(), "compare.py {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("compare.py printed no JSON ({e}): {}", text(&out)))
}

/// Exports `root` to `dir/hf` and compares it with switchyard's own eval.
fn export_and_compare(dir: &Path, root: &str, export_flags: &[&str], architecture: &str) {
    let held = dir.join("held.txt");
    let out = switchyard(&["data", "sample", "--out", held.to_str().unwrap(), "--sequences", "8"], dir);
    assert!(out.status.success(), "{}", text(&out));
    let logits = dir.join("logits.json");
    let out = switchyard(
        &[
            "eval",
            "--checkpoint",
            root,
            "--data",
            held.to_str().unwrap(),
            "--json",
            "--logits-out",
            logits.to_str().unwrap(),
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).expect("eval --json");
    let hf = dir.join("hf");
    let mut args = vec!["ckpt", "export", root, "--format", "hf", "--to", hf.to_str().unwrap()];
    args.extend(export_flags);
    let out = switchyard(&args, dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(architecture), "{}", text(&out));
    let loss = eval["loss"].as_f64().unwrap().to_string();
    let r = python(&["logits", hf.to_str().unwrap(), logits.to_str().unwrap(), held.to_str().unwrap(), &loss]);
    eprintln!("{architecture}: {r}");
    assert_eq!(r["architecture"], architecture, "{r}");
    let rel = r["max_rel_diff"].as_f64().unwrap();
    assert!(rel <= 1e-4, "{architecture}: logits differ by {rel:.2e} of the largest: {r}");
    let (theirs, ours) = (r["hf_loss"].as_f64().unwrap(), r["switchyard_loss"].as_f64().unwrap());
    assert!((theirs - ours).abs() <= 1e-4 * ours, "{architecture}: loss {theirs} in transformers, {ours} here");
}

#[test]
fn a_mixtral_export_loads_in_transformers_and_computes_the_same_logits() {
    let dir = common::temp_dir("hf", "mixtral");
    let root = train(&dir, None, &["model.tie_embeddings=true"]);
    // 0.25 MiB files: the export is sharded with an index, as transformers writes big models.
    export_and_compare(&dir, &root, &["--shard-mib", "0.25"], "MixtralForCausalLM");
    assert!(dir.join("hf/model.safetensors.index.json").exists(), "sharded export");
}

#[test]
fn a_qwen2_moe_export_loads_in_transformers_and_computes_the_same_logits() {
    // The Qwen example: a gated shared expert (2 of them here, merged into
    // one of twice the width), gates not renormalised; and a dense first layer.
    let dir = common::temp_dir("hf", "qwen");
    let sets =
        ["model.n_layers=3", "model.first_dense_layers=1", "model.dense_ffn_hidden=80", "model.n_shared_experts=2"];
    let root = train(&dir, Some("qwen-moe"), &sets);
    export_and_compare(&dir, &root, &[], "Qwen2MoeForCausalLM");
    assert!(dir.join("hf/model.safetensors").exists() && dir.join("hf/generation_config.json").exists());
}

#[test]
fn an_export_from_4_ranks_with_balanced_placement_holds_every_expert_once() {
    let dir = common::temp_dir("hf", "ranks");
    let one = common::temp_dir("hf", "ranks-one");
    let balanced = [
        "parallel.ranks=4",
        "parallel.placement=\"balanced\"",
        "parallel.rebalance_every=5",
        "parallel.redundant_experts=4",
        "model.aux_loss_coef=0.0",
        "train.micro_batch_size=2",
    ];
    let root4 = train(&dir, None, &balanced);
    let root1 = train(&one, None, &["model.aux_loss_coef=0.0", "train.micro_batch_size=2"]);
    let manifest = std::fs::read_to_string(Path::new(&root4).join("step-00000020/manifest.json")).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let replicated = plan["plan"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l.as_array().unwrap())
        .any(|o| o.as_array().unwrap().len() > 1);
    assert!(replicated, "the 4-rank run replicated hot experts over ranks");
    for (d, root) in [(&dir, &root4), (&one, &root1)] {
        let out = switchyard(&["ckpt", "export", root, "--format", "hf", "--to", d.join("hf").to_str().unwrap()], d);
        assert!(out.status.success(), "{}", text(&out));
    }
    let r = python(&["same", dir.join("hf").to_str().unwrap(), one.join("hf").to_str().unwrap()]);
    eprintln!("4 ranks against 1: {r}");
    assert_eq!(r["same_names"], true, "{r}");
    // Embeddings, 2 layers of (2 norms, 4 attention, router, 8 experts x 3), norm, head.
    assert_eq!(r["tensors"], 1 + 2 * (2 + 4 + 1 + 8 * 3) + 2, "every expert once: {r}");
    assert!(r["max_rel_diff"].as_f64().unwrap() <= 1e-4, "the same model as on one rank: {r}");
}

#[test]
fn models_transformers_cannot_compute_are_refused_and_nothing_is_written() {
    let dir = common::temp_dir("hf", "refused");
    let cases: [(Option<&str>, &[&str], &str); 3] = [
        (Some("deepseek-v3-mini"), &["train.steps=2"], "DeepSeek-V3 routing"),
        (Some("moe-plus-plus"), &["train.steps=2"], "MoE++"),
        (None, &["model.block=\"parallel\"", "train.steps=2"], "block = \"parallel\""),
    ];
    for (i, (config, sets, why)) in cases.into_iter().enumerate() {
        let case = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&case).unwrap();
        let root = train(&case, config, sets);
        let to = case.join("hf");
        let out = Command::new(EXE)
            .args(["ckpt", "export", &root, "--format", "hf", "--to", to.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success() && text(&out).contains(why), "{why}: {}", text(&out));
        assert!(!to.exists(), "nothing written for a refused export");
        let leftovers: Vec<_> = std::fs::read_dir(&case)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "no partial folder");
    }
}
