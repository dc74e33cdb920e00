//! `switchyard bench attention`: causal attention forward+backward at
//! growing sequence lengths — the plain core that saves its `seq x seq`
//! probabilities, the tiled one with an online softmax, and PyTorch's
//! `scaled_dot_product_attention` (`bench/torch_attention.py`) on the same
//! shapes and threads — with each one's peak memory. Every measurement runs
//! in a process of its own (this binary again, or python3), whose resident
//! peak over its resident size once the inputs exist is the figure.

use anyhow::{bail, Context, Result};
use model::ops::attention::{attention_backward, attention_forward, AttentionShape, Qkv, QkvGrads};
use model::ops::tiled_attention::{lse_len, tiled_attention_backward, tiled_attention_forward};
use model::rng::Rng;
use serde::{Deserialize, Serialize};
use std::process::Command;
use std::time::Instant;

/// What `bench attention` measures.
pub struct AttentionBench {
    pub seqs: Vec<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// Measure only this core at `seqs[0]` and print its JSON (a child run).
    pub one: Option<String>,
    pub json: bool,
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Forward+backward of one sequence.
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Resident peak over the resident size with the inputs allocated.
    pub peak_extra_mib: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    seq: usize,
    plain: Option<Measured>,
    tiled: Option<Measured>,
    sdpa: Option<Measured>,
}

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Forward+backward of `kind` ("plain" or "tiled") at `seq`, in this process.
fn measure(kind: &str, seq: usize, heads: usize, head_dim: usize) -> Result<Measured> {
    let shape = AttentionShape { batch: 1, seq, n_heads: heads, n_kv_heads: heads, head_dim };
    let len = seq * heads * head_dim;
    let mut rng = Rng::new(1);
    let (q, k, v, dout) =
        (rng.normal_vec(len, 1.0), rng.normal_vec(len, 1.0), rng.normal_vec(len, 1.0), rng.normal_vec(len, 1.0));
    let (mut dq, mut dk, mut dv, mut out) = (vec![0.0; len], vec![0.0; len], vec![0.0; len], vec![0.0; len]);
    let base = status_mib("VmRSS:");
    let qkv = Qkv { q_th: &q, k_tg: &k, v_tg: &v };
    let mut run = || match kind {
        "plain" => {
            let mut probs = vec![0.0f32; shape.probs_len()];
            attention_forward(shape, &q, &k, &v, &mut out, &mut probs);
            attention_backward(shape, qkv, &probs, &dout, QkvGrads { dq_th: &mut dq, dk_tg: &mut dk, dv_tg: &mut dv });
        }
        _ => {
            let mut lse = vec![0.0f32; lse_len(&shape)];
            tiled_attention_forward(shape, qkv, &mut out, &mut lse);
            let grads = QkvGrads { dq_th: &mut dq, dk_tg: &mut dk, dv_tg: &mut dv };
            tiled_attention_backward(shape, qkv, &out, &lse, &dout, grads);
        }
    };
    if !matches!(kind, "plain" | "tiled") {
        bail!("--one takes plain or tiled, not {kind}");
    }
    run();
    let (started, mut best, mut reps) = (Instant::now(), f64::MAX, 0);
    while reps < 2 || (started.elapsed().as_secs_f64() < 3.0 && reps < 20) {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    Ok(Measured { seconds: best, tokens_per_s: seq as f64 / best, peak_extra_mib: status_mib("VmHWM:") - base })
}

/// `kind` at `seq` in a child process (so each peak is its own).
fn child(kind: &str, seq: usize, heads: usize, head_dim: usize) -> Result<Measured> {
    let exe = std::env::current_exe().context("cannot find this binary to run a measurement")?;
    let out = Command::new(exe)
        .args(["bench", "attention", "--one", kind, "--seq", &seq.to_string()])
        .args(["--heads", &heads.to_string(), "--head-dim", &head_dim.to_string()])
        .output()
        .context("cannot run a measurement")?;
    if !out.status.success() {
        bail!("the {kind} attention at {seq} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("a measurement printed no JSON")
}

/// PyTorch's SDPA at `seq`, or why not.
fn sdpa(seq: usize, heads: usize, head_dim: usize) -> Result<Measured, String> {
    let args = [seq, heads, head_dim].map(|x| x.to_string());
    let install = "pip install torch (CPU); scripts/bench-kernels.sh does";
    let v = super::python_peer("torch_attention.py", &args, "torch", install)?;
    serde_json::from_value(v).map_err(|e| format!("bench/torch_attention.py printed no measurement: {e}"))
}

pub fn run(bench: AttentionBench) -> Result<()> {
    let (heads, head_dim) = (bench.heads, bench.head_dim);
    if let Some(kind) = &bench.one {
        let seq = *bench.seqs.first().context("--one needs one --seq")?;
        println!("{}", serde_json::to_string(&measure(kind, seq, heads, head_dim)?)?);
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut peer_note = String::new();
    for &seq in &bench.seqs {
        eprintln!("bench attention: T = {seq}, {heads} heads of {head_dim}: plain, tiled, PyTorch SDPA ...");
        let sdpa = sdpa(seq, heads, head_dim).map_err(|e| peer_note = e).ok();
        rows.push(Row {
            seq,
            plain: Some(child("plain", seq, heads, head_dim)?),
            tiled: Some(child("tiled", seq, heads, head_dim)?),
            sdpa,
        });
    }
    if bench.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "causal attention forward+backward, one sequence, {heads} heads of {head_dim}, fp32, {} threads",
        rayon::current_num_threads()
    );
    println!();
    println!("| T | plain tokens/s | plain peak MiB | tiled tokens/s | tiled peak MiB | SDPA tokens/s | SDPA peak MiB | tiled vs SDPA |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |m: &Option<Measured>| {
        m.as_ref().map_or(("-".into(), "-".into()), |m| {
            (format!("{:.0}", m.tokens_per_s), format!("{:.0}", m.peak_extra_mib))
        })
    };
    for r in &rows {
        let (p, pm) = cell(&r.plain);
        let (t, tm) = cell(&r.tiled);
        let (s, sm) = cell(&r.sdpa);
        let ratio = r
            .tiled
            .as_ref()
            .zip(r.sdpa.as_ref())
            .map_or("-".into(), |(t, s)| format!("{:.2}x", t.tokens_per_s / s.tokens_per_s));
        println!("| {} | {p} | {pm} | {t} | {tm} | {s} | {sm} | {ratio} |", r.seq);
    }
    println!();
    println!("peak MiB: the measuring process's resident peak over its size with the inputs allocated");
    if !peer_note.is_empty() {
        println!("peer: {peer_note}");
    }
    Ok(())
}
