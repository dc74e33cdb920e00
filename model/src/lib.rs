//! Single-rank math for the switchyard MoE transformer (DESIGN section 5).
//!
//! Nothing here communicates. The MoE layer is split into stages — route,
//! expert compute, combine — and expert compute goes through the
//! [`moe::ExpertExecutor`] trait so that the worker can put all-to-all
//! communication between the stages. [`moe::LocalExperts`] is the EP=1
//! executor and the reference that parallel runs are checked against.
//!
//! Shape legend used in names across the crate:
//! `t` tokens of a micro-batch (batch × seq_len), `d` d_model, `v` vocab,
//! `e` experts, `k` top-k, `f` ffn_hidden, `h` query heads, `g` kv heads,
//! `a` expert assignments (rows sent to experts), `s` sequence positions.

pub mod attention_experts;
pub mod attention_heads;
pub mod config;
pub mod error;
pub mod gemm;
pub mod modality;
pub mod model;
pub mod moe;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod shards;
pub mod weights;

pub use config::{AttentionKind, AttnRouterKind, BlockKind, ModelConfig, RoutedKind, RouterScoreKind};
pub use error::ModelError;
/// The MoE sub-layer, also reachable as `moe::layer`.
pub use moe::layer as moe_layer;
pub use weights::{
    AttnExpertWeights, ConstantExpertWeights, DenseLayerWeights, DenseWeights, ExpertStore, ExpertWeights, ModalTensor,
    ModalityWeights, ModelWeights,
};
