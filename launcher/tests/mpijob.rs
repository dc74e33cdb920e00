//! The MPIJob that `switchyard k8s render --workers 2` writes for an MPI
//! job, run without a cluster: three network-namespace hosts stand in for
//! its pods. Hosts 2 and 3 are the worker pods: each runs the rendered
//! worker command (sshd with the image's docker/sshd_config) with a key
//! pair made as the MPI Operator makes it. Host 1 is the coordinator pod
//! and the launcher pod: it runs the rendered coordinator command and the
//! rendered launcher command (mpirun over SSH, with the hostfile and the
//! OpenMPI settings the operator gives a launcher). The job trains; host 3
//! dies; the replaced "pod" and a second run of the launcher (the launcher
//! Job's retry) resume from the last commit and finish.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::processes::{allow_root, wait_guarded, NamespaceHosts};
use common::{parse_yaml, repo, text, EXE};
use serde_json::Value;

/// Paths and names in the rendered objects, and what stands in for them here.
struct Substitutions {
    pairs: Vec<(String, String)>,
}

impl Substitutions {
    fn apply(&self, command: &Value) -> Vec<String> {
        let words = command.as_array().expect("a command list").iter().map(|w| w.as_str().unwrap().to_string());
        words
            .map(|word| {
                let exact = self.pairs.iter().find(|(from, _)| *from == word);
                exact.map_or(word.clone(), |(_, to)| to.clone())
            })
            .collect()
    }
}

/// Runs `command` in namespace host `n` (its own host name, as a pod has).
fn in_host(n: u32, command: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    let script = format!("hostname sy-h{n}; exec \"$@\"");
    cmd.args(["netns", "exec", &format!("sy-h{n}"), "unshare", "--uts", "sh", "-c", &script, "sh"]).args(command);
    cmd
}

/// Kills every process of namespace host `n`: the host is gone.
fn kill_host(n: u32) {
    let pids = Command::new("ip").args(["netns", "pids", &format!("sy-h{n}")]).output().unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Waits until something in host 1 can connect to `addr:port`.
fn wait_for_port(addr: &str, port: u16, what: &str) {
    let started = Instant::now();
    let probe = format!("exec 3<>/dev/tcp/{addr}/{port}");
    let connects = || {
        let mut connect = Command::new("ip");
        connect.args(["netns", "exec", "sy-h1", "bash", "-c", &probe]);
        connect.stderr(Stdio::null()).status().unwrap().success()
    };
    while !connects() {
        assert!(started.elapsed() < Duration::from_secs(30), "{what} does not listen on {addr}:{port}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A worker "pod": the rendered sshd command, with this test's config.
fn start_worker(n: u32, sshd: &[String], dir: &Path) -> Child {
    let mut command = sshd.to_vec();
    command.extend(["-o".into(), format!("PidFile={}/sshd-h{n}.pid", dir.display())]);
    let child = in_host(n, &command).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("sshd starts");
    wait_for_port(&format!("10.77.0.{n}"), 2222, &format!("sshd of host {n}"));
    child
}

fn steps(metrics: &Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn an_mpijob_trains_over_ssh_between_pods_and_a_rerun_after_a_lost_pod_resumes() {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(sshd.exists(), "sshd is missing: apt-get install openssh-server openssh-client (./ci.sh does)");
    // The test runs sshd as root, which wants its privilege separation
    // folder (the image makes it too; its non-root sshd does not use it).
    std::fs::create_dir_all("/run/sshd").unwrap();
    let repo = repo();
    let scratch = common::temp_dir("mpijob", "run");
    let dir: PathBuf = scratch.to_path_buf();

    // 1. Render: 4 ranks in 2 worker pods; checkpoints on a folder every host sees.
    let rendered = dir.join("rendered");
    let checkpoints = dir.join("checkpoints");
    let sets = [
        "parallel.backend=\"mpi\"".to_string(),
        "parallel.ranks=4".into(),
        format!("checkpoint.url=\"{}\"", checkpoints.display()),
        "checkpoint.every=10".into(),
        "train.steps=40".into(),
        "train.log_every=1".into(),
        "train.global_batch_size=8".into(),
        "train.micro_batch_size=2".into(),
        "model.seq_len=32".into(),
        "parallel.collective_timeout_s=20".into(),
    ];
    let mut render = Command::new(EXE);
    render.args(["k8s", "render", "--config"]).arg(repo.join("examples/k8s.toml"));
    render.args(["--workers", "2", "--image", "switchyard:test", "--allow-local-checkpoints", "--out"]).arg(&rendered);
    for set in &sets {
        render.args(["--set", set]);
    }
    let out = render.env("SWITCHYARD_TOKEN", "t0ken").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let read = |file: &str| parse_yaml(&std::fs::read_to_string(rendered.join(file)).unwrap()).remove(0);
    let mpijob = read("worker-mpijob.yaml");
    let config = read("configmap.yaml");
    let coordinator_pod = read("coordinator-pod.yaml");
    let spec = &mpijob["spec"];
    let slots = spec["slotsPerWorker"].as_u64().unwrap();
    assert_eq!((slots, spec["mpiReplicaSpecs"]["Worker"]["replicas"].as_u64()), (2, Some(2)));

    // 2. What the pods see: the ConfigMap's job.toml, the image's sshd
    //    config, the operator's key pair (ECDSA P-521, mounted as id_rsa,
    //    id_rsa.pub and authorized_keys) and hostfile.
    let home = dir.join("home");
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let job_toml = dir.join("job.toml");
    std::fs::write(&job_toml, config["data"]["job.toml"].as_str().unwrap()).unwrap();
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-b", "521", "-N", "", "-f"])
        .arg(ssh.join("id_rsa"))
        .output()
        .expect("ssh-keygen runs (openssh-client)");
    assert!(keygen.status.success(), "{}", text(&keygen));
    std::fs::copy(ssh.join("id_rsa.pub"), ssh.join("authorized_keys")).unwrap();
    let image_sshd = std::fs::read_to_string(repo.join("docker/sshd_config")).unwrap();
    let sshd_config = home.join(".sshd_config");
    std::fs::write(&sshd_config, image_sshd.replace("/home/switchyard", &home.display().to_string())).unwrap();
    let hostfile = dir.join("hostfile");
    std::fs::write(&hostfile, format!("10.77.0.2 slots={slots}\n10.77.0.3 slots={slots}\n")).unwrap();
    // Each pod's run folder is its own; here rank and coordinator folders differ.
    let run_dir = dir.join("run");
    let coordinator_run = dir.join("coordinator");
    let here = |pod_run_dir: &Path| Substitutions {
        pairs: vec![
            ("switchyard".into(), EXE.into()),
            ("/etc/switchyard/job.toml".into(), job_toml.display().to_string()),
            ("/var/lib/switchyard/run".into(), pod_run_dir.display().to_string()),
            ("tiny-k8s-coordinator-reg:29500".into(), "10.77.0.1:29500".into()),
            ("/home/switchyard/.sshd_config".into(), sshd_config.display().to_string()),
        ],
    };
    let container = |role: &str| &spec["mpiReplicaSpecs"][role]["template"]["spec"]["containers"][0]["command"];
    let worker_command = here(&run_dir).apply(container("Worker"));
    let launcher_command = here(&run_dir).apply(container("Launcher"));
    let coordinator_command = here(&coordinator_run).apply(&coordinator_pod["spec"]["containers"][0]["command"]);

    // 3. The pods: workers on hosts 2 and 3, the coordinator on host 1.
    let _hosts = NamespaceHosts::up(&repo);
    let mut workers = vec![start_worker(2, &worker_command, &dir), start_worker(3, &worker_command, &dir)];
    let start_coordinator = || {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("coordinator.log")).unwrap();
        let child = in_host(1, &coordinator_command)
            .env("SWITCHYARD_TOKEN", "t0ken")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the coordinator starts");
        wait_for_port("10.77.0.1", 29500, "the coordinator");
        child
    };
    // The launcher pod: its rendered command, the environment the operator
    // gives a launcher (hostfile, SSH options) and the Secret's variables.
    let launcher = || {
        let ssh_args = format!(
            "-o ConnectionAttempts=10 -p 2222 -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            ssh.join("id_rsa").display()
        );
        let mut cmd = in_host(1, &launcher_command);
        allow_root(&mut cmd)
            .env("SWITCHYARD_TOKEN", "t0ken")
            .env("OMPI_MCA_orte_default_hostfile", &hostfile)
            .env("OMPI_MCA_orte_keep_fqdn_hostnames", "true")
            .env("OMPI_MCA_plm_rsh_args", ssh_args)
            // The namespace hosts' network: every byte between ranks over TCP on the bridge.
            .env("OMPI_MCA_btl", "tcp,self")
            .env("OMPI_MCA_btl_tcp_if_include", "10.77.0.0/24")
            .env("OMPI_MCA_oob_tcp_if_include", "10.77.0.0/24")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("mpirun starts")
    };
    let mut coordinator = start_coordinator();
    let first = launcher();

    // 4. It trains and commits; then host 3 (a worker pod) dies.
    let metrics = coordinator_run.join("metrics.jsonl");
    let started = Instant::now();
    while !(steps(&metrics).len() >= 12 && checkpoints.join("latest").exists()) {
        assert!(started.elapsed() < Duration::from_secs(240), "the MPIJob never trained 12 steps with a commit");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_host(3);
    let killed = Instant::now();
    let out = wait_guarded(first, Duration::from_secs(120), "the launcher after host 3 died");
    assert!(!out.status.success(), "mpirun must fail when a worker pod is lost: {}", text(&out));
    eprintln!("host 3 killed: the launcher ended {:?} later", killed.elapsed());
    let committed = std::fs::read_to_string(checkpoints.join("latest")).unwrap().trim().to_string();

    // 5. The operator makes the pod again; the coordinator pod restarts
    //    (restartPolicy OnFailure); the launcher Job runs its pod again.
    workers.push(start_worker(3, &worker_command, &dir));
    if coordinator.try_wait().unwrap().is_some() {
        coordinator = start_coordinator();
    }
    let out = wait_guarded(launcher(), Duration::from_secs(300), "the launcher's second run");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let steps = steps(&metrics);
    assert_eq!(steps.last(), Some(&40), "the job reached its last step");
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>(), "every step once after the resume");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000040");
    eprintln!("resumed from {committed} after the lost pod and finished at step 40");
    // The coordinator pod completes with the job.
    let done = Instant::now();
    while coordinator.try_wait().unwrap().is_none() && done.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let finished = coordinator.try_wait().unwrap();
    let _ = coordinator.kill();
    let coordinator_log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    assert!(finished.is_some_and(|s| s.success()), "the coordinator did not complete: {coordinator_log}");
    for mut worker in workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
}
