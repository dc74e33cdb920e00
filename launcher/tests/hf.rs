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
        "train.steps=50",
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

/// Held-out text of the built-in corpus, 2 KiB, in `dir/held.txt`.
fn held_out(dir: &Path) -> std::path::PathBuf {
    let held = dir.join("held.txt");
    let out = switchyard(&["data", "sample", "--out", held.to_str().unwrap(), "--sequences", "8"], dir);
    assert!(out.status.success(), "{}", text(&out));
    held
}

/// switchyard's eval loss and first-window logits of checkpoint `root` on
/// `held`, against the transformers model in `folder`.
fn compare(dir: &Path, root: &str, held: &Path, folder: &Path) -> serde_json::Value {
    compare_as(dir, root, held, folder, 0)
}

/// [`compare`], switchyard scoring the text as `modality` (Mixture-of-Transformers).
fn compare_as(dir: &Path, root: &str, held: &Path, folder: &Path, modality: u8) -> serde_json::Value {
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
            "--modality",
            &modality.to_string(),
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).expect("eval --json");
    let loss = eval["loss"].as_f64().unwrap().to_string();
    python(&["logits", folder.to_str().unwrap(), logits.to_str().unwrap(), held.to_str().unwrap(), &loss])
}

/// Asserts the logits (1e-4 of the largest) and the losses (1e-4 relative) agree.
fn assert_same_function(r: &serde_json::Value, what: &str) {
    let rel = r["max_rel_diff"].as_f64().unwrap();
    assert!(rel <= 1e-4, "{what}: logits differ by {rel:.2e} of the largest: {r}");
    let (theirs, ours) = (r["hf_loss"].as_f64().unwrap(), r["switchyard_loss"].as_f64().unwrap());
    assert!((theirs - ours).abs() <= 1e-4 * ours, "{what}: loss {theirs} in transformers, {ours} here");
}

/// `switchyard ckpt import --from FOLDER --run-dir RUN --seq-len 16`, run in `dir`.
fn import(dir: &Path, folder: &Path, run: &Path) -> std::process::Output {
    let (from, to) = (folder.to_str().unwrap(), run.to_str().unwrap());
    switchyard(&["ckpt", "import", "--from", from, "--run-dir", to, "--seq-len", "16"], dir)
}

/// Exports `root` to `dir/hf` and compares it with switchyard's own eval.
fn export_and_compare(dir: &Path, root: &str, export_flags: &[&str], architecture: &str) {
    let held = held_out(dir);
    let hf = dir.join("hf");
    let mut args = vec!["ckpt", "export", root, "--format", "hf", "--to", hf.to_str().unwrap()];
    args.extend(export_flags);
    let out = switchyard(&args, dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(architecture), "{}", text(&out));
    let r = compare(dir, root, &held, &hf);
    eprintln!("{architecture}: {r}");
    assert_eq!(r["architecture"], architecture, "{r}");
    assert_same_function(&r, architecture);
}

#[test]
fn transformers_models_import_compute_the_same_logits_and_train_on_several_ranks() {
    for kind in ["llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"] {
        let dir = common::temp_dir("hf", &format!("import-{kind}"));
        let folder = dir.join("hf-model");
        python(&["make", kind, folder.to_str().unwrap()]);
        let run = dir.join("run");
        let out = import(&dir, &folder, &run);
        assert!(out.status.success(), "{kind}: {}", text(&out));
        let root = run.join("checkpoints").display().to_string();
        let r = compare(&dir, &root, &held_out(&dir), &folder);
        eprintln!("import {kind}: {r}");
        assert_same_function(&r, &format!("import {kind}"));
        // The imported run resumes on 2 ranks and trains on the built-in corpus.
        let config = run.join("config.toml");
        let args =
            ["train", "--run-dir", run.to_str().unwrap(), "--config", config.to_str().unwrap(), "--resume", "--quiet"];
        let sets = [
            "--set",
            "train.steps=8",
            "--set",
            "parallel.ranks=2",
            "--set",
            "train.global_batch_size=4",
            "--set",
            "train.micro_batch_size=2",
        ];
        let out = switchyard(&[&args[..], &sets[..]].concat(), &dir);
        assert!(out.status.success(), "{kind}: {}", text(&out));
        assert!(text(&out).contains("resuming from") && text(&out).contains("(step 0)"), "{kind}: {}", text(&out));
    }
}

#[test]
fn bad_model_folders_are_refused_naming_the_file_and_nothing_is_written() {
    let dir = common::temp_dir("hf", "import-bad");
    let good = dir.join("good");
    python(&["make", "mixtral", good.to_str().unwrap()]);
    let import = |from: &Path, name: &str| -> (bool, String, bool) {
        let run = dir.join(format!("run-{name}"));
        let out = import(&dir, from, &run);
        (out.status.success(), text(&out), run.exists())
    };
    // An unknown model_type.
    let unknown = dir.join("unknown");
    std::fs::create_dir_all(&unknown).unwrap();
    let config = std::fs::read_to_string(good.join("config.json")).unwrap().replace("\"mixtral\"", "\"gpt_neox\"");
    std::fs::write(unknown.join("config.json"), config).unwrap();
    std::fs::copy(good.join("model.safetensors"), unknown.join("model.safetensors")).unwrap();
    let (ok, log, written) = import(&unknown, "unknown");
    assert!(!ok && log.contains("gpt_neox") && log.contains("config.json") && !written, "{log}");
    // A truncated safetensors file.
    let truncated = dir.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    std::fs::copy(good.join("config.json"), truncated.join("config.json")).unwrap();
    let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, log, written) = import(&truncated, "truncated");
    assert!(!ok && log.contains("model.safetensors") && log.contains("truncated") && !written, "{log}");
    // A shard the index names but the folder lacks.
    let missing = dir.join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::copy(good.join("config.json"), missing.join("config.json")).unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#;
    std::fs::write(missing.join("model.safetensors.index.json"), index).unwrap();
    let (ok, log, written) = import(&missing, "missing");
    assert!(!ok && log.contains("model-00001-of-00002.safetensors") && log.contains("missing") && !written, "{log}");
    // A shape that does not fit config.json.
    let shapes = dir.join("shapes");
    std::fs::create_dir_all(&shapes).unwrap();
    let config = std::fs::read_to_string(good.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 40", "\"intermediate_size\": 44");
    std::fs::write(shapes.join("config.json"), config).unwrap();
    std::fs::copy(good.join("model.safetensors"), shapes.join("model.safetensors")).unwrap();
    let (ok, log, written) = import(&shapes, "shapes");
    assert!(!ok && log.contains("w1.weight") && !written, "{log}");
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
fn a_qk_norm_export_loads_in_transformers_as_qwen3_moe() {
    // Query/key head norms (Qwen3) with a softmax router, no shared expert.
    let dir = common::temp_dir("hf", "qwen3");
    let root = train(&dir, None, &["model.qk_norm=true", "model.norm_topk_prob=false"]);
    export_and_compare(&dir, &root, &[], "Qwen3MoeForCausalLM");
}

#[test]
fn a_deepseek_v3_routed_export_loads_in_transformers_as_glm4_moe_with_its_bias() {
    // The DeepSeek example: sigmoid router, 4 groups of which 2 kept,
    // aux-loss-free bias, scaling 2.5, a shared expert, a dense first layer.
    let dir = common::temp_dir("hf", "deepseek");
    let root = train(&dir, Some("deepseek-v3-mini"), &[]);
    export_and_compare(&dir, &root, &[], "Glm4MoeForCausalLM");
    // The bias the run learned (50 steps of +-0.001) under transformers' name.
    let hf = dir.join("hf");
    let bias = python(&["tensor", hf.to_str().unwrap(), "model.layers.1.mlp.gate.e_score_correction_bias"]);
    assert_eq!(bias["shape"], serde_json::json!([16]), "{bias}");
    let most = bias["max_abs"].as_f64().unwrap();
    assert!(most > 0.0 && most <= 0.050001, "a bias of at most 50 steps of 0.001: {bias}");
}

#[test]
fn a_jetmoe_export_with_attention_experts_loads_in_transformers_and_computes_the_same_logits() {
    // The JetMoE example: 8 attention experts top-2 beside 8 FFN experts
    // top-2, 2 query heads per expert over 2 shared kv heads, tied embeddings.
    let dir = common::temp_dir("hf", "jetmoe");
    let root = train(&dir, Some("jetmoe-mini"), &["model.n_heads=2", "model.n_kv_heads=2"]);
    export_and_compare(&dir, &root, &[], "JetMoeForCausalLM");
    // The output bias the run learned, under JetMoE's name.
    let bias = python(&["tensor", dir.join("hf").to_str().unwrap(), "model.layers.1.self_attention.experts.bias"]);
    assert_eq!(bias["shape"], serde_json::json!([32]), "{bias}");
    assert!(bias["max_abs"].as_f64().unwrap() > 0.0, "a trained bias: {bias}");
}

#[test]
fn a_run_on_a_tokenizer_json_exports_it_for_autotokenizer() {
    // A byte-level BPE of 300 tokens trained on held-out text; the data
    // prepared with it; a short run; the export carries the tokenizer.
    let dir = common::temp_dir("hf", "tokenizer");
    let held = held_out(&dir);
    let tok = dir.join("tok.json");
    let made = python(&["bpe", held.to_str().unwrap(), tok.to_str().unwrap()]);
    assert_eq!(made["vocab"], 300, "{made}");
    let data = dir.join("data");
    let prepare = ["data", "prepare", "--input", held.to_str().unwrap(), "--out", data.to_str().unwrap()];
    let out = switchyard(&[&prepare[..], &["--tokenizer", tok.to_str().unwrap()]].concat(), &dir);
    assert!(out.status.success(), "{}", text(&out));
    let source = format!("data.source=\"{}\"", data.display());
    let root = train(&dir, None, &["model.vocab=300", &source, "train.steps=2"]);
    let hf = dir.join("hf");
    let out = switchyard(&["ckpt", "export", &root, "--format", "hf", "--to", hf.to_str().unwrap()], &dir);
    assert!(out.status.success() && text(&out).contains("copied as tokenizer.json"), "{}", text(&out));
    let copied = std::fs::read(hf.join("tokenizer.json")).unwrap();
    assert_eq!(copied, std::fs::read(&tok).unwrap(), "the run's tokenizer, byte for byte");
    // transformers loads it from the folder and encodes as the tokenizer does.
    let theirs = python(&["encode", hf.to_str().unwrap(), held.to_str().unwrap()]);
    assert_eq!(theirs["class"], "PreTrainedTokenizerFast", "{theirs}");
    let ids: Vec<u64> = theirs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(ids.len() > 10 && ids.len() < 200, "BPE merges bytes: {} ids for 200 characters", ids.len());
    assert!(ids.iter().any(|&id| id >= 256), "merged tokens past the bytes: {theirs}");
    // The same ids as switchyard's prepared shard (the cut at 200 characters
    // may split the last token).
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("index.json")).unwrap()).unwrap();
    let shard = std::fs::read(data.join(index["shards"][0]["file"].as_str().unwrap())).unwrap();
    let ours: Vec<u64> =
        shard.chunks_exact(4).take(ids.len() - 1).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as u64).collect();
    assert_eq!(ours, ids[..ids.len() - 1], "switchyard's tokens and transformers' for the same text");
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
    let manifest = std::fs::read_to_string(Path::new(&root4).join("step-00000050/manifest.json")).unwrap();
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
    let cases: [(Option<&str>, &[&str], &str); 7] = [
        (Some("deepseek-v3-mini"), &["model.shared_expert_gate=true", "train.steps=2"], "shared_expert_gate"),
        (Some("moe-plus-plus"), &["train.steps=2"], "MoE++"),
        (None, &["model.block=\"parallel\"", "train.steps=2"], "block = \"parallel\""),
        (None, &["model.qk_norm=true", "model.n_shared_experts=1", "train.steps=2"], "qk_norm"),
        // JetMoE gives each attention expert as many heads as kv heads.
        (Some("jetmoe-mini"), &["train.steps=2"], "n_kv_heads = 2 is not n_heads = 4"),
        (Some("moh-mini"), &["model.n_heads=8", "train.steps=2"], "attention = \"moh\""),
        (Some("mot-mini"), &["train.steps=2"], "modalities = 2"),
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

#[test]
fn an_upcycled_dense_model_computes_the_same_function_then_learns() {
    let dir = common::temp_dir("hf", "upcycle");
    let folder = dir.join("llama");
    python(&["make", "llama", folder.to_str().unwrap()]);
    let dense = dir.join("dense");
    let out = import(&dir, &folder, &dense);
    assert!(out.status.success(), "{}", text(&out));
    // `ckpt upcycle --from ROOT --run-dir DIR/NAME FLAGS...`: the run folder and the output.
    let upcycle = |from: &Path, name: &str, flags: &[&str]| {
        let (root, run) = (from.join("checkpoints").display().to_string(), dir.join(name));
        let args = [&["ckpt", "upcycle", "--from", &root, "--run-dir", run.to_str().unwrap()][..], flags].concat();
        (run.clone(), switchyard(&args, &dir))
    };
    let (moe, out) = upcycle(&dense, "moe", &["--experts", "4", "--top-k", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("into 4 experts, top-2"), "{}", text(&out));
    // Before any training the MoE computes the dense Llama's function.
    let held = held_out(&dir);
    let r = compare(&dir, &moe.join("checkpoints").display().to_string(), &held, &folder);
    eprintln!("upcycled: {r}");
    assert_same_function(&r, "upcycled llama");
    // Fine-grained: 4 copies each cut in 2 (width 24), a token takes 2
    // copies, and 2 shared experts (one more copy).
    let fine_flags = ["--experts", "8", "--top-k", "4", "--granularity", "2", "--shared-experts", "2"];
    let (fine, out) = upcycle(&dense, "fine", &fine_flags);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("into 8 experts (each FFN copy cut into 2, width 24) and 2 shared, top-4"),
        "{}",
        text(&out)
    );
    let r = compare(&dir, &fine.join("checkpoints").display().to_string(), &held, &folder);
    eprintln!("upcycled, granularity 2: {r}");
    assert_same_function(&r, "fine-grained upcycled llama");
    // BAM: the attention too, into 3 attention experts routed softly (all
    // of them, the default), and into 3 routed top-2.
    for (name, flags, says) in [
        ("bam", &["--attention-experts", "3"][..], "top-2, and its attention into 3 experts, top-3"),
        ("bam2", &["--attention-experts", "3", "--attention-top-k", "2"][..], "its attention into 3 experts, top-2"),
    ] {
        let (bam, out) = upcycle(&dense, name, &[&["--experts", "4", "--top-k", "2"][..], flags].concat());
        assert!(out.status.success() && text(&out).contains(says), "{}", text(&out));
        let r = compare(&dir, &bam.join("checkpoints").display().to_string(), &held, &folder);
        eprintln!("upcycled with attention experts ({name}): {r}");
        assert_same_function(&r, "llama upcycled with attention experts");
    }
    // Mixture-of-Transformers: 3 modalities, each tower a copy of the dense
    // one with 2 experts of its own, top-1: every modality is the dense model.
    let (mot, out) = upcycle(&dense, "mot", &["--modalities", "3", "--experts", "2", "--top-k", "1"]);
    assert!(out.status.success() && text(&out).contains("top-1 per modality, 3 modalities"), "{}", text(&out));
    for modality in 0..3 {
        let r = compare_as(&dir, &mot.join("checkpoints").display().to_string(), &held, &folder, modality);
        eprintln!("upcycled into modalities, as modality {modality}: {r}");
        assert_same_function(&r, "llama upcycled into modalities");
    }
    let out = switchyard(
        &[
            "eval",
            "--checkpoint",
            &mot.join("checkpoints").display().to_string(),
            "--data",
            held.to_str().unwrap(),
            "--modality",
            "3",
        ],
        &dir,
    );
    assert!(!out.status.success() && text(&out).contains("--modality 3"), "{}", text(&out));
    let (odd, out) = upcycle(&dense, "odd", &["--experts", "8", "--top-k", "3", "--granularity", "2"]);
    assert!(!out.status.success() && text(&out).contains("--granularity 2") && !odd.exists(), "{}", text(&out));
    // Then it trains: the experts drift apart and the loss falls.
    let config = moe.join("config.toml");
    let train =
        ["train", "--run-dir", moe.to_str().unwrap(), "--config", config.to_str().unwrap(), "--resume", "--quiet"];
    let sets = ["--set", "train.steps=30", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4"];
    let out = switchyard(&[&train[..], &sets[..]].concat(), &dir);
    assert!(out.status.success(), "{}", text(&out));
    let metrics = std::fs::read_to_string(moe.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    eprintln!("upcycled training: step 1 loss {:.4}, step 30 loss {:.4}", losses[0], losses[29]);
    assert!(losses[29] < losses[0] - 0.5, "the upcycled model learns: {losses:?}");
    // Upcycling needs a dense (one-expert) model.
    let (again, out) = upcycle(&moe, "again", &["--experts", "8", "--top-k", "2"]);
    assert!(!out.status.success() && text(&out).contains("not a dense model") && !again.exists(), "{}", text(&out));
}
