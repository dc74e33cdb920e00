//! Opening checkpoint URLs and parsing step URLs.

use checkpoint::{parse_step_url, CheckpointStore, Error};

#[test]
fn unsupported_schemes_say_so() {
    for url in ["ftp://host/ckpt", "hdfs://namenode/ckpt"] {
        let err = CheckpointStore::open(url).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::UnsupportedScheme { .. }), "{msg}");
        assert!(msg.contains("is not supported") && msg.contains("s3://bucket/prefix"), "{msg}");
        assert!(msg.contains(url), "{msg}");
    }
}

#[test]
fn a_bucket_url_needs_a_bucket() {
    let err = CheckpointStore::open("s3:///ckpt").unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    assert!(err.to_string().contains("names no bucket"), "{err}");
}

#[test]
fn errors_never_show_credentials() {
    // An ftp URL fails at once, before any connection, with the URL in the message.
    let err = CheckpointStore::open("ftp://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/ckpt?X-Amz-Signature=abc123").unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains("AKIDEXAMPLE") && !msg.contains("wJalrXUtnFEMI"), "{msg}");
    assert!(!msg.contains("abc123"), "{msg}");
    assert!(msg.contains("bucket/ckpt"), "{msg}");
}

#[test]
fn file_url_with_a_host_is_invalid() {
    let err = CheckpointStore::open("file://somehost/data/ckpt").unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    assert!(err.to_string().contains("file:///"), "{err}");
}

#[test]
fn relative_path_opens_as_absolute_file_url() {
    let dir = tempfile::tempdir().unwrap();
    let rel = dir.path().join("x/../ckpt");
    let store = CheckpointStore::open(rel.to_str().unwrap()).unwrap();
    let canonical = std::fs::canonicalize(dir.path().join("ckpt")).unwrap();
    assert_eq!(store.url(), format!("file://{}", canonical.display()));
}

#[test]
fn parse_step_url_cases() {
    let ok = |input: &str, root: &str, step: u64| {
        assert_eq!(parse_step_url(input).unwrap(), (root.to_string(), step), "{input}");
    };
    ok("file:///x/ckpt/step-00000020", "file:///x/ckpt", 20);
    ok("file:///x/ckpt/step-00000020/", "file:///x/ckpt", 20);
    ok("file:///x/ckpt/step-00000020/manifest.json", "file:///x/ckpt", 20);
    ok("/x/ckpt/step-00000020", "/x/ckpt", 20);
    ok("ckpt/step-00001200", "ckpt", 1200);
    ok("step-00000007", ".", 7);
    ok("/step-00000007", "/", 7);
    ok("s3://bucket/run/step-00000020", "s3://bucket/run", 20);
    ok("memory://step-00000001", "memory://", 1);
    ok("file:///step-00000001", "file:///", 1);
    ok("/x/step-123456789", "/x", 123_456_789);

    for bad in ["", "/x/ckpt", "/x/ckpt/latest", "/x/step-", "/x/step-12ab", "file:///x/ckpt/"] {
        let err = parse_step_url(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidStepUrl { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("step-00000020"), "{err}");
    }
}

#[test]
fn step_url_root_reopens_the_same_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let store = CheckpointStore::open(root.to_str().unwrap()).unwrap();
    let data = [1.0f32, 2.0];
    let tensor = checkpoint::TensorRef { name: "w", shape: &[2], data: &data };
    let mut manifest = checkpoint::Manifest::new(20, 0, "test");
    manifest.add_shard(store.write_shard(20, "rank-00000", &[tensor]).unwrap());
    store.commit(&manifest).unwrap();

    let (root_url, step) = parse_step_url(&format!("{}/step-00000020", store.url())).unwrap();
    let reopened = CheckpointStore::open(&root_url).unwrap();
    let read = reopened.read_manifest(step).unwrap();
    assert_eq!(checkpoint::Manifest { crc32: None, ..read }, manifest);
}

#[test]
fn blocking_call_inside_a_runtime_is_an_error_not_a_panic() {
    let store = CheckpointStore::open("memory://").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let err = rt.block_on(async { store.committed_steps() }).unwrap_err();
    assert!(matches!(err, Error::InsideAsyncRuntime { .. }), "{err}");
    assert!(err.to_string().contains("spawn_blocking"), "{err}");
}

#[test]
fn open_existing_refuses_a_missing_folder_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/ckpt");
    for input in [missing.to_str().unwrap().to_string(), format!("file://{}", missing.display())] {
        let err = CheckpointStore::open_existing(&input).unwrap_err();
        assert!(matches!(err, Error::RootNotFound { .. }), "{input}: {err}");
        assert!(err.to_string().contains("no/such/ckpt") && err.to_string().contains("does not exist"), "{err}");
    }
    assert!(!dir.path().join("no").exists(), "a read-only open created a folder");
    // An existing folder opens as with `open`.
    let store = CheckpointStore::open_existing(dir.path().to_str().unwrap()).unwrap();
    assert!(store.url().starts_with("file:///"), "{}", store.url());
}
