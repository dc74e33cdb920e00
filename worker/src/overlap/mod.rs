//! Overlap of communication with computation (DESIGN section 4,
//! docs/overlap.md): the `[overlap]` switches, which of them apply to a
//! layout, and how much waiting was left exposed.
//!
//! The techniques, each a switch:
//! - `chunks`: every dispatch and combine is cut in pieces; the experts run
//!   on piece i while piece i+1 travels (`dispatch.rs`).
//! - `parallel_block`: in parallel (BAM) blocks the MoE rows leave before
//!   attention runs, and come back after it (`model::model`).
//! - `interleave`: two micro-batches run at once on two lanes (threads with
//!   their own groups), so one's all-to-all travels while the other computes.
//! - `grad_bucket_mib`: dense gradients are all-reduced in buckets started
//!   during the last backward pass, as soon as a bucket's layers are done
//!   (`grad_buckets.rs`).
//!
//! Rows and buckets travel on communication threads
//! (`collectives::comm_thread`), which drive their transfers themselves.

pub mod exposure;
pub mod grad_buckets;

use crate::config::Backend;
use model::ModelConfig;
use serde::{Deserialize, Serialize};

/// `[overlap] mode`: when the technique switches apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlapMode {
    /// On the nccl backend, and on mpi when the ranks span more than one
    /// node; not on local threads or MPI ranks of one machine, where a
    /// transfer is a memory copy by the same busy cores (measured slower,
    /// docs/overlap.md).
    Auto,
    /// On every backend.
    On,
    /// On none.
    Off,
}

/// `[overlap]`: which techniques run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlapConfig {
    /// When the switches below apply.
    pub mode: OverlapMode,
    /// Pieces each dispatch and combine is cut in (1: one piece, no pipelining).
    pub chunks: usize,
    /// Parallel (BAM) blocks: attention runs while the MoE rows travel.
    pub parallel_block: bool,
    /// Two micro-batches at once when a step has two or more per rank.
    pub interleave: bool,
    /// Size of the gradient all-reduce buckets started during the backward
    /// pass, in MiB; 0 all-reduces every gradient after the backward pass.
    pub grad_bucket_mib: f64,
}

impl Default for OverlapConfig {
    fn default() -> Self {
        Self { mode: OverlapMode::Auto, chunks: 2, parallel_block: true, interleave: true, grad_bucket_mib: 1.0 }
    }
}

impl OverlapConfig {
    /// Checks the values; the error is (key, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=64).contains(&self.chunks) {
            return Err(("chunks", format!("{} is not 1 to 64", self.chunks)));
        }
        if !(self.grad_bucket_mib.is_finite() && self.grad_bucket_mib >= 0.0) {
            return Err(("grad_bucket_mib", "must be a number of MiB >= 0 (0: no buckets)".into()));
        }
        Ok(())
    }
}

/// What a rank does, given the switches and its layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Techniques {
    /// Rows travel on a communication thread, cut in this many chunks
    /// (`None`: on the rank's thread, waited for at once).
    pub pipe_chunks: Option<usize>,
    pub attention_during_moe: bool,
    pub interleave: bool,
    /// Bucket size in f32 values (`None`: no buckets).
    pub bucket_values: Option<usize>,
}

impl Techniques {
    /// The techniques that apply: all need more than one rank and `mode`
    /// to allow them on the backend; buckets need every dense gradient
    /// replicated (no attention shards) and layers that fill more than one
    /// bucket (one bucket can only start when the backward pass ends);
    /// interleaving needs two micro-batches per step; threads must be
    /// allowed to talk at once (MPI_THREAD_MULTIPLE).
    pub fn choose(cfg: &OverlapConfig, rank: &RankLayout) -> Self {
        let allowed = match cfg.mode {
            OverlapMode::On => true,
            OverlapMode::Off => false,
            OverlapMode::Auto => match rank.backend {
                Backend::Nccl => true,
                Backend::Mpi => rank.spans_nodes,
                Backend::Local => false,
            },
        };
        let on = allowed && rank.world > 1 && rank.threads_ok;
        let interleave = on && cfg.interleave && rank.micro_batches >= 2;
        let attention_during_moe = on && cfg.parallel_block;
        let pipe = on && (cfg.chunks > 1 || attention_during_moe || interleave);
        let bucket_values = ((cfg.grad_bucket_mib * (1 << 20) as f64) as usize / 4).max(1);
        let buckets = on && rank.attn_tp == 1 && cfg.grad_bucket_mib > 0.0 && rank.layer_grad_values > bucket_values;
        Self {
            pipe_chunks: pipe.then_some(cfg.chunks),
            attention_during_moe,
            interleave,
            bucket_values: buckets.then_some(bucket_values),
        }
    }
}

/// What the choice of techniques depends on besides the switches.
#[derive(Debug, Clone, Copy)]
pub struct RankLayout {
    pub backend: Backend,
    pub world: usize,
    pub attn_tp: usize,
    /// Micro-batches per rank per step.
    pub micro_batches: usize,
    /// Values of every layer's dense gradients (see [`dense_layer_values`]).
    pub layer_grad_values: usize,
    /// Whether the backend lets several threads run collectives at once.
    pub threads_ok: bool,
    /// Whether the ranks run on more than one node (host name).
    pub spans_nodes: bool,
}

/// Values of the dense tensors of all layers (what gradient buckets carry).
pub fn dense_layer_values(cfg: &ModelConfig) -> usize {
    (0..cfg.n_layers).map(|l| cfg.layer_dense_values(l)).sum()
}

impl Techniques {
    /// For the start banner, e.g. "chunks 2, attention during MoE, 2 lanes, buckets 1.0 MiB".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(chunks) = self.pipe_chunks {
            parts.push(format!("all-to-all on a thread in {chunks} chunk(s)"));
        }
        if self.attention_during_moe {
            parts.push("attention during MoE transfers".into());
        }
        if self.interleave {
            parts.push("2 micro-batch lanes".into());
        }
        if let Some(values) = self.bucket_values {
            parts.push(format!("gradient buckets of {:.1} MiB", (values * 4) as f64 / (1 << 20) as f64));
        }
        if parts.is_empty() {
            "off".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forced_on() -> OverlapConfig {
        OverlapConfig { mode: OverlapMode::On, ..OverlapConfig::default() }
    }

    #[test]
    fn techniques_follow_switches_and_layout() {
        let all = OverlapConfig::default();
        let big = 1 << 22;
        let layout = |backend, world, attn_tp, micro_batches, threads_ok| RankLayout {
            backend,
            world,
            attn_tp,
            micro_batches,
            layer_grad_values: big,
            threads_ok,
            spans_nodes: true,
        };
        let choose = |cfg: &OverlapConfig, backend, world, attn_tp, micro, ok| {
            Techniques::choose(cfg, &layout(backend, world, attn_tp, micro, ok))
        };
        let t = choose(&all, Backend::Mpi, 4, 1, 2, true);
        assert_eq!(t.pipe_chunks, Some(2));
        assert!(t.attention_during_moe && t.interleave);
        assert_eq!(t.bucket_values, Some(1 << 18));
        let none =
            Techniques { pipe_chunks: None, attention_during_moe: false, interleave: false, bucket_values: None };
        // One rank: nothing to overlap.
        assert_eq!(choose(&all, Backend::Mpi, 1, 1, 2, true), none);
        // Threads, and MPI ranks on one machine: off unless asked for.
        assert_eq!(choose(&all, Backend::Local, 4, 1, 2, true), none);
        let one_node = RankLayout { spans_nodes: false, ..layout(Backend::Mpi, 4, 1, 2, true) };
        assert_eq!(Techniques::choose(&all, &one_node), none);
        assert_eq!(Techniques::choose(&forced_on(), &one_node), t);
        assert_eq!(
            Techniques::choose(&all, &RankLayout { spans_nodes: false, ..layout(Backend::Nccl, 4, 1, 2, true) }),
            t
        );
        let forced = OverlapConfig { mode: OverlapMode::On, ..all.clone() };
        assert_eq!(choose(&forced, Backend::Local, 4, 1, 2, true), t);
        let never = OverlapConfig { mode: OverlapMode::Off, ..all.clone() };
        assert_eq!(choose(&never, Backend::Mpi, 4, 1, 2, true), none);
        // Attention shards: no buckets; one micro-batch: no interleaving.
        let sharded = choose(&all, Backend::Mpi, 4, 2, 1, true);
        assert!(sharded.bucket_values.is_none() && !sharded.interleave && sharded.pipe_chunks.is_some());
        // MPI without MPI_THREAD_MULTIPLE: everything on the rank's thread.
        assert_eq!(choose(&all, Backend::Mpi, 4, 1, 2, false), none);
        let off =
            OverlapConfig { chunks: 1, parallel_block: false, interleave: false, grad_bucket_mib: 0.0, ..all.clone() };
        assert_eq!(choose(&off, Backend::Mpi, 4, 1, 2, true), none);
        // Layers that fit in one bucket: no buckets (nothing to start early).
        let small = RankLayout { layer_grad_values: 1 << 18, ..layout(Backend::Mpi, 4, 1, 2, true) };
        assert_eq!(Techniques::choose(&all, &small).bucket_values, None);
        let tiny_buckets = OverlapConfig { grad_bucket_mib: 0.25, ..all.clone() };
        assert_eq!(Techniques::choose(&tiny_buckets, &small).bucket_values, Some(1 << 16));
        assert!(OverlapConfig { chunks: 0, ..all.clone() }.validate().is_err());
        assert!(OverlapConfig { grad_bucket_mib: -1.0, ..all.clone() }.validate().is_err());
        assert_eq!(none.describe(), "off");
        assert_eq!(
            t.describe(),
            "all-to-all on a thread in 2 chunk(s), attention during MoE transfers, 2 micro-batch lanes, gradient buckets of 1.0 MiB"
        );
    }

    #[test]
    fn dense_layer_values_count_every_layer_tensor() {
        let families = [
            ModelConfig::default(),
            ModelConfig { n_shared_experts: 1, shared_expert_gate: true, ..ModelConfig::default() },
            ModelConfig {
                n_layers: 3,
                first_dense_layers: 1,
                dense_ffn_hidden: 200,
                constant_experts: 2,
                copy_experts: 1,
                gating_residuals: true,
                ..ModelConfig::default()
            },
        ];
        for cfg in families {
            let weights = model::DenseWeights::init(&cfg, &mut model::rng::Rng::new(1));
            let counted: usize =
                weights.tensors().iter().filter(|(n, _)| n.starts_with("layers.")).map(|(_, t)| t.len()).sum();
            assert_eq!(dense_layer_values(&cfg), counted, "{cfg:?}");
        }
    }
}
