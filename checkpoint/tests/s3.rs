//! Checkpoints on a REAL S3-compatible server (s3s-fs, SigV4 credentials):
//! round trip with multipart shards, wrong credentials, a server that
//! refuses connections. One test, because the S3 client reads the process
//! environment and each scenario sets it differently.

mod common;

use std::time::{Duration, Instant};

use checkpoint::{CheckpointStore, Error, StoreOptions, TensorRef};
use common::s3_server::{set_s3_env, S3Server, SECRET_KEY};
use common::{assert_bit_identical, refs, save_step};

const URL: &str = "s3://ckpt/runs/a";

#[test]
fn s3_store_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path(), &["ckpt"]);
    server.use_in_env(SECRET_KEY);

    round_trip_with_multipart_shards(&server);
    missing_and_misnamed_buckets_are_not_retried(&server);
    wrong_credentials_are_refused_clearly(&server);
    server.use_in_env(SECRET_KEY);
    let server = a_server_restarting_within_the_retries_is_ridden_out(server);
    refused_connections_are_retried_then_fail_without_damage(server);
}

/// The default retries (10, from 1 s) outlast a server that is down for a
/// few seconds (a restart): the save goes through once it is back.
fn a_server_restarting_within_the_retries_is_ridden_out(server: S3Server) -> S3Server {
    let (root, port) = (server.root.clone(), server.port);
    drop(server);
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        S3Server::start_on(&root, &[], port)
    });
    let store = CheckpointStore::open(URL).unwrap();
    let tensors = common::model_tensors(50);
    let started = Instant::now();
    let written = store.write_shard(50, "rank-00000", &refs(&tensors));
    let server = back.join().unwrap();
    written.unwrap_or_else(|e| panic!("the save gave up on a server down for 4 s: {e}"));
    eprintln!("a save rode out a 4 s outage of the server in {:.1?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(4), "it cannot have been written while the server was down");
    server
}

fn round_trip_with_multipart_shards(server: &S3Server) {
    // 8 MiB parts: a 12 MiB shard goes up as a multipart upload.
    let options = StoreOptions { part_bytes: 8 << 20, ..Default::default() };
    let store = CheckpointStore::open_with(URL, &options).unwrap();
    assert_eq!(store.url(), URL);
    assert_eq!(store.latest_step().unwrap(), None);
    let (written, tensors) = save_step(&store, 10);
    // A shard larger than one upload part (8 MiB) goes up as a multipart upload.
    let big: Vec<f32> = (0..3_000_000).map(|i| (i as f32).sin()).collect();
    let shape = [3_000_000];
    let big_ref = [TensorRef { name: "layers.0.moe.experts.0.w1.weight", shape: &shape, data: &big }];
    let report = store.write_shard(20, "rank-00000", &big_ref).unwrap();
    assert!(report.size_bytes > 8 << 20, "the shard must span several parts");
    let mut manifest = written.clone();
    manifest.step = 20;
    manifest.shards.clear();
    manifest.tensors.clear();
    manifest.add_shard(report);
    store.commit(&manifest).unwrap();

    // A fresh handle reads both steps back, bit for bit, from the bucket.
    let store = CheckpointStore::open(URL).unwrap();
    assert_eq!(store.committed_steps().unwrap(), [10, 20]);
    assert_eq!(store.latest_step().unwrap(), Some(20));
    let loaded = store.read_tensors(10, &store.read_manifest(10).unwrap(), |_| true).unwrap();
    assert_bit_identical(&loaded, &tensors);
    let loaded = store.read_tensors(20, &manifest, |_| true).unwrap();
    assert!(loaded["layers.0.moe.experts.0.w1.weight"].1.iter().zip(&big).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(store.verify(20).unwrap().num_bytes, manifest.shards[0].size_bytes);

    // The objects really are in the server's folder, laid out as DESIGN section 6 says.
    let on_disk = server.root.join("ckpt/runs/a/step-00000020/shards/rank-00000.safetensors");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().len(), manifest.shards[0].size_bytes);
    let latest = std::fs::read_to_string(server.root.join("ckpt/runs/a/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000020");

    // An uncommitted step is cleaned up; pruning keeps the newest.
    store.write_shard(30, "rank-00000", &refs(&tensors[..1])).unwrap();
    assert_eq!(store.cleanup_uncommitted().unwrap(), [30]);
    assert_eq!(store.prune(1).unwrap(), [10]);
    assert_eq!(store.committed_steps().unwrap(), [20]);
    assert!(!server.root.join("ckpt/runs/a/step-00000030").join("shards/rank-00000.safetensors").exists());
}

fn missing_and_misnamed_buckets_are_not_retried(server: &S3Server) {
    server.use_in_env(SECRET_KEY);
    for (url, says) in
        [("s3://nosuchbucket/runs/a", "bucket does not exist"), ("s3://Bad_Bucket/a", "valid bucket name")]
    {
        let err = CheckpointStore::open(url).unwrap().latest_step().unwrap_err();
        let msg = err.to_string();
        assert!(!err.is_retryable(), "a request error does not get better by retrying: {msg}");
        assert!(msg.contains(url) && msg.contains(says) && !msg.contains("transient"), "{msg}");
    }
}

fn wrong_credentials_are_refused_clearly(server: &S3Server) {
    server.use_in_env("not-the-secret");
    let store = CheckpointStore::open(URL).unwrap();
    let err = store.latest_step().unwrap_err();
    let msg = err.to_string();
    eprintln!("wrong credentials: {msg}");
    assert!(matches!(err, Error::Storage { .. }), "{msg}");
    assert!(msg.contains(URL), "the error names the URL: {msg}");
    assert!(!err.is_retryable(), "bad credentials do not get better by retrying: {msg}");
    assert!(msg.contains("credentials"), "the error says what to check: {msg}");
    assert!(!msg.contains("not-the-secret") && !msg.contains(SECRET_KEY), "no secrets in messages: {msg}");
}

fn refused_connections_are_retried_then_fail_without_damage(server: S3Server) {
    let (root, port) = (server.root.clone(), server.port);
    drop(server);
    let options = StoreOptions { retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() };
    let store = CheckpointStore::open_with(URL, &options).unwrap();
    let tensors = common::model_tensors(40);
    let started = Instant::now();
    let err = store.write_shard(40, "rank-00000", &refs(&tensors)).unwrap_err();
    let msg = err.to_string();
    eprintln!("refused connection after {:.1?}: {msg}", started.elapsed());
    assert!(err.is_retryable(), "a refused connection is transient: {msg}");
    assert!(msg.contains("step-00000040/shards/rank-00000.safetensors"), "names the object: {msg}");
    assert!(msg.contains("after 3 retries"), "says it retried: {msg}");
    // The first backoff is 1 s (later ones are jittered): it did wait.
    assert!(started.elapsed() >= Duration::from_secs(1), "gave up without backing off");

    // The server comes back on the same folder: step 20 is intact and is the one to resume.
    let server = S3Server::start_on(&root, &[], port);
    set_s3_env(&server.endpoint(), SECRET_KEY);
    let store = CheckpointStore::open(URL).unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(20));
    store.verify(20).unwrap();
}
