//! Exporting a step as one safetensors file: what a standalone reader sees,
//! what the filter keeps, and that a failed export leaves nothing behind.

mod common;

use std::path::Path;

use checkpoint::{is_optimizer_state, CheckpointStore, Error, Manifest};
use common::{model_tensors, optim_tensors, refs, Owned};
use safetensors::{Dtype, SafeTensors};

/// Save `step` the way ranks do: the model split over two shards, each rank
/// writing its own tensors' optimizer moments next to them. Returns every
/// tensor written.
fn save_two_ranks(store: &CheckpointStore, step: u64) -> Vec<Owned> {
    let model = model_tensors(step as u32);
    let (rank0, rank1) = model.split_at(3);
    let mut manifest = Manifest::new(step, step * 1024, "test");
    let mut all = Vec::new();
    for (shard, part) in [("rank-00000", rank0), ("rank-00001", rank1)] {
        let mut tensors = part.to_vec();
        tensors.extend(optim_tensors(part));
        manifest.add_shard(store.write_shard(step, shard, &refs(&tensors)).unwrap());
        all.extend(tensors);
    }
    store.commit(&manifest).unwrap();
    all
}

/// Read `path` with the safetensors crate alone and check it holds exactly
/// `expected`, bit for bit.
fn assert_file_holds(path: &Path, expected: &[&Owned]) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let mut want: Vec<_> = expected.iter().map(|(name, _, _)| name).collect();
    want.sort();
    assert_eq!(names, want, "tensor names in {}", path.display());
    for (name, shape, data) in expected {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        let le: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(view.data() == le.as_slice(), "bytes of {name} differ");
    }
    // transformers' loaders look for this, as in every shard.
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(metadata.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
}

#[test]
fn export_round_trips_bit_for_bit_through_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    let all = save_two_ranks(&store, 20);
    let model: Vec<_> = all.iter().filter(|(name, _, _)| !is_optimizer_state(name)).collect();
    assert_eq!(model.len(), 6, "the fixture's model tensors, spread over both shards");

    let out = dir.path().join("model.safetensors");
    let report = store.export_safetensors(20, |name| !is_optimizer_state(name), &out).unwrap();
    assert_file_holds(&out, &model);
    assert_eq!(report.step, 20);
    assert_eq!(report.num_tensors, model.len());
    assert_eq!(report.num_skipped, all.len() - model.len());
    assert_eq!(report.num_bytes, std::fs::metadata(&out).unwrap().len());

    // Asked for, the optimizer moments come too (and replace the old file).
    let everything: Vec<_> = all.iter().collect();
    let report = store.export_safetensors(20, |_| true, &out).unwrap();
    assert_file_holds(&out, &everything);
    assert_eq!((report.num_tensors, report.num_skipped), (all.len(), 0));

    // Only the target is left in the folder: no temporary files.
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["ckpt", "model.safetensors"]);
}

#[test]
fn corrupt_tensor_fails_the_export_and_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    save_two_ranks(&store, 4);
    let manifest = store.read_manifest(4).unwrap();
    let victim = manifest.tensor("norm.weight").unwrap().clone();
    assert_eq!(victim.shard, "shards/rank-00001.safetensors");
    let shard = dir.path().join("ckpt/step-00000004").join(&victim.shard);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[victim.offset as usize + 2] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();

    let out = dir.path().join("model.safetensors");
    std::fs::write(&out, b"previous export").unwrap();
    let err = store.export_safetensors(4, |_| true, &out).unwrap_err();
    assert!(matches!(err, Error::CorruptTensor { .. }), "{err}");
    assert!(err.to_string().contains("rank-00001.safetensors") && err.to_string().contains("norm.weight"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous export");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "a temporary file was left");
}

#[test]
fn export_errors_name_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    save_two_ranks(&store, 8);

    let missing_dir = dir.path().join("no/such/folder/model.safetensors");
    let err = store.export_safetensors(8, |_| true, &missing_dir).unwrap_err();
    assert!(matches!(err, Error::ExportFile { .. }), "{err}");
    assert!(err.to_string().contains("no/such/folder/model.safetensors"), "{err}");
    assert!(!dir.path().join("no").exists());

    let err = store.export_safetensors(8, |_| false, &dir.path().join("none.safetensors")).unwrap_err();
    assert!(matches!(err, Error::NothingToExport { step: 8, .. }), "{err}");
    assert!(!dir.path().join("none.safetensors").exists());

    let err = store.export_safetensors(9, |_| true, &dir.path().join("x.safetensors")).unwrap_err();
    assert!(matches!(err, Error::NotCommitted { step: 9, .. }), "{err}");
}
