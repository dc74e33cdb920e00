//! The MoE layer as stages: route → dispatch → expert compute → combine.
//!
//! `route` decides, per token, its top-k experts, their gates and (with a
//! capacity factor) which assignments are dropped. A [`DispatchPlan`] lists
//! the kept assignments grouped by expert. The expert compute stage is an
//! [`ExpertExecutor`]: [`LocalExperts`] runs every expert on this rank (the
//! EP=1 reference); the worker's expert-parallel executor sends the rows to
//! the experts' owners with all-to-all instead. `combine` weights the expert
//! outputs by their gates and sums them back per token.
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots, `a` kept
//! assignments (rows of the dispatch buffer).

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::ops::swiglu::SwigluCache;
use crate::weights::ExpertStore;

/// The router's decisions for one micro-batch on one rank.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub num_tokens: usize,
    /// `[t, e]` router logits `x W_r^T`.
    pub logits_te: Vec<f32>,
    /// `[t, e]` softmax of the logits.
    pub probs_te: Vec<f32>,
    /// `[t, k]` chosen expert ids, highest probability first (ties → lower id).
    pub expert_tk: Vec<u32>,
    /// `[t, k]` gates (top-k probabilities, renormalised when `norm_topk_prob`).
    pub gate_tk: Vec<f32>,
    /// `[t, k]` false where capacity dropped the assignment.
    pub kept_tk: Vec<bool>,
    /// Switch/GShard load-balancing loss `E * sum_e f_e P_e` (before its coefficient).
    pub aux_loss: f32,
    /// `mean_t logsumexp(logits_t)^2` (before its coefficient).
    pub z_loss: f32,
    /// Kept assignments per expert (len E).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped by capacity.
    pub dropped: usize,
}

/// Computes router logits, probabilities, top-k, gates, capacity drops
/// (per DESIGN section 5, capacity from `cfg.capacity(num_tokens)`, token
/// order), the aux loss and the z-loss. `x_td` is `[num_tokens, d]`,
/// `router_ed` is `[E, d]`.
pub fn route(cfg: &ModelConfig, x_td: &[f32], router_ed: &[f32], num_tokens: usize) -> Routing {
    todo!()
}

/// Backward of [`route`]. `dgate_tk` is the loss gradient w.r.t. the gates
/// (zero for dropped assignments); `aux_scale` and `z_scale` multiply the
/// aux and z losses in the total loss. Adds into `dx_td` and `drouter_ed`.
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    cfg: &ModelConfig,
    x_td: &[f32],
    router_ed: &[f32],
    routing: &Routing,
    dgate_tk: &[f32],
    aux_scale: f32,
    z_scale: f32,
    dx_td: &mut [f32],
    drouter_ed: &mut [f32],
) {
    todo!()
}

/// The kept assignments grouped by expert: rows of expert 0 first (in
/// token order), then expert 1, and so on. This order is the contract
/// between the MoE layer and every [`ExpertExecutor`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchPlan {
    pub num_experts: usize,
    pub top_k: usize,
    /// Rows per expert (len E).
    pub counts_e: Vec<usize>,
    /// Start row of each expert's block (len E + 1).
    pub offsets_e: Vec<usize>,
    /// Per row: the flat `[t, k]` index `token * top_k + slot` it came from.
    pub source_a: Vec<u32>,
}

impl DispatchPlan {
    /// Groups the kept assignments of `routing` by expert.
    pub fn from_routing(routing: &Routing, num_experts: usize, top_k: usize) -> Self {
        todo!()
    }

    /// Number of rows (kept assignments).
    pub fn num_rows(&self) -> usize {
        self.source_a.len()
    }

    /// Copies each row's token vector: `x_ad[a] = x_td[source_a[a] / k]`.
    pub fn gather(&self, x_td: &[f32], d: usize) -> Vec<f32> {
        todo!()
    }

    /// Backward of [`DispatchPlan::gather`]: adds each row's gradient into its token.
    pub fn gather_backward(&self, dx_ad: &[f32], d: usize, dx_td: &mut [f32]) {
        todo!()
    }

    /// Combine: `out_td[t] += gate[t,k] * y_ad[a]` for every row `a` from `(t, k)`.
    pub fn combine(&self, routing: &Routing, y_ad: &[f32], d: usize, out_td: &mut [f32]) {
        todo!()
    }

    /// Backward of [`DispatchPlan::combine`]: returns `dy_ad`
    /// (`gate * dout[t]`) and adds `dot(dout[t], y_ad[a])` into `dgate_tk`.
    pub fn combine_backward(
        &self,
        routing: &Routing,
        y_ad: &[f32],
        dout_td: &[f32],
        d: usize,
        dgate_tk: &mut [f32],
    ) -> Vec<f32> {
        todo!()
    }
}

/// Where expert compute happens. Rows arrive in [`DispatchPlan`] order;
/// the executor returns each row's (ungated) expert output, and in
/// `backward` each row's input gradient, accumulating the experts' weight
/// gradients wherever the experts live. Calls come as all forwards of a
/// micro-batch (layer 0..L) then all backwards (layer L-1..0).
pub trait ExpertExecutor {
    /// `y_ad = Expert_e(x_ad)` row by row.
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// `dx_ad` from `dy_ad`, adding weight gradients.
    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError>;
}

/// Runs every expert on this rank: the EP=1 executor and the reference.
pub struct LocalExperts<'a> {
    d: usize,
    f: usize,
    weights: &'a ExpertStore,
    grads: &'a mut ExpertStore,
    /// Per layer: the forward input rows and per-expert caches.
    saved: Vec<Option<(Vec<f32>, Vec<SwigluCache>)>>,
}

impl<'a> LocalExperts<'a> {
    /// Experts from `weights` (which must hold every expert id the plans
    /// use); gradients are added into `grads`.
    pub fn new(cfg: &ModelConfig, weights: &'a ExpertStore, grads: &'a mut ExpertStore) -> Self {
        Self { d: cfg.d_model, f: cfg.ffn_hidden, weights, grads, saved: vec![None; cfg.n_layers] }
    }
}

impl ExpertExecutor for LocalExperts<'_> {
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        todo!()
    }

    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        todo!()
    }
}
