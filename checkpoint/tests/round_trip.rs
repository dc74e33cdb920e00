//! Save → commit → load through each supported store, bit for bit.

mod common;

use std::sync::Arc;

use checkpoint::object_store::memory::InMemory;
use checkpoint::{step_dir_name, CheckpointStore, Manifest, DTYPE_F32, FORMAT_VERSION};
use common::{assert_bit_identical, save_step};
use safetensors::{Dtype, SafeTensors};

#[test]
fn file_url_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let (written, tensors) = save_step(&CheckpointStore::open(&url).unwrap(), 20);

    // A fresh handle, as a resumed process would open it.
    let store = CheckpointStore::open(&url).unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(20));
    let manifest = store.read_manifest(20).unwrap();
    assert!(manifest.crc32.is_some(), "a committed manifest carries the CRC-32 of its contents");
    assert_eq!(Manifest { crc32: None, ..manifest.clone() }, written);
    assert_eq!(manifest.format_version, FORMAT_VERSION);
    assert_eq!(manifest.tokens_seen, 20 * 4096);
    assert_eq!(manifest.parallel["ranks"], 2);
    assert_eq!(manifest.code_version, env!("CARGO_PKG_VERSION"));
    assert!(manifest.tensors.iter().all(|t| t.dtype == DTYPE_F32));

    let loaded = store.read_tensors(20, &manifest, |_| true).unwrap();
    assert_bit_identical(&loaded, &tensors);

    let report = store.verify(20).unwrap();
    assert_eq!(report.num_shards, 2);
    assert_eq!(report.num_tensors, tensors.len());
}

#[test]
fn plain_path_is_created_and_laid_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("runs/a/ckpt");
    let store = CheckpointStore::open(root.to_str().unwrap()).unwrap();
    assert!(root.is_dir(), "open creates the folder");
    assert!(store.url().starts_with("file:///"), "{}", store.url());
    save_step(&store, 1200);

    let step_dir = root.join("step-00001200");
    assert!(step_dir.join("manifest.json").is_file());
    assert!(step_dir.join("shards/rank-00000.safetensors").is_file());
    assert!(step_dir.join("shards/rank-00001.safetensors").is_file());
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00001200");
    assert_eq!(step_dir_name(1200), "step-00001200");
}

#[test]
fn memory_round_trip_with_shared_store() {
    let shared = Arc::new(InMemory::new());
    let writer = CheckpointStore::from_object_store(shared.clone(), "runs/a", "memory://runs/a").unwrap();
    let (written, tensors) = save_step(&writer, 7);

    let reader = CheckpointStore::from_object_store(shared.clone(), "runs/a", "memory://runs/a").unwrap();
    assert_eq!(reader.committed_steps().unwrap(), vec![7]);
    let manifest = reader.read_manifest(7).unwrap();
    assert!(manifest.crc32.is_some(), "a committed manifest carries the CRC-32 of its contents");
    assert_eq!(Manifest { crc32: None, ..manifest.clone() }, written);
    let loaded = reader.read_tensors(7, &manifest, |_| true).unwrap();
    assert_bit_identical(&loaded, &tensors);
    reader.verify(7).unwrap();

    // Another prefix of the same store is another checkpoint root.
    let other = CheckpointStore::from_object_store(shared, "runs/b", "memory://runs/b").unwrap();
    assert_eq!(other.committed_steps().unwrap(), Vec::<u64>::new());
}

#[test]
fn memory_url_gives_a_fresh_store() {
    let first = CheckpointStore::open("memory://").unwrap();
    save_step(&first, 3);
    assert_eq!(first.latest_step().unwrap(), Some(3));
    let second = CheckpointStore::open("memory://").unwrap();
    assert_eq!(second.latest_step().unwrap(), None);
}

#[test]
fn read_tensors_applies_the_filter() {
    let store = CheckpointStore::open("memory://").unwrap();
    let (manifest, tensors) = save_step(&store, 5);
    let loaded = store.read_tensors(5, &manifest, |name| name.starts_with("optim.")).unwrap();
    let expected: Vec<_> = tensors.into_iter().filter(|(name, _, _)| name.starts_with("optim.")).collect();
    assert!(!expected.is_empty());
    assert_bit_identical(&loaded, &expected);
}

#[test]
fn shards_are_readable_by_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let (manifest, tensors) = save_step(&store, 9);
    for shard in &manifest.shards {
        let bytes = std::fs::read(dir.path().join("step-00000009").join(&shard.file)).unwrap();
        assert_eq!(bytes.len() as u64, shard.size_bytes);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let in_shard: Vec<_> = manifest.tensors.iter().filter(|t| t.shard == shard.file).collect();
        assert_eq!(st.len(), in_shard.len());
        for entry in in_shard {
            let view = st.tensor(&entry.name).unwrap();
            let (_, shape, data) = tensors.iter().find(|(n, _, _)| *n == entry.name).unwrap();
            assert_eq!(view.dtype(), Dtype::F32, "{}", entry.name);
            assert_eq!(view.shape(), shape.as_slice(), "{}", entry.name);
            let le: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(view.data(), le.as_slice(), "{}", entry.name);
            // The manifest's byte range points at the same bytes.
            let range = entry.offset as usize..(entry.offset + entry.length) as usize;
            assert_eq!(&bytes[range], le.as_slice(), "{}", entry.name);
        }
    }
}
