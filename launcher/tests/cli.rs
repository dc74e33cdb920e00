//! The `switchyard` binary as a user runs it: train, resume, eval, data
//! prepare, and every kind of bad input → a clear error, a non-zero exit,
//! and nothing already saved touched.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{switchyard, text, SMALL};

fn temp_dir(name: &str) -> common::Scratch {
    common::temp_dir("cli", name)
}

fn train(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--quiet", "--run-dir", "run"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    switchyard(&args, dir)
}

#[test]
fn train_resume_and_eval_work_as_documented() {
    let dir = temp_dir("flow");
    let out = train(&dir, &["--stop-at", "6"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("entropy floor") && log.contains("unigram entropy"), "{log}");
    assert!(log.contains("checkpoint: file://") && log.contains("switchyard eval --checkpoint"), "{log}");
    for file in ["config.toml", "metrics.jsonl", "train.log", "checkpoints/latest"] {
        assert!(dir.join("run").join(file).exists(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_expert", "dropped"]
    {
        assert!(first.get(key).is_some(), "metrics.jsonl lacks {key}: {first}");
    }

    let out = train(&dir, &["--resume"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from") && log.contains("step 6"), "{log}");
    assert_eq!(std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap().lines().count(), 12);

    std::fs::write(dir.join("eval.txt"), "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let out = switchyard(&["eval", "--checkpoint", "run/checkpoints", "--data", "eval.txt", "--json"], &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let result: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    // 900 bytes, T = 16: windows i*16 .. i*16+17 while <= 900 → 56 windows.
    assert_eq!(result["windows"], 56);
    assert_eq!(result["tokens"], 56 * 16);
    let loss = result["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 10.0, "{result}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn data_prepare_then_train_on_it() {
    let dir = temp_dir("prepare");
    std::fs::create_dir_all(dir.join("corpus/sub")).unwrap();
    std::fs::write(dir.join("corpus/a.txt"), "abcabcabd ".repeat(200)).unwrap();
    std::fs::write(dir.join("corpus/sub/b.txt"), "xyzxyzxyw ".repeat(200)).unwrap();
    let out = switchyard(&["data", "prepare", "--input", "corpus", "--out", "data"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("4000 tokens"), "{}", text(&out));
    let out = train(&dir, &["--set", "data.source=data"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("corpus unigram entropy"), "{log}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_config_files_are_named_with_the_key() {
    let dir = temp_dir("badcfg");
    let cases: &[(&str, &str, &[&str])] = &[
        ("missing.toml", "", &["missing.toml"]),
        ("garbled.toml", "[model\nd_model = ", &["garbled.toml"]),
        ("types.toml", "[train]\nsteps = \"many\"\n", &["types.toml", "steps"]),
        ("unknown.toml", "[model]\nd_modle = 64\n", &["unknown.toml", "d_modle"]),
        ("impossible.toml", "[model]\nn_experts = 2\ntop_k = 4\n", &["impossible.toml", "top_k"]),
        // NaN is not equal to itself: it once passed here and failed later as "a different job".
        ("nan.toml", "[model]\ncapacity_factor = nan\n", &["nan.toml", "capacity_factor", "finite"]),
        ("inf.toml", "[model]\ncapacity_factor = inf\n", &["inf.toml", "capacity_factor", "finite"]),
    ];
    for (file, body, needles) in cases {
        if !body.is_empty() {
            std::fs::write(dir.join(file), body).unwrap();
        }
        let out = switchyard(&["train", "--quiet", "--config", file, "--run-dir", "run"], &dir);
        let log = text(&out);
        assert!(!out.status.success(), "{file} was accepted");
        for needle in *needles {
            assert!(log.contains(needle), "{file}: error does not name {needle}: {log}");
        }
        assert!(!dir.join("run").exists(), "{file}: a run folder was created");
    }
    let out = switchyard(&["train", "--quiet", "--set", "train.nope=3"], &dir);
    assert!(!out.status.success() && text(&out).contains("nope"), "{}", text(&out));
    // A flag and a --set of the same key that disagree: neither silently wins.
    let out = switchyard(&["train", "--quiet", "--ranks", "2", "--set", "parallel.ranks=3", "--run-dir", "run"], &dir);
    let log = text(&out);
    assert!(!out.status.success() && log.contains("--ranks 2") && log.contains("parallel.ranks=3"), "{log}");
    assert!(!dir.join("run").exists(), "a run folder was created");
    // Allowed but probably not meant: said before the job starts.
    let short = ["train", "--quiet", "--set", "train.steps=2", "--set", "optim.warmup_steps=5", "--run-dir", "short"];
    let out = switchyard(&short, &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("warning:") && log.contains("warmup_steps = 5") && log.contains("steps = 2"), "{log}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A job larger than the machine is refused with its numbers before any
/// rank allocates (it once aborted allocating 512 GB, or grew until the
/// kernel killed it).
#[test]
fn a_job_that_cannot_fit_in_memory_is_refused_before_it_allocates() {
    let dir = temp_dir("too-big");
    for sets in [&["model.vocab=1000000000"][..], &["model.d_model=65536", "model.n_experts=1024"]] {
        let mut args = vec!["train", "--quiet", "--run-dir", "run"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let started = std::time::Instant::now();
        let out = switchyard(&args, &dir);
        let log = text(&out);
        assert_eq!(out.status.code(), Some(1), "{sets:?}: {log}");
        assert!(log.contains("cannot fit in this machine's memory") && log.contains("parameters"), "{log}");
        assert!(log.contains("available") && !log.contains("memory allocation of"), "{log}");
        assert!(started.elapsed().as_secs() < 30, "{sets:?}: refused only after {:?}", started.elapsed());
        assert!(!dir.join("run").exists(), "{sets:?}: a run folder was created");
    }
}

#[test]
fn unreadable_data_is_a_clear_error() {
    let dir = temp_dir("baddata");
    let out = train(&dir, &["--set", "data.source=no/such/folder"]);
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("no/such/folder") && log.contains("data prepare"), "{log}");
    assert!(!dir.join("run").exists(), "a run folder was created");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_incompatible_checkpoint_is_refused_and_left_intact() {
    let dir = temp_dir("incompatible");
    assert!(train(&dir, &[]).status.success());
    let manifest = dir.join("run/checkpoints/step-00000012/manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let metrics_before = std::fs::read(dir.join("run/metrics.jsonl")).unwrap();
    let out = train(&dir, &["--resume", "--set", "model.n_experts=4", "--set", "train.steps=20"]);
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("n_experts") && log.contains("different model"), "{log}");
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    assert_eq!(std::fs::read(dir.join("run/metrics.jsonl")).unwrap(), metrics_before);
    // A fresh start over an existing run is refused too.
    let out = train(&dir, &[]);
    let log = text(&out);
    assert!(!out.status.success() && log.contains("already hold step 12") && log.contains("--resume"), "{log}");
    assert!(!log.contains("cannot load") && !log.contains("cannot resume"), "a fresh start is not a resume: {log}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_step_and_bench_alltoall_print_their_tables() {
    let dir = temp_dir("bench");
    // With the PyTorch peer in eager mode (ci.sh installs torch).
    let mut args = vec!["bench", "step", "--ranks", "1,2", "--backends", "local", "--steps", "4", "--torch", "eager"];
    for set in ["model.d_model=32", "model.ffn_hidden=64", "model.seq_len=16"] {
        args.extend(["--set", set]);
    }
    let out = switchyard(&args, &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("| local | 1 |") && log.contains("| local | 2 |"), "{log}");
    let peer = log.lines().find(|l| l.starts_with("| PyTorch eager fp32 |")).unwrap_or_else(|| panic!("{log}"));
    // | label | step | tokens/s | ratio |: a measured row, not a reason.
    let cells: Vec<&str> = peer.split('|').map(str::trim).collect();
    let tokens_per_s: f64 = cells[3].parse().unwrap_or_else(|_| panic!("the PyTorch peer measured nothing: {peer}"));
    assert!(tokens_per_s > 0.0 && cells[4].ends_with('x'), "{peer}");

    let out = switchyard(&["bench", "alltoall", "--ranks", "2", "--max-mib", "1", "--rounds", "1", "--json"], &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON report");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "4 KiB to 1 MiB: {log}");
    assert!(rows.iter().all(|r| r["gb_per_s"].as_f64().unwrap() > 0.0), "{log}");
}

#[test]
fn a_running_job_serves_status_and_metrics() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = temp_dir("status");
    let mut args = vec!["train", "--quiet", "--ranks", "2", "--run-dir", "run"];
    args.extend_from_slice(SMALL);
    args.extend(["--set", "train.steps=100000"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(&args)
        .current_dir(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("status http://") {
        banner.clear();
        assert!(stderr.read_line(&mut banner).unwrap() > 0, "no coordinator banner");
    }
    let http = banner.split("status http://").nth(1).unwrap().split('/').next().unwrap().to_string();
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&http).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    };
    // Wait until both ranks registered and a step was aggregated.
    let started = std::time::Instant::now();
    let mut status = get("/status");
    while !(status.contains("\"registered\": 2") && status.contains("\"last_step\": {")) {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        status = get("/status");
    }
    assert!(status.contains("\"health\": \"healthy\""), "{status}");
    let metrics = get("/metrics");
    assert!(metrics.contains("switchyard_ranks_registered 2") && metrics.contains("switchyard_loss "), "{metrics}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The manifest of a step folder, parsed.
fn manifest(step_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(step_dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn ckpt_ls_inspect_verify_export_and_a_flipped_byte() {
    let dir = temp_dir("ckpt");
    // Two ranks, so the experts are spread over two shard files.
    let out = train(&dir, &["--ranks", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let root = dir.join("run/checkpoints");
    let step12 = root.join("step-00000012");
    let m12 = manifest(&step12);
    // A save cut short: a shard written, no manifest.
    std::fs::create_dir_all(root.join("step-00000018/shards")).unwrap();
    std::fs::copy(
        step12.join("shards/rank-00001.safetensors"),
        root.join("step-00000018/shards/rank-00001.safetensors"),
    )
    .unwrap();

    // ls: one line per step folder, committed or not, and which is latest.
    let out = switchyard(&["ckpt", "ls", "run/checkpoints"], &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let line = |step: &str| log.lines().find(|l| l.split_whitespace().next() == Some(step)).unwrap_or_default();
    // 6 steps x 32 sequences x 16 tokens = 3072 tokens.
    assert!(line("6").contains("committed") && line("6").contains(" 3072 ") && !line("6").contains("latest"), "{log}");
    assert!(line("12").contains("committed, latest") && line("12").contains(" 6144 "), "{log}");
    assert_eq!(m12["tokens_seen"], 6144);
    assert!(line("18").contains("uncommitted (no manifest)"), "{log}");
    assert!(log.contains("latest: step-00000012"), "{log}");
    let out = switchyard(&["ckpt", "ls", "run"], &dir);
    assert!(!out.status.success() && text(&out).contains("no checkpoint steps under"), "{}", text(&out));
    let out = switchyard(&["ckpt", "ls", "no/such/folder"], &dir);
    assert!(!out.status.success() && text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!dir.join("no").exists(), "ls created the folder it was given");

    // inspect: the header, the plan in compact form, the config and the tensor table.
    let out = switchyard(&["ckpt", "inspect", "run/checkpoints/step-00000012"], &dir);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for needle in [
        "format version  1",
        "tokens seen     6144",
        "world 2 | dense: attn_tp 1 x dp 2 | experts: ep 2 x edp 1",
        "layers 0-1: rank 0: experts 0-3 | rank 1: experts 4-7",
        "d_model = 32",
        "tensors: 195 in 2 shards",
    ] {
        assert!(log.contains(needle), "inspect lacks {needle:?}: {log}");
    }
    let row = log.lines().find(|l| l.split_whitespace().next() == Some("tok_embeddings.weight")).unwrap_or_default();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["tok_embeddings.weight", "F32", "[256,", "32]", "rank-00000", "32768"]
    );
    let out = switchyard(&["ckpt", "inspect", "--json", "run/checkpoints/step-00000012"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        out.stdout,
        std::fs::read(step12.join("manifest.json")).unwrap(),
        "--json is not the manifest as stored"
    );
    let out = switchyard(&["ckpt", "inspect", "run/checkpoints/step-00000018"], &dir);
    let log = text(&out);
    assert!(
        !out.status.success() && log.contains("not committed") && log.contains("committed steps there: 6, 12"),
        "{log}"
    );

    // verify: by step URL and by root (its latest step).
    let step_url = format!("file://{}", std::fs::canonicalize(&step12).unwrap().display());
    for target in [step_url.as_str(), "run/checkpoints"] {
        let out = switchyard(&["ckpt", "verify", target], &dir);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.starts_with("ok: 2 shards, 195 tensors, ") && log.contains(" MiB checked in "), "{log}");
    }

    // export: the model tensors, bit for bit as in the shards, for the safetensors crate itself.
    let shard_bytes = |file: &str| std::fs::read(step12.join(file)).unwrap();
    let shards = [shard_bytes("shards/rank-00000.safetensors"), shard_bytes("shards/rank-00001.safetensors")];
    let entries = m12["tensors"].as_array().unwrap();
    let model: Vec<_> = entries.iter().filter(|t| !t["name"].as_str().unwrap().starts_with("optim.")).collect();
    // 2 layers x (attn_norm, wq, wk, wv, wo, ffn_norm, router + 8 experts x 3)
    // + tok_embeddings, norm, output = 65 model tensors; 2 AdamW moments each.
    assert_eq!((model.len(), entries.len()), (65, 195));
    for (flag, expected) in [(None, model.clone()), (Some("--with-optimizer"), entries.iter().collect())] {
        let mut args = vec!["ckpt", "export", "run/checkpoints/step-00000012", "--to", "model.safetensors"];
        args.extend(flag);
        let out = switchyard(&args, &dir);
        assert!(out.status.success(), "{}", text(&out));
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.len(), expected.len(), "{flag:?}");
        for entry in expected {
            let view = file.tensor(entry["name"].as_str().unwrap()).unwrap();
            let shard = &shards[usize::from(entry["shard"] == "shards/rank-00001.safetensors")];
            let start = entry["offset"].as_u64().unwrap() as usize;
            assert!(view.data() == &shard[start..start + entry["length"].as_u64().unwrap() as usize], "{entry}");
            assert_eq!(serde_json::json!(view.shape()), entry["shape"], "{entry}");
        }
    }

    // One flipped byte in a model tensor of rank 1 (so the default export
    // reads it too): verify and export fail naming the shard file and tensor.
    let victim = model.iter().find(|t| t["shard"] == "shards/rank-00001.safetensors").unwrap();
    let shard_path = step12.join("shards/rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard_path).unwrap();
    bytes[victim["offset"].as_u64().unwrap() as usize + 3] ^= 0x40;
    std::fs::write(&shard_path, bytes).unwrap();
    let out = switchyard(&["ckpt", "verify", "run/checkpoints"], &dir);
    let log = text(&out);
    assert!(!out.status.success(), "verify passed a corrupt shard: {log}");
    assert!(log.contains("step-00000012/shards/rank-00001.safetensors"), "{log}");
    assert!(log.contains(victim["name"].as_str().unwrap()) && log.contains("corrupt"), "{log}");
    // Resuming from it fails the same way, before anything is written.
    let out = train(&dir, &["--ranks", "2", "--resume", "--set", "train.steps=14"]);
    let log = text(&out);
    assert!(!out.status.success(), "resumed from a corrupt shard: {log}");
    assert!(log.contains("step-00000012/shards/rank-00001.safetensors") && log.contains("corrupt"), "{log}");
    assert!(step12.join("manifest.json").exists(), "the failed resume touched the checkpoint");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let out = switchyard(&["ckpt", "export", "run/checkpoints", "--to", "model.safetensors"], &dir);
    assert!(!out.status.success() && text(&out).contains("rank-00001.safetensors"), "{}", text(&out));
    let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["run"], "a failed export left a file behind");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every reader of a checkpoint (resume, eval, export, verify) refuses a
/// shard whose safetensors header was damaged and a manifest that was
/// edited after its commit, naming the object; a manifest from before the
/// manifest checksum is still read.
#[test]
fn every_reader_refuses_a_damaged_header_or_an_edited_manifest() {
    let dir = temp_dir("integrity");
    assert!(train(&dir, &[]).status.success());
    std::fs::write(dir.join("eval.txt"), "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let step12 = dir.join("run/checkpoints/step-00000012");
    let readers: [&[&str]; 4] = [
        &["ckpt", "verify", "run/checkpoints"],
        &["eval", "--checkpoint", "run/checkpoints", "--data", "eval.txt"],
        &["ckpt", "export", "run/checkpoints", "--to", "model.safetensors"],
        &["train", "--quiet", "--run-dir", "run", "--resume", "--set", "train.steps=14"],
    ];
    let all_refuse = |damage: &str, needles: &[&str]| {
        for reader in readers {
            let mut args = reader.to_vec();
            if reader[0] == "train" {
                args.extend_from_slice(SMALL);
                args.extend_from_slice(&["--set", "train.steps=14"]);
            }
            let out = switchyard(&args, &dir);
            let log = text(&out);
            assert!(!out.status.success(), "{reader:?} accepted {damage}: {log}");
            for needle in needles {
                assert!(log.contains(needle), "{reader:?} on {damage}: the error does not say {needle:?}: {log}");
            }
        }
        assert!(!dir.join("model.safetensors").exists(), "a refused export left a file ({damage})");
        assert!(!step12.join("../step-00000014").exists(), "a refused resume saved a step ({damage})");
    };

    // One bit of the header's JSON (in a tensor's offsets or name): the
    // tensors' own checksums still pass, the header no longer agrees.
    let shard = step12.join("shards/rank-00000.safetensors");
    let original = std::fs::read(&shard).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&original[8..8 + header_len]).unwrap();
    let at = 8 + header.find("data_offsets").unwrap() + "data_offsets\":[".len();
    let mut damaged = original.clone();
    damaged[at] ^= 0x01; // one digit of an offset becomes another digit
    std::fs::write(&shard, &damaged).unwrap();
    all_refuse("a damaged shard header", &["step-00000012/shards/rank-00000.safetensors", "header"]);
    std::fs::write(&shard, &original).unwrap();

    // top_k 2 -> 3 in the manifest's config: a different model, refused.
    let manifest_path = step12.join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    assert!(manifest.contains("\"crc32\""), "a committed manifest carries its checksum");
    assert_eq!(manifest.matches("\"top_k\": 2").count(), 1);
    std::fs::write(&manifest_path, manifest.replace("\"top_k\": 2", "\"top_k\": 3")).unwrap();
    all_refuse("an edited manifest", &["step-00000012/manifest.json", "CRC-32"]);

    // A manifest written before the checksum existed is read as before.
    let mut old: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    old.as_object_mut().unwrap().remove("crc32");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let out = switchyard(&["ckpt", "verify", "run/checkpoints"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::remove_dir_all(&dir).ok();
}

#[path = "../../checkpoint/tests/common/s3_server.rs"]
#[allow(dead_code)] // the checkpoint tests use the rest
mod s3_server;

/// `switchyard` with the AWS variables that point at `server`.
fn switchyard_s3(args: &[&str], cwd: &Path, server: &s3_server::S3Server, secret: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(cwd)
        .env("AWS_ENDPOINT_URL", server.endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", s3_server::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .output()
        .expect("binary runs")
}

#[test]
fn training_checkpoints_to_s3_and_resumes_from_it() {
    let dir = temp_dir("s3");
    let server = s3_server::S3Server::start(&dir.join("s3"), &["ckpt"]);
    let url = "s3://ckpt/runs/tiny";
    let mut args =
        vec!["train", "--quiet", "--run-dir", "run", "--ranks", "2", "--set", "checkpoint.url=s3://ckpt/runs/tiny"];
    args.extend_from_slice(SMALL);
    let secret = s3_server::SECRET_KEY;

    let out = switchyard_s3(&[&args[..], &["--stop-at", "6"]].concat(), &dir, &server, secret);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("checkpoint: {url}/step-00000006")), "{log}");
    let shard = dir.join("s3/ckpt/runs/tiny/step-00000006/shards/rank-00001.safetensors");
    assert!(shard.is_file(), "rank 1 wrote its shard into the bucket");

    // Wrong credentials: a clear error before any training, nothing saved touched.
    let out = switchyard_s3(&[&args[..], &["--resume"]].concat(), &dir, &server, "wrong-secret");
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains(url) && log.contains("credentials") && !log.contains("wrong-secret"), "{log}");

    let out = switchyard_s3(&[&args[..], &["--resume"]].concat(), &dir, &server, secret);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from") && log.contains("step 6"), "{log}");
    assert_eq!(std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap().lines().count(), 12);

    let out = switchyard_s3(&["ckpt", "ls", url], &dir, &server, secret);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("12  committed, latest"), "{log}");
    let out = switchyard_s3(&["ckpt", "verify", url], &dir, &server, secret);
    assert!(out.status.success() && text(&out).contains("ok: 2 shards"), "{}", text(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// Files s3s-fs keeps for unfinished multipart uploads (`.upload-<id>.json`
/// and `.upload_id-<id>.part-<n>`, in its root folder).
fn unfinished_uploads(server_root: &Path) -> Vec<String> {
    std::fs::read_dir(server_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload"))
        .collect()
}

/// A process killed -9 in the middle of a multipart upload to a real S3
/// server leaves parts in the bucket; the resumed run aborts that upload
/// before training, so nothing stays billed, and trains on to the end.
#[test]
fn an_upload_cut_by_a_kill_is_aborted_when_the_run_resumes() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = temp_dir("s3-cut-upload");
    let server = s3_server::S3Server::start(&dir.join("s3"), &["ckpt"]);
    let s3_env = |cmd: &mut Command| {
        cmd.current_dir(&dir)
            .env("AWS_ENDPOINT_URL", server.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", s3_server::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3_server::SECRET_KEY);
    };
    // The built-in tiny model's shard (about 20 MiB) goes up in 5 MiB parts.
    let args = [
        "train",
        "--quiet",
        "--run-dir",
        "run",
        "--set",
        "checkpoint.url=s3://ckpt/runs/tiny",
        "--set",
        "checkpoint.part_mib=5",
        "--set",
        "train.steps=4",
        "--set",
        "checkpoint.every=2",
    ];
    let mut first = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    s3_env(first.args(args).args(["--stop-at", "2"]));
    let out = first.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(unfinished_uploads(&server.root).is_empty(), "finished uploads leave nothing behind");

    // The save of step 4 stalls after its first part; kill -9 it there.
    let mut cut = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    s3_env(cut.args(args).arg("--resume").env(checkpoint::PART_STALL_VAR, "120000"));
    let mut child = cut.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let marker_dir = dir.join("s3/ckpt/runs/tiny/uploads/step-00000004");
    let started = Instant::now();
    while !(marker_dir.is_dir() && unfinished_uploads(&server.root).iter().any(|f| f.starts_with(".upload_id-"))) {
        assert!(started.elapsed() < Duration::from_secs(120), "step 4's upload never sent a part");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = unfinished_uploads(&server.root);
    assert!(left.iter().any(|f| f.ends_with(".json")), "the cut upload is still open on the server: {left:?}");

    let mut resumed = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    s3_env(resumed.args(args).arg("--resume"));
    let out = resumed.output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step 2"), "resumed from the last commit: {log}");
    assert!(
        log.contains("aborted 1 unfinished upload(s) of an earlier, interrupted save: step-00000004/shards/"),
        "{log}"
    );
    assert_eq!(unfinished_uploads(&server.root), Vec::<String>::new(), "the cut upload was aborted");
    assert!(!marker_dir.exists() || std::fs::read_dir(&marker_dir).unwrap().next().is_none(), "no marker is left");
    let mut verify = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    s3_env(verify.args(["ckpt", "verify", "s3://ckpt/runs/tiny"]));
    let out = verify.output().unwrap();
    assert!(out.status.success() && text(&out).contains("step-00000004"), "{}", text(&out));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_saves_a_checkpoint_stops_with_143_and_the_job_resumes_from_it() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = temp_dir("sigterm");
    let mut args = vec!["train", "--quiet", "--run-dir", "run", "--ranks", "2"];
    args.extend_from_slice(SMALL);
    let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(&args)
        .args(["--set", "train.steps=100000", "--set", "checkpoint.every=100000"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.join("run/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "the job never trained");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!(log.contains(&format!("stopped on SIGTERM at step {steps} after committing its checkpoint")), "{log}");
    let latest = std::fs::read_to_string(dir.join("run/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{steps:08}"), "the checkpoint is of the step it stopped at");

    let end = format!("train.steps={}", steps + 3);
    let out = switchyard(&[&args[..], &["--resume", "--set", &end]].concat(), &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&metrics).unwrap().lines().count(), steps + 3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn slurm_render_writes_a_requeueable_script_and_refuses_bad_jobs_before_submitting() {
    let dir = temp_dir("slurm-render");
    let render = |extra: &[&str]| {
        let mut args = vec!["slurm", "render", "--run-dir", "run", "--exe", "/opt/switchyard/bin/switchyard"];
        args.extend_from_slice(extra);
        switchyard(&args, &dir)
    };
    let out = render(&["--nodes", "2", "--set", "parallel.ranks=4", "--time", "01:00:00"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = std::fs::read_to_string(dir.join("run/job.sbatch")).unwrap();
    for want in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@",
        "#SBATCH --time=01:00:00",
        "srun --overlap --mpi=pmix",
        "worker --backend mpi",
        "--resume-if-any",
        "coordinator --config",
        "SWITCHYARD_TOKEN=$(od",
    ] {
        assert!(script.contains(want), "the script lacks {want:?}:\n{script}");
    }
    let job = std::fs::read_to_string(dir.join("run/job.toml")).unwrap();
    assert!(job.contains("ranks = 4") && job.contains("backend = \"mpi\""), "{job}");
    // Memory per node from the memory model: a bigger model asks for more.
    let mem_mib = |script: &str| -> u64 {
        let line = script.lines().find_map(|l| l.strip_prefix("#SBATCH --mem=")).expect("a --mem line");
        line.strip_suffix('M').unwrap().parse().unwrap()
    };
    let small = mem_mib(&script);
    assert!(small >= 1024, "at least 1 GiB: {small}");
    let out =
        render(&["--nodes", "2", "--set", "parallel.ranks=4", "--set", "model.vocab=400000", "--out", "big.sbatch"]);
    assert!(out.status.success(), "{}", text(&out));
    let big = mem_mib(&std::fs::read_to_string(dir.join("big.sbatch")).unwrap());
    assert!(big > small + 1024, "a 400k vocabulary needs more: {big} MiB vs {small}");

    // GPU: one task per GPU over NCCL.
    let out = render(&["--gpu", "--ntasks-per-node", "4", "--out", "gpu.sbatch"]);
    assert!(out.status.success(), "{}", text(&out));
    let gpu = std::fs::read_to_string(dir.join("gpu.sbatch")).unwrap();
    assert!(gpu.contains("#SBATCH --gpus-per-node=4") && gpu.contains("worker --backend nccl"), "{gpu}");
    assert!(!gpu.contains("--mem="), "GPU ranks hold the model on the device: {gpu}");

    // Bad jobs: a clear error, nothing written.
    let refused = |extra: &[&str], want: &[&str]| {
        let out = render(&[&["--out", "bad.sbatch"], extra].concat());
        let log = text(&out);
        assert!(!out.status.success(), "{extra:?} was accepted: {log}");
        for w in want {
            assert!(log.contains(w), "{extra:?}: the error lacks {w:?}: {log}");
        }
        assert!(!dir.join("bad.sbatch").exists(), "{extra:?} wrote a script");
    };
    refused(&["--gpu", "--set", "parallel.backend=mpi"], &["--gpu", "nccl"]);
    refused(&["--nodes", "3", "--set", "parallel.ranks=4"], &["cannot be spread evenly", "--ntasks-per-node"]);
    refused(&["--ntasks-per-node", "3"], &["3 data-parallel rank(s)", "global_batch_size"]);
    refused(&["--ntasks-per-node", "3", "--set", "parallel.attn_tp=3"], &["attn_tp"]);
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["slurm", "render", "--run-dir", "run", "--exe", "/x/switchyard", "--out", "bad.sbatch"])
        .args(["--set", "checkpoint.url=s3://bucket/ckpt", "--set", "checkpoint.retries=0"])
        .current_dir(&dir)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(
        !out.status.success() && log.contains("s3://bucket/ckpt") && log.contains("nothing was submitted"),
        "{log}"
    );
    assert!(!dir.join("bad.sbatch").exists());
    std::fs::remove_dir_all(&dir).ok();
}
