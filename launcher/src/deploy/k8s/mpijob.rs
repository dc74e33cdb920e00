//! The workers of a CPU job over several pods: an `MPIJob` of the Kubeflow
//! MPI Operator (API kubeflow.org/v2beta1, docs/kubernetes.md).
//!
//! The operator makes, for an MPIJob named `<job>-mpi`: the worker pods
//! `<job>-mpi-worker-<i>` (here `sshd` on port 2222 as the image's
//! non-root user), a headless Service naming them, a ConfigMap with the
//! hostfile (`<pod>.<job>-mpi.<namespace>.svc slots=<slotsPerWorker>`),
//! mounted in the launcher at /etc/mpi with `OMPI_MCA_orte_default_hostfile`
//! pointing at it, and an SSH key pair in a Secret of its own, mounted at
//! `sshAuthMountPath` in every pod. Once every worker answers on its SSH
//! port (`WaitForWorkersReady`), it starts the launcher: a batch Job whose
//! pod runs `mpirun` over SSH to start the ranks in the worker pods. The
//! ranks register with the coordinator Pod rendered beside it and resume
//! from the last commit (`--resume-if-any`) whenever the launcher is run
//! again (`runPolicy.backoffLimit` times).

use crate::deploy::k8s::manifests::{env_from, labels, metadata, rank_command, volume_mounts, volumes};
use crate::deploy::k8s::plan::K8sJob;
use serde_json::{json, Value};

/// The image's user (Dockerfile): the operator's examples run as 1000.
const USER_ID: u32 = 1000;
/// Its home, which holds the sshd config and the mounted SSH keys.
const HOME: &str = "/home/switchyard";
/// sshd's port in the worker pods: a non-root sshd cannot bind 22.
pub const SSH_PORT: u16 = 2222;

/// The MPIJob's name: its own objects get suffixes of it (`-config`,
/// `-ssh`, `-launcher`, `-worker-<i>`), which must not collide with the
/// job's ConfigMap `<job>-config`.
pub fn mpi_job_name(job: &K8sJob) -> String {
    format!("{}-mpi", job.name)
}

/// The launcher's command: `mpirun` over the operator's hostfile, the
/// Secret's variables passed on to every rank (SSH starts them with a
/// clean environment), each rank the same command as in an Indexed Job.
pub fn launcher_command(job: &K8sJob) -> Vec<String> {
    let ranks = (job.workers * job.ranks_per_pod).to_string();
    let mut cmd: Vec<String> =
        ["mpirun", "-n", &ranks, "--bind-to", "none", "--map-by", "slot"].map(String::from).to_vec();
    for (name, _) in &job.secret_env {
        cmd.extend(["-x".to_string(), name.clone()]);
    }
    cmd.extend(rank_command(job));
    cmd
}

/// The worker pods' command: sshd in the foreground, logging to stderr,
/// with the image's config (port 2222, the mounted key as host key).
pub fn worker_sshd_command() -> Vec<String> {
    ["/usr/sbin/sshd", "-De", "-f", &format!("{HOME}/.sshd_config")].map(String::from).to_vec()
}

fn non_root() -> Value {
    json!({ "runAsUser": USER_ID, "runAsGroup": USER_ID, "runAsNonRoot": true })
}

/// The MPIJob: one launcher, `job.workers` workers of `job.ranks_per_pod` slots.
pub fn mpi_job(job: &K8sJob) -> Value {
    let launcher = json!({
        "name": "launcher",
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        "command": launcher_command(job),
        "envFrom": env_from(job),
        "resources": { "requests": { "cpu": "250m", "memory": "256Mi" } },
    });
    let worker = json!({
        "name": "worker",
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        "command": worker_sshd_command(),
        "ports": [{ "name": "ssh", "containerPort": SSH_PORT }],
        // Ready = sshd answers: the operator starts the launcher only then.
        "readinessProbe": { "tcpSocket": { "port": "ssh" }, "periodSeconds": 2 },
        "resources": {
            "requests": { "cpu": job.ranks_per_pod.to_string(), "memory": format!("{}Mi", job.worker_memory_mib) },
        },
        "volumeMounts": volume_mounts(job),
    });
    let template = |component: &str, container: Value, with_volumes: bool| {
        let mut spec = json!({ "securityContext": non_root(), "containers": [container] });
        if with_volumes {
            spec["volumes"] = volumes(job);
        }
        json!({ "metadata": { "labels": labels(job, component) }, "spec": spec })
    };
    json!({
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": metadata(job, mpi_job_name(job), "worker"),
        "spec": {
            "slotsPerWorker": job.ranks_per_pod,
            "runPolicy": {
                // Workers go when the job ends; the launcher's pods stay for their logs.
                "cleanPodPolicy": "Running",
                // Each run of the launcher resumes from the last commit.
                "backoffLimit": job.max_restarts,
            },
            "sshAuthMountPath": format!("{HOME}/.ssh"),
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": template("launcher", launcher, false),
                },
                "Worker": {
                    "replicas": job.workers,
                    // A worker whose sshd dies is restarted in place; a lost
                    // node's pod is made again by the operator.
                    "restartPolicy": "OnFailure",
                    "template": template("worker", worker, true),
                },
            },
        },
    })
}
