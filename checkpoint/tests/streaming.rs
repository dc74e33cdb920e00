//! Shards larger than one upload part are streamed (multipart) and must be
//! the same file `safetensors::serialize` would write.

use std::borrow::Cow;
use std::collections::HashMap;

use checkpoint::{CheckpointStore, Manifest, TensorRef};
use safetensors::{Dtype, View};

struct F32View<'a>(TensorRef<'a>);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.0.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

#[test]
fn shard_larger_than_an_upload_part_matches_safetensors_and_round_trips() {
    // ~20 MiB in all: more than two 8 MiB parts, with tensors straddling
    // part boundaries and given out of name order.
    let values = |n: usize, seed: u32| -> Vec<f32> {
        (0..n as u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761).wrapping_add(seed) & 0x7f7f_ffff)).collect()
    };
    let owned: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("layers.1.w".into(), vec![1024, 3584], values(1024 * 3584, 1)),
        ("layers.0.w".into(), vec![1536, 1024], values(1536 * 1024, 2)),
        ("empty".into(), vec![0, 3], vec![]),
        ("bias".into(), vec![777], values(777, 3)),
        ("scale".into(), vec![], vec![-0.0]),
    ];
    let tensors: Vec<TensorRef<'_>> = owned.iter().map(|(name, shape, data)| TensorRef { name, shape, data }).collect();

    let dir = tempfile::tempdir().unwrap();
    let options = checkpoint::StoreOptions { part_bytes: 8 << 20, ..Default::default() };
    let store = CheckpointStore::open_with(dir.path().to_str().unwrap(), &options).unwrap();
    let report = store.write_shard(11, "rank-00000", &tensors).unwrap();
    assert!(report.size_bytes > 16 << 20, "the shard must span several parts");

    let bytes = std::fs::read(dir.path().join("step-00000011").join(&report.file)).unwrap();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let expected = safetensors::serialize(tensors.iter().map(|t| (t.name, F32View(*t))), Some(metadata)).unwrap();
    assert_eq!(bytes.len(), expected.len());
    assert!(bytes == expected, "streamed shard differs from safetensors::serialize");
    assert_eq!(report.size_bytes, bytes.len() as u64);
    for entry in &report.tensors {
        let range = entry.offset as usize..(entry.offset + entry.length) as usize;
        assert_eq!(entry.crc32, crc32fast::hash(&bytes[range]), "crc of {}", entry.name);
    }

    let mut manifest = Manifest::new(11, 0, env!("CARGO_PKG_VERSION"));
    manifest.add_shard(report);
    store.commit(&manifest).unwrap();
    let loaded = store.read_tensors(11, &manifest, |_| true).unwrap();
    assert_eq!(loaded.len(), owned.len());
    for (name, shape, data) in &owned {
        let (got_shape, got) = &loaded[name];
        assert_eq!(got_shape, shape, "shape of {name}");
        assert!(got.iter().map(|x| x.to_bits()).eq(data.iter().map(|x| x.to_bits())), "values of {name}");
    }
    store.verify(11).unwrap();
}
