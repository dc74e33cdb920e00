//! Commit, latest, cleanup of half-written steps, pruning.

mod common;

use checkpoint::{CheckpointStore, Error, Manifest};
use common::{model_tensors, refs, save_step};

#[test]
fn uncommitted_step_is_invisible_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    save_step(&store, 10);
    // Step 20: shards written, but the run died before the commit.
    let model = model_tensors(20);
    store.write_shard(20, "rank-00000", &refs(&model)).unwrap();
    assert!(dir.path().join("step-00000020/shards").is_dir());

    assert_eq!(store.committed_steps().unwrap(), vec![10]);
    assert_eq!(store.latest_step().unwrap(), Some(10));
    let err = store.read_manifest(20).unwrap_err();
    assert!(matches!(err, Error::NotCommitted { step: 20, .. }), "{err}");
    assert!(err.to_string().contains("step-00000020/manifest.json"), "{err}");

    assert_eq!(store.cleanup_uncommitted().unwrap(), vec![20]);
    assert!(!dir.path().join("step-00000020").exists());
    assert!(dir.path().join("step-00000010/manifest.json").is_file());
    assert_eq!(store.committed_steps().unwrap(), vec![10]);
    store.verify(10).unwrap();
    assert_eq!(store.cleanup_uncommitted().unwrap(), Vec::<u64>::new());
}

#[test]
fn latest_tracks_the_newest_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(store.latest_step().unwrap(), None);
    for step in [5, 10, 15] {
        save_step(&store, step);
        assert_eq!(store.latest_step().unwrap(), Some(step));
    }
    let latest = dir.path().join("latest");
    assert_eq!(std::fs::read_to_string(&latest).unwrap().trim(), "step-00000015");

    // `latest` lost or pointing at a step without manifest: newest committed wins.
    std::fs::remove_file(&latest).unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(15));
    std::fs::write(&latest, "step-00000099\n").unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(15));
    std::fs::write(&latest, "step-00000005\n").unwrap();
    assert_eq!(store.latest_step().unwrap(), Some(5));
}

#[test]
fn prune_keeps_the_last_n() {
    let store = CheckpointStore::open("memory://").unwrap();
    for step in [1, 2, 3, 4, 5] {
        save_step(&store, step);
    }
    assert_eq!(store.prune(2).unwrap(), vec![1, 2, 3]);
    assert_eq!(store.committed_steps().unwrap(), vec![4, 5]);
    assert_eq!(store.prune(2).unwrap(), Vec::<u64>::new());
    store.verify(4).unwrap();
    store.verify(5).unwrap();
    // Nothing of the pruned steps is left behind as "uncommitted".
    assert_eq!(store.cleanup_uncommitted().unwrap(), Vec::<u64>::new());
    // The step `latest` names survives even keep_last = 0.
    assert_eq!(store.prune(0).unwrap(), vec![4]);
    assert_eq!(store.committed_steps().unwrap(), vec![5]);
}

#[test]
fn commit_refuses_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let model = model_tensors(1);
    let mut manifest = Manifest::new(30, 0, "test");
    for shard in ["rank-00000", "rank-00001"] {
        manifest.add_shard(store.write_shard(30, shard, &refs(&model[..2])).unwrap());
    }
    // Both ranks wrote the same names; give rank 1's tensors their own.
    for t in manifest.tensors.iter_mut().filter(|t| t.shard.contains("00001")) {
        t.name = format!("copy.{}", t.name);
    }
    std::fs::remove_file(dir.path().join("step-00000030/shards/rank-00001.safetensors")).unwrap();

    let err = store.commit(&manifest).unwrap_err();
    assert!(matches!(err, Error::ShardMissing { step: 30, .. }), "{err}");
    assert!(err.to_string().contains("step-00000030/shards/rank-00001.safetensors"), "{err}");
    assert!(!dir.path().join("step-00000030/manifest.json").exists());
    assert!(!dir.path().join("latest").exists());
    assert_eq!(store.committed_steps().unwrap(), Vec::<u64>::new());
}

#[test]
fn commit_refuses_a_shard_of_the_wrong_size() {
    let store = CheckpointStore::open("memory://").unwrap();
    let model = model_tensors(1);
    let mut manifest = Manifest::new(4, 0, "test");
    manifest.add_shard(store.write_shard(4, "rank-00000", &refs(&model)).unwrap());
    // The shard is overwritten with less data after its report was taken.
    store.write_shard(4, "rank-00000", &refs(&model[..1])).unwrap();
    let err = store.commit(&manifest).unwrap_err();
    assert!(matches!(err, Error::ShardSizeMismatch { step: 4, .. }), "{err}");
    assert_eq!(store.committed_steps().unwrap(), Vec::<u64>::new());
}

#[test]
fn commit_refuses_an_inconsistent_manifest() {
    let store = CheckpointStore::open("memory://").unwrap();
    let model = model_tensors(1);
    let mut manifest = Manifest::new(4, 0, "test");
    let report = store.write_shard(4, "rank-00000", &refs(&model)).unwrap();
    manifest.add_shard(report.clone());
    manifest.add_shard(report); // every tensor twice
    let err = store.commit(&manifest).unwrap_err();
    assert!(matches!(err, Error::InvalidManifest { .. }), "{err}");
    assert!(err.to_string().contains("listed twice"), "{err}");
}

#[test]
fn write_shard_rejects_bad_input() {
    let store = CheckpointStore::open("memory://").unwrap();
    let data = [1.0f32; 6];
    let bad_shape = [checkpoint::TensorRef { name: "layers.0.attn.wq.weight", shape: &[4, 2], data: &data }];
    let err = store.write_shard(1, "rank-0", &bad_shape).unwrap_err();
    assert!(matches!(err, Error::InvalidTensor { .. }), "{err}");
    assert!(err.to_string().contains("layers.0.attn.wq.weight"), "{err}");

    let ok = [checkpoint::TensorRef { name: "w", shape: &[6], data: &data }];
    for name in ["", "../escape", "a/b", ".hidden"] {
        let err = store.write_shard(1, name, &ok).unwrap_err();
        assert!(matches!(err, Error::InvalidShardName { .. }), "{name}: {err}");
    }
    let twice = [ok[0], ok[0]];
    let err = store.write_shard(1, "rank-0", &twice).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
}

#[test]
fn list_steps_shows_committed_uncommitted_and_latest() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(store.list_steps().unwrap(), checkpoint::RootListing { steps: vec![], latest: None });
    save_step(&store, 10);
    save_step(&store, 20);
    // Step 30: one shard written, never committed.
    store.write_shard(30, "rank-00000", &refs(&model_tensors(30))).unwrap();

    let listing = store.list_steps().unwrap();
    assert_eq!(listing.latest, Some(20));
    let summary: Vec<_> = listing.steps.iter().map(|s| (s.step, s.committed, s.num_shard_files)).collect();
    assert_eq!(summary, [(10, true, 2), (20, true, 2), (30, false, 1)]);
    // Sizes are what is on disk: the shards plus the manifest.
    let folder_bytes = |step: &str| -> u64 {
        let dir = dir.path().join(step);
        let shards = std::fs::read_dir(dir.join("shards")).unwrap().map(|e| e.unwrap().metadata().unwrap().len());
        shards.sum::<u64>() + std::fs::metadata(dir.join("manifest.json")).map_or(0, |m| m.len())
    };
    assert_eq!(listing.steps[1].num_bytes, folder_bytes("step-00000020"));
    assert_eq!(listing.steps[2].num_bytes, folder_bytes("step-00000030"));

    // `latest` is reported as written, even when it names a step without a manifest.
    std::fs::write(dir.path().join("latest"), "step-00000030\n").unwrap();
    assert_eq!(store.list_steps().unwrap().latest, Some(30));
}
