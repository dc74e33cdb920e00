//! What one rank computes in one step, kernel by kernel, from the model's
//! exact math (DESIGN section 5) as switchyard runs it: the matrix products
//! with their FLOPs, and the elementwise (memory-bound) passes with the
//! values they read and write.
//!
//! Conventions: a product `[m, k] x [k, n]` is `2 m k n` FLOPs. A linear
//! layer's backward pass is two products of the forward's size (input
//! gradient and weight gradient), so backward = 2 x forward for every
//! product, attention's `q k^T` and `P v` included (four products).
//! Attention computes the full `T x T` score matrix and masks it (as the
//! CPU kernel does), so its FLOPs are not halved for causality.

use super::shape::RankShape;

/// Which part of the model a kernel belongs to (for the FLOP breakdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// q, k, v, o projections and the scores / weighted sums.
    Attention,
    Router,
    /// Routed experts on this rank (the busiest rank's rows).
    Experts,
    SharedExperts,
    /// The FFN of the dense first layers (`first_dense_layers`).
    DenseFfn,
    /// LM head and cross-entropy.
    Head,
}

/// Matrix products of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    pub name: &'static str,
    pub part: Part,
    /// FLOPs of one product.
    pub flops_each: f64,
    /// Products per step on this rank.
    pub count: f64,
    /// How many of them run at once as independent tasks (attention
    /// heads, experts): small ones then fill the cores together.
    pub concurrent: f64,
}

/// An elementwise pass: memory-bound, `values` read + written per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub name: &'static str,
    pub values: f64,
    /// Passes (kernel launches / parallel regions) per step.
    pub launches: f64,
    /// Spread over every core (rayon), or on the rank's own thread.
    pub parallel: bool,
}

/// A rank's compute in one step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Kernels {
    pub gemms: Vec<Gemm>,
    pub streams: Vec<Stream>,
}

impl Kernels {
    /// Forward + backward of every micro-batch of a step on the busiest rank.
    pub fn of(s: &RankShape) -> Self {
        let f = |x: usize| x as f64;
        let (a, t, d, ff, v) = (f(s.a), f(s.t), f(s.d), f(s.f), f(s.v));
        let (q, g, hd, seq) = (f(s.q_width()), f(s.kv_width()), f(s.head_dim), f(s.seq));
        let (layers, mb) = (f(s.layers), f(s.micro_batches));
        let heads = f(s.micro * s.heads);
        // MoH skips the core of the heads a token did not choose.
        let core_heads = f(s.micro * s.core_heads);
        let rows = s.expert_rows_max;
        let per_layer = layers * mb;
        // The router, experts, dispatch and shared experts run in MoE layers only.
        let (per_moe, per_dense) = (f(s.moe_layers) * mb, f(s.dense_layers()) * mb);
        let mut gemms = Vec::new();
        // Forward product plus its two backward products.
        let mut linear = |name, part, m: f64, k: f64, n: f64, times: f64, concurrent: f64| {
            if m * k * n > 0.0 {
                gemms.push(Gemm { name, part, flops_each: 2.0 * m * k * n, count: 3.0 * times, concurrent });
            }
        };
        linear("attention q projection", Part::Attention, a, d, q, per_layer, 1.0);
        linear("attention k, v projections", Part::Attention, a, d, g, 2.0 * per_layer, 1.0);
        linear("attention output projection", Part::Attention, a, q, d, per_layer, 1.0);
        // Per sequence and head: scores q k^T [T, hd] x [hd, T], then P v.
        let core = 2.0 * core_heads * per_layer;
        linear("attention scores and weighted sum", Part::Attention, seq, hd, seq, core, heads);
        linear("router", Part::Router, t, d, f(s.router_outputs()), per_moe, 1.0);
        // w1 and w3 [f, d], then w2 [d, f], over the rows each local expert got.
        let local = f(s.local_experts).max(1.0);
        linear("experts w1, w3", Part::Experts, rows / local, d, ff, 2.0 * local * per_moe, local);
        linear("experts w2", Part::Experts, rows / local, ff, d, local * per_moe, local);
        let shared = f(s.shared_experts);
        linear("shared experts", Part::SharedExperts, t, d, ff, 3.0 * shared * per_moe, 1.0);
        let dense_f = f(s.dense_f);
        linear("dense FFN", Part::DenseFfn, t, d, dense_f, 3.0 * per_dense, 1.0);
        linear("LM head", Part::Head, t, d, v, mb, 1.0);

        // Values each elementwise pass reads and writes (forward and backward).
        let k = f(s.top_k);
        let probs = core_heads * seq * seq;
        let ep = s.ep > 1;
        let mut streams = Vec::new();
        let mut stream = |name, values: f64, launches: f64, parallel| {
            if values > 0.0 {
                streams.push(Stream { name, values, launches, parallel });
            }
        };
        let norms = if s.sequential { 2.0 } else { 1.0 };
        // RMSNorm: x read, y written, forward; x, dy read, dx written backward.
        stream("RMSNorm", norms * 5.0 * t * d * per_layer + 5.0 * t * d * mb, 2.0 * (norms * per_layer + mb), true);
        // RoPE on q and k, and its inverse on their gradients.
        stream("RoPE", 4.0 * a * (q + g) * per_layer, 4.0 * per_layer, true);
        // Softmax rows and the per-head copies in and out, forward and backward.
        stream(
            "attention softmax and head copies",
            (6.0 * probs + 6.0 * a * (q + 2.0 * g)) * per_layer,
            4.0 * per_layer,
            true,
        );
        // Residual adds, the copies the blocks keep, gradient accumulation.
        stream("residuals", 12.0 * t * d * per_layer, 8.0 * per_layer, false);
        // Router softmax, top-k, gates and the aux/z-loss gradients.
        stream("router softmax and top-k", 8.0 * t * f(s.router_outputs()) * per_moe, 4.0 * per_moe, false);
        // Gather each kept row, combine with gates; and their backward.
        stream("dispatch gather and combine", 10.0 * t * k * s.kept * d * per_moe, 4.0 * per_moe, false);
        // SwiGLU's silu(h1) * h3 and its backward, on the expert rows (and
        // every token of a dense layer).
        let swiglu = 9.0 * ((rows + shared * t) * ff * per_moe + t * dense_f * per_dense);
        stream("SwiGLU activation", swiglu, 2.0 * per_layer, true);
        if ep {
            // Rows packed by destination and unpacked, four exchanges per layer.
            stream("all-to-all packing", 4.0 * 4.0 * t * k * s.kept * d * per_moe, 16.0 * per_moe, false);
        }
        // Embedding rows, the logits' softmax and cross-entropy gradient.
        stream("embeddings", 4.0 * t * d * mb, 2.0 * mb, false);
        stream("cross-entropy", 4.0 * t * v * mb, 2.0 * mb, true);
        Self { gemms, streams }
    }

    /// FLOPs of the step's products on this rank.
    pub fn flops(&self) -> f64 {
        self.gemms.iter().map(|g| g.flops_each * g.count).sum()
    }

    /// FLOPs of one part.
    pub fn flops_of(&self, part: Part) -> f64 {
        self.gemms.iter().filter(|g| g.part == part).map(|g| g.flops_each * g.count).sum()
    }
}

/// Model FLOPs per step of the whole job: every token through attention,
/// router, its top-k experts (kept ones), shared experts and the head,
/// forward and backward (3x forward). The numerator of MFU.
pub fn model_flops_per_step(s: &RankShape) -> f64 {
    let f = |x: usize| x as f64;
    let tokens = f(s.tokens_per_step);
    let (d, ff, v, seq, hd) = (f(s.d), f(s.f), f(s.v), f(s.seq), f(s.head_dim));
    let (q, g) = (f(s.heads * s.attn_tp) * hd, f(s.kv_heads * s.attn_tp) * hd);
    let core = f(s.core_heads * s.attn_tp) * hd;
    let attention = 2.0 * d * (2.0 * q + 2.0 * g) + 2.0 * 2.0 * seq * core;
    let router = 2.0 * d * f(s.router_outputs());
    let ffn_share = f(s.experts) / f(s.router_outputs());
    let experts = f(s.top_k) * ffn_share * s.kept * 3.0 * 2.0 * d * ff;
    let shared = f(s.shared_experts) * 3.0 * 2.0 * d * ff;
    let dense = 3.0 * 2.0 * d * f(s.dense_f);
    let per_token = f(s.layers) * attention
        + f(s.moe_layers) * (router + experts + shared)
        + f(s.dense_layers()) * dense
        + 2.0 * d * v;
    3.0 * tokens * per_token
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Routing;
    use worker::JobConfig;

    fn shape(sets: &[&str]) -> RankShape {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::test_jobs::shape_of(&JobConfig::load(None, &sets).unwrap(), Routing::default())
    }

    #[test]
    fn every_layout_computes_the_model_flops_once() {
        // Balanced and dropless, the ranks' products add up to the model's.
        for sets in [
            &["parallel.ranks=1"][..],
            &["parallel.ranks=4"][..],
            &["parallel.ranks=4", "parallel.attn_tp=2"][..],
            &["parallel.ranks=4", "parallel.ep=2", "model.n_shared_experts=1"][..],
            &["parallel.ranks=4", "model.first_dense_layers=1", "model.dense_ffn_hidden=384"][..],
            &["parallel.ranks=4", "model.constant_experts=2", "model.copy_experts=1", "model.zero_experts=1"][..],
        ] {
            let s = shape(sets);
            let total = Kernels::of(&s).flops() * s.ranks as f64;
            let model = model_flops_per_step(&s);
            assert!((total - model).abs() <= 1e-9 * model, "{sets:?}: {total} vs {model}");
        }
    }

    #[test]
    fn expert_flops_by_hand() {
        // Default job on 1 rank: 32 sequences x 64 tokens, top-2, d 128, f 256,
        // 2 layers: 3 products of 2 x rows x d x f forward, 3x that with backward.
        let s = shape(&[]);
        let rows = 32.0 * 64.0 * 2.0;
        let expected = 3.0 * 3.0 * 2.0 * rows * 128.0 * 256.0 * 2.0;
        assert_eq!(Kernels::of(&s).flops_of(Part::Experts), expected);
        // Capacity 0.5 keeps at most half of the assignments: half the expert work.
        let half = shape(&["model.capacity_factor=0.5"]);
        assert!((Kernels::of(&half).flops_of(Part::Experts) - expected / 2.0).abs() < 1e-6 * expected);
        // The busiest rank of an imbalanced router computes more.
        let job = JobConfig::load(None, &["parallel.ranks=4".to_string()]).unwrap();
        let skewed = crate::test_jobs::shape_of(&job, Routing { imbalance: 1.5 });
        let even = crate::test_jobs::shape_of(&job, Routing::default());
        let ratio = Kernels::of(&skewed).flops_of(Part::Experts) / Kernels::of(&even).flops_of(Part::Experts);
        assert!((ratio - 1.5).abs() < 1e-12, "{ratio}");
    }

    #[test]
    fn attention_counts_full_score_matrices() {
        // One layer, one sequence of 64, 4 heads of 32: q k^T and P v are
        // 2 x 64 x 32 x 64 each per head, x3 with backward.
        let s = shape(&["model.n_layers=1", "train.global_batch_size=1", "train.micro_batch_size=1"]);
        let k = Kernels::of(&s);
        let scores = k.gemms.iter().find(|g| g.name.starts_with("attention scores")).unwrap();
        assert_eq!(scores.flops_each * scores.count, 3.0 * 2.0 * 4.0 * 2.0 * 64.0 * 32.0 * 64.0);
        assert_eq!(scores.concurrent, 4.0);
    }

    #[test]
    fn routed_heads_skip_the_core_of_unchosen_heads() {
        // MoH with 8 heads, 4 shared and 2 of the other 4 chosen: the core of
        // 6 heads, the projections of all 8; every layout counts it once.
        let dense = ["model.n_heads=8", "model.n_layers=1"];
        let moh =
            [&dense[..], &["model.attention=\"moh\"", "model.attn_shared_heads=4", "model.attn_top_k=2"]].concat();
        let core = |s: &RankShape| {
            let k = Kernels::of(s);
            let scores = k.gemms.iter().find(|g| g.name.starts_with("attention scores")).unwrap();
            scores.flops_each * scores.count
        };
        let (d, m) = (shape(&dense), shape(&moh));
        assert_eq!(core(&m) / core(&d), 6.0 / 8.0);
        assert!(Kernels::of(&m).flops_of(Part::Attention) < Kernels::of(&d).flops_of(Part::Attention));
        for sets in [&["parallel.ranks=1"][..], &["parallel.ranks=4", "parallel.attn_tp=2"][..]] {
            let s = shape(&[&moh[..], sets].concat());
            let total = Kernels::of(&s).flops() * s.ranks as f64;
            let model = model_flops_per_step(&s);
            assert!((total - model).abs() <= 1e-9 * model, "{sets:?}: {total} vs {model}");
        }
    }

    #[test]
    fn dense_first_layers_run_their_ffn_on_every_token_and_no_experts() {
        // 2 layers, the first dense with a 384-wide FFN: half the expert and
        // router work, and 3 products of 2 x tokens x d x 384, 3x with backward.
        let moe = shape(&[]);
        let s = shape(&["model.first_dense_layers=1", "model.dense_ffn_hidden=384"]);
        let (k, k_moe) = (Kernels::of(&s), Kernels::of(&moe));
        assert_eq!(k.flops_of(Part::Experts), k_moe.flops_of(Part::Experts) / 2.0);
        assert_eq!(k.flops_of(Part::Router), k_moe.flops_of(Part::Router) / 2.0);
        let tokens = 32.0 * 64.0;
        assert_eq!(k.flops_of(Part::DenseFfn), 3.0 * 3.0 * 2.0 * tokens * 128.0 * 384.0);
        assert_eq!(k.flops_of(Part::Attention), k_moe.flops_of(Part::Attention));
        assert_eq!(k_moe.flops_of(Part::DenseFfn), 0.0);
    }
}
