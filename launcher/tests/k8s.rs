//! `switchyard k8s render` and the committed `k8s/` tree: every variant is
//! checked by `kubernetes-validate --strict` against Kubernetes 1.33 (a
//! missing tool is a failure, never a skip), the objects say what the docs
//! promise, the overlays are what the renderer writes, and bad input is
//! refused before anything is written. Also `--resume-if-any`, which the
//! worker pods run with.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{repo, text, EXE as BIN, SMALL};

fn temp_dir(name: &str) -> common::Scratch {
    common::temp_dir("k8s", name)
}

/// `switchyard k8s render --config examples/k8s.toml ...` with a known token and S3 keys in its environment.
fn render(extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["k8s", "render", "--config"]).arg(repo().join("examples/k8s.toml")).args(extra);
    for var in ["AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"] {
        cmd.env_remove(var);
    }
    cmd.env("SWITCHYARD_TOKEN", "tok-5ecret-value")
        .env("AWS_ACCESS_KEY_ID", "AKIA-TEST-KEY")
        .env("AWS_SECRET_ACCESS_KEY", "s3-5ecret-value");
    cmd.output().expect("switchyard runs")
}

const SECRETS: [&str; 3] = ["tok-5ecret-value", "AKIA-TEST-KEY", "s3-5ecret-value"];

/// Runs `kubernetes-validate --strict -k 1.33.0` on `file`; panics with how to install it when missing.
fn validate(file: &Path) {
    let out = Command::new("kubernetes-validate").args(["--strict", "-k", "1.33.0"]).arg(file).output();
    let out = out.unwrap_or_else(|e| {
        panic!(
            "kubernetes-validate cannot be run ({e}): install it with `pip install kubernetes-validate` (ci.sh does)"
        )
    });
    assert!(out.status.success(), "{} is not valid Kubernetes 1.33:\n{}", file.display(), text(&out));
    assert!(!text(&out).contains("ERROR"), "{}", text(&out));
}

fn parse(yaml: &str) -> Vec<Value> {
    common::parse_yaml(yaml)
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", docs.iter().map(|d| &d["kind"]).collect::<Vec<_>>()))
}

/// Validates rendered documents: built-in kinds with `kubernetes-validate
/// --strict`; an MPIJob against the operator's API ([`check_mpijob`]), and
/// its launcher and worker pod templates, wrapped as Pods, like built-ins.
fn validate_docs(name: &str, docs: &[Value]) {
    let mut built_in: Vec<Value> = docs.iter().filter(|d| d["kind"] != "MPIJob").cloned().collect();
    for job in docs.iter().filter(|d| d["kind"] == "MPIJob") {
        check_mpijob(job);
        for (role, spec) in job["spec"]["mpiReplicaSpecs"].as_object().unwrap() {
            let template = &spec["template"];
            built_in.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": format!("{}-{}", job["metadata"]["name"].as_str().unwrap(), role.to_lowercase()),
                              "labels": template["metadata"]["labels"] },
                "spec": template["spec"],
            }));
        }
    }
    let scratch = temp_dir(name);
    let file = scratch.join("all.yaml");
    let yaml: Vec<String> = built_in.iter().map(|d| serde_json::to_string_pretty(d).unwrap()).collect();
    std::fs::write(&file, format!("---\n{}\n", yaml.join("\n---\n"))).unwrap();
    validate(&file);
}

/// Kinds of values in the MPIJob v2beta1 API (the operator's
/// pkg/apis/kubeflow/v2beta1/types.go, its CRD and validation.go).
enum Field {
    Int {
        min: i64,
        max: Option<i64>,
    },
    Bool,
    Text {
        one_of: &'static [&'static str],
    },
    Object(&'static [(&'static str, Field)]),
    /// Left to the Kubernetes schema (a PodTemplateSpec, quantities, ...).
    Any,
}

use Field::{Any, Bool, Int, Object, Text};

const NONEMPTY: &[&str] = &[];
const RUN_POLICY: &[(&str, Field)] = &[
    ("cleanPodPolicy", Text { one_of: &["None", "Running", "All"] }),
    ("ttlSecondsAfterFinished", Int { min: 0, max: None }),
    ("activeDeadlineSeconds", Int { min: 0, max: None }),
    ("backoffLimit", Int { min: 0, max: None }),
    ("schedulingPolicy", Any),
    ("suspend", Bool),
    ("managedBy", Text { one_of: &["kubeflow.org/mpi-operator", "kueue.x-k8s.io/multikueue"] }),
];
const LAUNCHER: &[(&str, Field)] = &[
    ("replicas", Int { min: 1, max: Some(1) }),
    ("restartPolicy", Text { one_of: &["OnFailure", "Never", "ExitCode"] }),
    ("template", Any),
];
const WORKER: &[(&str, Field)] = &[
    ("replicas", Int { min: 1, max: None }),
    ("restartPolicy", Text { one_of: &["Always", "OnFailure", "Never", "ExitCode"] }),
    ("template", Any),
];
const REPLICA_SPECS: &[(&str, Field)] = &[("Launcher", Object(LAUNCHER)), ("Worker", Object(WORKER))];
const MPIJOB_SPEC: &[(&str, Field)] = &[
    ("slotsPerWorker", Int { min: 0, max: None }),
    ("runLauncherAsWorker", Bool),
    ("runPolicy", Object(RUN_POLICY)),
    ("sshAuthMountPath", Text { one_of: NONEMPTY }),
    ("mpiImplementation", Text { one_of: &["OpenMPI", "Intel", "MPICH"] }),
    ("launcherCreationPolicy", Text { one_of: &["AtStartup", "WaitForWorkersReady"] }),
    ("mpiReplicaSpecs", Object(REPLICA_SPECS)),
];

/// Checks `value` at `path` against `field`: no unknown keys, the right
/// types, enums and bounds, so a misspelt or mistyped field fails here as
/// it would at the API server or in the operator.
fn check_field(path: &str, value: &Value, field: &Field) {
    match field {
        Int { min, max } => {
            let n = value.as_i64().unwrap_or_else(|| panic!("{path} must be an integer, is {value}"));
            assert!(n >= *min && max.is_none_or(|m| n <= m), "{path} = {n} is out of range");
        }
        Bool => assert!(value.is_boolean(), "{path} must be true or false, is {value}"),
        Text { one_of } => {
            let s = value.as_str().unwrap_or_else(|| panic!("{path} must be a string, is {value}"));
            assert!(!s.is_empty(), "{path} must not be empty");
            assert!(one_of.is_empty() || one_of.contains(&s), "{path} = {s:?} is not one of {one_of:?}");
        }
        Object(fields) => {
            let map = value.as_object().unwrap_or_else(|| panic!("{path} must be an object, is {value}"));
            for (key, v) in map {
                let (_, f) = fields
                    .iter()
                    .find(|(name, _)| name == key)
                    .unwrap_or_else(|| panic!("{path}.{key} is not a field of the MPIJob v2beta1 API"));
                check_field(&format!("{path}.{key}"), v, f);
            }
        }
        Any => assert!(!value.is_null(), "{path} is null"),
    }
}

/// An MPIJob as the operator's v2beta1 API defines it (field names, types,
/// enums, required parts), and names the operator can derive pods from.
fn check_mpijob(job: &Value) {
    assert_eq!(job["apiVersion"], "kubeflow.org/v2beta1");
    let top: Vec<&String> = job.as_object().unwrap().keys().collect();
    assert!(top.iter().all(|k| ["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str())), "{top:?}");
    check_field("spec", &job["spec"], &Object(MPIJOB_SPEC));
    let specs = &job["spec"]["mpiReplicaSpecs"];
    assert!(specs["Launcher"].is_object(), "an MPIJob needs a Launcher");
    for role in ["Launcher", "Worker"] {
        let template = &specs[role]["template"];
        assert!(specs[role]["replicas"].is_i64(), "{role}.replicas is required");
        let containers = template["spec"]["containers"].as_array().expect("template.spec.containers");
        assert!(!containers.is_empty(), "{role} has no container");
        assert!(template["spec"]["restartPolicy"].is_null(), "{role}: restartPolicy belongs to the replica spec");
    }
    // Pod names are <job>-worker-<i>: a DNS-1035 job name, labels of at most 63.
    let name = job["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with(|c: char| c.is_ascii_lowercase()), "{name} must start with a letter");
    let last = format!("{name}-worker-{}", specs["Worker"]["replicas"].as_i64().unwrap() - 1);
    assert!(last.len() <= 63 && last.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
}

#[test]
fn the_mpijob_check_catches_misspelt_and_mistyped_fields() {
    let docs = render_valid("mpijob-check", &mpijob_args());
    let good = object(&docs, "MPIJob", "tiny-k8s-mpi").clone();
    check_mpijob(&good);
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut job = good.clone();
        edit(&mut job);
        std::panic::catch_unwind(|| check_mpijob(&job)).is_err()
    };
    assert!(broken(&|j| j["spec"]["slotsPerWorkers"] = 2.into()), "misspelt field");
    assert!(broken(&|j| j["spec"]["slotsPerWorker"] = "2".into()), "string for an integer");
    assert!(broken(&|j| j["spec"]["mpiImplementation"] = "OpenMpi".into()), "unknown implementation");
    assert!(broken(&|j| j["spec"]["runPolicy"]["cleanPodPolicy"] = "Finished".into()), "unknown policy");
    assert!(broken(&|j| j["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] = 2.into()), "two launchers");
    assert!(broken(&|j| j["spec"]["mpiReplicaSpecs"]["Launcher"]["restartPolicy"] = "Always".into()));
    assert!(broken(&|j| j["spec"]["mpiReplicaSpecs"]["launcher"] = Value::Null), "lowercase role");
    assert!(broken(&|j| j["apiVersion"] = "kubeflow.org/v1".into()), "old API");
}

/// Renders to stdout, validates the documents and returns them.
fn render_valid(name: &str, extra: &[&str]) -> Vec<Value> {
    let out = render(extra);
    assert!(out.status.success(), "{}", text(&out));
    let yaml = String::from_utf8(out.stdout).unwrap();
    // Secret values only in the Secret.
    let docs = parse(&yaml);
    validate_docs(name, &docs);
    for doc in docs.iter().filter(|d| d["kind"] != "Secret") {
        let shown = doc.to_string();
        for secret in SECRETS {
            assert!(!shown.contains(secret), "{secret} leaked into {} {}", doc["kind"], doc["metadata"]["name"]);
        }
    }
    docs
}

fn worker_container(docs: &[Value]) -> &Value {
    &object(docs, "Job", "tiny-k8s-workers")["spec"]["template"]["spec"]["containers"][0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect()
}

#[test]
fn cpu_job_renders_every_object_valid_and_wired() {
    let docs = render_valid("cpu", &["--workers", "1", "--image", "reg.example/switchyard:1", "--namespace", "ml"]);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Job", "Pod", "Secret", "Service", "Service"]);
    assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "ml"));

    let secret = object(&docs, "Secret", "tiny-k8s-secrets");
    assert_eq!(secret["stringData"]["SWITCHYARD_TOKEN"], "tok-5ecret-value");
    assert_eq!(secret["stringData"]["AWS_SECRET_ACCESS_KEY"], "s3-5ecret-value");

    let config = object(&docs, "ConfigMap", "tiny-k8s-config")["data"]["job.toml"].as_str().unwrap().to_string();
    assert!(config.contains("url = \"s3://switchyard-checkpoints/tiny-k8s\""), "{config}");
    assert!(config.contains("backend = \"local\""), "{config}");

    let reg = object(&docs, "Service", "tiny-k8s-coordinator-reg");
    assert_eq!(reg["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(reg["spec"]["clusterIP"], "None");
    let svc = object(&docs, "Service", "tiny-k8s-coordinator");
    let ports: Vec<i64> =
        svc["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()).collect();
    assert_eq!(ports, [29500, 29501]);

    let pod = object(&docs, "Pod", "tiny-k8s-coordinator");
    assert_eq!(pod["spec"]["restartPolicy"], "OnFailure");
    let coordinator = &pod["spec"]["containers"][0];
    assert_eq!(coordinator["readinessProbe"]["httpGet"]["path"], "/status");
    assert_eq!(coordinator["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(coordinator["envFrom"][0]["secretRef"]["name"], "tiny-k8s-secrets");

    let job = object(&docs, "Job", "tiny-k8s-workers");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!((job["spec"]["parallelism"].as_i64(), job["spec"]["completions"].as_i64()), (Some(1), Some(1)));
    assert_eq!(job["spec"]["backoffLimitPerIndex"], 3);
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    assert!(rules.iter().any(|r| r["action"] == "Ignore" && r["onPodConditions"][0]["type"] == "DisruptionTarget"));
    let worker = worker_container(&docs);
    let command = strings(&worker["command"]);
    assert_eq!(command[..4], ["switchyard", "worker", "--coordinator", "tiny-k8s-coordinator-reg:29500"]);
    assert!(command.contains(&"--resume-if-any"), "{command:?}");
    // A worker's liveness is its own process, never the coordinator.
    let liveness = worker["livenessProbe"].to_string();
    assert!(worker["livenessProbe"]["exec"].is_object() && !liveness.contains("coordinator"), "{liveness}");
    assert!(worker["readinessProbe"].is_null());
    assert!(worker["resources"]["limits"]["nvidia.com/gpu"].is_null());
}

/// A CPU worker pod asks for the memory its ranks hold by the memory
/// model, so the scheduler places it on a node where it fits.
#[test]
fn a_cpu_worker_pod_requests_the_memory_its_model_needs() {
    let request_mib = |docs: &[Value]| {
        let memory = worker_container(docs)["resources"]["requests"]["memory"].as_str().unwrap().to_string();
        memory.strip_suffix("Mi").unwrap_or_else(|| panic!("{memory} is not in Mi")).parse::<u64>().unwrap()
    };
    assert_eq!(request_mib(&render_valid("mem-small", &["--workers", "1", "--image", "i:1"])), 1024, "at least 1 GiB");
    // 2 layers x 16 experts x 3 x 1024 x 4096 = 403M expert parameters, 16 bytes
    // each with their gradient and AdamW moments: 6.0 GiB before activations.
    let big = ["--workers", "1", "--image", "i:1", "--set", "model.d_model=1024", "--set", "model.ffn_hidden=4096"];
    let big =
        render_valid("mem-big", &[&big[..], &["--set", "model.n_experts=16", "--set", "model.n_heads=8"]].concat());
    let mib = request_mib(&big);
    assert!((6 * 1024 * 5 / 4..24 * 1024).contains(&mib), "{mib} MiB");
}

#[test]
fn gpu_jobs_run_one_rank_per_gpu_pod_at_any_size() {
    for workers in [1, 2, 4] {
        let n = workers.to_string();
        let ranks = format!("parallel.ranks={workers}");
        let args = ["--workers", &n, "--gpu", "--set", "parallel.backend=\"nccl\"", "--set", &ranks, "--image", "i:1"];
        let docs = render_valid(&format!("gpu{workers}"), &args);
        let job = object(&docs, "Job", "tiny-k8s-workers");
        assert_eq!(job["spec"]["parallelism"].as_u64(), Some(workers as u64));
        assert_eq!(job["spec"]["completions"].as_u64(), Some(workers as u64));
        let worker = worker_container(&docs);
        assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], 1);
        let env = worker["env"].to_string();
        assert!(env.contains("NCCL_SOCKET_IFNAME"), "{env}");
        let config = object(&docs, "ConfigMap", "tiny-k8s-config")["data"]["job.toml"].to_string();
        assert!(config.contains("backend = \\\"nccl\\\""), "{config}");
    }
}

#[test]
fn mpi_job_starts_its_ranks_with_mpirun_in_the_worker_pod() {
    let docs = render_valid("mpi", &["--workers", "1", "--set", "parallel.backend=\"mpi\"", "--image", "i:1"]);
    let command = strings(&worker_container(&docs)["command"]);
    assert_eq!(command[..3], ["mpirun", "-n", "2"]);
    assert!(command.contains(&"worker"));
}

/// A CPU job over 2 pods of 2 MPI ranks each.
fn mpijob_args() -> Vec<&'static str> {
    vec!["--workers", "2", "--set", "parallel.backend=\"mpi\"", "--set", "parallel.ranks=4", "--image", "i:1"]
}

#[test]
fn a_cpu_job_over_several_pods_is_an_mpijob_of_ssh_workers_and_an_mpirun_launcher() {
    let docs = render_valid("mpijob", &mpijob_args());
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "MPIJob", "Pod", "Secret", "Service", "Service"], "no Indexed Job");
    let job = object(&docs, "MPIJob", "tiny-k8s-mpi");
    let spec = &job["spec"];
    assert_eq!(spec["slotsPerWorker"], 2, "2 ranks per worker pod");
    assert_eq!(spec["runPolicy"]["backoffLimit"], 3, "--max-restarts runs of the launcher");
    assert_eq!(spec["launcherCreationPolicy"], "WaitForWorkersReady");
    assert_eq!(spec["sshAuthMountPath"], "/home/switchyard/.ssh");
    let launcher = &spec["mpiReplicaSpecs"]["Launcher"];
    let command = strings(&launcher["template"]["spec"]["containers"][0]["command"]);
    assert_eq!(command[..3], ["mpirun", "-n", "4"], "{command:?}");
    // Every Secret variable reaches the ranks by name (SSH gives them a clean environment).
    for var in ["SWITCHYARD_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(command.windows(2).any(|w| w == ["-x", var]), "{var} not passed on: {command:?}");
    }
    let rank = command.iter().position(|&c| c == "switchyard").expect("the rank command");
    assert_eq!(command[rank..rank + 4], ["switchyard", "worker", "--coordinator", "tiny-k8s-coordinator-reg:29500"]);
    assert!(command.contains(&"--resume-if-any"), "{command:?}");
    assert_eq!(launcher["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"], "tiny-k8s-secrets");
    let workers = &spec["mpiReplicaSpecs"]["Worker"];
    assert_eq!(workers["replicas"], 2);
    let worker = &workers["template"]["spec"]["containers"][0];
    assert_eq!(strings(&worker["command"]), ["/usr/sbin/sshd", "-De", "-f", "/home/switchyard/.sshd_config"]);
    assert_eq!(worker["ports"][0]["containerPort"], 2222);
    assert_eq!(worker["readinessProbe"]["tcpSocket"]["port"], "ssh");
    assert_eq!(worker["resources"]["requests"]["cpu"], "2", "a core per rank");
    let mounts = worker["volumeMounts"].to_string();
    assert!(mounts.contains("/etc/switchyard"), "the ranks read the job's config in the worker pods: {mounts}");
    for role in ["Launcher", "Worker"] {
        let security = &spec["mpiReplicaSpecs"][role]["template"]["spec"]["securityContext"];
        assert_eq!((security["runAsUser"].as_i64(), security["runAsNonRoot"].as_bool()), (Some(1000), Some(true)));
    }
    // Its objects (<name>-config, -ssh) must not be the job's own.
    assert!(docs.iter().all(|d| d["metadata"]["name"] != "tiny-k8s-mpi-config"));
}

#[test]
fn committed_k8s_tree_is_what_the_renderer_writes_and_valid() {
    let base = ["--image", "switchyard:latest", "--placeholder-secrets"];
    let variants: [(&str, Vec<&str>); 4] = [
        ("base", vec!["--workers", "1"]),
        ("overlays/cpu-mpi", vec!["--workers", "1", "--set", "parallel.backend=\"mpi\""]),
        (
            "overlays/cpu-mpijob",
            vec!["--workers", "2", "--set", "parallel.backend=\"mpi\"", "--set", "parallel.ranks=4"],
        ),
        (
            "overlays/gpu-nccl",
            vec!["--workers", "4", "--gpu", "--set", "parallel.backend=\"nccl\"", "--set", "parallel.ranks=4"],
        ),
    ];
    for (dir, extra) in variants {
        let out = Command::new("kubectl").args(["kustomize"]).arg(repo().join("k8s").join(dir)).output();
        let out = out.expect("kubectl runs (/usr/bin/kubectl)");
        assert!(out.status.success(), "kubectl kustomize k8s/{dir}: {}", text(&out));
        let built = String::from_utf8(out.stdout).unwrap();
        validate_docs(&format!("kustomize-{}", dir.replace('/', "-")), &parse(&built));
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let rendered = render(&args);
        assert!(rendered.status.success(), "{}", text(&rendered));
        assert_eq!(
            parse(&built),
            parse(&String::from_utf8(rendered.stdout).unwrap()),
            "k8s/{dir} drifted from `switchyard k8s render`: run scripts/render-k8s.sh"
        );
    }
}

#[test]
fn out_writes_one_file_per_object_and_a_kustomization() {
    let scratch = temp_dir("out");
    let dir = scratch.join("job");
    let out = render(&["--workers", "1", "--image", "i:1", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(
        files,
        [
            "configmap.yaml",
            "coordinator-pod.yaml",
            "coordinator-service.yaml",
            "kustomization.yaml",
            "registration-service.yaml",
            "secret.yaml",
            "worker-job.yaml"
        ]
    );
    for file in files.iter().filter(|f| *f != "kustomization.yaml") {
        validate(&dir.join(file));
    }
}

/// Renders with `--out` and expects a refusal mentioning `want`, with nothing written.
fn refused(extra: &[&str], want: &str) {
    let scratch = temp_dir("refused");
    let dir = scratch.join("out");
    let mut args = extra.to_vec();
    args.extend(["--out", dir.to_str().unwrap()]);
    let out = render(&args);
    assert!(!out.status.success(), "accepted {extra:?}");
    assert!(text(&out).contains(want), "{extra:?}: expected '{want}' in: {}", text(&out));
    assert!(!dir.exists(), "{extra:?} wrote files before refusing");
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    refused(&["--workers", "1"], "--image is required");
    refused(&["--workers", "0", "--image", "i"], "--workers must be at least 1");
    refused(&["--workers", "-2", "--image", "i"], "--workers must be at least 1");
    // Local ranks are threads: one pod holds them all.
    refused(&["--workers", "2", "--image", "i"], "as threads of one worker pod");
    // MPI ranks over pods: the same number in each.
    refused(
        &["--workers", "3", "--set", "parallel.backend=\"mpi\"", "--image", "i"],
        "cannot hold [parallel] ranks = 2",
    );
    let nccl = ["--gpu", "--set", "parallel.backend=\"nccl\"", "--image", "i"];
    let more: Vec<&str> = [&["--workers", "3"], &nccl[..]].concat();
    refused(&more, "[parallel] ranks = 2");
    refused(&["--workers", "1", "--gpu", "--image", "i"], "--gpu needs [parallel] backend = \"nccl\"");
    refused(&["--workers", "2", "--set", "parallel.backend=\"nccl\"", "--image", "i"], "add --gpu");
    for url in ["\"\"", "\"/data/ckpt\"", "\"file:///data/ckpt\"", "\"memory://x\""] {
        let set = format!("checkpoint.url={url}");
        refused(&["--workers", "1", "--image", "i", "--set", &set], "pods need storage they all share");
    }
    refused(
        &["--workers", "1", "--image", "i", "--allow-local-checkpoints", "--set", "checkpoint.url=\"\""],
        "absolute path",
    );
}

#[test]
fn local_checkpoints_need_the_explicit_flag_and_get_a_volume_note() {
    let args = ["--workers", "1", "--image", "i", "--allow-local-checkpoints", "--set", "checkpoint.url=\"/ckpt\""];
    let out = render(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ReadWriteMany PersistentVolumeClaim"), "{}", text(&out));
}

#[test]
fn resume_if_any_starts_fresh_then_resumes_the_last_commit() {
    let dir = temp_dir("resume");
    let train = |extra: &[&str]| {
        let out =
            Command::new(BIN).args(["train", "--run-dir", "run"]).args(SMALL).args(extra).current_dir(&dir).output();
        out.unwrap()
    };
    // No checkpoint yet: a fresh start, where --resume would refuse.
    let refused = train(&["--resume", "--quiet"]);
    assert!(!refused.status.success() && text(&refused).contains("no committed checkpoint"), "{}", text(&refused));
    let first = train(&["--resume-if-any", "--stop-at", "6"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(!text(&first).contains("resuming from"), "{}", text(&first));
    // Same command line again (a replaced pod): continues from step 6.
    let second = train(&["--resume-if-any"]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("(step 6)"), "{}", text(&second));
    let both = train(&["--resume-if-any", "--resume"]);
    assert!(!both.status.success(), "--resume-if-any with --resume must be refused");
}

#[test]
fn an_unreachable_checkpoint_store_is_refused_before_anything_is_written() {
    let scratch = temp_dir("unreachable");
    let out_dir = scratch.join("out");
    let out = Command::new(BIN)
        .args(["k8s", "render", "--config"])
        .arg(repo().join("examples/k8s.toml"))
        .args(["--workers", "1", "--image", "i", "--check-store", "--set", "checkpoint.retries=0", "--out"])
        .arg(&out_dir)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("s3://switchyard-checkpoints/tiny-k8s") && log.contains("does not answer"), "{log}");
    assert!(log.contains("nothing was written") && !out_dir.exists(), "{log}");
}
