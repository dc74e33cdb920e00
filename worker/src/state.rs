//! Training state and its checkpoint form (DESIGN section 6).
//!
//! Model tensors are saved under their DESIGN section 5 names and the
//! AdamW moments as `optim.<name>.exp_avg` / `.exp_avg_sq`, so any
//! safetensors reader can open a shard and any layout can read it back.

use crate::config::{AttnExpertPlacement, JobConfig};
use crate::data::DataCursor;
use crate::error::WorkerError;
use checkpoint::{CheckpointStore, Manifest, ShardReport, TensorRef};
use layout::{ParallelDims, PlacementPlan};
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

/// The (layer, global expert id) of a routed expert's tensor name
/// (`layers.{l}.moe.experts.{e}.…`).
fn expert_of(name: &str) -> Option<(usize, usize)> {
    layer_expert_of(name, "moe.experts.")
}

/// The (layer, expert id) of a MoA attention expert's tensor name
/// (`layers.{l}.attn.experts.{e}.…`).
pub(crate) fn attn_expert_of(name: &str) -> Option<(usize, usize)> {
    layer_expert_of(name, "attn.experts.")
}

/// The (layer, expert) of `layers.{l}.{family}{e}.…`.
fn layer_expert_of(name: &str, family: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let expert = rest.strip_prefix(family)?.split('.').next()?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}

/// A tensor copied out of the training state for a checkpoint.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A tensor of a rank's checkpoint shard, read in place from the state.
#[derive(Debug, Clone)]
pub struct ShardTensor<'s> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'s [f32],
}

impl OwnedTensor {
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef { name: &self.name, shape: &self.shape, data: &self.data }
    }
}

impl ShardTensor<'_> {
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef { name: &self.name, shape: &self.shape, data: self.data }
    }
}

/// Writes `tensors` as shard `rank-XXXXX` of `step`; `None` when there is nothing to write.
pub fn write_snapshot(
    store: &CheckpointStore,
    step: u64,
    rank: usize,
    tensors: &[TensorRef<'_>],
) -> Result<Option<ShardReport>, WorkerError> {
    if tensors.is_empty() {
        return Ok(None);
    }
    Ok(Some(store.write_shard(step, &format!("rank-{rank:05}"), tensors)?))
}

/// The learning-rate schedule's position, saved in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleState {
    pub step: u64,
    pub total_steps: u64,
}

impl TrainState {
    /// A fresh run: seeded weights (the dense tensors and the experts the
    /// plan gives expert-parallel position `ep_rank`; with partitioned
    /// attention experts, `attn` their plan, only those this position
    /// owns, the others left empty), zero moments.
    pub fn fresh(job: &JobConfig, plan: &PlacementPlan, attn: Option<&PlacementPlan>, ep_rank: usize) -> Self {
        let mut weights = ModelWeights::init_owned(&job.model, job.train.seed, &plan.owned_by(ep_rank));
        if let Some(attn) = attn {
            // Seeded whole first, so an expert's values do not depend on the layout.
            for (l, layer) in weights.dense.layers.iter_mut().enumerate() {
                for (e, expert) in layer.attn_experts.iter_mut().enumerate() {
                    if !attn.owners[l][e].contains(&ep_rank) {
                        (expert.wq, expert.wo) = (Vec::new(), Vec::new());
                    }
                }
            }
        }
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

    /// This rank's share of the checkpoint, read in place: the dense
    /// tensors (replicated everywhere) only when `writes.dense`, and the
    /// experts it holds for which `writes.expert(layer, expert)` — so every
    /// tensor is written once — each with its two AdamW moments.
    pub fn shard_tensors(&self, job: &JobConfig, writes: ShardWrites<'_>) -> Vec<ShardTensor<'_>> {
        fn select<'w>(w: &'w ModelWeights, partitioned: bool, writes: ShardWrites) -> Vec<(String, &'w Vec<f32>)> {
            let mut out = Vec::new();
            for (name, t) in w.dense.tensors() {
                let attn_expert = partitioned && attn_expert_of(&name).is_some();
                // A partitioned attention expert is empty where another rank holds it.
                let written = if attn_expert { writes.attn_experts && !t.is_empty() } else { writes.dense };
                if written {
                    out.push((name, t));
                }
            }
            let experts = w.experts.tensors().into_iter();
            out.extend(experts.filter(|(name, _)| expert_of(name).is_some_and(|(l, e)| (writes.expert)(l, e))));
            out
        }
        let partitioned = job.parallel.attn_expert_placement == AttnExpertPlacement::Partitioned;
        let select = |w| select(w, partitioned, writes);
        let shape = |name: &str| tensor_shape(&job.model, name).expect("names come from the model crate");
        let mut out = Vec::new();
        let moments = select(&self.exp_avg).into_iter().zip(select(&self.exp_avg_sq));
        for ((name, w), ((_, m), (_, v))) in select(&self.weights).into_iter().zip(moments) {
            let shape = shape(&name);
            out.push(ShardTensor { name: format!("optim.{name}.exp_avg"), shape: shape.clone(), data: m });
            out.push(ShardTensor { name: format!("optim.{name}.exp_avg_sq"), shape: shape.clone(), data: v });
            out.push(ShardTensor { name, shape, data: w });
        }
        // Buffers (the expert bias) are state without moments, replicated
        // like the dense tensors.
        if writes.dense {
            for (name, data) in self.weights.dense.buffers() {
                out.push(ShardTensor { shape: shape(&name), name, data });
            }
        }
        out
    }

    /// Copies [`Self::shard_tensors`] into `out`, ready to upload while
    /// training goes on. Buffers of a previous snapshot with the same
    /// tensors are reused: a save then costs one memory copy, without
    /// fresh allocations to fault in.
    pub fn snapshot_into(&self, job: &JobConfig, writes: ShardWrites<'_>, out: &mut Vec<OwnedTensor>) {
        let wanted = self.shard_tensors(job, writes);
        let reusable = out.len() == wanted.len()
            && out.iter().zip(&wanted).all(|(t, w)| t.name == w.name && t.data.len() == w.data.len());
        if reusable {
            // Memory-bandwidth bound: every core copies a part.
            use rayon::prelude::*;
            out.par_iter_mut().zip(wanted.par_iter()).for_each(|(t, w)| t.data.copy_from_slice(w.data));
            return;
        }
        *out =
            wanted.into_iter().map(|w| OwnedTensor { name: w.name, shape: w.shape, data: w.data.to_vec() }).collect();
    }

    /// The manifest of this state's step, listing the shards every rank wrote.
    pub fn manifest(
        &self,
        job: &JobConfig,
        dims: &ParallelDims,
        plan: &PlacementPlan,
        shards: Vec<ShardReport>,
    ) -> Manifest {
        let mut manifest = Manifest::new(self.step, self.tokens_seen, env!("CARGO_PKG_VERSION"));
        // The auth token is a secret: checkpoints are shared, so it stays out.
        let mut job = job.clone();
        job.coordinator.token.clear();
        manifest.config = serde_json::to_value(&job).expect("config serialises");
        manifest.plan = serde_json::to_value(plan).expect("plan serialises");
        manifest.parallel = serde_json::to_value(dims).expect("dims serialise");
        manifest.data_cursor = serde_json::to_value(self.cursor(&job)).expect("cursor serialises");
        manifest.rng = serde_json::to_value(&self.rng).expect("rng serialises");
        manifest.schedule = serde_json::to_value(ScheduleState { step: self.step, total_steps: job.train.steps })
            .expect("schedule serialises");
        for shard in shards {
            manifest.add_shard(shard);
        }
        manifest
    }

    /// Loads a committed step onto this rank's plans (as [`TrainState::fresh`]).
    /// The checkpoint's model config must equal `job.model`: anything else
    /// is refused with the keys that differ.
    pub fn load(
        store: &CheckpointStore,
        step: u64,
        job: &JobConfig,
        (plan, attn): (&PlacementPlan, Option<&PlacementPlan>),
        ep_rank: usize,
    ) -> Result<Self, WorkerError> {
        let manifest = store.read_manifest(step)?;
        let saved: JobConfig =
            serde_json::from_value(manifest.config.clone()).map_err(|e| WorkerError::Incompatible {
                url: store.step_url(step),
                reason: format!("its config cannot be read by this version: {e}"),
            })?;
        check_same_model(&saved.model, &job.model)
            .map_err(|reason| WorkerError::Incompatible { url: store.step_url(step), reason })?;
        let mut state = Self::fresh(job, plan, attn, ep_rank);
        // Only what this rank holds: dense tensors and its own experts, by
        // global name — whatever layout wrote them (partitioned attention
        // experts held elsewhere are empty here).
        let mut needed = std::collections::BTreeSet::new();
        for (name, _) in state.weights.tensors().into_iter().filter(|(_, t)| !t.is_empty()) {
            needed.insert(format!("optim.{name}.exp_avg"));
            needed.insert(format!("optim.{name}.exp_avg_sq"));
            needed.insert(name);
        }
        needed.extend(state.weights.dense.buffers().into_iter().map(|(name, _)| name));
        let mut tensors = store.read_tensors(step, &manifest, |name| needed.contains(name))?;
        let url = store.step_url(step);
        fill(state.weights.dense.buffers_mut(), &mut tensors, "", &url)?;
        fill(held(state.weights.tensors_mut()), &mut tensors, "", &url)?;
        fill(held(state.exp_avg.tensors_mut()), &mut tensors, ".exp_avg", &url)?;
        fill(held(state.exp_avg_sq.tensors_mut()), &mut tensors, ".exp_avg_sq", &url)?;
        state.step = manifest.step;
        state.tokens_seen = manifest.tokens_seen;
        state.rng = serde_json::from_value(manifest.rng.clone())
            .map_err(|e| WorkerError::Incompatible { url: url.clone(), reason: format!("bad RNG state: {e}") })?;
        Ok(state)
    }
}

/// The tensors this rank holds: every model tensor has values, so an
/// empty one is a partitioned attention expert another rank holds.
fn held(tensors: Vec<(String, &mut Vec<f32>)>) -> Vec<(String, &mut Vec<f32>)> {
    tensors.into_iter().filter(|(_, t)| !t.is_empty()).collect()
}

/// What one rank writes of a checkpoint (each tensor is written once).
#[derive(Clone, Copy)]
pub struct ShardWrites<'f> {
    /// The replicated dense tensors and buffers.
    pub dense: bool,
    /// The routed experts (layer, expert) it holds for which this says so.
    pub expert: &'f dyn Fn(usize, usize) -> bool,
    /// The partitioned attention experts it holds.
    pub attn_experts: bool,
}

impl ShardWrites<'_> {
    /// Everything this rank holds (one rank holding the whole model).
    pub const ALL: ShardWrites<'static> = ShardWrites { dense: true, expert: &|_, _| true, attn_experts: true };
}

/// Copies saved tensors into the named `targets`; `suffix` selects
/// weights ("") or a moment (".exp_avg", ".exp_avg_sq").
fn fill(
    targets: Vec<(String, &mut Vec<f32>)>,
    tensors: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    suffix: &str,
    url: &str,
) -> Result<(), WorkerError> {
    for (name, dst) in targets {
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
