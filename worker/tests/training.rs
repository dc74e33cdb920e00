//! The training loop end to end: golden losses, exact resume, refusals.

mod common;

use common::{micro_job, options, temp_dir, Recorder};
use worker::api::Resume;
use worker::train::train;

fn run(job: &worker::JobConfig, dir: &std::path::Path, resume: Resume) -> Recorder {
    run_until(job, dir, resume, None)
}

fn run_until(job: &worker::JobConfig, dir: &std::path::Path, resume: Resume, stop_at: Option<u64>) -> Recorder {
    let mut rec = Recorder::default();
    train(job, &options(dir, resume, stop_at), &mut rec).unwrap();
    rec
}

fn losses(rec: &Recorder) -> Vec<f64> {
    rec.steps.iter().map(|m| m.loss).collect()
}

/// The CPU's vector extensions that select the GEMM kernels: two machines
/// with the same set sum in the same order.
fn cpu_kernel_features() -> String {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (name, present) in [
        ("avx2", std::is_x86_feature_detected!("avx2")),
        ("fma", std::is_x86_feature_detected!("fma")),
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
    ] {
        if present {
            features.push(name);
        }
    }
    format!("{}:{}", std::env::consts::ARCH, features.join("+"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Golden {
    cpu: String,
    losses: Vec<f64>,
}

/// The first 20 losses of a fixed tiny job, stored in tests/golden and
/// reproduced exactly on a CPU with the same kernel features (a CPU with
/// other vector units sums in another order: there they must agree to 1e-5
/// relative). Regenerate after a deliberate change of the math with
/// `SWITCHYARD_BLESS=1 cargo test -p worker --test training golden`.
#[test]
fn golden_losses_are_reproduced_exactly() {
    let dir = temp_dir("golden");
    let job = micro_job(&["model.n_shared_experts=1", "model.capacity_factor=1.25"]);
    let got = losses(&run(&job, &dir, Resume::No));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/micro_job_losses.json");
    let cpu = cpu_kernel_features();
    if std::env::var_os("SWITCHYARD_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let golden = Golden { cpu: cpu.clone(), losses: got.clone() };
        std::fs::write(&path, serde_json::to_string_pretty(&golden).unwrap()).unwrap();
    }
    let text = std::fs::read_to_string(&path).expect("golden file missing: run with SWITCHYARD_BLESS=1 once");
    let want: Golden = serde_json::from_str(&text).unwrap();
    assert_eq!(got.len(), 20);
    assert_eq!(want.losses.len(), 20);
    let exact = want.cpu == cpu;
    if !exact {
        eprintln!("golden losses were recorded on {}, this CPU is {cpu}: comparing to 1e-5 relative", want.cpu);
    }
    for (i, (g, w)) in got.iter().zip(&want.losses).enumerate() {
        if exact {
            assert_eq!(g.to_bits(), w.to_bits(), "step {}: loss {g} differs from golden {w}", i + 1);
        } else {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "step {}: loss {g} vs golden {w}", i + 1);
        }
    }
    // It learns: the last loss is well below the first.
    assert!(got[19] < got[0] - 0.3, "losses {got:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// 20 steps straight == stopped after 10 steps, then resumed for 10:
/// bit-identical losses and final weights. (Stopping, not a 10-step job:
/// the cosine schedule spans `train.steps`.)
#[test]
fn resume_continues_bit_exactly() {
    resumes_bit_exactly(&[], "");
}

/// The same with Qwen3's query/key head norms (their weights are resumed too).
#[test]
fn resume_with_query_key_norms_continues_bit_exactly() {
    resumes_bit_exactly(&["model.qk_norm=true"], "-qk");
}

fn resumes_bit_exactly(sets: &[&str], tag: &str) {
    let job = micro_job(sets);
    let straight_dir = temp_dir(&format!("straight{tag}"));
    let straight = run(&job, &straight_dir, Resume::No);

    let split_dir = temp_dir(&format!("split{tag}"));
    let head = run_until(&job, &split_dir, Resume::No, Some(10));
    let tail = run(&job, &split_dir, Resume::Latest);
    let mut joined = losses(&head);
    joined.extend(losses(&tail));
    let straight_losses = losses(&straight);
    assert_eq!(joined.len(), 20);
    for (i, (a, b)) in straight_losses.iter().zip(&joined).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "step {}: {a} vs {b}", i + 1);
    }

    // Final weights: both runs committed step 20.
    let load = |dir: &std::path::Path| {
        let store = checkpoint::CheckpointStore::open(dir.join("checkpoints").to_str().unwrap()).unwrap();
        let manifest = store.read_manifest(20).unwrap();
        store.read_tensors(20, &manifest, |_| true).unwrap()
    };
    let (a, b) = (load(&straight_dir), load(&split_dir));
    assert_eq!(a.len(), b.len());
    for set in sets.iter().filter(|s| s.starts_with("model.qk_norm")) {
        assert!(a.contains_key("layers.1.attn.k_norm.weight"), "{set}: the head norms are checkpointed");
    }
    for (name, (_, data)) in &a {
        let other = &b[name].1;
        assert!(data.iter().zip(other).all(|(x, y)| x.to_bits() == y.to_bits()), "tensor {name} differs");
    }
    std::fs::remove_dir_all(&straight_dir).ok();
    std::fs::remove_dir_all(&split_dir).ok();
}

#[test]
fn a_fresh_run_refuses_to_overwrite_checkpoints() {
    let dir = temp_dir("refuse");
    let job = micro_job(&["train.steps=10"]);
    run(&job, &dir, Resume::No);
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let err = train(&job, &options(&dir, Resume::No, None), &mut Recorder::default()).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before, "metrics were touched");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resuming_with_another_model_is_refused_naming_the_keys() {
    let dir = temp_dir("incompatible");
    run(&micro_job(&["train.steps=10"]), &dir, Resume::No);
    let other = micro_job(&["model.d_model=64"]);
    let err = train(&other, &options(&dir, Resume::Latest, None), &mut Recorder::default()).unwrap_err().to_string();
    assert!(err.contains("d_model") && err.contains("different model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
