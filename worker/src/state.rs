//! Training state and its checkpoint form (DESIGN section 6).
//!
//! Model tensors are saved under their DESIGN section 5 names and the
//! AdamW moments as `optim.<name>.exp_avg` / `.exp_avg_sq`, so any
//! safetensors reader can open a shard and any layout can read it back.

use crate::config::JobConfig;
use crate::data::DataCursor;
use crate::error::WorkerError;
use checkpoint::{CheckpointStore, Manifest, TensorRef};
use coordinator::placement::PlacementPlan;
use model::rng::Rng;
use model::weights::tensor_shape;
use model::{ModelConfig, ModelWeights};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything that makes a run continue bit-exactly.
#[derive(Debug, Clone)]
pub struct TrainState {
    pub weights: ModelWeights,
    pub exp_avg: ModelWeights,
    pub exp_avg_sq: ModelWeights,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Reserved for stochastic features (dropout, sampling); saved so that
    /// adding one never breaks exact resume.
    pub rng: Rng,
}

/// The learning-rate schedule's position, saved in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleState {
    pub step: u64,
    pub total_steps: u64,
}

impl TrainState {
    /// A fresh run: seeded weights, zero moments.
    pub fn fresh(job: &JobConfig, plan: &PlacementPlan, rank: usize) -> Self {
        let weights = ModelWeights::init_owned(&job.model, job.train.seed, &plan.owned_by(rank));
        let zeros = weights.zeros_like();
        Self {
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
            weights,
            step: 0,
            tokens_seen: 0,
            rng: Rng::for_stream(job.train.seed, &[0x5EED]),
        }
    }

    /// The data position after `step` steps.
    pub fn cursor(&self, job: &JobConfig) -> DataCursor {
        DataCursor { sequences_consumed: self.step * job.train.global_batch_size as u64 }
    }

    /// Writes this rank's tensors (weights and moments) into one shard and
    /// returns the manifest describing them. The caller commits it.
    pub fn save(
        &self,
        store: &CheckpointStore,
        job: &JobConfig,
        plan: &PlacementPlan,
    ) -> Result<Manifest, WorkerError> {
        let mut refs_data: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        let moments = self.exp_avg.tensors().into_iter().zip(self.exp_avg_sq.tensors());
        for ((name, w), ((_, m), (_, v))) in self.weights.tensors().into_iter().zip(moments) {
            let shape = tensor_shape(&job.model, &name).expect("names come from the model crate");
            refs_data.push((format!("optim.{name}.exp_avg"), shape.clone(), m));
            refs_data.push((format!("optim.{name}.exp_avg_sq"), shape.clone(), v));
            refs_data.push((name, shape, w));
        }
        let refs: Vec<TensorRef> =
            refs_data.iter().map(|(name, shape, data)| TensorRef { name, shape, data }).collect();
        let report = store.write_shard(self.step, "rank-00000", &refs)?;
        let mut manifest = Manifest::new(self.step, self.tokens_seen, env!("CARGO_PKG_VERSION"));
        manifest.config = serde_json::to_value(job).expect("config serialises");
        manifest.plan = serde_json::to_value(plan).expect("plan serialises");
        manifest.parallel = serde_json::json!({ "ranks": job.parallel.ranks, "attn_tp": job.parallel.attn_tp });
        manifest.data_cursor = serde_json::to_value(self.cursor(job)).expect("cursor serialises");
        manifest.rng = serde_json::to_value(&self.rng).expect("rng serialises");
        manifest.schedule = serde_json::to_value(ScheduleState { step: self.step, total_steps: job.train.steps })
            .expect("schedule serialises");
        manifest.add_shard(report);
        Ok(manifest)
    }

    /// Loads a committed step onto this rank's plan. The checkpoint's model
    /// config must equal `job.model`: anything else is refused with the keys
    /// that differ.
    pub fn load(
        store: &CheckpointStore,
        step: u64,
        job: &JobConfig,
        plan: &PlacementPlan,
        rank: usize,
    ) -> Result<Self, WorkerError> {
        let manifest = store.read_manifest(step)?;
        let saved: JobConfig =
            serde_json::from_value(manifest.config.clone()).map_err(|e| WorkerError::Incompatible {
                url: store.step_url(step),
                reason: format!("its config cannot be read by this version: {e}"),
            })?;
        check_same_model(&saved.model, &job.model)
            .map_err(|reason| WorkerError::Incompatible { url: store.step_url(step), reason })?;
        let mut state = Self::fresh(job, plan, rank);
        let mut tensors = store.read_tensors(step, &manifest, |_| true)?;
        let url = store.step_url(step);
        fill(&mut state.weights, &mut tensors, "", &url)?;
        fill(&mut state.exp_avg, &mut tensors, ".exp_avg", &url)?;
        fill(&mut state.exp_avg_sq, &mut tensors, ".exp_avg_sq", &url)?;
        state.step = manifest.step;
        state.tokens_seen = manifest.tokens_seen;
        state.rng = serde_json::from_value(manifest.rng.clone())
            .map_err(|e| WorkerError::Incompatible { url: url.clone(), reason: format!("bad RNG state: {e}") })?;
        Ok(state)
    }
}

/// Copies saved tensors into `weights`; `suffix` selects weights ("") or a
/// moment (".exp_avg", ".exp_avg_sq").
fn fill(
    weights: &mut ModelWeights,
    tensors: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    suffix: &str,
    url: &str,
) -> Result<(), WorkerError> {
    for (name, dst) in weights.tensors_mut() {
        let key = if suffix.is_empty() { name.clone() } else { format!("optim.{name}{suffix}") };
        let (_, data) = tensors.remove(&key).ok_or_else(|| WorkerError::Incompatible {
            url: url.to_string(),
            reason: format!("tensor `{key}` is missing"),
        })?;
        if data.len() != dst.len() {
            return Err(WorkerError::Incompatible {
                url: url.to_string(),
                reason: format!("tensor `{key}` has {} values, the model needs {}", data.len(), dst.len()),
            });
        }
        dst.copy_from_slice(&data);
    }
    Ok(())
}

/// Names the `[model]` keys whose values differ.
fn check_same_model(saved: &ModelConfig, current: &ModelConfig) -> Result<(), String> {
    if saved == current {
        return Ok(());
    }
    let a = toml::Value::try_from(saved).expect("config serialises");
    let b = toml::Value::try_from(current).expect("config serialises");
    let (a, b) = (a.as_table().expect("table"), b.as_table().expect("table"));
    let diffs: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| {
            format!("{k} = {v} in the checkpoint, {} now", b.get(k).map(|x| x.to_string()).unwrap_or_default())
        })
        .collect();
    Err(format!(
        "it was written for a different model ([model] {}); resume with the checkpoint's config or start a new run",
        diffs.join("; ")
    ))
}
