//! `switchyard k8s render`: manifests for a job on Kubernetes (docs/kubernetes.md).

pub mod manifests;
pub mod mpijob;
pub mod plan;
pub mod yaml;

use crate::deploy::k8s::manifests::{kustomization, manifests};
use crate::deploy::k8s::plan::{plan, RenderRequest};
use crate::deploy::k8s::yaml::to_yaml;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use worker::JobConfig;

/// `switchyard k8s ...`
#[derive(Subcommand)]
pub enum K8sCommand {
    /// Write a job's manifests: ConfigMap, Secret, coordinator Pod and Services, and the workers
    /// (an Indexed Job, or an MPIJob for MPI ranks over several pods).
    Render(RenderArgs),
}

/// Arguments of `switchyard k8s render`.
#[derive(Args)]
pub struct RenderArgs {
    /// Job config (TOML); its [checkpoint] url must be s3://, gs:// or az://.
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, e.g. --set parallel.ranks=4 (repeatable); the ConfigMap holds the result.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Worker pods: 1 holds every CPU rank; N > 1 with backend mpi is an MPIJob of ranks/N ranks per pod
    /// (Kubeflow MPI Operator); with --gpu, [parallel] ranks (one GPU each).
    #[arg(long, allow_negative_numbers = true)]
    workers: i64,
    /// Container image with the switchyard binary (see the Dockerfile).
    #[arg(long)]
    image: Option<String>,
    /// Namespace of every object (default: kubectl's current one).
    #[arg(long)]
    namespace: Option<String>,
    /// GPU workers: one nvidia.com/gpu per pod, NCCL settings; needs backend nccl.
    #[arg(long)]
    gpu: bool,
    /// Prefix of the objects' names (default: the job's name).
    #[arg(long)]
    name: Option<String>,
    /// Write one file per object and a kustomization.yaml here (default: all documents to stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Retries of each worker index before the Job fails; each resumes from the last committed checkpoint.
    #[arg(long, default_value_t = 3, value_name = "N")]
    max_restarts: u32,
    /// Accept a file:// checkpoint URL (every pod must mount one shared volume there).
    #[arg(long)]
    allow_local_checkpoints: bool,
    /// Write REPLACE_ME for every Secret value instead of this shell's token and credentials (for git).
    #[arg(long)]
    placeholder_secrets: bool,
    /// Check from here, with this shell's credentials, that the checkpoint store answers
    /// (off by default: a bucket may be reachable only from inside the cluster).
    #[arg(long)]
    check_store: bool,
}

/// Lists the checkpoint bucket with this shell's credentials (the ones the
/// Secret gets), so a typo or a wrong key fails here, before anything is applied.
fn check_store(job: &JobConfig) -> Result<()> {
    let url = &job.checkpoint.url;
    let store = checkpoint::CheckpointStore::open_with(url, &job.checkpoint.store_options())
        .with_context(|| format!("the checkpoint store {url} cannot be opened; nothing was written"))?;
    store.committed_steps().with_context(|| {
        format!("the checkpoint store {url} does not answer from here (--check-store); nothing was written")
    })?;
    Ok(())
}

/// Runs a `k8s` subcommand.
pub fn run(cmd: K8sCommand) -> Result<()> {
    match cmd {
        K8sCommand::Render(args) => render(args),
    }
}

fn render(args: RenderArgs) -> Result<()> {
    let job = JobConfig::load(Some(&args.config), &args.overrides)?;
    let req = RenderRequest {
        workers: args.workers,
        image: args.image.clone(),
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        gpu: args.gpu,
        allow_local_checkpoints: args.allow_local_checkpoints,
        placeholder_secrets: args.placeholder_secrets,
        max_restarts: args.max_restarts,
    };
    // Every check happens here, before a file is written.
    let k8s_job = plan(&job, &req, |name| std::env::var(name).ok())?;
    if args.check_store && !args.allow_local_checkpoints {
        check_store(&job)?;
    }
    let objects = manifests(&k8s_job);
    match &args.out {
        None => {
            let docs: Vec<String> = objects.iter().map(|(_, o)| to_yaml(o)).collect();
            print!("---\n{}", docs.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let files: Vec<&str> = objects.iter().map(|(f, _)| *f).collect();
            let all =
                objects.iter().map(|(f, o)| (*f, o.clone())).chain([("kustomization.yaml", kustomization(&files))]);
            for (file, object) in all {
                let path = dir.join(file);
                std::fs::write(&path, to_yaml(&object)).with_context(|| format!("cannot write {}", path.display()))?;
            }
            eprintln!(
                "wrote {} objects of job {} ({} worker pod(s) x {} rank(s), backend {}) to {}: kubectl apply -k {}",
                objects.len(),
                k8s_job.name,
                k8s_job.workers,
                k8s_job.ranks_per_pod,
                k8s_job.backend,
                dir.display(),
                dir.display()
            );
        }
    }
    for note in &k8s_job.notes {
        eprintln!("note: {note}");
    }
    Ok(())
}
