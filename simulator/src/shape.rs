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
    /// Ranks are processes with a thread pool each (the mpi and nccl
    /// backends), not threads of one process sharing one pool.
    pub ranks_are_processes: bool,
    /// MoA's attention experts partitioned over the expert-parallel group
    /// (`parallel.attn_expert_placement`), not replicated.
    pub attn_experts_partitioned: bool,
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
    /// Ranks are processes with their own thread pools (see [`JobSizes`]).
    pub ranks_are_processes: bool,
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
    /// Layers with an MoE FFN; the first `layers - moe_layers` are dense
    /// (`first_dense_layers`: every token through one FFN of width `dense_f`
    /// per modality, no router, no all-to-all).
    pub moe_layers: usize,
    pub dense_f: usize,
    /// Routed FFN experts per layer.
    pub experts: usize,
    /// MoE++'s computation-free experts per layer (constant, copy, zero:
    /// the router scores them beside the FFN experts; they run where the
    /// token is, with no product and no exchange) and of those the constant
    /// ones (`3 d` parameters each).
    pub free_experts: usize,
    pub constant_experts: usize,
    pub top_k: usize,
    pub shared_experts: usize,
    /// Query and kv heads this rank computes.
    pub heads: usize,
    pub kv_heads: usize,
    /// Query heads whose attention core (scores, softmax, `P v`) runs per
    /// token: `heads`, or with MoH's routed heads the shared and chosen ones.
    pub core_heads: usize,
    /// The attention core runs tiled: it saves a log-sum-exp per query
    /// row instead of the `seq x seq` probabilities.
    pub tiled_attention: bool,
    pub head_dim: usize,
    pub sequential: bool,
    pub tied_embeddings: bool,
    /// Mixture-of-Transformers: copies of the attention and norms (1: none).
    pub modalities: usize,
    /// Experts of one layer held here (`e / ep`).
    pub local_experts: usize,
    /// Share of the `t x k` assignments the capacity keeps (1 when dropless).
    pub kept: f64,
    /// Rows this rank's experts compute per micro-batch per layer, on the
    /// busiest rank (mean x imbalance, capped by capacity).
    pub expert_rows_max: f64,
    /// The mean over ranks.
    pub expert_rows_mean: f64,
    /// Rows whose input travels per micro-batch per layer, the mean over
    /// ranks: a token goes once to each rank holding some of its experts
    /// (`worker::dispatch`), so with top-k > 1 fewer than the rows.
    pub travel_rows_mean: f64,
    /// Tokens of the global batch per step.
    pub tokens_per_step: usize,
    /// MoA: attention experts per layer (0 without MoA), the query and
    /// output weights of those this rank holds per layer (its share of
    /// every expert's heads, or its whole experts when partitioned), and
    /// whether they are partitioned over the expert-parallel group.
    pub attn_experts: usize,
    pub attn_expert_weights: usize,
    pub attn_experts_partitioned: bool,
    /// MoA partitioned: rows (token, chosen attention expert) per layer and
    /// micro-batch this rank sends to the experts' owners, and one
    /// expert's query width.
    pub attn_rows: f64,
    pub attn_width: usize,
}

/// The expected number of expert-parallel ranks a token's top-k experts
/// live on, for a router that picks uniformly among the experts it may
/// choose: with group-limited routing those of its `topk_groups` groups
/// (consecutive ids, so a group lies on `ep / n_groups` ranks, or shares a
/// rank with others when groups outnumber ranks: then the kept groups are
/// taken as on different ranks, the most they can spread).
pub fn owners_per_token(m: &ModelConfig, ep: usize) -> f64 {
    let (e, k, ep) = (m.n_experts as f64, m.top_k, ep.max(1) as f64);
    // Picks of MoE++'s computation-free experts stay with the token.
    let free = m.computation_free_experts() as f64;
    let limited = m.n_groups > 1 && m.topk_groups < m.n_groups;
    let (groups, kept) = (m.n_groups as f64, m.topk_groups as f64);
    // Outputs a token may choose, the ranks their FFN experts live on, and
    // the FFN experts of one such rank.
    let (choosable, ranks, per_rank) = match (limited, m.n_groups as f64 <= ep) {
        (false, _) => (e + free, ep, e / ep),
        (true, true) => (e * kept / groups, ep * kept / groups, e / ep),
        (true, false) => (e * kept / groups, kept.min(ep), e * kept / groups / kept.min(ep)),
    };
    // A rank is missed when all k picks (without replacement) avoid its experts.
    let missed: f64 = (0..k).map(|i| ((choosable - per_rank - i as f64) / (choosable - i as f64)).max(0.0)).product();
    ranks * (1.0 - missed)
}

/// MoA's query and output weights one rank holds per layer: a share of
/// every expert's heads (attention shards), or whole experts when they
/// are partitioned (`ceil(Ea / ep)` on the busiest rank); 0 without MoA.
fn attn_expert_weights(m: &ModelConfig, dims: ParallelDims, partitioned: bool) -> usize {
    if !m.is_moa() {
        return 0;
    }
    let one = 2 * m.d_model * m.n_heads * m.head_dim();
    match partitioned {
        true => m.attn_experts.div_ceil(dims.ep.max(1)) * one,
        false => m.attn_experts * one / dims.attn_tp,
    }
}

impl RankShape {
    /// The router's outputs: the FFN experts and the computation-free ones.
    pub fn router_outputs(&self) -> usize {
        self.experts + self.free_experts
    }

    /// Layers with a dense FFN instead of the MoE (`first_dense_layers`).
    pub fn dense_layers(&self) -> usize {
        self.layers - self.moe_layers
    }

    /// The shape of `job` under `routing`.
    pub fn of(job: &JobSizes, routing: Routing) -> Self {
        let m = &job.model;
        let dims = job.dims;
        let micro = job.micro_batch_size;
        let a = micro * m.seq_len;
        let t = a / dims.attn_tp;
        // A uniform router sends this share of a token's top-k picks to FFN
        // experts (the rest to MoE++'s computation-free ones).
        let ffn_share = m.n_experts as f64 / m.n_router_outputs() as f64;
        let assignments = (t * m.top_k) as f64 * ffn_share;
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
            ranks_are_processes: job.ranks_are_processes,
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
            moe_layers: m.n_layers - m.first_dense_layers,
            dense_f: m.dense_ffn_width(),
            experts: m.n_experts,
            free_experts: m.computation_free_experts(),
            constant_experts: m.constant_experts,
            top_k: m.top_k,
            shared_experts: m.n_shared_experts,
            heads: m.query_heads_per_token() / dims.attn_tp,
            kv_heads: m.n_kv_heads / dims.attn_tp,
            core_heads: m.attention_core_heads() / dims.attn_tp,
            tiled_attention: m.tiled_attention(),
            head_dim: m.head_dim(),
            sequential: m.block == BlockKind::Sequential,
            tied_embeddings: m.tie_embeddings,
            modalities: m.modalities,
            local_experts: m.n_experts / dims.ep,
            kept,
            // Every rank of an EP group sends its kept rows; the group's experts
            // share them, so the mean rank computes as many rows as it sends.
            expert_rows_mean: assignments * kept,
            travel_rows_mean: t as f64 * kept * owners_per_token(m, dims.ep),
            expert_rows_max: assignments * busiest_share,
            tokens_per_step: job.global_batch_size * m.seq_len,
            attn_experts: if m.is_moa() { m.attn_experts } else { 0 },
            attn_expert_weights: attn_expert_weights(m, dims, job.attn_experts_partitioned),
            attn_experts_partitioned: m.is_moa() && job.attn_experts_partitioned,
            attn_rows: if m.is_moa() { (t * m.attn_top_k) as f64 } else { 0.0 },
            attn_width: m.n_heads * m.head_dim(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn model(experts: usize, top_k: usize, groups: usize, kept: usize) -> ModelConfig {
        ModelConfig { n_experts: experts, top_k, n_groups: groups, topk_groups: kept, ..Default::default() }
    }

    #[test]
    fn a_token_reaches_at_most_top_k_owners_and_fewer_with_groups_kept() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(owners_per_token(&model(8, 1, 1, 1), 4), 1.0));
        assert!(close(owners_per_token(&model(8, 2, 1, 1), 1), 1.0), "one rank holds everything");
        assert!(close(owners_per_token(&model(8, 2, 1, 1), 8), 2.0), "one expert per rank");
        // DeepSeek-V3 on 64 ranks: 8 groups of 32 experts, 4 kept, top-8.
        // Limited, the 128 choosable experts live on 32 ranks, 4 each.
        let limited = owners_per_token(&model(256, 8, 8, 4), 64);
        let missed: f64 = (0..8).map(|i| (124.0 - i as f64) / (128.0 - i as f64)).product();
        assert!(close(limited, 32.0 * (1.0 - missed)), "{limited}");
        let spread = owners_per_token(&model(256, 8, 1, 1), 64);
        assert!(limited < spread && spread < 8.0, "{limited} vs {spread}");
        // Groups outnumbering ranks: at most one rank per kept group.
        assert!(owners_per_token(&model(16, 4, 8, 2), 2) <= 2.0);
    }
}
