//! Damaged checkpoints are refused with errors that name what is broken.

mod common;

use checkpoint::{CheckpointStore, Error};
use common::save_step;

const VICTIM: &str = "layers.0.attn.wq.weight";

#[test]
fn flipped_byte_fails_read_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let (manifest, _) = save_step(&store, 20);
    let entry = manifest.tensor(VICTIM).unwrap().clone();
    let path = dir.path().join("step-00000020").join(&entry.shard);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[entry.offset as usize + 9] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let check = |err: Error| {
        let msg = err.to_string();
        assert!(matches!(err, Error::CorruptTensor { .. }), "{msg}");
        assert!(msg.contains("step-00000020/shards/rank-00000.safetensors"), "{msg}");
        assert!(msg.contains(VICTIM), "{msg}");
        assert!(msg.contains("corrupt") && msg.contains("earlier step"), "{msg}");
    };
    check(store.read_tensors(20, &manifest, |_| true).unwrap_err());
    check(store.verify(20).unwrap_err());

    // Tensors other than the damaged one still load.
    let others = store.read_tensors(20, &manifest, |n| n != VICTIM).unwrap();
    assert_eq!(others.len(), manifest.tensors.len() - 1);
}

#[test]
fn truncated_shard_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let (manifest, _) = save_step(&store, 2);
    let path = dir.path().join("step-00000002/shards/rank-00001.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();

    for err in [store.read_tensors(2, &manifest, |_| true).unwrap_err(), store.verify(2).unwrap_err()] {
        assert!(matches!(err, Error::CorruptShard { .. }), "{err}");
        assert!(err.to_string().contains("rank-00001.safetensors"), "{err}");
    }
}

#[test]
fn other_format_version_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    save_step(&store, 3);
    let path = dir.path().join("step-00000003/manifest.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["format_version"] = 2.into();
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();

    let err = store.read_manifest(3).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::FormatVersion { expected: 1, .. }), "{msg}");
    assert!(msg.contains("format_version 2") && msg.contains("manifest.json"), "{msg}");
}

#[test]
fn garbled_manifest_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    save_step(&store, 3);
    std::fs::write(dir.path().join("step-00000003/manifest.json"), b"{\"format_").unwrap();
    let err = store.read_manifest(3).unwrap_err();
    assert!(matches!(err, Error::ManifestJson { .. }), "{err}");
    assert!(err.to_string().contains("step-00000003/manifest.json"), "{err}");
}
