//! `switchyard bench layer`: how fast the CPU kernels are, measured against
//! this machine's own peak GEMM and against JAX in the same run.
//!
//! Rows: a large square GEMM (the peak), the expert GEMMs at the layer's
//! shapes, the MoE layer forward+backward at a few sizes in fp32 and bf16
//! (`[train] precision`), and a full training step of the default model in
//! both. The peers are the same MoE layer in JAX (`bench/jax_moe_layer.py`,
//! jit on CPU, fp32) and in PyTorch (`bench/torch_moe_layer.py`, eager fp32
//! and bf16 autocast), same thread count; when one is missing the row says
//! how to get it (`scripts/bench-layer.sh` installs them).
//! Memory: the default job's peak resident set against the analytic sum of
//! parameters, gradients, optimizer state and saved activations.

use anyhow::{Context, Result};
use model::gemm::{self, matmul_nt, Precision};
use model::model::{forward_backward, LossScales, MicroBatch};
use model::moe::layer::{moe_backward, moe_forward, MoeBackwardInput, MoeGrads, MoeLayer};
use model::moe::{LocalExperts, RouterLossScales};
use model::ops::rope::RopeTable;
use model::rng::Rng;
use model::{ModelConfig, ModelWeights};
use serde::Serialize;
use std::process::Command;
use std::time::Instant;
use worker::JobConfig;

/// One MoE layer shape to measure.
#[derive(Debug, Clone, Serialize)]
struct LayerCase {
    name: String,
    d_model: usize,
    ffn_hidden: usize,
    n_experts: usize,
    top_k: usize,
    tokens: usize,
    /// MoE++'s computation-free experts beside the FFN experts: (constant,
    /// copy, zero); the JAX peer has none of these.
    #[serde(skip)]
    free: (usize, usize, usize),
}

#[derive(Debug, Default, Serialize)]
struct Report {
    threads: usize,
    peak_gflops: f64,
    expert_gemm: Vec<GemmRow>,
    layers: Vec<LayerRow>,
    computation_free: Vec<FreeRow>,
    step: Option<StepRow>,
    memory: Vec<MemoryRow>,
}

#[derive(Debug, Serialize)]
struct GemmRow {
    shape: String,
    gflops: f64,
    share_of_peak: f64,
}

#[derive(Debug, Serialize)]
struct LayerRow {
    case: LayerCase,
    tokens_per_s: f64,
    gflops: f64,
    share_of_peak: f64,
    jax_tokens_per_s: Option<f64>,
    jax_note: String,
    /// The same layer with `[train] precision = "bf16"` (None: not measured,
    /// on a CPU without bf16 units unless `--bf16` asks).
    bf16_tokens_per_s: Option<f64>,
    torch_fp32_tokens_per_s: Option<f64>,
    torch_bf16_tokens_per_s: Option<f64>,
    torch_note: String,
    /// Rounds measured; the rates above are their medians.
    rounds: usize,
    /// switchyard over PyTorch, one ratio per round (each round measures
    /// both within seconds of each other), fp32 and bf16.
    fp32_vs_torch: Vec<f64>,
    bf16_vs_torch: Vec<f64>,
}

/// One round of a layer row: switchyard in fp32 (and bf16 when measured),
/// then its peers.
struct LayerRound {
    fp32: f64,
    bf16: Option<f64>,
    jax: (Option<f64>, String),
    /// PyTorch's fp32 and (when measured) bf16 autocast tokens/s.
    torch: (Option<(f64, Option<f64>)>, String),
}

impl LayerRound {
    fn measure(case: &LayerCase, bf16: bool) -> Self {
        let (fp32, _) = bench_moe_layer(case);
        let bf16 = bf16.then(|| in_precision(Precision::Bf16, || bench_moe_layer(case)).0);
        Self { fp32, bf16, jax: bench_jax(case), torch: bench_torch(case, bf16.is_some()) }
    }
}

/// A layer row from its rounds: medians of every rate, the per-round ratios.
fn layer_row(case: &LayerCase, rounds: Vec<LayerRound>, peak_gflops: f64) -> LayerRow {
    let of = |f: &dyn Fn(&LayerRound) -> Option<f64>| {
        let values: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| super::median(values))
    };
    let tokens_per_s = of(&|r| Some(r.fp32)).unwrap_or(0.0);
    let gflops = layer_flops(case) * tokens_per_s / case.tokens as f64 / 1e9;
    let ratios = |f: fn(&LayerRound) -> Option<f64>| rounds.iter().filter_map(f).collect::<Vec<_>>();
    let last = rounds.last().expect("at least one round");
    LayerRow {
        case: case.clone(),
        rounds: rounds.len(),
        tokens_per_s,
        gflops,
        share_of_peak: gflops / peak_gflops,
        jax_tokens_per_s: of(&|r| r.jax.0),
        jax_note: last.jax.1.clone(),
        bf16_tokens_per_s: of(&|r| r.bf16),
        torch_fp32_tokens_per_s: of(&|r| r.torch.0.map(|t| t.0)),
        torch_bf16_tokens_per_s: of(&|r| r.torch.0.and_then(|t| t.1)),
        torch_note: last.torch.1.clone(),
        fp32_vs_torch: ratios(|r| r.torch.0.map(|t| r.fp32 / t.0)),
        bf16_vs_torch: ratios(|r| r.bf16.zip(r.torch.0.and_then(|t| t.1)).map(|(ours, theirs)| ours / theirs)),
    }
}

/// The MoE layer with and without MoE++'s computation-free experts.
#[derive(Debug, Serialize)]
struct FreeRow {
    name: String,
    tokens: usize,
    /// FFN expert rows per token (top_k without computation-free experts).
    ffn_rows_per_token: f64,
    tokens_per_s: f64,
    /// Over the same layer without computation-free experts.
    speedup: f64,
}

#[derive(Debug, Serialize)]
struct StepRow {
    tokens_per_s: f64,
    seconds_per_step: f64,
    bf16_tokens_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct MemoryRow {
    job: String,
    peak_rss_mib: f64,
    /// The largest anonymous (heap, stacks, buffers) and file-backed
    /// (the executable's and libraries' pages) resident sets seen.
    peak_anon_mib: f64,
    peak_file_mib: f64,
    analytic_mib: f64,
    ratio: f64,
    anon_ratio: f64,
}

/// Median seconds of `reps` runs after one warm-up.
fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let mut rng = Rng::new(1);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(n * k, 1.0);
    let mut c = vec![0.0; m * n];
    let s = time_median(reps, || matmul_nt(m, k, n, &a, &b, &mut c, false));
    2.0 * (m * k * n) as f64 / s / 1e9
}

/// Forward+backward FLOPs of the routed experts: 3 GEMMs of 2·rows·D·F
/// forward, twice that backward.
fn layer_flops(case: &LayerCase) -> f64 {
    let rows = (case.tokens * case.top_k) as f64;
    3.0 * 3.0 * 2.0 * rows * case.d_model as f64 * case.ffn_hidden as f64
}

fn layer_config(case: &LayerCase) -> ModelConfig {
    ModelConfig {
        d_model: case.d_model,
        ffn_hidden: case.ffn_hidden,
        n_experts: case.n_experts,
        top_k: case.top_k,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 4,
        capacity_factor: 0.0,
        constant_experts: case.free.0,
        copy_experts: case.free.1,
        zero_experts: case.free.2,
        ..ModelConfig::default()
    }
}

/// Tokens/s of one MoE layer forward+backward (router, dispatch, experts,
/// combine), and its FFN expert rows per token.
fn bench_moe_layer(case: &LayerCase) -> (f64, f64) {
    let cfg = layer_config(case);
    let weights = ModelWeights::init(&cfg, 7);
    let mut grads = weights.zeros_like();
    let mut rng = Rng::new(3);
    let x_td = rng.normal_vec(case.tokens * case.d_model, 1.0);
    let dout_td = rng.normal_vec(case.tokens * case.d_model, 1.0);
    let layer = &weights.dense.layers[0];
    let mut ffn_rows = 0;
    let s = time_median(5, || {
        let mut gdense = grads.dense.layers[0].clone();
        let mut experts = LocalExperts::new(&cfg, &weights.experts, &mut grads.experts);
        let moe = MoeLayer { cfg: &cfg, layer: 0, w: layer, prev_logits_te: None, modality_t: &[] };
        let (_, mut cache) = moe_forward(moe, &x_td, case.tokens, &mut experts, &mut model::shards::NoShards).unwrap();
        ffn_rows = cache.plan.num_rows();
        let mut dx_td = vec![0.0; x_td.len()];
        let y_ad = std::mem::take(&mut cache.y_ad);
        let input = MoeBackwardInput { x_td: &x_td, cache: &cache, dout_td: &dout_td };
        let grads = MoeGrads { gw: &mut gdense, dx_td: &mut dx_td, dlogits_in_te: None, dprev_logits_te: None };
        let scales = RouterLossScales { aux: 0.01, z: 0.001, seq: 0.0 };
        moe_backward(moe, (input, y_ad), scales, grads, &mut experts).unwrap();
    });
    (case.tokens as f64 / s, ffn_rows as f64 / case.tokens as f64)
}

/// `f` with this process's products in `precision` (fp32 again after).
fn in_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    gemm::set_precision(precision);
    let out = f();
    gemm::set_precision(Precision::Fp32);
    out
}

/// The same layer in PyTorch (`bench/torch_moe_layer.py`): eager fp32 and
/// (if `bf16`) bf16 autocast tokens/s, or a note saying why not.
fn bench_torch(case: &LayerCase, bf16: bool) -> (Option<(f64, Option<f64>)>, String) {
    let mut args = vec![serde_json::to_string(case).expect("case serialises")];
    if !bf16 {
        args.push("--fp32-only".into());
    }
    match super::python_peer("torch_moe_layer.py", &args, "torch", TORCH_INSTALL) {
        Ok(v) => match v["fp32"].as_f64().filter(|_| !bf16 || v["bf16"].is_f64()) {
            Some(fp32) => (
                Some((fp32, v["bf16"].as_f64())),
                format!("PyTorch {} eager, {} threads", v["torch"].as_str().unwrap_or("?"), v["threads"]),
            ),
            None => (None, format!("bench/torch_moe_layer.py printed no rates: {v}")),
        },
        Err(note) => (None, note),
    }
}

/// How to get PyTorch for the peers.
const TORCH_INSTALL: &str = "run scripts/bench-layer.sh (pip install torch, CPU)";

/// The same layer in JAX, run by `bench/jax_moe_layer.py` (XLA's CPU
/// runtime uses every core, as rayon does); None with a note when JAX is missing.
fn bench_jax(case: &LayerCase) -> (Option<f64>, String) {
    let args = [serde_json::to_string(case).expect("case serialises")];
    match super::python_peer("jax_moe_layer.py", &args, "jax", "run scripts/bench-layer.sh (pip install jax)") {
        Ok(v) => match v["tokens_per_s"].as_f64() {
            Some(tps) => (Some(tps), "jax.jit on CPU".into()),
            None => (None, format!("bench/jax_moe_layer.py printed no tokens_per_s: {v}")),
        },
        Err(note) => (None, note),
    }
}

/// Tokens/s of full optimizer-free training steps (forward+backward of every micro-batch) of `job`.
fn bench_step(job: &JobConfig) -> StepRow {
    let cfg = &job.model;
    let weights = ModelWeights::init(cfg, job.train.seed);
    let mut grads = weights.zeros_like();
    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let data = job.data.open_source().expect("built-in data");
    let micro = job.train.micro_batch_size;
    let accumulation = job.grad_accumulation(1);
    let tokens = (job.train.global_batch_size * cfg.seq_len) as f64;
    let scales = LossScales { ce: 1.0 / tokens as f32, aux: 0.01, z: 0.001, seq: 0.0, attn_aux: 0.01 };
    let mut step = 0;
    let s = time_median(5, || {
        for m in 0..accumulation {
            let batch = data
                .batch_for_step(job.train.seed, step, job.train.global_batch_size, m * micro, micro, cfg.seq_len + 1)
                .unwrap();
            let mut experts = LocalExperts::new(cfg, &weights.experts, &mut grads.experts);
            let mb = MicroBatch { tokens: &batch, batch: micro, modality: &[] };
            forward_backward(cfg, &rope, &weights.dense, &mut grads.dense, &mut experts, mb, scales).unwrap();
        }
        step += 1;
    });
    StepRow { tokens_per_s: tokens / s, seconds_per_step: s, bf16_tokens_per_s: None }
}

/// The jobs whose peak memory `bench layer` measures: the default job, and
/// the same job at the width of the first MoE-layer row, where the model
/// rather than the program's fixed costs (its code, the GEMM library's
/// per-thread packing buffers) makes up the memory.
const MEMORY_JOBS: [(&str, &[&str]); 2] = [
    ("default job", &[]),
    (
        "default job at D512 F1024 (8 heads)",
        &["model.d_model=512", "model.ffn_hidden=1024", "model.n_heads=8", "model.n_kv_heads=4"],
    ),
];

/// Peak RSS of a child `switchyard train` of the default job with `sets`
/// against the analytic sum of what it must hold.
fn bench_memory(name: &str, sets: &[&str]) -> Result<MemoryRow> {
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.extend(["train.steps=10".to_string(), "checkpoint.every=0".to_string()]);
    let job = JobConfig::load(None, &sets)?;
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("switchyard-bench-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let set_flags: String = sets.iter().map(|s| format!(" --set {s}")).collect();
    // Samples /proc every 50 ms: VmHWM (the kernel's own peak), and the
    // largest anonymous and file-backed resident sets (no peak is kept
    // for those, so sampling may miss a short one).
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "\"{}\" train --quiet{set_flags} --run-dir \"{}\" >/dev/null 2>&1 & \
             pid=$!; peak=0; anon=0; file=0; while kill -0 $pid 2>/dev/null; do \
             s=$(awk '/VmHWM|RssAnon|RssFile/ {{printf \"%s \", $2}}' /proc/$pid/status 2>/dev/null); \
             set -- $s; if [ $# -eq 3 ]; then peak=$1; [ $2 -gt $anon ] && anon=$2; [ $3 -gt $file ] && file=$3; fi; \
             sleep 0.05; done; wait $pid; echo $peak $anon $file",
            exe.display(),
            dir.display()
        ))
        .output()
        .context("cannot start the memory probe")?;
    let _ = std::fs::remove_dir_all(&dir);
    let probe = String::from_utf8_lossy(&status.stdout);
    let kib: Vec<f64> = probe.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [peak_kib, anon_kib, file_kib] = kib[..] else {
        anyhow::bail!("memory probe gave no VmHWM/RssAnon/RssFile (got {probe:?})");
    };
    // One rank holding the whole job in fp32: the simulator's memory model.
    let shape = crate::experiments::simulate::shape_of(&job, simulator::Routing::default())?;
    let memory = simulator::memory::RankMemory::of(&shape, &simulator::cluster::Precision::default());
    let analytic = memory.total();
    let mib = |kib: f64| kib / 1024.0;
    Ok(MemoryRow {
        job: name.to_string(),
        peak_rss_mib: mib(peak_kib),
        peak_anon_mib: mib(anon_kib),
        peak_file_mib: mib(file_kib),
        analytic_mib: analytic / (1 << 20) as f64,
        ratio: peak_kib * 1024.0 / analytic,
        anon_ratio: anon_kib * 1024.0 / analytic,
    })
}

/// Runs every row and prints a table (or JSON).
/// `bf16`: measure the bf16 rows even on a CPU without bf16 units (there
/// they are emulated, switchyard's and PyTorch's alike, and slow).
pub fn run(json: bool, memory_only: bool, rounds: usize, bf16: bool) -> Result<()> {
    let threads = rayon::current_num_threads();
    let mut report = Report { threads, ..Default::default() };
    if !memory_only {
        let bf16 = bf16 || gemm::cpu_has_bf16_units();
        if !bf16 {
            eprintln!("this CPU has no bf16 matrix units: measuring fp32 only (--bf16 measures bf16 too)");
        }
        run_speed_rows(&mut report, rounds.max(1), bf16)?;
    }
    for (name, sets) in MEMORY_JOBS {
        eprintln!("measuring peak memory of the {name} ...");
        report.memory.push(bench_memory(name, sets)?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The GEMM, layer (`rounds` of each) and step rows.
fn run_speed_rows(report: &mut Report, rounds: usize, bf16: bool) -> Result<()> {
    // The peak is the best of a few large square products: one size alone
    // can land on a bad blocking for this cache and under-report it.
    eprintln!("measuring peak GEMM (1024^3, 1536^3, 2048^3) ...");
    report.peak_gflops = [1024, 1536, 2048].iter().map(|&n| gemm_gflops(n, n, n, 5)).fold(0.0, f64::max);

    let job = JobConfig::load(None, &[])?;
    let cases = vec![
        LayerCase {
            name: "D512 F1024 E8 k2".into(),
            d_model: 512,
            ffn_hidden: 1024,
            n_experts: 8,
            top_k: 2,
            tokens: 4096,
            free: (0, 0, 0),
        },
        LayerCase {
            name: "default model".into(),
            d_model: job.model.d_model,
            ffn_hidden: job.model.ffn_hidden,
            n_experts: job.model.n_experts,
            top_k: job.model.top_k,
            tokens: job.train.micro_batch_size * job.model.seq_len,
            free: (0, 0, 0),
        },
    ];
    for case in &cases {
        // An expert's GEMM at balanced routing: tokens*k/E rows.
        let rows = case.tokens * case.top_k / case.n_experts;
        eprintln!("measuring expert GEMM {rows}x{}x{} ...", case.d_model, case.ffn_hidden);
        let gflops = gemm_gflops(rows, case.d_model, case.ffn_hidden, 9);
        report.expert_gemm.push(GemmRow {
            shape: format!("{rows}x{}x{} ({})", case.d_model, case.ffn_hidden, case.name),
            gflops,
            share_of_peak: gflops / report.peak_gflops,
        });
        let rounds = (1..=rounds)
            .map(|round| {
                let ours = if bf16 { "fp32, bf16" } else { "fp32" };
                eprintln!(
                    "measuring MoE layer {} ({ours}, then JAX and PyTorch), round {round}/{rounds} ...",
                    case.name
                );
                LayerRound::measure(case, bf16)
            })
            .collect();
        report.layers.push(layer_row(case, rounds, report.peak_gflops));
    }
    // MoE++: the first case with 2 constant, 1 copy and 1 zero expert beside
    // its 8 FFN experts (MoE++-7B's 16 + 4 in proportion); the router is
    // untrained, so the share of tokens that skip FFN work is the
    // initial one, not a trained model's.
    let base = &report.layers[0];
    let free_case =
        LayerCase { name: format!("{} + 2c 1copy 1zero", cases[0].name), free: (2, 1, 1), ..cases[0].clone() };
    eprintln!("measuring MoE layer {} ...", free_case.name);
    let (tps, rows) = bench_moe_layer(&free_case);
    report.computation_free = vec![
        FreeRow {
            name: cases[0].name.clone(),
            tokens: cases[0].tokens,
            ffn_rows_per_token: cases[0].top_k as f64,
            tokens_per_s: base.tokens_per_s,
            speedup: 1.0,
        },
        FreeRow {
            name: free_case.name.clone(),
            tokens: free_case.tokens,
            ffn_rows_per_token: rows,
            tokens_per_s: tps,
            speedup: tps / base.tokens_per_s,
        },
    ];
    eprintln!("measuring a full forward+backward step of the default job ...");
    let mut step = bench_step(&job);
    step.bf16_tokens_per_s = bf16.then(|| in_precision(Precision::Bf16, || bench_step(&job)).tokens_per_s);
    report.step = Some(step);
    Ok(())
}

fn print_table(r: &Report) {
    println!("switchyard bench layer ({} threads)", r.threads);
    if r.peak_gflops > 0.0 {
        print_speed_rows(r);
    }
    print_memory_rows(r);
}

fn print_speed_rows(r: &Report) {
    println!("peak GEMM (best of 1024^3, 1536^3, 2048^3): {:.1} GFLOP/s", r.peak_gflops);
    println!();
    println!("{:<40} {:>10} {:>9}", "expert GEMM", "GFLOP/s", "of peak");
    for g in &r.expert_gemm {
        println!("{:<40} {:>10.1} {:>8.0}%", g.shape, g.gflops, 100.0 * g.share_of_peak);
    }
    println!();
    let rounds = r.layers.first().map_or(0, |l| l.rounds);
    let of = if rounds > 1 { format!(", medians of {rounds} rounds") } else { String::new() };
    println!("MoE layer forward+backward, tokens/s{of}:");
    println!(
        "{:<20} {:>7} {:>11} {:>9} {:>8} {:>11} {:>10} {:>13} {:>13} {:>10} {:>10}",
        "MoE layer fwd+bwd",
        "tokens",
        "fp32 tok/s",
        "GFLOP/s",
        "of peak",
        "bf16 tok/s",
        "JAX fp32",
        "PyTorch fp32",
        "PyTorch bf16",
        "fp32 vs PT",
        "bf16 vs PT"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |v: &[f64]| if v.is_empty() { "-".to_string() } else { format!("{:.2}x", super::median(v.to_vec())) };
    for l in &r.layers {
        println!(
            "{:<20} {:>7} {:>11.0} {:>9.1} {:>7.0}% {:>11} {:>10} {:>13} {:>13} {:>10} {:>10}",
            l.case.name,
            l.case.tokens,
            l.tokens_per_s,
            l.gflops,
            100.0 * l.share_of_peak,
            cell(l.bf16_tokens_per_s),
            cell(l.jax_tokens_per_s),
            cell(l.torch_fp32_tokens_per_s),
            cell(l.torch_bf16_tokens_per_s),
            ratio(&l.fp32_vs_torch),
            ratio(&l.bf16_vs_torch)
        );
        if l.jax_tokens_per_s.is_none() {
            println!("    JAX: {}", l.jax_note);
        }
        println!("    PyTorch: {}", l.torch_note);
        if l.fp32_vs_torch.len() > 1 {
            let span = |v: &[f64]| {
                if v.is_empty() {
                    return "-".to_string();
                }
                let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                format!("{lo:.2}-{hi:.2}x")
            };
            println!(
                "    per round: fp32 vs PyTorch fp32 {}, bf16 vs PyTorch bf16 {}",
                span(&l.fp32_vs_torch),
                span(&l.bf16_vs_torch)
            );
        }
    }
    if r.layers.iter().any(|l| l.bf16_tokens_per_s.is_some()) {
        println!("    bf16: {}", gemm::describe(Precision::Bf16));
    } else {
        println!("    bf16: not measured, this CPU has no bf16 matrix units (--bf16 measures it anyway)");
    }
    if !r.computation_free.is_empty() {
        println!();
        println!(
            "{:<36} {:>7} {:>15} {:>12} {:>9}",
            "MoE++ computation-free experts", "tokens", "FFN rows/token", "tokens/s", "speedup"
        );
        for f in &r.computation_free {
            println!(
                "{:<36} {:>7} {:>15.2} {:>12.0} {:>8.2}x",
                f.name, f.tokens, f.ffn_rows_per_token, f.tokens_per_s, f.speedup
            );
        }
        println!("(untrained router: the share of assignments to computation-free experts is the initial one)");
    }
    if let Some(s) = &r.step {
        println!();
        let bf16 = s.bf16_tokens_per_s.map_or(String::new(), |t| format!(", {t:.0} tokens/s in bf16"));
        println!(
            "default job, forward+backward of one step: {:.0} tokens/s ({:.3} s/step) in fp32{bf16}",
            s.tokens_per_s, s.seconds_per_step
        );
    }
}

fn print_memory_rows(r: &Report) {
    println!();
    println!(
        "{:<36} {:>9} {:>7} {:>9} {:>10} {:>10} {:>7}",
        "peak RSS of `train` (MiB)", "all", "ratio", "analytic", "anonymous", "file", "ratio"
    );
    for m in &r.memory {
        println!(
            "{:<36} {:>9.1} {:>6.2}x {:>9.1} {:>10.1} {:>10.1} {:>6.2}x",
            m.job, m.peak_rss_mib, m.ratio, m.analytic_mib, m.peak_anon_mib, m.peak_file_mib, m.anon_ratio
        );
    }
    println!("(analytic: params + grads + AdamW moments + one micro-batch's saved activations;");
    println!(" anonymous: heap, stacks and buffers; file: the executable's and libraries' pages in memory;");
    println!(" the last ratio is anonymous over analytic)");
}
