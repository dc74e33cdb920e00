//! `switchyard bench`.

pub mod alltoall;
pub mod attention;
pub mod checkpoint;
pub mod kernels;
pub mod layer;
pub mod overlap;
pub mod simulator;
pub mod step;
pub mod torch_step;
pub mod turns;

use anyhow::Result;
use clap::Subcommand;
use worker::Backend;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// MoE layer and full-step throughput against peak GEMM and JAX.
    Layer {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the peak-memory table (seconds, not minutes).
        #[arg(long)]
        memory_only: bool,
        /// Rounds of the layer rows, switchyard and its peers taking turns
        /// in each: the table shows medians and the spread of the ratios
        /// (a shared machine drifts between one measurement and the next).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Measure the bf16 rows on a CPU without bf16 matrix units too
        /// (without this they are measured only where the CPU has them).
        #[arg(long)]
        bf16: bool,
    },
    /// Causal attention forward+backward at growing lengths: plain, tiled (online softmax)
    /// and PyTorch's scaled_dot_product_attention, with each one's peak memory.
    Attention {
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
        seq: Vec<usize>,
        /// Attention heads.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Head dimension.
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// Measure only this core (plain or tiled) in this process (used by the benchmark itself).
        #[arg(long, hide = true)]
        one: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Matrix products on each kernel set (built-in fp32, oneDNN fp32 and bf16) against PyTorch.
    Kernels {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Where a training step's time goes (compute, all-to-all, gradient sync, other) on 1, 2, 4 ranks.
    Step {
        /// Rank counts to measure, e.g. 1,2,4.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        ranks: Vec<usize>,
        /// Backends to measure: local, and mpi when this binary has it.
        #[arg(long, value_delimiter = ',', value_name = "local|mpi")]
        backends: Option<Vec<Backend>>,
        /// Job config (default: the built-in tiny job).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Override a config key (repeatable), as for train.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Measure every row once per value of a config key, e.g.
        /// parallel.attn_expert_placement=replicated,partitioned.
        #[arg(long, value_name = "KEY=V1,V2,...")]
        vary: Option<String>,
        /// Steps per job (the first 2 are warm-up).
        #[arg(long, default_value_t = 12)]
        steps: u64,
        /// PyTorch modes to measure the same job in, on one process with
        /// these threads (bench/torch_train_step.py); `none` for none.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "eager,autocast,compile,compile_autocast",
            value_parser = ["eager", "autocast", "compile", "compile_autocast", "none"]
        )]
        torch: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint save bandwidth against plain object-store puts, the training
    /// stall per save, and the resume time, per store URL.
    Checkpoint {
        /// Checkpoint roots to measure (repeatable; an empty prefix each), e.g.
        /// s3://bucket/bench; default: a scratch folder (file://).
        #[arg(long = "url")]
        urls: Vec<String>,
        /// Job config whose model is saved (default: the built-in tiny job).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Override a config key (repeatable), as for train.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Rounds per timing; the best is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Step time with each overlap technique off, on alone, and all on, with
    /// the exposed share of communication and step / max(compute, communication).
    Overlap {
        /// Job config (default: the built-in tiny job with parallel blocks and 2 micro-batches per rank).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Override a config key (repeatable), as for train; applies to every variant.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Number of ranks.
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// local (threads) or mpi (processes).
        #[arg(long, default_value = "local", value_name = "local|mpi")]
        backend: Backend,
        /// A program that starts the ranks itself (e.g. scripts/netns-mpirun.sh
        /// for MPI over namespace hosts): run as `PROGRAM switchyard train ...`.
        #[arg(long)]
        launcher: Option<std::path::PathBuf>,
        /// Chunks per dispatch/combine when chunking is on.
        #[arg(long, default_value_t = 4)]
        chunks: usize,
        /// Steps per variant (the first 3 are warm-up).
        #[arg(long, default_value_t = 15)]
        steps: u64,
        /// Rounds over all variants; each variant's fastest is reported.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// All-to-all-v bandwidth, 4 KiB to 64 MiB per rank, against mpi4py's Alltoallv.
    Alltoall {
        /// Number of ranks.
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// local (threads) or mpi (processes; needs a build with --features mpi).
        #[arg(long, default_value = "local", value_name = "local|mpi")]
        backend: Backend,
        /// Largest message per rank, in MiB (sizes 4 KiB ... this).
        #[arg(long, default_value_t = 64)]
        max_mib: usize,
        /// Rounds of switchyard and mpi4py running in turns; each side's best per size is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only these sizes (KiB), a few quick timings: as ranks of another
        /// mpirun (`simulate validate` measures its links so).
        #[arg(long, hide = true, value_delimiter = ',')]
        probe_kib: Vec<usize>,
    },
    /// How well the calibrated simulator predicts this machine: `simulate calibrate`,
    /// a measured sweep over ranks and experts, and `simulate` of the same grid.
    Simulator {
        /// Job config swept and simulated.
        #[arg(long, default_value = "examples/sweeps/job.toml")]
        config: std::path::PathBuf,
        /// Rounds of the measured sweep; each point keeps its best.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// How the swept ranks run: local (threads of one process) or mpi
        /// (processes on this machine; needs a build with --features mpi).
        #[arg(long, default_value = "local", value_name = "local|mpi")]
        backend: Backend,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Layer { json, memory_only, rounds, bf16 } => {
            crate::bench::layer::run(json, memory_only, rounds as usize, bf16)
        }
        BenchCommand::Kernels { json } => crate::bench::kernels::run(json),
        BenchCommand::Attention { seq, heads, head_dim, one, json } => {
            crate::bench::attention::run(crate::bench::attention::AttentionBench {
                seqs: seq,
                heads,
                head_dim,
                one,
                json,
            })
        }
        BenchCommand::Step { ranks, backends, config, overrides, vary, steps, torch, json } => {
            let backends = backends.unwrap_or_else(|| {
                let mut all = vec![Backend::Local];
                if collectives::mpi::COMPILED {
                    all.push(Backend::Mpi);
                }
                all
            });
            let backends = backends.iter().map(|b| b.as_str().to_string()).collect();
            let torch = torch.into_iter().filter(|m| m != "none").collect();
            crate::bench::step::run(crate::bench::step::StepBench {
                ranks,
                backends,
                config,
                overrides,
                vary: vary.map(|v| crate::bench::step::Vary::parse(&v)).transpose()?,
                steps,
                torch,
                json,
            })
        }
        BenchCommand::Checkpoint { urls, config, overrides, rounds, json } => {
            crate::bench::checkpoint::run(crate::bench::checkpoint::CheckpointBench {
                urls,
                config,
                overrides,
                rounds: rounds.max(1),
                json,
            })
        }
        BenchCommand::Overlap { config, overrides, ranks, backend, launcher, chunks, steps, rounds, json } => {
            crate::bench::overlap::run(crate::bench::overlap::OverlapBench {
                config,
                overrides,
                ranks,
                backend: backend.as_str().to_string(),
                launcher,
                chunks,
                steps,
                rounds: rounds.max(1),
                json,
            })
        }
        BenchCommand::Alltoall { ranks, backend, max_mib, rounds, json, probe_kib } => {
            crate::bench::alltoall::run(ranks, backend.as_str(), max_mib, rounds.max(1), json, &probe_kib)
        }
        BenchCommand::Simulator { config, rounds, backend, json } => {
            crate::bench::simulator::run(crate::bench::simulator::SimulatorBench {
                config,
                rounds: rounds.max(1),
                backend,
                json,
            })
        }
    }
}

/// Set (to 1) where switchyard itself chose `OMP_WAIT_POLICY` (main.rs).
pub const OMP_POLICY_OURS: &str = "SWITCHYARD_OMP_WAIT_POLICY_DEFAULTED";

/// Set where switchyard added its malloc setting to `GLIBC_TUNABLES`
/// (main.rs): the value the user had, empty when none.
pub const TUNABLES_BEFORE: &str = "SWITCHYARD_GLIBC_TUNABLES_BEFORE";

/// `peer` (a benchmark's PyTorch, JAX or mpi4py process) with the
/// environment its users run it in: without the OpenMP wait policy and
/// the malloc setting this program gave itself, unless the user set them.
pub fn as_users_run_it(peer: &mut std::process::Command) -> &mut std::process::Command {
    if std::env::var_os(OMP_POLICY_OURS).is_some() {
        peer.env_remove("OMP_WAIT_POLICY").env_remove(OMP_POLICY_OURS);
    }
    if let Some(before) = std::env::var_os(TUNABLES_BEFORE) {
        if before.is_empty() {
            peer.env_remove("GLIBC_TUNABLES");
        } else {
            peer.env("GLIBC_TUNABLES", before);
        }
        peer.env_remove(TUNABLES_BEFORE);
    }
    peer
}

/// A Python peer of a benchmark: `python3 bench/<script> args...`, whose
/// last stdout line is one JSON object. Err says why there is none: the
/// module missing (with `install`, how to get it), or the run's failure.
pub fn python_peer(script: &str, args: &[String], module: &str, install: &str) -> Result<serde_json::Value, String> {
    let path = format!("{}/../bench/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut python = std::process::Command::new("python3");
    let out = as_users_run_it(&mut python)
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(if err.contains(&format!("No module named '{module}'")) {
            format!("{module} not installed: {install}")
        } else {
            format!("bench/{script} failed: {}", err.lines().last().unwrap_or(""))
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).map_err(|_| format!("unexpected output from bench/{script}: {text}"))
}

/// The median of `values` (the mean of the middle two for an even count).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
