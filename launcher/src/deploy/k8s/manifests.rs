//! The Kubernetes objects of a job (DESIGN section 2): coordinator Pod and
//! Services, the workers' Indexed Job (or MPIJob, `super::mpijob`), the
//! config's ConfigMap and the Secret. Secret values appear only in the
//! Secret; pods read them with `envFrom`.

use crate::deploy::k8s::mpijob::mpi_job;
use crate::deploy::k8s::plan::{K8sJob, WorkerForm, COORDINATOR_PORT, HTTP_PORT};
use serde_json::{json, Value};
use worker::Backend;

/// Where the ConfigMap's `job.toml` is mounted in every pod.
pub(super) const CONFIG_DIR: &str = "/etc/switchyard";
/// Each pod's run folder (log, resolved config); checkpoints go to the configured URL.
pub(super) const RUN_DIR: &str = "/var/lib/switchyard/run";

/// Every object, each with the file name `--out` writes it to, in apply order.
pub fn manifests(job: &K8sJob) -> Vec<(&'static str, Value)> {
    vec![
        ("configmap.yaml", config_map(job)),
        ("secret.yaml", secret(job)),
        ("coordinator-service.yaml", coordinator_service(job)),
        ("registration-service.yaml", registration_service(job)),
        ("coordinator-pod.yaml", coordinator_pod(job)),
        match job.form {
            WorkerForm::IndexedJob => ("worker-job.yaml", worker_job(job)),
            WorkerForm::MpiJob => ("worker-mpijob.yaml", mpi_job(job)),
        },
    ]
}

/// `kustomization.yaml` listing the files of [`manifests`].
pub fn kustomization(files: &[&str]) -> Value {
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": files,
    })
}

pub(super) fn metadata(job: &K8sJob, name: String, component: &str) -> Value {
    let mut meta = json!({ "name": name, "labels": labels(job, component) });
    if let Some(ns) = &job.namespace {
        meta["namespace"] = json!(ns);
    }
    meta
}

pub(super) fn labels(job: &K8sJob, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "switchyard",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": component,
    })
}

fn config_map(job: &K8sJob) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, format!("{}-config", job.name), "config"),
        "data": { "job.toml": job.config_toml },
    })
}

fn secret(job: &K8sJob) -> Value {
    let values: serde_json::Map<String, Value> = job.secret_env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata(job, secret_name(job), "secrets"),
        "stringData": values,
    })
}

fn secret_name(job: &K8sJob) -> String {
    format!("{}-secrets", job.name)
}

/// Address of the coordinator for users and Prometheus: ready pods only.
fn coordinator_service(job: &K8sJob) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, format!("{}-coordinator", job.name), "coordinator"),
        "spec": {
            "selector": labels(job, "coordinator"),
            "ports": [
                { "name": "coordinator", "port": COORDINATOR_PORT, "targetPort": "coordinator" },
                { "name": "http", "port": HTTP_PORT, "targetPort": "http" },
            ],
        },
    })
}

/// Where workers register: headless and publishing not-ready addresses, so
/// a worker reaches a coordinator that is up but not yet ready.
fn registration_service(job: &K8sJob) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, registration_name(job), "coordinator"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": labels(job, "coordinator"),
            "ports": [{ "name": "coordinator", "port": COORDINATOR_PORT, "targetPort": "coordinator" }],
        },
    })
}

pub(super) fn registration_name(job: &K8sJob) -> String {
    format!("{}-coordinator-reg", job.name)
}

pub(super) fn volumes(job: &K8sJob) -> Value {
    let mut list = vec![
        json!({ "name": "config", "configMap": { "name": format!("{}-config", job.name) } }),
        json!({ "name": "run", "emptyDir": {} }),
    ];
    if job.gpu {
        // NCCL's shared-memory transport needs more than the runtime's 64 MiB /dev/shm.
        list.push(json!({ "name": "dshm", "emptyDir": { "medium": "Memory" } }));
    }
    json!(list)
}

pub(super) fn volume_mounts(job: &K8sJob) -> Value {
    let mut list = vec![
        json!({ "name": "config", "mountPath": CONFIG_DIR, "readOnly": true }),
        json!({ "name": "run", "mountPath": "/var/lib/switchyard" }),
    ];
    if job.gpu {
        list.push(json!({ "name": "dshm", "mountPath": "/dev/shm" }));
    }
    json!(list)
}

pub(super) fn env_from(job: &K8sJob) -> Value {
    json!([{ "secretRef": { "name": secret_name(job) } }])
}

/// The coordinator: restarted in place when it exits non-zero (a lost rank
/// ends it; the restarted one serves the resumed job), left Completed when
/// the job finished. A Deployment would restart a finished coordinator.
fn coordinator_pod(job: &K8sJob) -> Value {
    let config = format!("{CONFIG_DIR}/job.toml");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(job, format!("{}-coordinator", job.name), "coordinator"),
        "spec": {
            "restartPolicy": "OnFailure",
            "containers": [{
                "name": "coordinator",
                "image": job.image,
                "imagePullPolicy": "IfNotPresent",
                "command": [
                    "switchyard", "coordinator", "--config", config,
                    "--addr", format!("0.0.0.0:{COORDINATOR_PORT}"),
                    "--http-addr", format!("0.0.0.0:{HTTP_PORT}"),
                    "--run-dir", RUN_DIR,
                ],
                "ports": [
                    { "name": "coordinator", "containerPort": COORDINATOR_PORT },
                    { "name": "http", "containerPort": HTTP_PORT },
                ],
                "envFrom": env_from(job),
                // Ready = it answers /status; alive = its HTTP server answers at all.
                "readinessProbe": {
                    "httpGet": { "path": "/status", "port": "http" },
                    "periodSeconds": 5,
                },
                "livenessProbe": {
                    "httpGet": { "path": "/healthz", "port": "http" },
                    "initialDelaySeconds": 10,
                    "periodSeconds": 10,
                    "failureThreshold": 6,
                },
                "resources": { "requests": { "cpu": "500m", "memory": "512Mi" } },
                "volumeMounts": volume_mounts(&K8sJob { gpu: false, ..job.clone() }),
            }],
            "volumes": volumes(&K8sJob { gpu: false, ..job.clone() }),
        },
    })
}

/// The worker pods' command: register with the coordinator, resume from
/// the last committed checkpoint when there is one.
fn worker_command(job: &K8sJob) -> Vec<String> {
    let mut cmd: Vec<String> = Vec::new();
    if job.backend == Backend::Mpi {
        let n = job.ranks_per_pod.to_string();
        cmd.extend(["mpirun", "-n", &n, "--oversubscribe", "--bind-to", "none"].map(String::from));
    }
    cmd.extend(rank_command(job));
    cmd
}

/// What every rank runs, whoever starts it (the pod, or mpirun).
pub(super) fn rank_command(job: &K8sJob) -> Vec<String> {
    let coordinator = format!("{}:{COORDINATOR_PORT}", registration_name(job));
    let config = format!("{CONFIG_DIR}/job.toml");
    ["switchyard", "worker", "--coordinator", &coordinator, "--config", &config]
        .into_iter()
        .chain(["--run-dir", RUN_DIR, "--resume-if-any", "--quiet"])
        .map(String::from)
        .collect()
}

fn worker_env(job: &K8sJob) -> Value {
    let mut env = Vec::new();
    if job.backend == Backend::Mpi {
        // Containers run as root, which OpenMPI refuses unless told.
        env.push(json!({ "name": "OMPI_ALLOW_RUN_AS_ROOT", "value": "1" }));
        env.push(json!({ "name": "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "value": "1" }));
    }
    if job.gpu {
        env.push(json!({ "name": "NCCL_DEBUG", "value": "WARN" }));
        // Pod networking is eth0; NCCL would otherwise probe every interface.
        env.push(json!({ "name": "NCCL_SOCKET_IFNAME", "value": "eth0" }));
    }
    json!(env)
}

/// The workers: an Indexed Job, one pod per index, the index is the rank
/// (JOB_COMPLETION_INDEX). A failed pod is replaced (up to `max_restarts`
/// per index) and resumes from the last committed checkpoint; pre-emption
/// and eviction (DisruptionTarget) are not counted; a command-line error
/// (exit code 2) fails the Job at once, since a retry cannot fix it.
fn worker_job(job: &K8sJob) -> Value {
    let mut container = json!({
        "name": "worker",
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        "command": worker_command(job),
        "envFrom": env_from(job),
        // Alive = the process is not stopped or a zombie, checked inside the
        // pod: a worker must not be killed because the coordinator is away
        // (it stops on its own when its coordinator is lost).
        "livenessProbe": {
            "exec": { "command": ["/bin/sh", "-c", "! grep -Eq '^State:[[:space:]]+[TZ]' /proc/1/status"] },
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "resources": { "requests": { "cpu": "1", "memory": format!("{}Mi", job.worker_memory_mib) } },
        "volumeMounts": volume_mounts(job),
    });
    let env = worker_env(job);
    if env.as_array().is_some_and(|e| !e.is_empty()) {
        container["env"] = env;
    }
    if job.gpu {
        container["resources"]["limits"] = json!({ "nvidia.com/gpu": 1 });
    }
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes(job),
    });
    if job.gpu {
        pod_spec["tolerations"] = json!([{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }]);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(job, format!("{}-workers", job.name), "worker"),
        "spec": {
            "completionMode": "Indexed",
            "completions": job.workers,
            "parallelism": job.workers,
            "backoffLimitPerIndex": job.max_restarts,
            "maxFailedIndexes": 0,
            "podFailurePolicy": {
                "rules": [
                    { "action": "FailJob", "onExitCodes": { "containerName": "worker", "operator": "In", "values": [2] } },
                    { "action": "Ignore", "onPodConditions": [{ "type": "DisruptionTarget", "status": "True" }] },
                ],
            },
            "template": {
                "metadata": { "labels": labels(job, "worker") },
                "spec": pod_spec,
            },
        },
    })
}
