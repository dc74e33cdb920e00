//! Mixture-of-Transformers (docs/model.md) in training, over the local
//! (threads) backend: every modality's own tensors are dense, replicated on
//! every rank, and its experts are a block of the layer's, so every layout
//! gives the same losses (within 1e-6 over 20 steps); resume on the same
//! layout is bit-exact and on another within 1e-6. The built-in corpus's
//! sources serve as modalities (one per sequence); a prepared folder marks
//! them per document, so they change inside a window.

mod common;

use common::{fresh_run as run, layout_job as job, temp_dir, train_steps as steps};
use worker::api::Resume;
use worker::data::{prepare_with_modalities, Tokenizer};
use worker::metrics::StepMetrics;

/// 2 modalities; a dense first layer (an FFN per modality), then MoE
/// layers of 8 experts, 4 per modality, top-2.
const MOT: &[&str] = &["model.modalities=2", "model.n_experts=8", "model.n_layers=3", "model.first_dense_layers=1"];

fn assert_close(reference: &[StepMetrics], other: &[StepMetrics], what: &str) {
    common::assert_close_by(reference, other, what, |m| m.tokens_per_expert.clone());
}

#[test]
fn modalities_match_on_every_layout() {
    for (block, name) in [("sequential", "seq"), ("parallel", "par")] {
        let block_set = format!("model.block=\"{block}\"");
        let model = [MOT, &[block_set.as_str()][..]].concat();
        let one = run(&job(&model, 1, &[]), &format!("mot-{name}-1"));
        assert!(one[19].loss < one[0].loss - 0.3, "{block}: the job learns: {} -> {}", one[0].loss, one[19].loss);
        let layouts: [(usize, &[&str]); 6] = [
            (2, &[]),
            (4, &[]),
            (4, &["parallel.ep=2"]),
            (4, &["parallel.placement=\"balanced\"", "parallel.rebalance_every=4", "parallel.redundant_experts=4"]),
            (2, &["parallel.attn_tp=2"]),
            (4, &["parallel.attn_tp=2"]),
        ];
        for (i, (ranks, extra)) in layouts.into_iter().enumerate() {
            let other = run(&job(&model, ranks, extra), &format!("mot-{name}-layout-{i}"));
            assert_close(&one, &other, &format!("{block}, {ranks} ranks {extra:?}"));
        }
    }
}

#[test]
fn modalities_resume_bit_exactly_and_on_another_layout() {
    let dir = temp_dir("mot-resume");
    let mut joined = steps(&job(MOT, 2, &[]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOT, 2, &[]), &dir, Resume::Latest, None));
    let reference = run(&job(MOT, 2, &[]), "mot-resume-ref");
    for (a, b) in reference.iter().zip(&joined) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: resumed loss", a.step);
    }
    let dir = temp_dir("mot-reshard");
    let mut joined = steps(&job(MOT, 4, &["parallel.attn_tp=2"]), &dir, Resume::No, Some(10));
    joined.extend(steps(&job(MOT, 1, &[]), &dir, Resume::Latest, None));
    assert_close(&reference, &joined, "4 ranks in 2 attention shards, then 1");
    let manifest = std::fs::read_to_string(dir.join("checkpoints/step-00000020/manifest.json")).unwrap();
    for name in [
        "layers.0.modality.1.attn_norm.weight",
        "layers.0.modality.1.attn.wq.weight",
        "layers.2.modality.1.attn.wo.weight",
        "layers.0.modality.1.ffn.w1.weight",
        "layers.1.modality.1.ffn_norm.weight",
        "layers.1.moe.experts.7.w2.weight",
    ] {
        assert!(manifest.contains(&format!("\"{name}\"")), "{name} in the checkpoint");
    }
    assert!(!manifest.contains("\"layers.1.modality.1.ffn.w1.weight\""), "an MoE layer has no dense FFN per modality");
}

/// `inputs` inputs of different alphabets (3 documents each) prepared as
/// as many modalities; returns the scratch folder and the prepared folder.
fn prepared(name: &str, inputs: usize) -> (common::Scratch, std::path::PathBuf) {
    let root = temp_dir(name);
    let mut dirs = Vec::new();
    for i in 0..inputs {
        let dir = root.join(format!("in-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for doc in 0..3 {
            let alphabet: &[u8] = [b"abcdefgh ", b"01234567.", b"XYZ,;!?-:"][i % 3];
            let text: Vec<u8> = (0..700).map(|j| alphabet[(j * (doc + 2) + j / 5) % alphabet.len()]).collect();
            std::fs::write(dir.join(format!("doc-{doc}.txt")), text).unwrap();
        }
        dirs.push(dir);
    }
    let out = root.join("prepared");
    prepare_with_modalities(&dirs, &out, &Tokenizer::Byte).unwrap();
    (root, out)
}

#[test]
fn prepared_modalities_change_inside_windows_and_match_across_layouts() {
    let (_scratch, data) = prepared("mot-prepared", 2);
    let index = std::fs::read_to_string(data.join("index.json")).unwrap();
    assert!(index.contains("\"modality_spans\""), "{index}");
    let source = format!("data.source=\"{}\"", data.display());
    let model = [MOT, &[source.as_str()][..]].concat();
    let one = run(&job(&model, 1, &[]), "mot-prepared-1");
    let sharded = run(&job(&model, 4, &["parallel.attn_tp=2"]), "mot-prepared-4");
    assert_close(&one, &sharded, "prepared data, 4 ranks in 2 attention shards");
}

#[test]
fn data_that_cannot_give_the_modalities_is_refused_at_start() {
    let (_scratch, three) = prepared("mot-three", 3);
    let unmarked = temp_dir("mot-unmarked");
    std::fs::write(unmarked.join("doc.txt"), "plain text ".repeat(40)).unwrap();
    let folder = unmarked.join("prepared");
    worker::data::prepare(&[unmarked.join("doc.txt")], &folder, &Tokenizer::Byte).unwrap();
    let cases = [
        (format!("data.source=\"{}\"", three.display()), "modality id 2", "index.json"),
        (format!("data.source=\"{}\"", folder.display()), "--modality-per-input", "prepared"),
        ("model.modalities=5".to_string(), "4 sources", "builtin"),
    ];
    for (set, what, names) in cases {
        let model = [MOT, &["model.n_experts=10", set.as_str()][..]].concat();
        let job = job(&model, 1, &[]);
        let options = common::options(&temp_dir("mot-refused"), Resume::No, None);
        let err = worker::train::train(&job, &options, &mut common::Recorder::default()).unwrap_err().to_string();
        assert!(err.contains(what) && err.contains(names), "{set}: {err}");
    }
}

#[test]
fn bad_modality_settings_name_the_key() {
    let cases: [(&[&str], &str); 6] = [
        (&["model.modalities=3"], "modalities"),
        (&["model.modalities=0"], "modalities"),
        (&["model.modalities=2", "model.top_k=3"], "top_k"),
        (&["model.modalities=2", "model.attention=\"moa\"", "model.attn_experts=2", "model.attn_top_k=1"], "attention"),
        (&["model.modalities=2", "model.qk_norm=true"], "qk_norm"),
        (&["model.modalities=2", "model.n_shared_experts=1"], "n_shared_experts"),
    ];
    for (sets, key) in cases {
        let mut all: Vec<String> =
            ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_experts=4"].map(String::from).into();
        all.extend(sets.iter().map(|s| s.to_string()));
        let err = worker::JobConfig::load(None, &all).map(|_| ()).expect_err(key).to_string();
        assert!(err.contains(key), "{sets:?}: {err}");
    }
}
