//! Memory one rank holds at its peak: parameters, gradients, optimizer
//! state, the activations one micro-batch saves for its backward pass
//! (micro-batches run one after another), and communication buffers.

use super::cluster::Precision;
use super::shape::RankShape;
use super::traffic::{dense_params, expert_params};

/// Bytes per rank, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RankMemory {
    pub params: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub activations: f64,
    /// All-to-all send/receive staging and the gradient all-reduce's flat copy.
    pub buffers: f64,
}

impl RankMemory {
    /// The busiest rank's memory under `precision`.
    pub fn of(s: &RankShape, precision: &Precision) -> Self {
        let (replicated, sharded) = dense_params(s);
        let dense = replicated + sharded;
        let experts = expert_params(s);
        let params = dense + experts;
        let optimizer = if precision.shard_optimizer { dense / s.dp as f64 + experts / s.edp as f64 } else { params };
        let rows = s.expert_rows_max * s.d as f64;
        let exchange = if s.ep > 1 { 2.0 * rows * precision.activation_bytes } else { 0.0 };
        let flat = if s.ranks > 1 { dense * precision.grad_bytes } else { 0.0 };
        Self {
            params: params * precision.param_bytes,
            grads: params * precision.grad_bytes,
            optimizer: optimizer * precision.optimizer_bytes,
            activations: activation_values(s) * precision.activation_bytes,
            buffers: exchange + flat,
        }
    }

    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer + self.activations + self.buffers
    }
}

/// Values one micro-batch's forward pass saves for its backward pass on
/// this rank (per rank: attention on all of the micro-batch's tokens with shards,
/// the experts on the rows they received).
pub fn activation_values(s: &RankShape) -> f64 {
    let f = |x: usize| x as f64;
    let (a, t, d, ff, v) = (f(s.a), f(s.t), f(s.d), f(s.f), f(s.v));
    let (q, g) = (f(s.q_width()), f(s.kv_width()));
    // x and the normalised input; q, k, v and the attention output on all
    // tokens; the softmax probabilities (or, tiled, a log-sum-exp per query
    // row); with shards the gathered input too.
    let keys_saved = if s.tiled_attention { 1 } else { s.seq };
    let mut attention = 2.0 * t * d + a * (2.0 * q + 2.0 * g) + f(s.micro * s.heads * s.seq * keys_saved);
    if s.attn_tp > 1 {
        attention += a * d;
    }
    let residual = if s.sequential { 2.0 * t * d } else { t * d };
    // Router logits and probabilities; the expert inputs and SwiGLU h1, h3
    // on the rows received; this rank's rows' outputs (for combine).
    let rows = s.expert_rows_max;
    let moe = 2.0 * t * f(s.router_outputs())
        + rows * d
        + t * f(s.top_k) * s.kept * d
        + 2.0 * rows * ff
        + 2.0 * t * ff * f(s.shared_experts);
    // A dense first layer's SwiGLU h1 and h3 on every token.
    let dense_ffn = 2.0 * t * f(s.dense_f);
    let head = t * d + 2.0 * t * v;
    f(s.layers) * (attention + residual) + f(s.moe_layers) * moe + f(s.dense_layers()) * dense_ffn + head
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Routing;
    use worker::JobConfig;

    fn job(sets: &[&str]) -> JobConfig {
        JobConfig::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    /// An independent count for one rank holding the whole job: what one
    /// micro-batch's forward pass keeps for backward, tensor by tensor.
    fn whole_job_activation_values(job: &JobConfig) -> f64 {
        let cfg = &job.model;
        let (b, s) = (job.train.micro_batch_size, cfg.seq_len);
        let t = b * s;
        let (d, f, v, e, k) = (cfg.d_model, cfg.ffn_hidden, cfg.vocab, cfg.n_router_outputs(), cfg.top_k);
        let (q, g) = (cfg.query_heads_per_token() * cfg.head_dim(), cfg.n_kv_heads * cfg.head_dim());
        // x, normalised input, q, k, v, attention output, probabilities
        // (a log-sum-exp per query row when the core runs tiled)
        let keys_saved = if cfg.tiled_attention() { 1 } else { s };
        let attention = t * (2 * d + 2 * q + 2 * g) + b * cfg.query_heads_per_token() * s * keys_saved;
        // h and its normalisation (sequential), or a copy of the shared input (parallel)
        let residual = if cfg.block == model::BlockKind::Sequential { 2 * t * d } else { t * d };
        // router logits and probabilities, dispatched inputs and outputs, SwiGLU h1 and h3
        let moe = 2 * t * e + 2 * t * k * d + 2 * t * k * f + 2 * t * f * cfg.n_shared_experts;
        // a dense first layer: SwiGLU h1 and h3 on every token
        let dense = 2 * t * cfg.dense_ffn_width();
        let moe_layers = cfg.n_layers - cfg.first_dense_layers;
        // final normalised states, logits and their gradient
        let head = t * d + 2 * t * v;
        (cfg.n_layers * (attention + residual) + moe_layers * moe + cfg.first_dense_layers * dense + head) as f64
    }

    #[test]
    fn one_rank_matches_a_count_of_the_whole_job() {
        let dense_first = &["model.first_dense_layers=1", "model.dense_ffn_hidden=384"][..];
        for sets in [&[][..], &["model.block=\"parallel\"", "model.n_shared_experts=1"][..], dense_first] {
            let job = job(sets);
            let s = crate::test_jobs::shape_of(&job, Routing::default());
            assert_eq!(activation_values(&s), whole_job_activation_values(&job), "{sets:?}");
            let m = RankMemory::of(&s, &Precision::default());
            let params = job.model.num_params() as f64;
            assert_eq!(m.params, 4.0 * params);
            assert_eq!((m.grads, m.optimizer), (4.0 * params, 8.0 * params));
            assert_eq!(m.activations, 4.0 * whole_job_activation_values(&job));
            assert_eq!(m.buffers, 0.0, "one rank exchanges nothing");
        }
    }

    #[test]
    fn computation_free_experts_take_their_share_of_the_picks() {
        // MoE++: 8 FFN experts beside 2 constant, 1 copy and 1 zero, top-2:
        // a uniform router sends 8/12 of the picks to FFN experts; the
        // constant experts' vectors and gates are parameters.
        let plain = crate::test_jobs::shape_of(&job(&[]), Routing::default());
        let sets = ["model.constant_experts=2", "model.copy_experts=1", "model.zero_experts=1"];
        let free_job = job(&sets);
        let free = crate::test_jobs::shape_of(&free_job, Routing::default());
        assert!((free.expert_rows_mean - plain.expert_rows_mean * 8.0 / 12.0).abs() < 1e-9);
        assert_eq!(RankMemory::of(&free, &Precision::default()).params, 4.0 * free_job.model.num_params() as f64);
        let ratio = crate::kernels::Kernels::of(&free).flops_of(crate::kernels::Part::Experts)
            / crate::kernels::Kernels::of(&plain).flops_of(crate::kernels::Part::Experts);
        assert!((ratio - 8.0 / 12.0).abs() < 1e-12, "{ratio}");
        // On 2 ranks a token's input travels to a rank unless both picks
        // avoid its 4 FFN experts among the 12 outputs (8/12 x 7/11).
        let two = crate::test_jobs::shape_of(&job(&[&sets[..], &["parallel.ranks=2"]].concat()), Routing::default());
        let owners = 2.0 * (1.0 - 8.0 / 12.0 * 7.0 / 11.0);
        assert!((two.travel_rows_mean - two.t as f64 * owners).abs() < 1e-9, "{}", two.travel_rows_mean);
    }

    #[test]
    fn attention_experts_count_whole_and_split_over_ep_when_partitioned() {
        let moa = ["model.attention=\"moa\"", "model.attn_experts=4", "model.attn_top_k=2"];
        let one_job = job(&moa);
        let one = crate::test_jobs::shape_of(&one_job, Routing::default());
        let p = Precision::default();
        assert_eq!(RankMemory::of(&one, &p).params, 4.0 * one_job.model.num_params() as f64);
        let partitioned = "parallel.attn_expert_placement=\"partitioned\"";
        let replicated =
            crate::test_jobs::shape_of(&job(&[&moa[..], &["parallel.ranks=4"]].concat()), Routing::default());
        let split = [&moa[..], &["parallel.ranks=4", partitioned]].concat();
        let split = crate::test_jobs::shape_of(&job(&split), Routing::default());
        // Each of 4 ranks holds 1 of the 4 experts' query and output weights.
        let m = &one_job.model;
        let all = (m.n_layers * 4 * 2 * m.d_model * m.n_heads * m.head_dim()) as f64;
        let saved = RankMemory::of(&replicated, &p).params - RankMemory::of(&split, &p).params;
        assert_eq!(saved, 4.0 * 0.75 * all);
        let rows = |s: &RankShape| {
            let comms = crate::traffic::collectives(s, &p);
            comms.iter().filter(|c| c.name == crate::traffic::ATTN_ROWS).map(|c| c.count).sum::<f64>()
        };
        assert_eq!(rows(&replicated), 0.0);
        assert_eq!(rows(&split), 8.0 * (m.n_layers * split.micro_batches) as f64);
    }

    #[test]
    fn experts_split_over_ep_and_optimizer_over_dp() {
        let one = crate::test_jobs::shape_of(&job(&[]), Routing::default());
        let four = crate::test_jobs::shape_of(&job(&["parallel.ranks=4"]), Routing::default());
        let p = Precision::default();
        let (m1, m4) = (RankMemory::of(&one, &p), RankMemory::of(&four, &p));
        let experts = expert_params(&one);
        assert_eq!(expert_params(&four), experts / 4.0);
        assert_eq!(m1.params - m4.params, 4.0 * 0.75 * experts);
        let sharded = RankMemory::of(&four, &Precision { shard_optimizer: true, ..p.clone() });
        let (dense, _) = dense_params(&four);
        // Dense state over dp = 4, experts over edp = 1.
        assert_eq!(sharded.optimizer, 8.0 * (dense / 4.0 + expert_params(&four)));
    }
}
