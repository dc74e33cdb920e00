//! What `switchyard k8s render` will write, decided and checked before
//! anything is written: the pod layout for the job's backend, where the
//! checkpoints go, and the values of the job's Secret.

use anyhow::{bail, Result};
use worker::{Backend, JobConfig};

/// Port workers register on (the coordinator's `--addr`).
pub const COORDINATOR_PORT: u16 = 29500;
/// Port of the coordinator's `/status`, `/metrics` and `/healthz`.
pub const HTTP_PORT: u16 = 29501;
/// Stands in for a secret value the user must fill in.
pub const PLACEHOLDER: &str = "REPLACE_ME";

/// A worker pod's memory request: what its CPU ranks need
/// ([`crate::run::preflight::request_mib`]); a GPU pod's ranks hold the
/// model on the device, so it asks for the minimum.
fn worker_memory_mib(job: &JobConfig, ranks_per_pod: usize, gpu: bool) -> Result<u64> {
    if gpu {
        return Ok(crate::run::preflight::MIN_REQUEST_MIB);
    }
    crate::run::preflight::request_mib(job, ranks_per_pod)
}

/// How the worker pods are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerForm {
    /// A batch/v1 Indexed Job: one pod per index (`local` and `mpi` in one
    /// pod, `nccl` with one GPU per pod).
    IndexedJob,
    /// A Kubeflow MPI Operator `MPIJob` (kubeflow.org/v2beta1): a launcher
    /// pod runs `mpirun` over SSH to worker pods running `sshd` (`mpi`
    /// over several pods).
    MpiJob,
}

/// A checked job ready to be turned into manifests.
#[derive(Debug, Clone)]
pub struct K8sJob {
    /// Prefix of every object's name (DNS-1123 label).
    pub name: String,
    pub namespace: Option<String>,
    pub image: String,
    /// Worker pods (of the Indexed Job, or the MPIJob's workers).
    pub workers: usize,
    pub form: WorkerForm,
    /// Ranks each worker pod runs (threads for `local`, mpirun processes for `mpi`, 1 for `nccl`).
    pub ranks_per_pod: usize,
    /// The worker container's memory request, MiB: what its ranks hold by
    /// the memory model, with room for what the model leaves out.
    pub worker_memory_mib: u64,
    pub backend: Backend,
    pub gpu: bool,
    /// The resolved job config, token removed: the ConfigMap's `job.toml`.
    pub config_toml: String,
    /// A failed index is retried this many times (each retry resumes from the last commit).
    pub max_restarts: u32,
    /// Environment of every pod, kept in the Secret: token and storage credentials.
    pub secret_env: Vec<(String, String)>,
    /// Notes for the user printed after rendering (placeholders to fill, volumes to add).
    pub notes: Vec<String>,
}

/// Inputs of the renderer besides the job config.
#[derive(Debug, Clone, Default)]
pub struct RenderRequest {
    pub workers: i64,
    pub image: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub gpu: bool,
    pub allow_local_checkpoints: bool,
    pub placeholder_secrets: bool,
    pub max_restarts: u32,
}

/// Checks `req` against `job` and decides the layout; every refusal says what to change.
pub fn plan(job: &JobConfig, req: &RenderRequest, env: impl Fn(&str) -> Option<String>) -> Result<K8sJob> {
    let image = match req.image.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => i.to_string(),
        _ => bail!("--image is required: the container image with the switchyard binary (see the Dockerfile)"),
    };
    if req.workers < 1 {
        bail!("--workers must be at least 1 (got {})", req.workers);
    }
    let workers = req.workers as usize;
    let ranks = job.parallel.ranks;
    let backend = job.parallel.backend;
    let ranks_per_pod = match (backend, req.gpu) {
        (Backend::Nccl, false) => bail!(
            "[parallel] backend = \"nccl\" runs on GPUs: add --gpu, or set parallel.backend to \"local\" or \"mpi\""
        ),
        (Backend::Nccl, true) => {
            // One process per GPU and one GPU per pod: the pod's index is its rank.
            if workers != ranks {
                bail!(
                    "--workers {workers} with --gpu runs {workers} rank(s) (one GPU each) but [parallel] ranks = \
                     {ranks}: use --workers {ranks}, or --set parallel.ranks={workers}"
                );
            }
            1
        }
        (other @ (Backend::Local | Backend::Mpi), true) => bail!(
            "--gpu needs [parallel] backend = \"nccl\" but the config says \"{other}\": \
             add --set parallel.backend=nccl, or drop --gpu for a CPU job"
        ),
        (Backend::Local, false) => {
            // `local` ranks are threads of one process: one pod holds the world.
            if workers != 1 {
                bail!(
                    "--workers {workers}: [parallel] backend = \"local\" runs all {ranks} rank(s) as threads of one \
                     worker pod, so it has --workers 1; for ranks across pods use --set parallel.backend=mpi (an \
                     MPIJob of the Kubeflow MPI Operator), or --gpu with backend nccl"
                );
            }
            ranks
        }
        (Backend::Mpi, false) => {
            // mpirun starts the ranks: in the one worker pod, or over SSH in
            // the MPIJob's worker pods, the same number in each.
            if !ranks.is_multiple_of(workers) {
                bail!(
                    "--workers {workers} cannot hold [parallel] ranks = {ranks} evenly (each pod runs the same \
                     number of ranks): use a --workers that divides {ranks}, or --set parallel.ranks to a multiple \
                     of {workers}"
                );
            }
            ranks / workers
        }
    };
    let form = if backend == Backend::Mpi && workers > 1 { WorkerForm::MpiJob } else { WorkerForm::IndexedJob };
    let worker_memory_mib = worker_memory_mib(job, ranks_per_pod, req.gpu)?;
    let mut notes = Vec::new();
    let url = job.checkpoint.url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("s3" | "gs" | "az") => {}
        _ if req.allow_local_checkpoints => {
            if url.is_empty() || !(url.starts_with("file://") || url.starts_with('/')) {
                bail!(
                    "with --allow-local-checkpoints, set [checkpoint] url to an absolute path (file:///ckpt) \
                     where every pod mounts the same volume (got '{url}')"
                );
            }
            notes.push(format!(
                "checkpoints go to {url} inside the pods: mount one ReadWriteMany PersistentVolumeClaim at that path \
                 in the coordinator pod and in the worker pods (not rendered), or every pod writes its own disk"
            ));
        }
        _ => bail!(
            "[checkpoint] url = '{url}' is {}: pods need storage they all share. Set it to s3://bucket/prefix, \
             gs://bucket/prefix or az://container/prefix, or pass --allow-local-checkpoints with a shared volume",
            if url.is_empty() { "empty (each pod's own run folder)" } else { "not an object store" }
        ),
    }
    let name = dns_label(req.name.as_deref().unwrap_or(&job.name))?;
    if let Some(ns) = &req.namespace {
        if dns_label(ns)? != *ns {
            bail!("--namespace '{ns}' is not a Kubernetes name (lowercase letters, digits and '-')");
        }
    }
    let secret_env = secret_values(job, scheme.unwrap_or(""), req.placeholder_secrets, &env, &mut notes)?;
    if form == WorkerForm::MpiJob {
        notes.push(format!(
            "the workers are an MPIJob ({workers} pods of {ranks_per_pod} rank(s), started over SSH): the cluster needs \
             the Kubeflow MPI Operator (kubeflow.org/v2beta1), and the image must be this project's Dockerfile \
             (sshd, user 1000); docs/kubernetes.md, \"Several nodes\""
        ));
    }
    Ok(K8sJob {
        name,
        namespace: req.namespace.clone(),
        image,
        workers,
        form,
        ranks_per_pod,
        worker_memory_mib,
        backend,
        gpu: req.gpu,
        config_toml: job.to_toml(),
        max_restarts: req.max_restarts,
        secret_env,
        notes,
    })
}

/// The Secret's variables: the job's token and the store's credentials,
/// taken from this environment (or placeholders, named in a note).
fn secret_values(
    job: &JobConfig,
    scheme: &str,
    placeholders: bool,
    env: &impl Fn(&str) -> Option<String>,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, String)>> {
    let get = |name: &str| if placeholders { None } else { env(name).filter(|v| !v.is_empty()) };
    let token = if placeholders {
        PLACEHOLDER.to_string()
    } else if !job.coordinator.token.is_empty() {
        job.coordinator.token.clone()
    } else {
        get("SWITCHYARD_TOKEN").map_or_else(random_token, Ok)?
    };
    let mut values = vec![("SWITCHYARD_TOKEN".to_string(), token)];
    let (required, optional): (&[&str], &[&str]) = match scheme {
        "s3" => (
            &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            &["AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"],
        ),
        "gs" => (&["GOOGLE_SERVICE_ACCOUNT_KEY"], &[]),
        "az" => (&["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"], &[]),
        _ => (&[], &[]),
    };
    let mut missing = Vec::new();
    for &name in required {
        let value = get(name).unwrap_or_else(|| {
            missing.push(name);
            PLACEHOLDER.to_string()
        });
        values.push((name.to_string(), value));
    }
    values.extend(optional.iter().filter_map(|&n| get(n).map(|v| (n.to_string(), v))));
    if placeholders {
        notes.push(format!("the Secret holds {PLACEHOLDER} for every value: replace them before applying"));
    } else if !missing.is_empty() {
        notes.push(format!(
            "{} not set here: the Secret holds {PLACEHOLDER} for them; edit it before applying",
            missing.join(", ")
        ));
    }
    Ok(values)
}

/// A fresh job token: 128 random bits as hex.
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot make a token from /dev/urandom ({e}): set SWITCHYARD_TOKEN"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `raw` as a DNS-1123 label (lowercase, digits, '-'), short enough for the
/// longest suffix added to it ("-coordinator-reg", pod index suffixes).
fn dns_label(raw: &str) -> Result<String> {
    let mut label: String =
        raw.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    label = label.trim_matches('-').to_string();
    if label.is_empty() {
        bail!("'{raw}' gives no usable Kubernetes name: pass --name (lowercase letters, digits and '-')");
    }
    if label.len() > 40 {
        bail!("name '{label}' is longer than 40 characters: pass a shorter --name");
    }
    Ok(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_label("Tiny_MoE.v2").unwrap(), "tiny-moe-v2");
        assert!(dns_label("__").is_err());
        assert!(dns_label(&"x".repeat(41)).is_err());
    }
}
