//! `switchyard slurm render | submit`: a training job as an sbatch script
//! (slurm_script.rs), checked before anything reaches the scheduler: the
//! layout, the backend, the binary, and that the checkpoint store answers.

pub mod script;

use crate::deploy::slurm::script::{render, SlurmJob};
use anyhow::{bail, Context, Result};
use checkpoint::CheckpointStore;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;
use worker::api::checkpoint_url;
use worker::{Backend, JobConfig};

/// `switchyard slurm ...`.
#[derive(Subcommand)]
pub enum SlurmCommand {
    /// Write the sbatch script (and the resolved config beside it).
    Render(SlurmArgs),
    /// Render, then submit with sbatch; prints the job id.
    Submit(SlurmArgs),
}

/// The job and how it is laid out on the cluster.
#[derive(Args)]
pub struct SlurmArgs {
    /// Job config (TOML); default: the built-in tiny job.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key (repeatable), as for train.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Nodes to allocate.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Ranks per node (one per GPU with --gpu); default: the config's ranks over the nodes.
    #[arg(long)]
    ntasks_per_node: Option<usize>,
    /// One GPU per rank with the NCCL backend, instead of CPU ranks over MPI.
    #[arg(long)]
    gpu: bool,
    /// Run folder on storage every node sees (config, logs, metrics; checkpoints unless
    /// [checkpoint] url names a bucket); default runs/<job name>, made absolute.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Where to write the script; default <run dir>/job.sbatch.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    partition: Option<String>,
    /// Time limit (sbatch --time), e.g. 04:00:00.
    #[arg(long)]
    time: Option<String>,
    /// The coordinator's port on the first node (the HTTP status port is the next one).
    #[arg(long, default_value_t = 29500)]
    port: u16,
    /// The switchyard binary on the compute nodes; default: this one.
    #[arg(long)]
    exe: Option<PathBuf>,
}

pub fn run(cmd: SlurmCommand) -> Result<()> {
    match cmd {
        SlurmCommand::Render(args) => {
            let script = prepare(&args)?;
            println!("wrote {}", script.display());
            println!("submit: sbatch {}   (or: switchyard slurm submit with the same options)", script.display());
            Ok(())
        }
        SlurmCommand::Submit(args) => {
            let script = prepare(&args)?;
            let out = Command::new("sbatch")
                .arg("--parsable")
                .arg(&script)
                .output()
                .context("cannot run sbatch: is this a Slurm login node (is sbatch on PATH)?")?;
            if !out.status.success() {
                bail!("sbatch refused {}: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
            let run_dir = script.parent().unwrap_or(Path::new(".")).display().to_string();
            println!("submitted job {id} ({})", script.display());
            println!("watch:  squeue -j {id}; tail -f {run_dir}/slurm-{id}.out");
            println!("cancel: scancel {id}   (the ranks checkpoint first; submit again to resume)");
            Ok(())
        }
    }
}

/// Checks everything, writes the resolved config and the script; returns the script's path.
fn prepare(args: &SlurmArgs) -> Result<PathBuf> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let mut overrides = args.overrides.clone();
    if let Some(tasks) = args.ntasks_per_node {
        // The config is checked with the rank count the job will have.
        overrides.push(format!("parallel.ranks={}", args.nodes * tasks));
    }
    let base = JobConfig::load(args.config.as_deref(), &overrides)?;
    let tasks_per_node = match args.ntasks_per_node {
        Some(0) => bail!("--ntasks-per-node must be at least 1"),
        Some(n) => n,
        None if base.parallel.ranks.is_multiple_of(args.nodes) && base.parallel.ranks >= args.nodes => {
            base.parallel.ranks / args.nodes
        }
        None => bail!(
            "[parallel] ranks = {} cannot be spread evenly over {} node(s): give --ntasks-per-node \
             (ranks = nodes x ntasks-per-node)",
            base.parallel.ranks,
            args.nodes
        ),
    };
    let ranks = args.nodes * tasks_per_node;
    let backend = if args.gpu { Backend::Nccl } else { Backend::Mpi };
    if args.gpu && base.parallel.backend == Backend::Mpi {
        bail!(
            "--gpu runs one rank per GPU over NCCL, but the config says [parallel] backend = \"{}\": \
             drop --gpu for CPU ranks over MPI, or set parallel.backend=nccl",
            base.parallel.backend
        );
    }
    if !args.gpu && base.parallel.backend == Backend::Nccl {
        bail!("the config asks for the nccl backend: add --gpu (one rank per GPU) or set parallel.backend=mpi");
    }
    overrides.push(format!("parallel.ranks={ranks}"));
    overrides.push(format!("parallel.backend={backend}"));
    // Every error in the layout (experts over ranks, heads over attn_tp, batch
    // over data-parallel ranks) now, not on the cluster.
    let job = JobConfig::load(args.config.as_deref(), &overrides)
        .with_context(|| format!("the job does not fit {ranks} rank(s) ({} node(s) x {tasks_per_node})", args.nodes))?;
    job.parallel_dims().with_context(|| format!("the job cannot run on {ranks} rank(s)"))?;

    let run_dir = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&job.name));
    let run_dir = std::path::absolute(&run_dir).with_context(|| format!("bad --run-dir {}", run_dir.display()))?;
    let exe = match &args.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("cannot find this program's path; give --exe")?,
    };
    if args.exe.is_none() && !exe.is_file() {
        bail!("{} does not exist; give --exe with the switchyard binary the nodes run", exe.display());
    }
    if !args.gpu && !collectives::mpi::COMPILED && args.exe.is_none() {
        bail!(
            "this switchyard was built without MPI, which CPU ranks under srun need: build with \
             cargo build --release --features mpi, or give --exe with such a binary"
        );
    }
    // The store must answer now: a typo or missing credentials should stop
    // the submission, not the job an hour later in the queue.
    let url = checkpoint_url(&job, &run_dir);
    let store = CheckpointStore::open_with(&url, &job.checkpoint.store_options())
        .with_context(|| format!("the checkpoint store {url} cannot be opened; nothing was submitted"))?;
    store
        .committed_steps()
        .with_context(|| format!("the checkpoint store {url} does not answer; nothing was submitted"))?;

    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let config = run_dir.join("job.toml");
    std::fs::write(&config, job.to_toml()).with_context(|| format!("cannot write {}", config.display()))?;
    let script_path = args.out.clone().unwrap_or_else(|| run_dir.join("job.sbatch"));
    let rendered_by = std::env::args().map(|a| if a.contains(' ') { format!("{a:?}") } else { a }).collect::<Vec<_>>();
    let script = render(&SlurmJob {
        name: &job.name,
        nodes: args.nodes,
        tasks_per_node,
        gpu: args.gpu,
        mem_per_node_mib: if args.gpu { None } else { Some(crate::run::preflight::request_mib(&job, tasks_per_node)?) },
        partition: args.partition.as_deref(),
        time: args.time.as_deref(),
        exe: &exe,
        config: &config,
        run_dir: &run_dir,
        port: args.port,
        signal_before_s: 120,
        rendered_by: &rendered_by.join(" "),
    });
    std::fs::write(&script_path, script).with_context(|| format!("cannot write {}", script_path.display()))?;
    Ok(script_path)
}
