//! Helpers shared by the checkpoint integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod s3_server;

use checkpoint::{CheckpointStore, LoadedTensors, Manifest, TensorRef};
use serde_json::json;

/// An owned tensor: name, shape, values.
pub type Owned = (String, Vec<usize>, Vec<f32>);

/// Model tensors with values that a lossy round trip would change: -0.0,
/// subnormals, infinities and a NaN with a payload.
pub fn model_tensors(seed: u32) -> Vec<Owned> {
    let special = [-0.0, f32::MIN_POSITIVE / 8.0, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0x7fc0_1234)];
    let ramp = |n: usize| -> Vec<f32> { (0..n).map(|i| (i as f32 + seed as f32) * 0.37 - 1.5).collect() };
    let mut wq = ramp(4 * 6);
    wq[..special.len()].copy_from_slice(&special);
    vec![
        ("tok_embeddings.weight".into(), vec![10, 4], ramp(40)),
        ("layers.0.attn.wq.weight".into(), vec![4, 6], wq),
        ("layers.0.moe.experts.3.w1.weight".into(), vec![3, 4], ramp(12)),
        ("norm.weight".into(), vec![4], ramp(4)),
        ("scalar".into(), vec![], vec![7.25]),
        ("empty".into(), vec![0, 4], vec![]),
    ]
}

/// Optimizer state for `model`: `optim.<name>.exp_avg` / `.exp_avg_sq`.
pub fn optim_tensors(model: &[Owned]) -> Vec<Owned> {
    model
        .iter()
        .flat_map(|(name, shape, data)| {
            let avg = data.iter().map(|x| x * 0.5).collect();
            let sq = data.iter().map(|x| x * x).collect();
            [
                (format!("optim.{name}.exp_avg"), shape.clone(), avg),
                (format!("optim.{name}.exp_avg_sq"), shape.clone(), sq),
            ]
        })
        .collect()
}

/// Borrow owned tensors for `write_shard`.
pub fn refs(tensors: &[Owned]) -> Vec<TensorRef<'_>> {
    tensors.iter().map(|(name, shape, data)| TensorRef { name, shape, data }).collect()
}

/// Save `step` as two shards (model on rank 0, optimizer on rank 1) and
/// commit it; returns what was written.
pub fn save_step(store: &CheckpointStore, step: u64) -> (Manifest, Vec<Owned>) {
    let model = model_tensors(step as u32);
    let optim = optim_tensors(&model);
    let mut manifest = Manifest::new(step, step * 4096, env!("CARGO_PKG_VERSION"));
    manifest.config = json!({"model": {"d_model": 4, "n_experts": 8}, "train": {"steps": 100}});
    manifest.plan = json!({"experts": {"3": 0}});
    manifest.parallel = json!({"ranks": 2, "ep": 2, "attn_tp": 1});
    manifest.data_cursor = json!([{"shard": 0, "offset": step * 16}]);
    manifest.rng = json!({"seed": 42, "counter": step});
    manifest.schedule = json!({"lr": 3e-4, "loss_scale": 1.0});
    for (shard, tensors) in [("rank-00000", &model), ("rank-00001", &optim)] {
        let report = store.write_shard(step, shard, &refs(tensors)).unwrap();
        manifest.add_shard(report);
    }
    store.commit(&manifest).unwrap();
    let mut all = model;
    all.extend(optim);
    (manifest, all)
}

/// Assert `loaded` holds exactly `expected`, bit for bit.
pub fn assert_bit_identical(loaded: &LoadedTensors, expected: &[Owned]) {
    assert_eq!(loaded.len(), expected.len(), "number of tensors");
    for (name, shape, data) in expected {
        let (got_shape, got) = &loaded[name];
        assert_eq!(got_shape, shape, "shape of {name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(got), bits(data), "values of {name}");
    }
}
