//! Expert compute: the [`ExpertExecutor`] stage of the MoE layer, and
//! [`LocalExperts`], which runs every expert on this rank through an
//! [`ExpertKind`] (`expert_kind.rs`).
//!
//! Legend: `d` d_model, `f` ffn_hidden, `e` experts, `a` rows of the
//! dispatch buffer (kept assignments, grouped by expert).

use super::dispatch_plan::DispatchPlan;
use super::expert_kind::{ExpertKind, Rows};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::ops::swiglu::SwiGlu;
use crate::weights::{ExpertStore, ExpertWeights};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Below this many multiply-adds per expert product (`rows * d * f` for
/// SwiGLU, summed over the call's experts) the experts run one after another.
const RAYON_MIN_WORK: usize = 1 << 18;

/// Whether to run the experts of one call as parallel rayon tasks (each
/// with a single-threaded gemm) rather than one after another (each gemm
/// free to use every thread). Measured on the 2-core development machine,
/// forward + backward of `LocalExperts`: E=8, d=512, f=1024, 4096 rows:
/// about equal (rayon ~0.65 s, serial ~0.75 s, noisy); E=8, d=64, f=128,
/// 512 rows: rayon 1.5x faster (each gemm is below gemm's own parallel
/// threshold); E=4, d=6, f=5, 32 rows: serial 4x faster (task overhead).
fn use_rayon(rows: usize, work_per_row: usize, active_experts: usize) -> bool {
    active_experts > 1 && rows * work_per_row >= RAYON_MIN_WORK
}

/// Where expert compute happens. Rows arrive in [`DispatchPlan`] order;
/// the executor returns each row's (ungated) expert output, and in
/// `backward` each row's input gradient, accumulating the experts' weight
/// gradients wherever the experts live. Calls come as all forwards of a
/// micro-batch (layer 0..L) then all backwards (layer L-1..0).
pub trait ExpertExecutor {
    /// `y_ad = Expert_e(x_ad)` row by row. The executor owns `x_ad` from
    /// here: a local one keeps it as its saved input (no copy).
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: Vec<f32>) -> Result<Vec<f32>, ModelError>;
    /// `dx_ad` from `dy_ad`, adding weight gradients.
    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError>;

    /// Starts [`ExpertExecutor::forward`]; the caller may compute something
    /// else (attention, shared experts) before [`ExpertExecutor::finish_forward`].
    /// An executor that sends rows to other ranks starts sending here.
    fn start_forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: Vec<f32>) -> Result<Started, ModelError> {
        self.forward(layer, plan, x_ad).map(Started::Done)
    }
    /// The result of the forward pass `started` by [`ExpertExecutor::start_forward`].
    fn finish_forward(&mut self, layer: usize, started: Started) -> Result<Vec<f32>, ModelError> {
        started.into_done(layer)
    }
    /// Starts [`ExpertExecutor::backward`] (see [`ExpertExecutor::start_forward`]).
    fn start_backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Started, ModelError> {
        self.backward(layer, plan, dy_ad).map(Started::Done)
    }
    /// The result of the backward pass `started` by [`ExpertExecutor::start_backward`].
    fn finish_backward(&mut self, layer: usize, started: Started) -> Result<Vec<f32>, ModelError> {
        started.into_done(layer)
    }

    /// MoA's attention experts (`attention_experts.rs`) of `layer`, whose
    /// rows `plan` groups by expert: says which rows this rank computes,
    /// grouped by expert (a plan without token sources). Experts
    /// replicated on every rank (the default) compute every row here; an
    /// executor that partitions them over its ranks plans the exchanges of
    /// [`ExpertExecutor::attn_to_owners`] here, which every later exchange
    /// of the layer (forward and backward) follows.
    fn attn_plan(&mut self, _layer: usize, plan: &DispatchPlan) -> Result<DispatchPlan, ModelError> {
        Ok(DispatchPlan::grouped(plan.counts_e.clone(), plan.top_k))
    }
    /// Sends rows `[r, width]` in `plan` order (of [`ExpertExecutor::attn_plan`])
    /// to the ranks that hold their experts; returns the rows this rank
    /// computes, grouped as `attn_plan` said.
    fn attn_to_owners(&mut self, _layer: usize, rows: Vec<f32>, _width: usize) -> Result<Vec<f32>, ModelError> {
        Ok(rows)
    }
    /// The inverse of [`ExpertExecutor::attn_to_owners`]: rows computed here
    /// go back to the ranks they came from, in `plan` order there.
    fn attn_to_sources(&mut self, _layer: usize, rows: Vec<f32>, _width: usize) -> Result<Vec<f32>, ModelError> {
        Ok(rows)
    }
}

/// A started expert pass: done already, or still in flight inside the
/// executor (its finish call completes it).
#[derive(Debug)]
pub enum Started {
    Done(Vec<f32>),
    InFlight,
}

impl Started {
    fn into_done(self, layer: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            Started::Done(rows) => Ok(rows),
            Started::InFlight => Err(ModelError::executor(layer, "this executor left no pass in flight to finish")),
        }
    }
}

/// Runs every expert on this rank: the EP=1 executor and the reference.
/// Each expert's rows go through the expert kind `K` ([`SwiGlu`] in v1).
pub struct LocalExperts<'a, K: ExpertKind = SwiGlu> {
    kind: K,
    d: usize,
    weights: &'a ExpertStore,
    grads: &'a mut ExpertStore,
    n_layers: usize,
    /// Per (slot, layer): what its backward pass needs.
    saved: Vec<Option<Saved<K::Cache>>>,
}

/// One forward pass's input rows and its per-expert caches.
type Saved<C> = (Vec<f32>, Vec<C>);

impl<'a> LocalExperts<'a> {
    /// SwiGLU experts from `weights` (which must hold every expert id the
    /// plans use); gradients are added into `grads`.
    pub fn new(cfg: &ModelConfig, weights: &'a ExpertStore, grads: &'a mut ExpertStore) -> Self {
        Self::with_kind(SwiGlu::of(cfg), cfg, weights, grads)
    }
}

impl<'a, K: ExpertKind> LocalExperts<'a, K> {
    /// [`LocalExperts::new`] with experts of kind `kind`.
    pub fn with_kind(kind: K, cfg: &ModelConfig, weights: &'a ExpertStore, grads: &'a mut ExpertStore) -> Self {
        Self { kind, d: cfg.d_model, weights, grads, n_layers: cfg.n_layers, saved: vec![None; cfg.n_layers] }
    }

    /// Room for `slots` forward passes per layer whose backward passes are
    /// still to come (a pipelined executor runs each layer's rows in pieces).
    pub fn with_slots(mut self, slots: usize) -> Self {
        self.saved = vec![None; self.n_layers * slots.max(1)];
        self
    }

    fn slot_index(&self, slot: usize, layer: usize) -> Result<usize, ModelError> {
        let index = slot * self.n_layers + layer;
        if layer >= self.n_layers || index >= self.saved.len() {
            let reason = format!(
                "slot {slot} out of range ({} layers, {} slots)",
                self.n_layers,
                self.saved.len() / self.n_layers.max(1)
            );
            return Err(ModelError::executor(layer, reason));
        }
        Ok(index)
    }

    /// What a pass over `layer` with `plan` starts from, checked: the slot's
    /// index, the plan's rows, and each expert's weights. `values_ad` (named
    /// `what` in errors) must hold one row per planned row.
    fn start_pass(
        &self,
        slot: usize,
        layer: usize,
        plan: &DispatchPlan,
        values_ad: &[f32],
        what: &str,
    ) -> Result<(usize, usize, Vec<Option<&'a ExpertWeights>>), ModelError> {
        let index = self.slot_index(slot, layer)?;
        let (rows, d) = (plan.num_rows(), self.d);
        if values_ad.len() != rows * d {
            let reason = format!("{what} has {} values, the plan needs {rows}x{d}", values_ad.len());
            return Err(ModelError::executor(layer, reason));
        }
        Ok((index, rows, layer_experts(self.weights, self.n_layers, layer, plan)?))
    }
}

/// Runs `run` on every expert's task (`rows` planned rows in all): on the
/// thread pool when [`use_rayon`] says the work is worth it.
fn run_tasks<T: Send>(tasks: Vec<T>, rows: usize, work_per_row: usize, run: impl Fn(T) + Sync + Send) {
    if use_rayon(rows, work_per_row, tasks.len()) {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

impl<K: ExpertKind> ExpertExecutor for LocalExperts<'_, K> {
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        self.forward_in(0, layer, plan, x_ad)
    }

    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.backward_in(0, layer, plan, dy_ad)
    }
}

impl<K: ExpertKind> LocalExperts<'_, K> {
    /// [`ExpertExecutor::forward`] keeping its cache in `slot` (see [`LocalExperts::with_slots`]).
    pub fn forward_in(
        &mut self,
        slot: usize,
        layer: usize,
        plan: &DispatchPlan,
        x_ad: Vec<f32>,
    ) -> Result<Vec<f32>, ModelError> {
        let (d, kind) = (self.d, &self.kind);
        let (index, rows, weights) = self.start_pass(slot, layer, plan, &x_ad, "dispatch buffer")?;
        let mut y_ad = vec![0.0f32; rows * d];
        let mut caches = vec![K::Cache::default(); plan.num_experts];
        {
            // Per expert with rows: (weights, input rows, output rows, cache), all disjoint.
            let mut tasks = Vec::with_capacity(weights.len());
            let mut y_rest: &mut [f32] = &mut y_ad;
            for ((e, cache), w) in caches.iter_mut().enumerate().zip(weights) {
                let (lo, hi) = (plan.offsets_e[e], plan.offsets_e[e + 1]);
                let (y_e, y_next) = std::mem::take(&mut y_rest).split_at_mut((hi - lo) * d);
                y_rest = y_next;
                if let Some(w) = w {
                    tasks.push((w, &x_ad[lo * d..hi * d], hi - lo, y_e, cache));
                }
            }
            let run = |(w, x_rd, rows, y, c): (&ExpertWeights, &[f32], usize, &mut [f32], &mut K::Cache)| {
                kind.forward(w, Rows { x_rd, rows }, y, c)
            };
            run_tasks(tasks, rows, kind.work_per_row(), run);
        }
        self.saved[index] = Some((x_ad, caches));
        Ok(y_ad)
    }

    /// [`ExpertExecutor::backward`] of the forward pass kept in `slot`.
    pub fn backward_in(
        &mut self,
        slot: usize,
        layer: usize,
        plan: &DispatchPlan,
        dy_ad: &[f32],
    ) -> Result<Vec<f32>, ModelError> {
        let (d, kind) = (self.d, &self.kind);
        let (index, rows, weights) = self.start_pass(slot, layer, plan, dy_ad, "output gradient")?;
        let (mut x_ad, caches) = self
            .saved
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| ModelError::executor(layer, "backward without a saved forward"))?;
        if x_ad.len() != rows * d || caches.len() != plan.num_experts {
            return Err(ModelError::executor(layer, "backward plan does not match the forward plan"));
        }
        let grads_layer = self
            .grads
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::executor(layer, "no gradient store for this layer"))?;
        // Disjoint &mut to every gradient entry the plan uses.
        let mut grad_of: BTreeMap<usize, &mut ExpertWeights> = grads_layer
            .iter_mut()
            .filter(|(e, _)| plan.counts_e.get(**e).is_some_and(|&c| c > 0))
            .map(|(e, g)| (*e, g))
            .collect();
        {
            // Each task spends its expert's cache (freed as that expert
            // finishes) and its rows of the saved input, which become the
            // rows' input gradient (no fresh [rows, d] at the pass's peak).
            let mut tasks = Vec::with_capacity(weights.len());
            let mut x_rest: &mut [f32] = &mut x_ad;
            for ((e, w), cache) in weights.into_iter().enumerate().zip(caches) {
                let (lo, hi) = (plan.offsets_e[e], plan.offsets_e[e + 1]);
                let (x_dx_e, x_next) = std::mem::take(&mut x_rest).split_at_mut((hi - lo) * d);
                x_rest = x_next;
                // No weights means no rows (`layer_experts`): nothing to compute.
                let Some(w) = w else { continue };
                let g = grad_of.remove(&e).ok_or_else(|| {
                    ModelError::executor(layer, format!("expert {e} has no gradient entry on this rank"))
                })?;
                tasks.push((w, x_dx_e, hi - lo, cache, &dy_ad[lo * d..hi * d], g));
            }
            type Task<'t, C> = (&'t ExpertWeights, &'t mut [f32], usize, C, &'t [f32], &'t mut ExpertWeights);
            let run = |(w, x_dx, rows, c, dy, g): Task<'_, K::Cache>| kind.backward(w, x_dx, rows, c, dy, g);
            run_tasks(tasks, rows, kind.work_per_row(), run);
        }
        Ok(x_ad)
    }
}

/// Per expert id `0..E`: its weights when the plan gives it rows, or an
/// error naming the first such expert missing from the store.
fn layer_experts<'w>(
    weights: &'w ExpertStore,
    n_layers: usize,
    layer: usize,
    plan: &DispatchPlan,
) -> Result<Vec<Option<&'w ExpertWeights>>, ModelError> {
    if layer >= n_layers {
        return Err(ModelError::executor(layer, format!("out of range: the model has {n_layers} layers")));
    }
    let consistent = plan.counts_e.len() == plan.num_experts
        && plan.offsets_e.len() == plan.num_experts + 1
        && plan.offsets_e[0] == 0
        && plan.offsets_e[plan.num_experts] == plan.num_rows()
        && (0..plan.num_experts).all(|e| plan.offsets_e[e] + plan.counts_e[e] == plan.offsets_e[e + 1]);
    if !consistent {
        return Err(ModelError::executor(layer, "malformed dispatch plan"));
    }
    let store =
        weights.layers.get(layer).ok_or_else(|| ModelError::executor(layer, "the expert store has no such layer"))?;
    (0..plan.num_experts)
        .map(|e| {
            if plan.counts_e[e] == 0 {
                return Ok(None);
            }
            store.get(&e).map(Some).ok_or_else(|| {
                let reason = format!("expert {e} has {} rows but is not held on this rank", plan.counts_e[e]);
                ModelError::executor(layer, reason)
            })
        })
        .collect()
}
