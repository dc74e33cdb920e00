//! The sizes one rank works with in one step, from the job config alone:
//! what the kernel, traffic and memory models share.
//!
//! Legend (DESIGN section 5): `a` tokens of a micro-batch, `t` this rank's
//! slice of them (`a / attn_tp`), `d` d_model, `f` ffn_hidden, `v` vocab,
//! `e` experts, `k` top-k, `L` layers.

use layout::ParallelDims;
use model::{BlockKind, ModelConfig};

/// What the step model reads of a job: the model, the batch sizes and the
/// checked parallel layout (the launcher builds it from the job config).
#[derive(Debug, Clone, PartialEq)]
pub struct JobSizes {
    pub model: ModelConfig,
    /// Sequences per rank per forward pass.
    pub micro_batch_size: usize,
    /// Sequences per optimizer step, over all ranks.
    pub global_batch_size: usize,
    pub dims: ParallelDims,
}

/// What the simulator assumes about routing, beyond the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    /// Busiest expert-parallel rank's rows over the mean (1 = perfectly
    /// balanced router; a freshly initialised router on a tiny model is
    /// far from it, see docs/scaling.md).
    pub imbalance: f64,
}

impl Default for Routing {
    fn default() -> Self {
        Self { imbalance: 1.0 }
    }
}

/// One rank's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct RankShape {
    pub ranks: usize,
    pub attn_tp: usize,
    pub dp: usize,
    pub ep: usize,
    pub edp: usize,
    /// Micro-batches per step on this rank (gradient accumulation).
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    pub micro: usize,
    pub seq: usize,
    /// Tokens of a micro-batch (`a`), and this rank's slice (`t`).
    pub a: usize,
    pub t: usize,
    pub d: usize,
    pub f: usize,
    pub v: usize,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub shared_experts: usize,
    /// Query and kv heads this rank computes.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sequential: bool,
    pub tied_embeddings: bool,
    /// Experts of one layer held here (`e / ep`).
    pub local_experts: usize,
    /// Share of the `t x k` assignments the capacity keeps (1 when dropless).
    pub kept: f64,
    /// Rows this rank's experts compute per micro-batch per layer, on the
    /// busiest rank (mean x imbalance, capped by capacity).
    pub expert_rows_max: f64,
    /// The mean over ranks.
    pub expert_rows_mean: f64,
    /// Tokens of the global batch per step.
    pub tokens_per_step: usize,
}

impl RankShape {
    /// The shape of `job` under `routing`.
    pub fn of(job: &JobSizes, routing: Routing) -> Self {
        let m = &job.model;
        let dims = job.dims;
        let micro = job.micro_batch_size;
        let a = micro * m.seq_len;
        let t = a / dims.attn_tp;
        let assignments = (t * m.top_k) as f64;
        // Capacity is per expert per micro-batch on a rank: ceil(c N k / E).
        // Balanced, an expert gets N k / E; with the busiest rank at
        // `imbalance` x the mean, its experts keep at most `c / imbalance` of it.
        let imbalance = routing.imbalance.max(1.0);
        let (kept, busiest_share) = if m.dropless() {
            (1.0, imbalance)
        } else {
            let cap = m.capacity(t) as f64 * m.n_experts as f64 / assignments;
            (cap.min(1.0), imbalance.min(cap))
        };
        Self {
            ranks: dims.world,
            attn_tp: dims.attn_tp,
            dp: dims.dp,
            ep: dims.ep,
            edp: dims.edp,
            micro_batches: job.global_batch_size / (dims.dp * micro),
            micro,
            seq: m.seq_len,
            a,
            t,
            d: m.d_model,
            f: m.ffn_hidden,
            v: m.vocab,
            layers: m.n_layers,
            experts: m.n_experts,
            top_k: m.top_k,
            shared_experts: m.n_shared_experts,
            heads: m.n_heads / dims.attn_tp,
            kv_heads: m.n_kv_heads / dims.attn_tp,
            head_dim: m.head_dim(),
            sequential: m.block == BlockKind::Sequential,
            tied_embeddings: m.tie_embeddings,
            local_experts: m.n_experts / dims.ep,
            kept,
            // Every rank of an EP group sends its kept rows; the group's experts
            // share them, so the mean rank computes as many rows as it sends.
            expert_rows_mean: assignments * kept,
            expert_rows_max: assignments * busiest_share,
            tokens_per_step: job.global_batch_size * m.seq_len,
        }
    }

    /// Query and kv widths of this rank's heads.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
