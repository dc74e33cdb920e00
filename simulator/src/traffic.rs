//! Every collective one rank takes part in during a step (DESIGN section
//! 4), with the bytes it puts on each link level.
//!
//! Groups are blocks of consecutive ranks (`ParallelDims`: an expert-parallel
//! group is `ep` consecutive ranks, an attention group `attn_tp`), and ranks
//! fill a node's devices before the next node, so a group of `p` ranks has
//! `min(p, ranks per node)` members on each of its nodes.

use super::cluster::{Placement, Precision};
use super::shape::RankShape;

/// What a collective does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All-to-all: every rank sends `bytes` in all, an equal block to each member (its own included).
    Exchange,
    /// All-reduce: every rank contributes `bytes` and gets the sum.
    Reduce,
    /// All-gather: every rank contributes `bytes` and gets everyone's (or the reverse: reduce-scatter).
    Gather,
}

/// Which part of the step a collective belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Expert dispatch and combine (and attention shards): inside forward/backward.
    Exchange,
    /// Gradient all-reduce and the global norm.
    GradSync,
    /// Metrics and the pre-emption flag, once per step.
    Bookkeeping,
}

/// One kind of collective of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Collective {
    pub name: &'static str,
    pub kind: Kind,
    pub phase: Phase,
    /// Ranks in the group.
    pub group: usize,
    /// Bytes this rank contributes per call.
    pub bytes: f64,
    /// Calls per step.
    pub count: f64,
}

/// Bytes one rank sends on each link level.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkBytes {
    pub intra: f64,
    pub inter: f64,
}

impl Collective {
    /// Bytes this rank sends per call on each level, for groups placed as `at`.
    pub fn link_bytes(&self, at: &Placement) -> LinkBytes {
        let p = self.group as f64;
        if self.group <= 1 {
            return LinkBytes::default();
        }
        let here = self.group.min(at.ranks_per_node) as f64;
        let n = self.bytes;
        match self.kind {
            Kind::Exchange => LinkBytes { intra: n * (here - 1.0) / p, inter: n * (p - here) / p },
            // Hierarchical: reduce-scatter and all-gather inside the node,
            // then each of the node's ranks all-reduces its 1/here share
            // with its peers on the other nodes (ring: 2 (N-1)/N).
            Kind::Reduce => {
                let nodes = p / here;
                LinkBytes { intra: 2.0 * n * (here - 1.0) / here, inter: 2.0 * (n / here) * (nodes - 1.0) / nodes }
            }
            Kind::Gather => LinkBytes { intra: n * (here - 1.0), inter: n * (p - here) },
        }
    }
}

/// The expert exchanges whose rows are a token's once per owner rank
/// (inputs forward, input gradients backward).
pub const ROWS_ONCE_PER_OWNER: &str = "all-to-all: expert inputs / input gradients";
/// The expert exchanges that carry every row (outputs forward, output
/// gradients backward).
pub const ROWS_EACH: &str = "all-to-all: expert outputs / output gradients";

/// The exchanges of partitioned attention experts' rows.
pub const ATTN_ROWS: &str = "all-to-all: attention expert rows";

/// Whether `c` moves expert rows (the bytes `alltoall_bytes_sent` counts).
pub fn moves_expert_rows(c: &Collective) -> bool {
    c.name == ROWS_ONCE_PER_OWNER || c.name == ROWS_EACH || c.name == ATTN_ROWS
}

/// The collectives of one step on one rank.
pub fn collectives(s: &RankShape, precision: &Precision) -> Vec<Collective> {
    let f = |x: usize| x as f64;
    let (value, grad) = (precision.activation_bytes, precision.grad_bytes);
    let mut out = Vec::new();
    let per_layer = f(s.moe_layers * s.micro_batches);
    if s.ep > 1 {
        // Forward, inputs out to the experts (a token once per owner rank)
        // and outputs back (row by row); backward the reverse: output
        // gradients out row by row, input gradients back summed per token
        // and owner. The busiest rank receives more, but sends its own
        // tokens' rows: the mean.
        out.push(Collective {
            name: ROWS_ONCE_PER_OWNER,
            kind: Kind::Exchange,
            phase: Phase::Exchange,
            group: s.ep,
            bytes: s.travel_rows_mean * f(s.d) * value,
            count: 2.0 * per_layer,
        });
        out.push(Collective {
            name: ROWS_EACH,
            kind: Kind::Exchange,
            phase: Phase::Exchange,
            group: s.ep,
            bytes: s.expert_rows_mean * f(s.d) * value,
            count: 2.0 * per_layer,
        });
        // Row counts per expert and chunk, and with top-k > 1 each row's
        // travelling row, once per layer forward (backward reuses them).
        let slots = if s.top_k > 1 { s.expert_rows_mean } else { 0.0 };
        out.push(Collective {
            name: "all-to-all: row counts",
            kind: Kind::Exchange,
            phase: Phase::Exchange,
            group: s.ep,
            bytes: 8.0 * (f(s.experts) + slots),
            count: per_layer,
        });
    }
    if s.attn_experts_partitioned && s.ep > 1 {
        // Per layer forward: inputs (d) to the owners and queries (w) back,
        // head outputs (w) to them and outputs (d) back; backward the same
        // sizes: 8 exchanges of (d + w) / 2 values per row on average, and
        // the row counts once per layer.
        let per_layer = f(s.layers * s.micro_batches);
        out.push(Collective {
            name: ATTN_ROWS,
            kind: Kind::Exchange,
            phase: Phase::Exchange,
            group: s.ep,
            bytes: s.attn_rows * f(s.d + s.attn_width) / 2.0 * value,
            count: 8.0 * per_layer,
        });
        out.push(Collective {
            name: "all-to-all: attention expert row counts",
            kind: Kind::Exchange,
            phase: Phase::Exchange,
            group: s.ep,
            bytes: 4.0 * f(s.attn_experts),
            count: per_layer,
        });
    }
    if s.attn_tp > 1 {
        // Gather the normalised inputs, reduce-scatter the output projection,
        // and the reverse backward: 4 per layer of t x d values; plus the
        // router statistics summed over the group.
        out.push(Collective {
            name: "attention shards: all-gather / reduce-scatter",
            kind: Kind::Gather,
            phase: Phase::Exchange,
            group: s.attn_tp,
            bytes: f(s.t * s.d) * value,
            count: 4.0 * per_layer,
        });
        out.push(Collective {
            name: "attention shards: router statistics",
            kind: Kind::Reduce,
            phase: Phase::Exchange,
            group: s.attn_tp,
            bytes: 8.0 * 2.0 * f(s.experts),
            count: per_layer,
        });
    }
    if s.ranks > 1 {
        let (dense, sharded) = dense_params(s);
        out.push(Collective {
            name: "gradient all-reduce: dense",
            kind: Kind::Reduce,
            phase: Phase::GradSync,
            group: s.ranks,
            bytes: dense * grad,
            count: 1.0,
        });
        if s.attn_tp > 1 && s.dp > 1 {
            out.push(Collective {
                name: "gradient all-reduce: attention shards",
                kind: Kind::Reduce,
                phase: Phase::GradSync,
                group: s.dp,
                bytes: sharded * grad,
                count: 1.0,
            });
        }
        if s.edp > 1 {
            out.push(Collective {
                name: "gradient all-reduce: expert replicas",
                kind: Kind::Reduce,
                phase: Phase::GradSync,
                group: s.edp,
                bytes: expert_params(s) * grad,
                count: 1.0,
            });
        }
        // Global norm: expert part over the EP group, shards over TP.
        out.push(Collective {
            name: "gradient norm",
            kind: Kind::Reduce,
            phase: Phase::GradSync,
            group: s.ep.max(2).min(s.ranks),
            bytes: 8.0,
            count: 1.0 + f(usize::from(s.attn_tp > 1)),
        });
        // Losses, expert loads and the per-rank table (two sums over all ranks).
        out.push(Collective {
            name: "metrics",
            kind: Kind::Reduce,
            phase: Phase::Bookkeeping,
            group: s.ranks,
            bytes: 8.0 * f(3 + s.layers * (s.experts + 1) + 7 * s.ranks),
            count: 2.0,
        });
    }
    out
}

/// Dense parameters of this rank (embeddings, norms, attention, router,
/// shared experts, head): (replicated over all ranks, sharded over attn_tp).
pub fn dense_params(s: &RankShape) -> (f64, f64) {
    let f = |x: usize| x as f64;
    let (d, v) = (f(s.d), f(s.v));
    // Mixture-of-Transformers: every modality its own projections and norms.
    let modalities = f(s.modalities);
    // MoA: the experts' query and output weights (replicated ones here,
    // partitioned ones with the experts), their router and output bias.
    let query_output = match s.attn_experts {
        0 => d * f(s.q_width()) * 2.0,
        ea => f(s.attn_expert_weights) * f(usize::from(!s.attn_experts_partitioned)) + f(ea) * d + d,
    };
    let attention = modalities * (query_output + d * f(s.kv_width()) * 2.0);
    let norms = modalities * d * if s.sequential { 2.0 } else { 1.0 };
    let shared = f(s.shared_experts) * 3.0 * d * f(s.f);
    // The router's rows, and MoE++'s constant experts (a vector and a 2-way gate each).
    let moe_layer = f(s.router_outputs()) * d + f(s.constant_experts) * 3.0 * d + shared;
    // A dense first layer's FFN, one per modality.
    let dense_layer = modalities * 3.0 * d * f(s.dense_f);
    // Embeddings, final norm and the output head (unless tied to the embeddings).
    let heads = if s.tied_embeddings { 1.0 } else { 2.0 };
    let layers = f(s.layers) * norms + f(s.moe_layers) * moe_layer + f(s.dense_layers()) * dense_layer;
    let replicated = heads * v * d + d + layers;
    let sharded = f(s.layers) * attention;
    if s.attn_tp > 1 {
        (replicated, sharded)
    } else {
        (replicated + sharded, 0.0)
    }
}

/// Routed-expert parameters held by this rank (its `e / ep` experts of
/// every layer, and its partitioned attention experts).
pub fn expert_params(s: &RankShape) -> f64 {
    let attention = if s.attn_experts_partitioned { s.layers * s.attn_expert_weights } else { 0 };
    (s.moe_layers * s.local_experts * 3 * s.d * s.f + attention) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Routing;
    use worker::JobConfig;

    fn at(ranks_per_node: usize) -> Placement {
        Placement { ranks_per_device: 1, ranks_sharing_cores: 1, ranks_per_node, nodes: 1 }
    }

    #[test]
    fn bytes_split_by_link_level() {
        let a2a =
            Collective { name: "x", kind: Kind::Exchange, phase: Phase::Exchange, group: 8, bytes: 800.0, count: 1.0 };
        // 8 ranks on nodes of 4: 3 peers beside it, 4 on the other node.
        assert_eq!(a2a.link_bytes(&at(4)), LinkBytes { intra: 300.0, inter: 400.0 });
        assert_eq!(a2a.link_bytes(&at(8)), LinkBytes { intra: 700.0, inter: 0.0 });
        let reduce = Collective { kind: Kind::Reduce, ..a2a.clone() };
        // Inside one node: the ring's 2 (p-1)/p; across 2 nodes of 4: a quarter each goes out.
        assert_eq!(reduce.link_bytes(&at(8)), LinkBytes { intra: 1400.0, inter: 0.0 });
        assert_eq!(reduce.link_bytes(&at(4)), LinkBytes { intra: 1200.0, inter: 200.0 });
        assert_eq!(Collective { group: 1, ..a2a }.link_bytes(&at(4)), LinkBytes::default());
    }

    #[test]
    fn expert_rows_travel_four_times_per_layer() {
        // Default job on 2 ranks: 16 sequences of 64 tokens per rank (2
        // micro-batches of 8), top-2 of 8 experts, d 128, fp32, 2 layers;
        // half the rows leave.
        let job = JobConfig::load(None, &["parallel.ranks=2".to_string()]).unwrap();
        let s = crate::test_jobs::shape_of(&job, Routing::default());
        let all = collectives(&s, &Precision::default());
        let each = all.iter().find(|c| c.name == ROWS_EACH).unwrap();
        assert_eq!(each.bytes, 8.0 * 64.0 * 2.0 * 128.0 * 4.0);
        assert_eq!(each.count, 2.0 * 2.0 * 2.0);
        assert_eq!(each.link_bytes(&at(2)).intra, each.bytes / 2.0);
        // Inputs: a token misses a rank when both picks avoid its 4 experts
        // (4/8 x 3/7), so it goes to 2 (1 - 3/14) ranks on average.
        let once = all.iter().find(|c| c.name == ROWS_ONCE_PER_OWNER).unwrap();
        let owners = 2.0 * (1.0 - 4.0 / 8.0 * 3.0 / 7.0);
        assert!((once.bytes - 8.0 * 64.0 * owners * 128.0 * 4.0).abs() < 1e-6, "{}", once.bytes);
        assert_eq!(once.count, each.count);
        // Dense gradients: everything but the experts, over both ranks.
        let grads = all.iter().find(|c| c.name == "gradient all-reduce: dense").unwrap();
        let experts = (job.model.n_layers * job.model.n_experts * 3 * 128 * 256) as f64;
        assert_eq!(grads.bytes, 4.0 * (job.model.num_params() as f64 - experts));
        // Mixture-of-Transformers: every modality's projections and norms too.
        let sets = ["parallel.ranks=2", "model.modalities=2", "model.block=\"parallel\""].map(String::from);
        let mot = JobConfig::load(None, &sets).unwrap();
        let all = collectives(&crate::test_jobs::shape_of(&mot, Routing::default()), &Precision::default());
        let grads = all.iter().find(|c| c.name == "gradient all-reduce: dense").unwrap();
        assert_eq!(grads.bytes, 4.0 * (mot.model.num_params() as f64 - experts));
        assert!(collectives(
            &crate::test_jobs::shape_of(&JobConfig::load(None, &[]).unwrap(), Routing::default()),
            &Precision::default()
        )
        .is_empty());
    }

    #[test]
    fn dense_first_layers_exchange_nothing_and_sync_their_ffn() {
        // 2 ranks, 2 layers, the first dense: one MoE layer's rows travel,
        // and the dense gradients hold the dense layer's FFN.
        let sets = ["parallel.ranks=2", "model.first_dense_layers=1", "model.dense_ffn_hidden=384"].map(String::from);
        let job = JobConfig::load(None, &sets).unwrap();
        let s = crate::test_jobs::shape_of(&job, Routing::default());
        let all = collectives(&s, &Precision::default());
        let each = all.iter().find(|c| c.name == ROWS_EACH).unwrap();
        assert_eq!(each.count, 2.0 * 2.0 * 1.0);
        let grads = all.iter().find(|c| c.name == "gradient all-reduce: dense").unwrap();
        let experts = (job.model.n_experts * 3 * 128 * 256) as f64;
        assert_eq!(grads.bytes, 4.0 * (job.model.num_params() as f64 - experts));
    }
}
