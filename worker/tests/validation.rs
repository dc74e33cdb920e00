//! Validation during training (`[train] eval_every`, `[data] eval_source`):
//! every `eval_every` steps each rank runs its share of the held-out
//! windows forward through the same exchange and shards as training, so
//! the loss is the same on every layout (within 1e-6), and it is logged in
//! the step's metrics (none between).

mod common;

use common::{fresh_run as run, layout_job as job, temp_dir};
use worker::data::BuiltinCorpus;

#[test]
fn validation_loss_is_the_same_on_every_layout() {
    let dir = temp_dir("validation-text");
    // 2,000 bytes of the built-in corpus's held-out text: 117 windows of 17.
    let text = &BuiltinCorpus::new().held_out_text(8, 4242)[..2000];
    let path = dir.join("held-out.txt");
    std::fs::write(&path, text).unwrap();
    let source = format!("data.eval_source=\"{}\"", path.display());
    let model = ["train.eval_every=10", source.as_str()];
    let one = run(&job(&model, 1, &[]), "validation-1");
    for m in &one {
        assert_eq!(m.eval_loss.is_some(), m.step % 10 == 0, "step {}: {:?}", m.step, m.eval_loss);
    }
    // A folder made by `data prepare` of the same text: the same tokens, the same loss.
    let folder = dir.join("prepared");
    worker::data::prepare(std::slice::from_ref(&path), &folder, &worker::data::Tokenizer::Byte).unwrap();
    let source = format!("data.eval_source=\"{}\"", folder.display());
    let prepared = run(&job(&["train.eval_every=10", source.as_str()], 1, &[]), "validation-prepared");
    assert_eq!(prepared[19].eval_loss, one[19].eval_loss, "a prepared folder of the same text");
    let (first, last) = (one[9].eval_loss.unwrap(), one[19].eval_loss.unwrap());
    assert!(last < first, "the held-out loss falls as the model learns: {first} -> {last}");
    let layouts: [(usize, &[&str]); 5] =
        [(2, &[]), (4, &[]), (4, &["parallel.ep=2"]), (2, &["parallel.attn_tp=2"]), (4, &["parallel.attn_tp=2"])];
    for (i, (ranks, extra)) in layouts.into_iter().enumerate() {
        let other = run(&job(&model, ranks, extra), &format!("validation-layout-{i}"));
        for (a, b) in one.iter().zip(&other) {
            let (a, b) = (a.eval_loss.unwrap_or(0.0), b.eval_loss.unwrap_or(0.0));
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{ranks} ranks {extra:?}: eval loss {b} vs {a}");
        }
    }
}

#[test]
fn validation_settings_are_checked() {
    let err = worker::JobConfig::load(None, &["train.eval_every=5".to_string()]).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("eval_every") && err.contains("eval_source"), "{err}");
    let sets = ["train.eval_every=5", "data.eval_source=\"/nonexistent/held-out.txt\""];
    let job = job(&sets, 1, &[]);
    let dir = temp_dir("validation-missing");
    let options = common::options(&dir, worker::api::Resume::No, None);
    let err = worker::train::train(&job, &options, &mut common::Recorder::default()).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/held-out.txt"), "{err}");
}
