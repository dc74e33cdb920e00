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
//! Files, one job each: `router.rs` (route, gates, balance and z losses,
//! backward), `score.rs` (the scoring function), `select.rs` (the choice
//! of experts: top-k, expert bias, group limit), `bias_update.rs` (the
//! aux-loss-free bias step), `free_experts.rs` (MoE++'s constant, copy
//! and zero experts, computed where the token is), `dispatch_plan.rs` (grouping rows by
//! expert, gather and combine), `experts.rs` (the executor trait and
//! [`LocalExperts`]), `expert_kind.rs` (the math of one expert), `layer.rs`
//! (the stages assembled into the sub-layer, shared experts included).
//!
//! Two seams, so that new routers and experts are additions, not edits
//! across files: a scoring function is a [`RouterScore`] variant (see
//! `score.rs`: "To add a scoring function"), an expert kind is an
//! [`ExpertKind`] implementation (see `expert_kind.rs`: "To add an expert
//! kind").
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots, `a` kept
//! assignments (rows of the dispatch buffer).

mod bias_update;
mod dispatch_plan;
mod expert_kind;
mod experts;
mod free_experts;
pub mod layer;
mod router;
mod score;
mod select;

pub use bias_update::update_expert_bias;
pub use dispatch_plan::DispatchPlan;
pub use expert_kind::{ExpertKind, Rows};
pub use experts::{ExpertExecutor, LocalExperts, Started};
pub use router::{
    route, route_backward, route_sharded, GatingResidual, RouterGrads, RouterLossScales, RouterWeights, Routing,
};
pub use score::RouterScore;
pub use select::Selection;
