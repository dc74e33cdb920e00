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

/// The YAML documents of `yaml` as JSON values (PyYAML comes with kubernetes-validate).
fn parse(yaml: &str) -> Vec<Value> {
    let dir = temp_dir("parse");
    let file = dir.join("docs.yaml");
    std::fs::write(&file, yaml).unwrap();
    let script = "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let out = Command::new("python3").args(["-c", script]).arg(&file).output().expect("python3 runs");
    assert!(out.status.success(), "PyYAML (pip install kubernetes-validate) cannot read it: {}", text(&out));
    let mut docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    docs.sort_by_key(|d| (d["kind"].to_string(), d["metadata"]["name"].to_string()));
    docs
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", docs.iter().map(|d| &d["kind"]).collect::<Vec<_>>()))
}

/// Renders to stdout, validates the documents and returns them.
fn render_valid(name: &str, extra: &[&str]) -> Vec<Value> {
    let out = render(extra);
    assert!(out.status.success(), "{}", text(&out));
    let yaml = String::from_utf8(out.stdout).unwrap();
    let scratch = temp_dir(name);
    let file = scratch.join("all.yaml");
    std::fs::write(&file, &yaml).unwrap();
    validate(&file);
    // Secret values only in the Secret.
    let docs = parse(&yaml);
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

#[test]
fn committed_k8s_tree_is_what_the_renderer_writes_and_valid() {
    let base = ["--image", "switchyard:latest", "--placeholder-secrets"];
    let variants: [(&str, Vec<&str>); 3] = [
        ("base", vec!["--workers", "1"]),
        ("overlays/cpu-mpi", vec!["--workers", "1", "--set", "parallel.backend=\"mpi\""]),
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
        let scratch = temp_dir("kustomize");
        let file = scratch.join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, &built).unwrap();
        validate(&file);
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
    refused(&["--workers", "2", "--image", "i"], "a CPU job has --workers 1");
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
