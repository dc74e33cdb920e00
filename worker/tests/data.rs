//! Tests of the data layer: built-in corpus statistics, prepare/open round
//! trips and their errors, layout-independent sampling, eval windows.

use model::rng::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use worker::data::{
    eval_windows, prepare, prepare_with_shard_size, BuiltinCorpus, DataConfig, DataCursor, DataError, DataSource,
    PreparedData, Tokenizer, DATA_STREAM_TAG,
};

mod common;

/// A fresh, empty folder under the system temp dir, unique per test and
/// removed after it.
fn fresh_dir(name: &str) -> common::Scratch {
    common::temp_dir(&format!("data-{name}"))
}

fn write(path: &Path, text: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn entropy_of_counts<'a>(counts: impl Iterator<Item = &'a u64>) -> (f64, u64) {
    let counts: Vec<u64> = counts.copied().collect();
    let total: u64 = counts.iter().sum();
    let h = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    (h, total)
}

/// Draws `num` sequences of `len` tokens with their source index.
fn sample_builtin(corpus: &BuiltinCorpus, num: u64, len: usize) -> Vec<(usize, Vec<u32>)> {
    (0..num)
        .map(|i| {
            let mut rng = Rng::for_stream(11, &[DATA_STREAM_TAG, i]);
            let mut seq = vec![0; len];
            let s = corpus.generate(&mut rng, &mut seq);
            (s, seq)
        })
        .collect()
}

#[test]
fn builtin_is_deterministic_per_index() {
    let a = DataSource::Builtin(BuiltinCorpus::new());
    let b = DataSource::Builtin(BuiltinCorpus::new());
    let mut x = vec![0; 65];
    let mut y = vec![0; 65];
    a.sequence(5, 17, 65, &mut x).unwrap();
    b.sequence(5, 17, 65, &mut y).unwrap();
    assert_eq!(x, y, "same (seed, index) must give the same sequence");
    b.sequence(5, 18, 65, &mut y).unwrap();
    assert_ne!(x, y, "different indices must differ");
    b.sequence(6, 17, 65, &mut y).unwrap();
    assert_ne!(x, y, "different seeds must differ");
    assert!(x.iter().all(|&t| t < 256));
}

#[test]
fn builtin_entropy_numbers_are_in_the_intended_range() {
    let c = BuiltinCorpus::new();
    let floor = c.entropy_floor_nats();
    let unigram = c.unigram_entropy_nats();
    println!("entropy floor {floor:.4} nats, unigram {unigram:.4} nats");
    assert!((1.0..=1.6).contains(&floor), "floor {floor}");
    assert!(unigram >= 3.0, "unigram {unigram}");
    assert!((c.marginal().iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn builtin_sample_conditional_entropy_matches_floor() {
    let corpus = BuiltinCorpus::new();
    let mut counts: HashMap<(usize, u32, u32), HashMap<u32, u64>> = HashMap::new();
    for (s, seq) in sample_builtin(&corpus, 4000, 512) {
        for w in seq.windows(3) {
            *counts.entry((s, w[0], w[1])).or_default().entry(w[2]).or_default() += 1;
        }
    }
    let (mut sum, mut n) = (0.0, 0u64);
    for next in counts.values() {
        let (h, total) = entropy_of_counts(next.values());
        sum += h * total as f64;
        n += total;
    }
    let empirical = sum / n as f64;
    let floor = corpus.entropy_floor_nats();
    assert!((empirical - floor).abs() / floor < 0.02, "empirical {empirical} vs floor {floor}");
    // Every observed transition must be one the source allows.
    for (&(s, a, b), next) in &counts {
        let allowed = corpus.next_distribution(s, a as u8, b as u8).unwrap();
        assert!(next.keys().all(|&c| allowed.iter().any(|&(x, _)| x as u32 == c)));
    }
}

#[test]
fn builtin_sample_unigram_entropy_matches_marginal() {
    let corpus = BuiltinCorpus::new();
    let mut counts = vec![0u64; 256];
    for (_, seq) in sample_builtin(&corpus, 4000, 256) {
        for t in seq {
            counts[t as usize] += 1;
        }
    }
    let (empirical, _) = entropy_of_counts(counts.iter());
    let analytic = corpus.unigram_entropy_nats();
    assert!((empirical - analytic).abs() / analytic < 0.01, "empirical {empirical} vs analytic {analytic}");
}

#[test]
fn prepare_round_trip_with_byte_tokenizer() {
    let root = fresh_dir("roundtrip");
    let input = root.join("in");
    write(&input.join("b/2.txt"), b"second");
    write(&input.join("a.txt"), b"first ");
    write(&input.join("b/1.txt"), b"middle ");
    write(&input.join(".hidden"), b"NOPE");
    write(&input.join(".git/config"), b"NOPE");
    let extra = root.join("extra.txt");
    write(&extra, b"!");
    let out = root.join("out");

    let report = prepare_with_shard_size(&[input, extra], &out, &Tokenizer::Byte, 8).unwrap();
    let expected = b"first middle second!";
    assert_eq!(report.documents, 4);
    assert_eq!(report.tokens, expected.len() as u64, "byte tokenizer: one token per byte");
    assert_eq!(report.bytes, expected.len() as u64);
    assert_eq!(report.shards, 3);

    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index,
        serde_json::json!({
            "format_version": 1,
            "vocab": 256,
            "tokenizer": "byte",
            "shards": [
                {"file": "tokens-00000.bin", "tokens": 8},
                {"file": "tokens-00001.bin", "tokens": 8},
                {"file": "tokens-00002.bin", "tokens": 4},
            ],
            "total_tokens": 20,
            "documents": 4,
        })
    );
    assert_eq!(
        std::fs::read(out.join("tokens-00002.bin")).unwrap(),
        [b'o', 0, 0, 0, b'n', 0, 0, 0, b'd', 0, 0, 0, b'!', 0, 0, 0]
    );

    let data = PreparedData::open(&out).unwrap();
    let tokens: Vec<u8> = data.tokens().iter().map(|&t| t as u8).collect();
    assert_eq!(tokens, expected);
    assert_eq!(data.vocab(), 256);
    assert_eq!(data.tokenizer_path(), None);

    // Preparing into the same folder again would mix runs: refused.
    let again = prepare(&[root.join("extra.txt")], &out, &Tokenizer::Byte).unwrap_err();
    assert!(matches!(again, DataError::OutputNotEmpty { .. }), "{again}");
}

#[test]
fn prepare_reports_missing_input() {
    let root = fresh_dir("missing-input");
    let err = prepare(&[root.join("nope.txt")], &root.join("out"), &Tokenizer::Byte).unwrap_err();
    assert!(err.to_string().contains("nope.txt"), "{err}");
}

#[test]
fn open_without_index_says_to_run_prepare() {
    let root = fresh_dir("no-index");
    let err = PreparedData::open(&root).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::MissingIndex { .. }));
    assert!(msg.contains("switchyard data prepare") && msg.contains(&*root.to_string_lossy()), "{msg}");
}

/// `text` prepared into `<scratch>/out`; the scratch folder lives as long
/// as the caller keeps it.
fn prepared_bytes(name: &str, text: &[u8]) -> (common::Scratch, PathBuf) {
    let root = fresh_dir(name);
    write(&root.join("doc.txt"), text);
    prepare(&[root.join("doc.txt")], &root.join("out"), &Tokenizer::Byte).unwrap();
    let out = root.join("out");
    (root, out)
}

#[test]
fn open_truncated_shard_names_the_file() {
    let (_root, out) = prepared_bytes("truncated", b"hello world");
    let shard = out.join("tokens-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let err = PreparedData::open(&out).unwrap_err();
    assert!(matches!(err, DataError::ShardSizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("tokens-00000.bin"), "{err}");
}

#[test]
fn open_out_of_vocab_token_names_the_file() {
    let (_root, out) = prepared_bytes("oov", b"hello world");
    let shard = out.join("tokens-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[4..8].copy_from_slice(&300u32.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let err = PreparedData::open(&out).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::TokenOutOfVocab { token: 300, position: 1, .. }), "{msg}");
    assert!(msg.contains("tokens-00000.bin") && msg.contains("300"), "{msg}");
}

#[test]
fn batch_is_independent_of_layout() {
    let text: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sources = [
        DataSource::Builtin(BuiltinCorpus::new()),
        DataSource::Prepared(PreparedData::open(&prepared_bytes("layout", &text).1).unwrap()),
    ];
    for src in &sources {
        for step in [0, 3] {
            let whole = src.batch_for_step(9, step, 8, 0, 8, 33).unwrap();
            let mut halves = src.batch_for_step(9, step, 8, 0, 4, 33).unwrap();
            halves.extend(src.batch_for_step(9, step, 8, 4, 4, 33).unwrap());
            assert_eq!(whole, halves);
            // One sequence at a time, in any order, gives the same tokens.
            for i in (0..8).rev() {
                let one = src.batch_for_step(9, step, 8, i, 1, 33).unwrap();
                assert_eq!(one, whole[i * 33..(i + 1) * 33]);
            }
        }
        assert_ne!(src.batch_for_step(9, 0, 8, 0, 8, 33).unwrap(), src.batch_for_step(9, 1, 8, 0, 8, 33).unwrap());
    }
}

#[test]
fn every_epoch_visits_every_window_once() {
    // 200 windows of 4 tokens whose first token is the window's number.
    let text: Vec<u8> = (0..200u8).flat_map(|w| [w, 1, 2, 3]).chain([9, 9]).collect();
    let src = DataSource::Prepared(PreparedData::open(&prepared_bytes("epochs", &text).1).unwrap());
    let mut orders = Vec::new();
    for epoch in 0..2u64 {
        let mut seen: Vec<u32> = (0..200)
            .map(|i| {
                let mut seq = [0; 4];
                src.sequence(3, epoch * 200 + i, 4, &mut seq).unwrap();
                assert_eq!(seq[1..], [1, 2, 3], "windows are aligned, never overlapping");
                seq[0]
            })
            .collect();
        orders.push(seen.clone());
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<u32>>(), "epoch {epoch}");
    }
    assert_ne!(orders[0], orders[1], "each epoch has its own order");
    assert_ne!(orders[0], (0..200).collect::<Vec<u32>>(), "windows are shuffled");
}

#[test]
fn too_little_data_for_one_sequence_is_an_error() {
    let src = DataSource::Prepared(PreparedData::open(&prepared_bytes("short", b"tiny").1).unwrap());
    let err = src.check_len(5).unwrap_err();
    assert!(matches!(err, DataError::TooShort { tokens: 4, len: 5, .. }), "{err}");
    assert!(src.batch_for_step(1, 0, 1, 0, 1, 5).is_err());
    assert!(src.check_len(4).is_ok());
}

#[test]
fn cursor_round_trips_through_serde() {
    let mut c = DataCursor::after_steps(3, 16);
    c.advance(16);
    assert_eq!(c.sequences_consumed, 64);
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(json, r#"{"sequences_consumed":64}"#);
    assert_eq!(serde_json::from_str::<DataCursor>(&json).unwrap(), c);
}

#[test]
fn eval_windows_overlap_by_one_token() {
    let t: Vec<u32> = (0..10).collect();
    let w: Vec<&[u32]> = eval_windows(&t, 3).collect();
    assert_eq!(w, [&[0, 1, 2, 3][..], &[3, 4, 5, 6][..], &[6, 7, 8, 9][..]]);
    assert_eq!(eval_windows(&t, 9).count(), 1);
    assert_eq!(eval_windows(&t, 10).count(), 0);
}

#[test]
fn data_config_defaults_and_validation() {
    let c: DataConfig = toml::from_str("").unwrap();
    assert_eq!((c.source.as_str(), c.tokenizer.as_str()), ("builtin", "byte"));
    c.validate().unwrap();
    assert!(matches!(c.open_source().unwrap(), DataSource::Builtin(_)));
    assert!(toml::from_str::<DataConfig>("sorce = \"x\"").unwrap_err().to_string().contains("sorce"));
    let empty = DataConfig { source: " ".into(), ..DataConfig::default() };
    assert!(empty.validate().unwrap_err().to_string().contains("source"));
    let bad_tok = DataConfig { tokenizer: "gpt2".into(), ..DataConfig::default() };
    assert!(bad_tok.validate().unwrap_err().to_string().contains("tokenizer.json"));
    let missing = DataConfig { source: "/nonexistent/switchyard-data".into(), ..DataConfig::default() };
    assert!(missing.open_source().unwrap_err().to_string().contains("switchyard data prepare"));
}

/// A tiny word-level tokenizer.json (no merges, whitespace pre-tokenizer).
const WORD_LEVEL_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}, "unk_token": "[UNK]"}
}"#;

#[cfg(feature = "hf-tokenizer")]
#[test]
fn hf_tokenizer_encodes_and_prepares() {
    let root = fresh_dir("hf");
    let tok_path = root.join("tokenizer.json");
    write(&tok_path, WORD_LEVEL_JSON.as_bytes());
    let tok = Tokenizer::from_setting(tok_path.to_str().unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.encode(b"hello world !").unwrap(), [1, 2, 3]);
    assert_eq!(tok.encode(b"hello moon").unwrap(), [1, 0]);
    assert!(tok.encode(&[0xff, 0xfe]).is_err());

    write(&root.join("in/a.txt"), b"hello hello");
    write(&root.join("in/b.txt"), b"world !");
    let out = root.join("out");
    let report = prepare(&[root.join("in")], &out, &tok).unwrap();
    assert_eq!((report.documents, report.tokens), (2, 4));
    let data = PreparedData::open(&out).unwrap();
    assert_eq!(data.tokens(), [1, 1, 2, 3]);
    assert_eq!(data.index().tokenizer, "tokenizer.json");
    assert_eq!(data.vocab(), 4);
    assert_eq!(data.tokenizer_path(), Some(out.join("tokenizer.json")));
    assert!(out.join("tokenizer.json").is_file(), "tokenizer copied next to the shards");
}

#[cfg(not(feature = "hf-tokenizer"))]
#[test]
fn hf_tokenizer_without_feature_says_how_to_rebuild() {
    let root = fresh_dir("hf-off");
    let tok_path = root.join("tokenizer.json");
    write(&tok_path, WORD_LEVEL_JSON.as_bytes());
    let err = Tokenizer::load(&tok_path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("--features worker/hf-tokenizer") && msg.contains("tokenizer.json"), "{msg}");
}
