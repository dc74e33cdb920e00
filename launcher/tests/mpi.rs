//! `switchyard train --backend mpi` as a user runs it, with a real OpenMPI:
//! the launcher's own mpirun, ranks started directly by mpirun, three
//! network-namespace "hosts" talking TCP, and a rank that is stopped or
//! killed mid-run. Losses must match the one-rank run.
//!
//! The suites share the machine's two cores, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

mod common;
use common::processes::{allow_root, find_rank, wait_guarded, NamespaceHosts};
use common::{text, EXE};

const STEPS: usize = 20;

fn temp_dir(name: &str) -> common::Scratch {
    common::temp_dir("mpi", name)
}

/// The default (dropless) model, 20 steps, no checkpoint before the end.
fn job_args(run_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> =
        ["train", "--quiet", "--set", "checkpoint.every=0", "--set", "train.log_every=10"].map(String::from).to_vec();
    args.extend(["--set".into(), format!("train.steps={STEPS}"), "--run-dir".into(), run_dir.display().to_string()]);
    args
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
        panic!("cannot start {what}: {e} (the MPI tests need OpenMPI: apt-get install openmpi-bin; ./ci.sh does)")
    });
    wait_guarded(child, Duration::from_secs(300), what)
}

fn losses(run_dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl written");
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
}

fn assert_close(reference: &[f64], other: &[f64], what: &str) {
    assert_eq!(reference.len(), other.len(), "{what}: step count");
    for (step, (a, b)) in reference.iter().zip(other).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{what}: step {} loss {b} vs {a} on one rank", step + 1);
    }
}

fn one_rank_losses(dir: &Path) -> Vec<f64> {
    let run_dir = dir.join("one");
    let out = run(Command::new(EXE).args(job_args(&run_dir)), "one-rank run");
    assert!(out.status.success(), "{}", text(&out));
    losses(&run_dir)
}

#[test]
fn the_launchers_mpirun_on_2_and_4_ranks_matches_one_rank() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("launch");
    let reference = one_rank_losses(&dir);
    // 2 and 4 ranks with experts over all of them; 4 with attention in 2 shards.
    for (ranks, attn_tp) in [(2, 1), (4, 1), (4, 2)] {
        let run_dir = dir.join(format!("mpi{ranks}-tp{attn_tp}"));
        let out = run(
            Command::new(EXE)
                .args(job_args(&run_dir))
                .args(["--backend", "mpi", "--ranks", &ranks.to_string()])
                .args(["--set", &format!("parallel.attn_tp={attn_tp}")]),
            "switchyard train --backend mpi",
        );
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.contains(&format!("layout: {ranks} ranks (mpi backend)")), "{log}");
        // Only rank 0 reports: one banner, one closing block.
        assert_eq!(log.matches("switchyard: ").count(), 1, "{log}");
        assert_eq!(log.matches("checkpoint: file://").count(), 1, "{log}");
        assert_close(&reference, &losses(&run_dir), &format!("{ranks} MPI ranks, attn_tp {attn_tp}"));
    }
}

#[test]
fn ranks_start_from_the_launch_plan_whatever_flags_the_launcher_was_given() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("plan");
    let run_dir = dir.join("plan");
    // Flags only the launcher acts on (--max-restarts, --set in = form), and
    // ones the ranks must honour (--stop-at, --trace): the ranks get the
    // resolved config and typed flags, so they start and stop where they
    // were told, and each writes its timeline, which the launcher merges.
    let trace = dir.join("trace.json");
    let out = run(
        Command::new(EXE)
            .args(job_args(&run_dir))
            .args(["--backend", "mpi", "--ranks", "2", "--max-restarts=1", "--stop-at", "8"])
            .arg("--set=model.n_experts=4")
            .args(["--trace", trace.to_str().unwrap()]),
        "switchyard train --backend mpi with launcher flags",
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(losses(&run_dir).len(), 8, "the ranks stopped at --stop-at 8: {log}");
    let merged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    for rank in 0..2u64 {
        let names: std::collections::BTreeSet<&str> = merged["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["pid"].as_u64() == Some(rank) && e["ph"] == "X")
            .filter_map(|e| e["name"].as_str())
            .collect();
        for phase in ["step", "forward", "backward", "dispatch", "expert compute", "combine", "gradient all-reduce"] {
            assert!(names.contains(phase), "rank {rank}'s process wrote no {phase:?} into the merged trace: {names:?}");
        }
    }
    assert!(!dir.join("trace.rank-0.json").exists(), "the ranks' own files are merged and removed");
    let plan = std::fs::read_to_string(run_dir.join("launch.toml")).expect("the ranks' resolved config");
    assert!(plan.contains("n_experts = 4") && plan.contains("backend = \"mpi\""), "{plan}");
    assert!(run_dir.join("checkpoints/step-00000008/manifest.json").exists(), "{log}");
}

#[test]
fn ranks_started_by_mpirun_read_their_rank_from_the_environment() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("direct");
    let reference = one_rank_losses(&dir);
    let run_dir = dir.join("direct");
    // No --ranks: the world size comes from OMPI_COMM_WORLD_SIZE.
    let out = run(
        allow_root(Command::new("mpirun").args(["-n", "4", "--oversubscribe", "--bind-to", "none", EXE]))
            .args(job_args(&run_dir))
            .args(["--backend", "mpi"]),
        "mpirun -n 4 switchyard",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_close(&reference, &losses(&run_dir), "mpirun -n 4");
}

/// `metrics.jsonl`'s lines as JSON.
fn metric_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl written");
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Layouts of [`example_on_4_mpi_ranks_matches_one_rank`]: no attention
/// shards, or two.
const TP1: &[&str] = &["parallel.attn_tp=1"];
const TP2: &[&str] = &["parallel.attn_tp=2"];

/// An example config's 20 steps on 1 rank, then on 4 MPI ranks with each
/// of `layouts` (`--set`s, e.g. attention shards): the same losses
/// and, with an expert bias, the same bias bits, every rank checked
/// against rank 0's.
fn example_on_4_mpi_ranks_matches_one_rank(example: &str, layouts: &[&[&str]]) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir(example);
    let example = format!("{}/../examples/{example}.toml", env!("CARGO_MANIFEST_DIR"));
    let example = example.as_str();
    let args = |run_dir: &Path| {
        let mut args = job_args(run_dir);
        args.extend(
            ["--config", example, "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2"]
                .map(String::from),
        );
        args
    };
    let one = dir.join("one");
    let out = run(Command::new(EXE).args(args(&one)), "one-rank run");
    assert!(out.status.success(), "{}", text(&out));
    for (i, &layout) in layouts.iter().enumerate() {
        let run_dir = dir.join(format!("mpi4-layout{i}"));
        let sets = layout.iter().flat_map(|set| ["--set", set]);
        let out = run(
            Command::new(EXE).args(args(&run_dir)).args(["--backend", "mpi", "--ranks", "4"]).args(sets),
            "switchyard train --backend mpi",
        );
        assert!(out.status.success(), "{}", text(&out));
        if layout.iter().any(|set| set.starts_with("overlap.mode")) {
            assert!(text(&out).contains("all-to-all on a thread"), "{layout:?}: overlap took effect: {}", text(&out));
        }
        let (reference, other) = (metric_lines(&one), metric_lines(&run_dir));
        assert_eq!(reference.len(), other.len());
        for (a, b) in reference.iter().zip(&other) {
            let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!((la - lb).abs() <= 1e-6 * la, "{layout:?}, step {}: loss {lb} vs {la}", a["step"]);
            assert_eq!(a["computation_free_share"], b["computation_free_share"], "step {}", a["step"]);
            if a.get("expert_bias").is_none() {
                continue;
            }
            assert!(
                a["expert_bias"]
                    .as_array()
                    .is_some_and(|layers| layers.iter().any(|l| l.as_array().is_some_and(|b| !b.is_empty()))),
                "{a}"
            );
            assert_eq!(a["expert_bias"], b["expert_bias"], "{layout:?}, step {}: expert bias", a["step"]);
            // Every rank checked it routes with rank 0's bias.
            let hashes: Vec<&serde_json::Value> =
                b["per_rank"].as_array().unwrap().iter().map(|r| &r["expert_bias_hash"]).collect();
            assert!(hashes.len() == 4 && hashes.iter().all(|h| *h == hashes[0] && h.as_u64().is_some()), "{hashes:?}");
        }
        let loss = |step: usize| reference[step]["loss"].as_f64().unwrap();
        assert!(loss(STEPS - 1) < loss(0) - 0.3, "the example learns: {} -> {}", loss(0), loss(STEPS - 1));
    }
}

#[test]
fn deepseek_v3_example_on_4_mpi_ranks_matches_one_rank_bias_included() {
    example_on_4_mpi_ranks_matches_one_rank("deepseek-v3-mini", &[TP1, TP2]);
}

#[test]
fn moe_plus_plus_example_on_4_mpi_ranks_matches_one_rank() {
    example_on_4_mpi_ranks_matches_one_rank("moe-plus-plus", &[TP1, TP2]);
}

#[test]
fn jetmoe_example_with_attention_experts_on_4_mpi_ranks_matches_one_rank() {
    // Attention experts partitioned over the ranks, their rows exchanged on
    // the rank's thread and on the communication thread.
    let partitioned = "parallel.attn_expert_placement=\"partitioned\"";
    let overlapped = &[partitioned, "overlap.mode=\"on\""];
    example_on_4_mpi_ranks_matches_one_rank("jetmoe-mini", &[TP1, TP2, &[partitioned], overlapped]);
}

#[test]
fn moh_example_with_routed_heads_on_4_mpi_ranks_matches_one_rank() {
    example_on_4_mpi_ranks_matches_one_rank("moh-mini", &[TP1, TP2]);
}

#[test]
fn mot_example_with_modalities_on_4_mpi_ranks_matches_one_rank() {
    example_on_4_mpi_ranks_matches_one_rank("mot-mini", &[TP1, TP2]);
}

#[test]
fn qwen_moe_example_on_4_mpi_ranks_matches_one_rank() {
    example_on_4_mpi_ranks_matches_one_rank("qwen-moe", &[TP1, TP2]);
}

/// Waits (3 minutes at most) until the run has `steps` lines of metrics
/// and, when asked, a committed checkpoint; returns the metrics file.
fn wait_for_progress(run_dir: &Path, steps: usize, with_checkpoint: bool) -> PathBuf {
    let started = Instant::now();
    let metrics = run_dir.join("metrics.jsonl");
    let trained = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) >= steps;
    let checkpointed = || !with_checkpoint || run_dir.join("checkpoints/latest").exists();
    while !(trained() && checkpointed()) {
        assert!(started.elapsed() < Duration::from_secs(180), "the job never reached step {steps}");
        std::thread::sleep(Duration::from_millis(50));
    }
    metrics
}

/// Starts a long 4-rank job, waits until it trains, sends `signal` to rank
/// `victim` and returns what the launcher printed and how long it took to end.
fn signal_a_rank(name: &str, signal: &str, victim: usize, extra: &[&str]) -> (Output, Duration) {
    let dir = temp_dir(name);
    let run_dir = dir.join("run");
    let tag = format!("{name}-{}", std::process::id());
    let child = Command::new(EXE)
        .args(job_args(&run_dir))
        .args(["--backend", "mpi", "--ranks", "4", "--set", "train.steps=100000", "--set", "train.log_every=1"])
        .args(extra)
        .env("SWITCHYARD_TEST_TAG", &tag)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard starts");
    wait_for_progress(&run_dir, 3, false);
    let pid = find_rank(&tag, victim).expect("rank process found by its environment");
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
    let signalled = Instant::now();
    let out = wait_guarded(child, Duration::from_secs(90), "the job after a rank was signalled");
    // A stopped rank is killed by MPI_Abort; make sure nothing is left behind.
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
    (out, signalled.elapsed())
}

#[test]
fn a_stopped_rank_makes_the_others_fail_naming_it() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (out, took) = signal_a_rank("stop", "-STOP", 2, &["--set", "parallel.collective_timeout_s=5"]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("timed out after 5s"), "{log}");
    // The roll call names every rank that did not answer: rank 2, and any
    // rank that is itself stuck waiting for rank 2's data (its exchange
    // partner in the all-to-all), so a list may hold more than rank 2.
    let named: Vec<Vec<u32>> = log
        .split("rank(s) [")
        .skip(1)
        .filter_map(|rest| rest.split_once("] never arrived"))
        .map(|(list, _)| list.split(", ").filter_map(|r| r.trim().parse().ok()).collect())
        .collect();
    // (The ranks' stderr lines interleave, so some reports come out garbled: one naming rank 2 is the proof.)
    assert!(named.iter().any(|ranks| ranks.contains(&2)), "rank 2 named as missing: {log}");
    assert!(log.contains("the MPI job failed"), "{log}");
    eprintln!("stopped rank 2: the job ended {took:?} after the signal; missing ranks reported: {named:?}");
}

/// SIGTERM to one rank only: every rank saves the step and stops, and the
/// launcher reports a stop (143), not a failed job.
#[test]
fn sigterm_to_one_rank_stops_the_job_with_a_checkpoint_and_143() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (out, _) = signal_a_rank("rank-sigterm", "-TERM", 1, &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    assert!(log.contains("the ranks committed a checkpoint") && !log.contains("the MPI job failed"), "{log}");
}

#[test]
fn a_killed_rank_ends_the_job_with_an_error() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (out, took) = signal_a_rank("kill", "-KILL", 1, &["--set", "parallel.collective_timeout_s=5"]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    // Whoever notices first names rank 1: mpirun ("process rank 1 ... signal 9")
    // or the coordinator ("rank 1 on <host> is lost"), which then stops the others.
    let named = log.contains("process rank 1") || log.contains("rank 1 on ");
    assert!(named && log.contains("the MPI job failed"), "{log}");
    eprintln!("killed rank 1: the job ended {took:?} after the signal");
}

#[test]
fn the_coordinator_stops_the_job_when_a_rank_stops_heartbeating() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Collectives would wait 120 s; the coordinator hears nothing from the
    // stopped rank for 3 s, names it, and every other rank stops at once.
    let extra = ["--set", "parallel.collective_timeout_s=120", "--set", "coordinator.heartbeat_timeout_s=3"];
    let (out, took) = signal_a_rank("heartbeat", "-STOP", 2, &extra);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("coordinator: rank 2 on") && log.contains("no heartbeat"), "{log}");
    assert!(log.contains("stopped: rank 2 on"), "the other ranks say why they stopped: {log}");
    assert!(took < Duration::from_secs(60), "ended by the coordinator, not the 120 s collective timeout: {took:?}");
    eprintln!("stopped rank 2 (heartbeats): the job ended {took:?} after the signal");
}

/// SIGTERM (a pod's or a batch system's, which often reach only the
/// launcher) and SIGINT (Ctrl-C) to the launcher of an MPI job: the ranks
/// save the current step, the launcher exits 143, and the job resumes
/// from that step.
#[test]
fn sigterm_and_sigint_to_the_mpi_launcher_save_the_step_and_exit_143() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("launcher-signals");
    let run_dir = dir.join("run");
    let metrics = run_dir.join("metrics.jsonl");
    let steps_done = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
    let mut resume: &[&str] = &[];
    for signal in ["-TERM", "-INT"] {
        let before = steps_done();
        let child = Command::new(EXE)
            .args(job_args(&run_dir))
            .args(["--backend", "mpi", "--ranks", "2", "--set", "train.steps=100000", "--set", "train.log_every=1"])
            .args(resume)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("switchyard starts");
        wait_for_progress(&run_dir, before + 3, false);
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
        let out = wait_guarded(child, Duration::from_secs(120), "the MPI job after a signal to its launcher");
        let log = text(&out);
        let name = if signal == "-TERM" { "SIGTERM" } else { "SIGINT" };
        assert_eq!(out.status.code(), Some(143), "{name}: {log}");
        assert!(log.contains(&format!("stopped on {name}")) && log.contains("committed a checkpoint"), "{log}");
        let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
        assert_eq!(latest.trim(), format!("step-{:08}", steps_done()), "{name}: the checkpoint is of the last step");
        resume = &["--resume"];
    }
    let end = format!("train.steps={}", steps_done() + 2);
    let out = run(
        Command::new(EXE).args(job_args(&run_dir)).args([
            "--backend",
            "mpi",
            "--ranks",
            "2",
            "--resume",
            "--set",
            &end,
        ]),
        "the resumed job",
    );
    assert!(out.status.success(), "{}", text(&out));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>(), "every step once, in order");
}

/// A 2-rank MPI job of 40 steps (a commit every 10) with `flags`, whose
/// rank 1 is SIGKILLed once a checkpoint is committed and training went
/// on past it; returns the launcher, still running.
fn forty_steps_with_rank_1_killed_after_a_commit(run_dir: &Path, name: &str, flags: &[&str]) -> Child {
    let tag = format!("{name}-{}", std::process::id());
    let child = Command::new(EXE)
        .args(["train", "--quiet", "--backend", "mpi", "--ranks", "2"])
        .args(flags)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--set", "train.steps=40", "--set", "checkpoint.every=10", "--set", "train.log_every=1"])
        .args(["--set", "parallel.collective_timeout_s=10"])
        .env("SWITCHYARD_TEST_TAG", &tag)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard starts");
    wait_for_progress(run_dir, 12, true);
    let pid = find_rank(&tag, 1).expect("rank 1 found by its environment");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    child
}

#[test]
fn max_restarts_resumes_a_job_whose_rank_was_killed() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("restart");
    let run_dir = dir.join("run");
    let child = forty_steps_with_rank_1_killed_after_a_commit(&run_dir, "restart", &["--max-restarts", "1"]);
    let metrics = run_dir.join("metrics.jsonl");
    let out = wait_guarded(child, Duration::from_secs(240), "the restarted job");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("restart 1/1: resuming from step"), "{log}");
    assert!(log.contains("done: "), "{log}");
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    // Steps run after the checkpoint and again after the restart are kept once.
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>(), "the job reached its last step, every step once");
}

/// Without --max-restarts a killed rank ends the run; the launcher then
/// says which step was committed and the command that resumes it, and
/// that command finishes the run.
#[test]
fn a_killed_rank_without_restarts_leaves_a_resume_command_that_finishes_the_run() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("no-restart");
    let run_dir = dir.join("run");
    let child = forty_steps_with_rank_1_killed_after_a_commit(&run_dir, "no-restart", &[]);
    let out = wait_guarded(child, Duration::from_secs(240), "the job whose rank was killed");
    let log = text(&out);
    assert!(!out.status.success(), "a killed rank must fail the run: {log}");
    let hint = log.lines().find(|l| l.contains("last committed checkpoint is step")).unwrap_or_else(|| panic!("{log}"));
    let command = hint.split("Resume it with: ").nth(1).and_then(|rest| rest.split(" (or").next()).expect(hint);
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"switchyard"), "{hint}");
    let out = Command::new(EXE).args(&words[1..]).arg("--quiet").output().expect("switchyard starts");
    let log = text(&out);
    assert!(out.status.success(), "the printed command resumes and finishes: {log}");
    assert!(log.contains("resuming from file://"), "{log}");
    let last = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 40, "the resumed run reached the last step");
}

/// `switchyard coordinator` for 2 ranks of `job` writing to `run_dir`,
/// with the stdout it is still writing and the address it printed.
fn separate_coordinator(
    run_dir: &Path,
    job: &[&str],
) -> (Child, std::io::BufReader<std::process::ChildStdout>, String) {
    use std::io::BufRead;
    let mut coordinator = Command::new(EXE)
        .args(["coordinator", "--ranks", "2", "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--run-dir"])
        .arg(run_dir)
        .args(job)
        .env("SWITCHYARD_TOKEN", "t0ken")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard coordinator starts");
    let mut stdout = std::io::BufReader::new(coordinator.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    let addr = banner.split_whitespace().nth(1).expect("coordinator <addr> waiting ...").to_string();
    (coordinator, stdout, addr)
}

/// `mpirun -n 2 switchyard worker` of `job` for the coordinator at `addr`.
fn mpirun_workers(addr: &str, run_dir: &Path, job: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    allow_root(cmd.args(["-n", "2", "--oversubscribe", "--bind-to", "none", EXE]))
        .args(["worker", "--coordinator", addr, "--backend", "mpi", "--quiet", "--run-dir"])
        .arg(run_dir)
        .args(job)
        .env("SWITCHYARD_TOKEN", "t0ken");
    cmd
}

/// SIGTERM to a coordinator started on its own (a coordinator pod being
/// deleted): it asks every rank to save the current step and stop; the
/// ranks commit and exit 143, and so does the coordinator.
#[test]
fn sigterm_to_a_separate_coordinator_saves_the_step_and_stops_the_job() {
    use std::io::Read;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("coordinator-sigterm");
    let run_dir = dir.join("run");
    let job = ["--set", "train.steps=100000", "--set", "checkpoint.every=0", "--set", "train.log_every=1"];
    let (coordinator, mut stdout, addr) = separate_coordinator(&run_dir, &job);
    let workers = mpirun_workers(&addr, &run_dir, &job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    let metrics = wait_for_progress(&run_dir, 3, false);
    assert!(Command::new("kill").args(["-TERM", &coordinator.id().to_string()]).status().unwrap().success());
    let ended = wait_guarded(coordinator, Duration::from_secs(120), "the coordinator after SIGTERM");
    let workers = wait_guarded(workers, Duration::from_secs(60), "the workers after the coordinator's request");
    let mut log = String::new();
    stdout.read_to_string(&mut log).unwrap();
    assert_eq!(ended.status.code(), Some(143), "{log}{}", text(&ended));
    assert!(log.contains("SIGTERM: asking every rank to save"), "{log}");
    assert!(text(&ended).contains("stopped on SIGTERM"), "{}", text(&ended));
    assert!(!workers.status.success(), "the workers stopped early, so not with success: {}", text(&workers));
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{steps:08}"), "the checkpoint is of the last step");
    assert!(log.contains(&format!("checkpoint step {steps} committed")), "{log}");
}

#[test]
fn a_separate_coordinator_serves_workers_started_by_mpirun() {
    use std::io::Read;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("roles");
    let job = ["--set", "train.steps=12", "--set", "checkpoint.every=0"];
    let (coordinator, mut stdout, addr) = separate_coordinator(&dir.join("run"), &job);

    // A worker with the wrong token is refused, clearly; the job goes on.
    let bad = run(
        Command::new(EXE)
            .args(["worker", "--coordinator", &addr, "--quiet", "--run-dir"])
            .arg(dir.join("intruder"))
            .args(job)
            .env("SWITCHYARD_TOKEN", "guess"),
        "a worker with a wrong token",
    );
    assert!(!bad.status.success() && text(&bad).contains("wrong auth token"), "{}", text(&bad));

    let out = run(&mut mpirun_workers(&addr, &dir.join("run"), &job), "mpirun -n 2 switchyard worker");
    assert!(out.status.success(), "{}", text(&out));
    let ended = wait_guarded(coordinator, Duration::from_secs(60), "the coordinator after its workers finished");
    let mut log = String::new();
    stdout.read_to_string(&mut log).unwrap();
    assert!(ended.status.success(), "{log}{}", text(&ended));
    assert!(log.contains("refused") && log.contains("wrong auth token"), "{log}");
    assert!(log.contains("step 12 | loss") && log.contains("every rank finished"), "{log}");
    assert!(log.contains("checkpoint step 12 committed"), "the coordinator commits the final checkpoint: {log}");
}

/// Whether a process with `pid` still exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills `victim` ("rank" 1, or the "coordinator", i.e. the launcher that
/// runs it) while the upload of checkpoint step 20 is in flight, then
/// checks that step 10 is still the committed one and that `--resume`
/// continues from it to the end.
fn kill_during_upload(victim: &str) {
    let dir = temp_dir(&format!("upload-{victim}"));
    let run_dir = dir.join("run");
    let tag = format!("upload-{victim}-{}", std::process::id());
    let args = |resume: bool| {
        let mut args: Vec<String> =
            ["train", "--quiet", "--backend", "mpi", "--ranks", "2", "--run-dir"].map(String::from).to_vec();
        args.push(run_dir.display().to_string());
        for set in ["train.steps=40", "checkpoint.every=10", "train.log_every=1", "parallel.collective_timeout_s=10"] {
            args.extend(["--set".to_string(), set.to_string()]);
        }
        if resume {
            args.push("--resume".into());
        }
        args
    };
    // Every upload first waits 4 s: long enough to kill a process during one.
    let child = Command::new(EXE)
        .args(args(false))
        .env("SWITCHYARD_TEST_TAG", &tag)
        .env("SWITCHYARD_FAULT_UPLOAD_DELAY_MS", "4000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard starts");
    // Step 10 committed and step 20's save started (its metrics line comes after the save began).
    let latest = run_dir.join("checkpoints/latest");
    let started = Instant::now();
    while !(std::fs::read_to_string(&latest).is_ok_and(|t| t.trim() == "step-00000010")
        && std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) >= 20)
    {
        assert!(started.elapsed() < Duration::from_secs(180), "the job never reached step 20 with step 10 committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks: Vec<u32> = (0..2).filter_map(|r| find_rank(&tag, r)).collect();
    assert_eq!(ranks.len(), 2, "both rank processes found by their environment");
    let pid = if victim == "rank" { ranks[1] } else { child.id() };
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let killed = Instant::now();
    let out = wait_guarded(child, Duration::from_secs(90), "the job after a kill during an upload");
    assert!(!out.status.success(), "{}", text(&out));
    // Nobody is left hanging: every rank process ends by itself.
    while ranks.iter().any(|&pid| alive(pid)) {
        assert!(killed.elapsed() < Duration::from_secs(60), "a rank outlived the {victim} by 60 s: it hung");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("killed the {victim} during an upload: every rank ended {:?} after the signal", killed.elapsed());
    assert_eq!(std::fs::read_to_string(&latest).unwrap().trim(), "step-00000010");
    assert!(!run_dir.join("checkpoints/step-00000020/manifest.json").exists(), "step 20 was never committed");
    let verify = run(Command::new(EXE).args(["ckpt", "verify"]).arg(run_dir.join("checkpoints")), "ckpt verify");
    assert!(text(&verify).contains("step-00000010"), "{}", text(&verify));

    let out = run(Command::new(EXE).args(args(true)), "the resumed job");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from") && log.contains("step-00000010"), "{log}");
    let last = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().last().unwrap().to_string();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&last).unwrap()["step"], 40);
    assert_eq!(std::fs::read_to_string(&latest).unwrap().trim(), "step-00000040");
}

#[test]
fn a_rank_killed_during_an_upload_leaves_the_last_commit_to_resume_from() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    kill_during_upload("rank");
}

#[test]
fn the_coordinator_killed_during_an_upload_leaves_the_last_commit_to_resume_from() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    kill_during_upload("coordinator");
}

/// A DeepSeek-style router on 3 ranks over 3 namespace hosts: with its 3
/// groups placed one per node (`placement = "grouped"`) and 1 kept per
/// token, a token's 4 experts sit on one node, so it reaches at most one
/// other node; without the group limit its experts spread over all three.
#[test]
fn grouped_placement_keeps_each_token_on_one_other_node_at_most() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = temp_dir("grouped");
    let _hosts = NamespaceHosts::up(&repo);
    let mpirun = repo.join("scripts/netns-mpirun.sh");
    let example = format!("{}/../examples/deepseek-v3-mini.toml", env!("CARGO_MANIFEST_DIR"));
    let model = ["model.n_experts=12", "model.top_k=4", "train.global_batch_size=6", "train.micro_batch_size=2"];
    let run_on_hosts = |name: &str, sets: &[&str]| -> Vec<serde_json::Value> {
        let run_dir = dir.join(name);
        let mut cmd = Command::new(&mpirun);
        cmd.args(["-n", "3", "--host", "10.77.0.1:1,10.77.0.2:1,10.77.0.3:1"])
            .arg(EXE)
            .args(job_args(&run_dir))
            .args(["--backend", "mpi", "--config", &example]);
        for set in model.iter().chain(sets) {
            cmd.args(["--set", set]);
        }
        let out = run(&mut cmd, "mpirun over namespace hosts");
        assert!(out.status.success(), "{}", text(&out));
        metric_lines(&run_dir)
    };
    let limited =
        run_on_hosts("limited", &["model.n_groups=3", "model.topk_groups=1", "parallel.placement=\"grouped\""]);
    let spread = run_on_hosts("spread", &["model.n_groups=1", "model.topk_groups=1"]);
    // Token-layer visits: 6 sequences of 64 tokens, 2 layers.
    let visits = 6.0 * 64.0 * 2.0;
    let pairs = |lines: &[serde_json::Value]| -> f64 {
        lines.iter().map(|l| l["internode_token_nodes"].as_f64().unwrap_or(0.0)).sum::<f64>() / lines.len() as f64
    };
    let (limited_pairs, spread_pairs) = (pairs(&limited), pairs(&spread));
    let mean = |lines: &[serde_json::Value], key: &str| {
        lines.iter().map(|l| l[key].as_f64().unwrap_or(0.0)).sum::<f64>() / lines.len() as f64
    };
    let (limited_sent, spread_sent) = (mean(&limited, "internode_rows_sent"), mean(&spread, "internode_rows_sent"));
    eprintln!(
        "per step, {visits} token-layer visits: (token, other node) pairs {limited_pairs:.0} grouped and limited, \
         {spread_pairs:.0} without the limit; rows for experts on other nodes {:.0} and {:.0}; rows sent to other \
         nodes {limited_sent:.0} and {spread_sent:.0}; all-to-all bytes sent {:.0} and {:.0}",
        mean(&limited, "internode_rows"),
        mean(&spread, "internode_rows"),
        mean(&limited, "alltoall_bytes_sent"),
        mean(&spread, "alltoall_bytes_sent"),
    );
    assert!(limited_pairs > 0.0 && limited_pairs <= visits, "at most one other node per token: {limited_pairs}");
    assert!(
        limited_pairs < 0.8 * spread_pairs,
        "(token, node) pairs crossing nodes per step: {limited_pairs:.0} with groups on nodes, {spread_pairs:.0} without"
    );
    assert!(
        limited_sent < 0.8 * spread_sent,
        "rows sent between nodes per step: {limited_sent:.0} with groups on nodes, {spread_sent:.0} without"
    );
    // The simulator's count for a uniform router: each visit goes to the
    // ranks of its experts, two thirds of them on other nodes.
    for (sets, measured) in [
        (&["model.n_groups=3", "model.topk_groups=1"], limited_sent),
        (&["model.n_groups=1", "model.topk_groups=1"], spread_sent),
    ] {
        let overrides: Vec<String> = model.iter().chain(sets).map(|s| s.to_string()).collect();
        let job = worker::JobConfig::load(Some(Path::new(&example)), &overrides).unwrap();
        let predicted = visits * simulator::shape::owners_per_token(&job.model, 3) * 2.0 / 3.0;
        assert!(
            (measured - predicted).abs() <= 0.1 * predicted,
            "{sets:?}: rows sent between nodes per step {measured:.0}, simulator {predicted:.0}"
        );
        eprintln!("{sets:?}: rows sent between nodes per step {measured:.0}, simulator {predicted:.0}");
    }
    for lines in [&limited, &spread] {
        for line in lines.iter() {
            let rows = line["internode_rows"].as_u64().unwrap();
            let pairs = line["internode_token_nodes"].as_u64().unwrap();
            // One rank per node: a token travels to a node once.
            assert_eq!(line["internode_rows_sent"].as_u64().unwrap(), pairs, "{line}");
            assert!(line["rows_deduplicated"].as_u64().unwrap() >= rows - pairs, "{line}");
        }
    }
}

#[test]
fn four_ranks_over_three_namespace_hosts_match_one_rank() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = temp_dir("hosts");
    let reference = one_rank_losses(&dir);
    let _hosts = NamespaceHosts::up(&repo);
    let run_dir = dir.join("hosts");
    // mpirun runs on host 1 (ranks 0, 1); orted reaches hosts 2 and 3
    // through the agent; every byte between ranks goes over TCP on the bridge.
    let out = run(
        Command::new(repo.join("scripts/netns-mpirun.sh")).arg(EXE).args(job_args(&run_dir)).args(["--backend", "mpi"]),
        "mpirun over namespace hosts",
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("nodes: 3 | sy-h1: ranks 0,1 | sy-h2: rank 2 | sy-h3: rank 3"), "{log}");
    // Ranks on several nodes: overlap is on by default, and the losses still match.
    assert!(log.contains("overlap: all-to-all on a thread in 2 chunk(s)"), "{log}");
    assert_close(&reference, &losses(&run_dir), "4 ranks on 3 namespace hosts");
}

#[test]
fn a_lost_host_is_left_out_and_the_job_continues_on_the_remaining_ranks() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = temp_dir("host-loss");
    let run_dir = dir.join("run");
    let _hosts = NamespaceHosts::up(&repo);
    let agent = repo.join("scripts/netns-rsh.sh");
    let mpirun_args = format!(
        "launch.extra_args=[\"--mca\", \"plm_rsh_agent\", \"{}\", \"--mca\", \"btl\", \"tcp,self\", \
         \"--mca\", \"btl_tcp_if_include\", \"10.77.0.0/24\", \"--mca\", \"oob_tcp_if_include\", \"10.77.0.0/24\"]",
        agent.display()
    );
    // 24 sequences per step split evenly over 4 ranks and over 3.
    let job = [
        "--set",
        "train.steps=40",
        "--set",
        "checkpoint.every=10",
        "--set",
        "train.log_every=1",
        "--set",
        "train.global_batch_size=24",
        "--set",
        "train.micro_batch_size=2",
        "--set",
        "parallel.collective_timeout_s=30",
    ];
    let child = allow_root(Command::new("ip").args(["netns", "exec", "sy-h1", "unshare", "--uts", "sh", "-c"]))
        .args(["hostname sy-h1; exec \"$@\"", "sh", EXE, "train", "--quiet", "--backend", "mpi", "--ranks", "4"])
        .args(["--hosts", "10.77.0.1:2,10.77.0.2:1,10.77.0.3:1", "--max-restarts", "1", "--run-dir"])
        .arg(&run_dir)
        .args(job)
        .args(["--set", &mpirun_args])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard starts in host 1");
    let metrics = wait_for_progress(&run_dir, 12, true);
    // Host 3 dies: every process in its namespace is killed.
    let pids = Command::new("ip").args(["netns", "pids", "sy-h3"]).output().unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let out = wait_guarded(child, Duration::from_secs(300), "the job after host 3 died");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("host 10.77.0.3:1 (rank 3) is gone: continuing on 10.77.0.1:2,10.77.0.2:1 with 3 rank(s)"),
        "{log}"
    );
    assert!(log.contains("restart 1/1: resuming from step") && log.contains("layout: 3 ranks"), "{log}");
    let last = std::fs::read_to_string(&metrics).unwrap().lines().last().unwrap().to_string();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["step"], 40, "the job reached its last step on the remaining hosts");
}

/// `simulate validate` end to end on 2 namespace hosts at one shaped rate:
/// the link is measured, the point trained over MPI and predicted, and the
/// table, results and plot name every part with numbers. How close they
/// land is the command's own table (docs/scaling.md), not checked here.
#[test]
fn simulate_validate_measures_and_predicts_every_part_over_shaped_links() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = temp_dir("validate");
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, "steps = 8\nwarmup = 3\n[axes]\nparallel.ranks = [2]\n").unwrap();
    let out_dir = dir.join("out");
    let mut cmd = Command::new(EXE);
    cmd.current_dir(&repo).args(["simulate", "validate", "--rates", "200mbit", "--rounds", "1", "--grid"]);
    cmd.arg(&grid).arg("--out").arg(&out_dir);
    let out = run(&mut cmd, "simulate validate");
    assert!(out.status.success(), "{}", text(&out));
    let table = std::fs::read_to_string(out_dir.join("table.md")).unwrap();
    assert!(table.contains("| 200mbit | parallel.ranks=2 |"), "{table}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    let link = &results["links"][0];
    assert!(link["bandwidth_gbps"].as_f64().unwrap() > 0.0 && link["latency_us"].as_f64().unwrap() > 0.0, "{link}");
    let row = &results["rows"][0];
    for side in ["measured", "predicted"] {
        for part in ["step_s", "compute_s", "transfer_s", "waiting_s"] {
            let v = row[side][part].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v < 10.0, "{side} {part} = {v}: {row}");
        }
    }
    for file in ["validate_200mbit.svg", "validate_200mbit.png", "cluster-200mbit.toml", "cluster.toml"] {
        assert!(out_dir.join(file).is_file(), "{file} was not written");
    }
    let hosts = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&hosts.stdout).contains("sy-h"), "the namespace hosts were left behind");
}
