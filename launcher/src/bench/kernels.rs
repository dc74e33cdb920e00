//! `switchyard bench kernels`: the matrix products a training step is
//! made of (the default MoE layer's expert products at balanced-routing
//! rows, a dense projection, a lightly loaded expert, and 2048^3) on each
//! kernel set — the built-in fp32 kernels, oneDNN in fp32 and in bf16 —
//! against PyTorch's fp32 and bf16 matmul on the same shapes and threads
//! (`bench/torch_matmul.py`), measured in one run.

use anyhow::{Context, Result};
use model::gemm::{self, Kernels, Precision};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One product to time.
#[derive(Debug, Clone, Copy, Serialize)]
struct Case {
    what: &'static str,
    kind: &'static str,
    m: usize,
    k: usize,
    n: usize,
}

/// D 512, F 1024, 8 experts top-2 over 4,096 tokens: 1,024 rows per expert.
const CASES: [Case; 7] = [
    Case { what: "expert w1/w3 forward", kind: "nt", m: 1024, k: 512, n: 1024 },
    Case { what: "expert w2 forward", kind: "nt", m: 1024, k: 1024, n: 512 },
    Case { what: "expert input gradient", kind: "nn", m: 1024, k: 1024, n: 512 },
    Case { what: "expert weight gradient", kind: "tn", m: 1024, k: 1024, n: 512 },
    Case { what: "dense projection, 4096 tokens", kind: "nt", m: 4096, k: 512, n: 512 },
    Case { what: "lightly loaded expert", kind: "nt", m: 128, k: 512, n: 1024 },
    Case { what: "square", kind: "nt", m: 2048, k: 2048, n: 2048 },
];

/// Time per measurement.
const SECONDS: f64 = 0.4;

#[derive(Debug, Serialize)]
struct Row {
    case: Case,
    builtin_fp32: f64,
    onednn_fp32: Option<f64>,
    onednn_bf16: Option<f64>,
    torch_fp32: Option<f64>,
    torch_bf16: Option<f64>,
    onednn_bf16_implementation: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    bf16_units: bool,
    onednn: String,
    torch: String,
    rows: Vec<Row>,
}

/// GFLOP/s of `case` on `kernels` in `precision` (fastest repetition).
fn rate(case: &Case, precision: Precision, kernels: Kernels) -> f64 {
    gemm::set_precision(precision);
    gemm::set_kernels(Some(kernels));
    let (m, k, n) = (case.m, case.k, case.n);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 6.0).collect();
    let mut c = vec![0.0f32; m * n];
    let run = |c: &mut [f32]| match case.kind {
        "nt" => gemm::matmul_nt(m, k, n, &a, &b, c, false),
        "nn" => gemm::matmul_nn(m, k, n, &a, &b, c, false),
        _ => gemm::matmul_tn(m, k, n, &a, &b, c, false),
    };
    for _ in 0..2 {
        run(&mut c);
    }
    let started = Instant::now();
    let mut best = Duration::MAX;
    while started.elapsed().as_secs_f64() < SECONDS {
        let t = Instant::now();
        run(&mut c);
        best = best.min(t.elapsed());
    }
    gemm::set_precision(Precision::Fp32);
    gemm::set_kernels(None);
    2.0 * (m * k * n) as f64 / best.as_secs_f64() / 1e9
}

/// PyTorch's rates (fp32, bf16) per case, or why there are none.
fn torch_rates() -> (Vec<Option<(f64, f64)>>, String) {
    let args = [serde_json::to_string(&CASES).expect("cases serialise"), SECONDS.to_string()];
    let install = "pip install torch (CPU); scripts/bench-kernels.sh does";
    match super::python_peer("torch_matmul.py", &args, "torch", install) {
        Ok(v) => {
            let rates = v["results"].as_array().into_iter().flatten();
            let rates = rates.map(|x| x["fp32"].as_f64().zip(x["bf16"].as_f64())).collect();
            (rates, format!("PyTorch {} on {} threads", v["torch"].as_str().unwrap_or("?"), v["threads"]))
        }
        Err(note) => (vec![None; CASES.len()], note),
    }
}

/// The CPU's model name (/proc/cpuinfo).
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn run(json: bool) -> Result<()> {
    let onednn = gemm::onednn::get();
    if !json {
        eprintln!("bench kernels: {} products x 3 kernel sets, {SECONDS} s each, then PyTorch ...", CASES.len());
    }
    let mut rows = Vec::new();
    for case in &CASES {
        let builtin_fp32 = rate(case, Precision::Fp32, Kernels::Builtin);
        let (onednn_fp32, onednn_bf16, implementation) = match onednn {
            // No bf16 column where oneDNN has no bf16 matmul for this CPU.
            Ok(lib) => (
                Some(rate(case, Precision::Fp32, Kernels::OneDnn)),
                lib.bf16().is_ok().then(|| rate(case, Precision::Bf16, Kernels::OneDnn)),
                lib.implementation(case.m, case.k, case.n, true).ok(),
            ),
            Err(_) => (None, None, None),
        };
        rows.push(Row {
            case: *case,
            builtin_fp32,
            onednn_fp32,
            onednn_bf16,
            torch_fp32: None,
            torch_bf16: None,
            onednn_bf16_implementation: implementation,
        });
    }
    let (torch, torch_note) = torch_rates();
    for (row, rates) in rows.iter_mut().zip(torch) {
        (row.torch_fp32, row.torch_bf16) = (rates.map(|r| r.0), rates.map(|r| r.1));
    }
    let report = Report {
        cpu: cpu_name(),
        bf16_units: gemm::cpu_has_bf16_units(),
        onednn: match onednn {
            Ok(lib) => lib.bf16().err().unwrap_or(lib.description()).to_string(),
            Err(e) => e.to_string(),
        },
        torch: torch_note,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).context("report serialises")?);
        return Ok(());
    }
    print_table(&report);
    Ok(())
}

fn print_table(report: &Report) {
    let units = if report.bf16_units { "has bf16 matrix units" } else { "no bf16 matrix units" };
    println!("CPU: {} ({units}), {} threads", report.cpu, rayon::current_num_threads());
    println!("kernels: built-in (gemm crate) | {} | peer: {}", report.onednn, report.torch);
    println!();
    println!(
        "| product | m x k x n | built-in fp32 | oneDNN fp32 | oneDNN bf16 | PyTorch fp32 | PyTorch bf16 | bf16 vs PyTorch bf16 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    for r in &report.rows {
        let c = &r.case;
        let ratio = r.onednn_bf16.zip(r.torch_bf16).map_or("-".to_string(), |(a, b)| format!("{:.2}x", a / b));
        println!(
            "| {} ({}) | {} x {} x {} | {:.0} | {} | {} | {} | {} | {ratio} |",
            c.what,
            c.kind,
            c.m,
            c.k,
            c.n,
            r.builtin_fp32,
            cell(r.onednn_fp32),
            cell(r.onednn_bf16),
            cell(r.torch_fp32),
            cell(r.torch_bf16),
        );
    }
    println!();
    println!(
        "GFLOP/s, fastest of {SECONDS} s of repetitions each (products of fp32 factors: bf16 includes rounding them)"
    );
    if let Some(implementation) = report.rows.iter().find_map(|r| r.onednn_bf16_implementation.as_deref()) {
        println!("oneDNN's bf16 implementation: {implementation}");
    }
}
