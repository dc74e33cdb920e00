//! The `[model]` section of a job config (DESIGN section 5 and 7).

use crate::error::ModelError;
use serde::{Deserialize, Serialize};

/// Sequences from this length run the tiled attention core
/// ([`ModelConfig::tiled_attention`]); shorter ones the plain core, whose
/// saved probabilities are small there (and whose results the golden
/// losses pin).
pub const TILED_ATTENTION_FROM_SEQ: usize = 512;

/// Sequential (`h = x + attn; out = h + moe`) or parallel BAM-style
/// (`out = x + attn(n) + moe(n)`) transformer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Sequential,
    Parallel,
}

/// The attention block of every layer (docs/model.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// One grouped-query attention block (v1).
    #[default]
    Dense,
    /// JetMoE's Mixture of Attention: `attn_experts` experts with their own
    /// query and output projections, keys and values shared.
    Moa,
    /// MoH's routed heads: `attn_shared_heads` always on, `attn_top_k` of
    /// the others per token, each head's output times its gate.
    Moh,
}

/// How MoH chooses a token's routed heads (docs/model.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnRouterKind {
    /// Softmax routers with MoH's shared/routed two-way weights.
    #[default]
    Learned,
    /// MoH-LLaMA3's parameter-free choice: the routed heads whose queries
    /// have the largest norms, gates 1.
    QueryNorm,
}

/// How the router turns logits into scores (docs/model.md, "Routers beyond v1").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterScoreKind {
    /// `softmax(logits)` (v1, Mixtral, Qwen).
    #[default]
    Softmax,
    /// `sigmoid(logits)` per expert (DeepSeek-V3).
    Sigmoid,
}

/// What one router output stands for (MoE++ orders them FFN, constant,
/// copy, zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutedKind {
    /// A SwiGLU expert, placed on ranks and reached by all-to-all.
    Ffn,
    /// Constant expert `j`: `a1 x + a2 v_j`, `[a1, a2] = softmax(W_c,j x)`.
    Constant(usize),
    /// `x`.
    Copy,
    /// `0` (its gate is forced to 0).
    Zero,
}

/// Model hyper-parameters; key names are part of the user interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_hidden: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub n_shared_experts: usize,
    pub seq_len: usize,
    pub block: BlockKind,
    /// Expert capacity factor; `<= 0` means dropless.
    pub capacity_factor: f32,
    pub norm_topk_prob: bool,
    pub rope_theta: f32,
    pub norm_eps: f32,
    pub tie_embeddings: bool,
    pub aux_loss_coef: f32,
    pub z_loss_coef: f32,
    /// Standard deviation of the initial weights (output projections are
    /// further scaled by `1/sqrt(2 n_layers)` as in GPT-2).
    pub init_std: f32,
    /// Router scores: softmax (v1) or DeepSeek-V3's sigmoid.
    pub router_score: RouterScoreKind,
    /// Gates are multiplied by this after any renormalisation (DeepSeek-V3: 2.5).
    pub routed_scaling_factor: f32,
    /// Group-limited routing: experts form `n_groups` groups of consecutive
    /// ids and a token chooses inside its `topk_groups` best groups.
    pub n_groups: usize,
    pub topk_groups: usize,
    /// A per-expert selection bias, updated after each step from the global
    /// loads (aux-loss-free balancing), saved as `layers.{l}.moe.expert_bias`.
    pub expert_bias: bool,
    /// The bias update's step `gamma` (DeepSeek-V3: 0.001).
    pub bias_update_speed: f32,
    /// Subtract the mean of each bias update (torchtitan does).
    pub bias_update_centered: bool,
    /// Sequence-wise balance loss coefficient `alpha` (DeepSeek-V3: 1e-4).
    pub seq_aux_loss_coef: f32,
    /// Qwen2-MoE: the shared experts' output times `sigmoid(w_g . x)`.
    pub shared_expert_gate: bool,
    /// MoE++'s computation-free experts, routed beside the FFN experts:
    /// constant (`a1 x + a2 v`), copy (`x`) and zero (`0`) experts. They run
    /// on the token's own rank and never travel.
    pub constant_experts: usize,
    pub copy_experts: usize,
    pub zero_experts: usize,
    /// MoE++'s heterogeneous balance loss: the weight `tau` of the
    /// computation-free experts' terms (FFN experts weigh 1).
    pub zero_computation_tau: f32,
    /// MoE++'s gating residuals: a layer's router logits add `W_map` times
    /// the previous MoE layer's logits.
    pub gating_residuals: bool,
    /// MoE++'s 2-layer router: `logits = W_2 tanh(W_1 x)`, `W_1: [8R, D]`.
    pub router_mlp: bool,
    /// Qwen3's query/key norm: every query and key head vector RMS-normalised
    /// (weights `[hd]` per layer) after the projections, before RoPE.
    pub qk_norm: bool,
    /// DeepSeek-V3: the first layers have a dense SwiGLU FFN instead of an
    /// MoE (DeepSeek-V3: 3), of hidden width `dense_ffn_hidden` (0: `ffn_hidden`).
    pub first_dense_layers: usize,
    pub dense_ffn_hidden: usize,
    /// Dense attention (v1) or JetMoE's attention experts.
    pub attention: AttentionKind,
    /// MoA: attention experts per layer (each with `n_heads` query heads).
    pub attn_experts: usize,
    /// MoA: attention experts per token (`attn_experts`: BAM's soft
    /// routing); MoH: routed heads per token.
    pub attn_top_k: usize,
    /// MoH: the first heads, always on.
    pub attn_shared_heads: usize,
    /// MoH: the learned router or MoH-LLaMA3's query norms.
    pub attn_router: AttnRouterKind,
    /// MoH's balance loss weight (its mean over layers is added).
    pub attn_aux_loss_coef: f32,
    /// Mixture-of-Transformers: modalities with their own attention
    /// projections, norms, dense FFNs and block of experts (1: off).
    pub modalities: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab: 256,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_hidden: 128,
            n_experts: 8,
            top_k: 2,
            n_shared_experts: 0,
            seq_len: 64,
            block: BlockKind::Sequential,
            capacity_factor: 0.0,
            norm_topk_prob: true,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            aux_loss_coef: 0.01,
            z_loss_coef: 0.001,
            init_std: 0.02,
            router_score: RouterScoreKind::Softmax,
            routed_scaling_factor: 1.0,
            n_groups: 1,
            topk_groups: 1,
            expert_bias: false,
            bias_update_speed: 0.001,
            bias_update_centered: false,
            seq_aux_loss_coef: 0.0,
            shared_expert_gate: false,
            constant_experts: 0,
            copy_experts: 0,
            zero_experts: 0,
            zero_computation_tau: 0.75,
            gating_residuals: false,
            router_mlp: false,
            qk_norm: false,
            first_dense_layers: 0,
            dense_ffn_hidden: 0,
            attention: AttentionKind::Dense,
            attn_experts: 0,
            attn_top_k: 0,
            attn_shared_heads: 0,
            attn_router: AttnRouterKind::Learned,
            attn_aux_loss_coef: 0.01,
            modalities: 1,
        }
    }
}

impl ModelConfig {
    /// Per-head dimension `hd = d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// True when capacity is unlimited (no token is ever dropped).
    pub fn dropless(&self) -> bool {
        self.capacity_factor <= 0.0
    }

    /// Expert capacity for a micro-batch of `num_tokens` tokens on one rank:
    /// `ceil(c * N * k / E)`, or `usize::MAX` when dropless.
    pub fn capacity(&self, num_tokens: usize) -> usize {
        if self.dropless() {
            return usize::MAX;
        }
        let exact = self.capacity_factor as f64 * (num_tokens * self.top_k) as f64 / self.n_experts as f64;
        exact.ceil() as usize
    }

    /// Rejects impossible settings with the name of the key at fault.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, reason: String| Err(ModelError::InvalidConfig { key, reason });
        let positive = [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn_hidden", self.ffn_hidden),
            ("n_experts", self.n_experts),
            ("top_k", self.top_k),
            ("seq_len", self.seq_len),
            ("n_groups", self.n_groups),
            ("topk_groups", self.topk_groups),
        ];
        for (key, value) in positive {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad("n_heads", format!("d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad("n_heads", format!("head_dim d_model/n_heads = {} must be even for RoPE", self.head_dim()));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "n_kv_heads",
                format!("n_heads {} is not divisible by n_kv_heads {}", self.n_heads, self.n_kv_heads),
            );
        }
        if self.top_k > self.n_router_outputs() {
            let reason = format!(
                "top_k {} exceeds the {} experts (n_experts {} + computation-free {})",
                self.top_k,
                self.n_router_outputs(),
                self.n_experts,
                self.computation_free_experts()
            );
            return bad("top_k", reason);
        }
        self.validate_groups()?;
        self.validate_attention()?;
        self.validate_modalities()?;
        if self.first_dense_layers >= self.n_layers {
            let reason = format!(
                "{} dense layers leave none of the n_layers = {} for experts: an MoE model needs at least one MoE layer",
                self.first_dense_layers, self.n_layers
            );
            return bad("first_dense_layers", reason);
        }
        if self.shared_expert_gate && self.n_shared_experts == 0 {
            return bad("shared_expert_gate", "gates the shared experts, but n_shared_experts = 0".into());
        }
        if self.vocab > u32::MAX as usize {
            return bad("vocab", "must fit in 32 bits".into());
        }
        for (key, value) in [("norm_eps", self.norm_eps), ("rope_theta", self.rope_theta), ("init_std", self.init_std)]
        {
            if !(value > 0.0 && value.is_finite()) {
                return bad(key, format!("must be a positive number, got {value}"));
            }
        }
        if !self.capacity_factor.is_finite() {
            return bad(
                "capacity_factor",
                format!("must be a finite number (0 or less: dropless), got {}", self.capacity_factor),
            );
        }
        if !(self.routed_scaling_factor > 0.0 && self.routed_scaling_factor.is_finite()) {
            return bad(
                "routed_scaling_factor",
                format!("must be a positive number, got {}", self.routed_scaling_factor),
            );
        }
        for (key, value) in [
            ("aux_loss_coef", self.aux_loss_coef),
            ("z_loss_coef", self.z_loss_coef),
            ("seq_aux_loss_coef", self.seq_aux_loss_coef),
            ("bias_update_speed", self.bias_update_speed),
            ("zero_computation_tau", self.zero_computation_tau),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return bad(key, format!("must be >= 0, got {value}"));
            }
        }
        Ok(())
    }

    /// Whether layer `l` is an MoE layer (else a dense FFN: `first_dense_layers`).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l >= self.first_dense_layers
    }

    /// The hidden width of the dense layers' FFN.
    pub fn dense_ffn_width(&self) -> usize {
        if self.dense_ffn_hidden == 0 {
            self.ffn_hidden
        } else {
            self.dense_ffn_hidden
        }
    }

    /// The router's outputs: FFN experts, then constant, copy and zero
    /// experts (MoE++'s order), in that id order.
    pub fn n_router_outputs(&self) -> usize {
        self.n_experts + self.computation_free_experts()
    }

    /// MoE++'s constant, copy and zero experts together.
    pub fn computation_free_experts(&self) -> usize {
        self.constant_experts + self.copy_experts + self.zero_experts
    }

    /// The width the router's output layer reads: `D`, or the MLP router's
    /// hidden width `8R` (MoE++'s `num_experts * 8`).
    pub fn router_input_width(&self) -> usize {
        if self.router_mlp {
            8 * self.n_router_outputs()
        } else {
            self.d_model
        }
    }

    /// What router output `id` is.
    pub fn routed_kind(&self, id: usize) -> RoutedKind {
        let constants = self.n_experts + self.constant_experts;
        if id < self.n_experts {
            RoutedKind::Ffn
        } else if id < constants {
            RoutedKind::Constant(id - self.n_experts)
        } else if id < constants + self.copy_experts {
            RoutedKind::Copy
        } else {
            RoutedKind::Zero
        }
    }

    /// The weight of router output `id` in the balance losses: 1 for FFN
    /// experts, `zero_computation_tau` for the others (MoE++).
    pub fn balance_weight(&self, id: usize) -> f32 {
        if id < self.n_experts {
            1.0
        } else {
            self.zero_computation_tau
        }
    }

    /// Experts per routing group (`n_experts / n_groups`).
    pub fn group_size(&self) -> usize {
        self.n_experts / self.n_groups
    }

    /// MoA needs experts and a top-k among them; dense attention neither.
    fn validate_attention(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, reason: String| Err(ModelError::InvalidConfig { key, reason });
        let unused = |keys: &[(&'static str, usize)], what: &str| {
            for &(key, value) in keys {
                if value != 0 {
                    return bad(key, format!("is {value}, but attention = \"{what}\" does not use it: remove the key"));
                }
            }
            Ok(())
        };
        if self.attention != AttentionKind::Moh && self.attn_router != AttnRouterKind::Learned {
            return bad("attn_router", "chooses MoH's routed heads: it needs attention = \"moh\"".into());
        }
        if !(self.attn_aux_loss_coef >= 0.0 && self.attn_aux_loss_coef.is_finite()) {
            return bad("attn_aux_loss_coef", format!("must be >= 0, got {}", self.attn_aux_loss_coef));
        }
        match self.attention {
            AttentionKind::Dense => {
                let keys = [
                    ("attn_experts", self.attn_experts),
                    ("attn_top_k", self.attn_top_k),
                    ("attn_shared_heads", self.attn_shared_heads),
                ];
                unused(&keys, "dense")?;
            }
            AttentionKind::Moh => {
                unused(&[("attn_experts", self.attn_experts)], "moh")?;
                if self.attn_shared_heads >= self.n_heads {
                    let reason = format!(
                        "{} shared heads leave none of the n_heads = {} to route (MoH: half of them)",
                        self.attn_shared_heads, self.n_heads
                    );
                    return bad("attn_shared_heads", reason);
                }
                let routed = self.n_heads - self.attn_shared_heads;
                if self.attn_top_k == 0 || self.attn_top_k > routed {
                    let reason = format!(
                        "must be between 1 and the {routed} routed heads (n_heads {} - attn_shared_heads {}), got {} \
                         (MoH-LLaMA3: 8 of 16)",
                        self.n_heads, self.attn_shared_heads, self.attn_top_k
                    );
                    return bad("attn_top_k", reason);
                }
            }
            AttentionKind::Moa => {
                unused(&[("attn_shared_heads", self.attn_shared_heads)], "moa")?;
                if self.attn_experts == 0 {
                    return bad(
                        "attn_experts",
                        "attention = \"moa\" needs at least 1 attention expert (JetMoE: 8)".into(),
                    );
                }
                if self.attn_top_k == 0 || self.attn_top_k > self.attn_experts {
                    let reason = format!(
                        "must be between 1 and attn_experts = {} (JetMoE: 2; attn_experts for BAM's soft routing), got {}",
                        self.attn_experts, self.attn_top_k
                    );
                    return bad("attn_top_k", reason);
                }
            }
        }
        Ok(())
    }

    /// Query heads a token attends with: `n_heads`, or with MoA its
    /// `attn_top_k` experts' `n_heads` each (what attention costs scale with).
    pub fn query_heads_per_token(&self) -> usize {
        if self.is_moa() {
            self.n_heads * self.attn_top_k
        } else {
            self.n_heads
        }
    }

    /// Query heads whose attention core runs per token: MoH's shared heads
    /// and its `attn_top_k` chosen ones, else every query head of a token.
    pub fn attention_core_heads(&self) -> usize {
        if self.is_moh() {
            self.attn_shared_heads + self.attn_top_k
        } else {
            self.query_heads_per_token()
        }
    }

    /// What a token's attention router chooses among: MoA's experts, MoH's
    /// routed heads, or nothing (0) for dense attention.
    pub fn attention_choices(&self) -> usize {
        match self.attention {
            AttentionKind::Dense => 0,
            AttentionKind::Moa => self.attn_experts,
            AttentionKind::Moh => self.routed_heads(),
        }
    }

    /// Whether attention is MoH's routed heads.
    pub fn is_moh(&self) -> bool {
        self.attention == AttentionKind::Moh
    }

    /// MoH: the routed heads (those after the shared ones).
    pub fn routed_heads(&self) -> usize {
        self.n_heads - self.attn_shared_heads
    }

    /// MoH's learned router's weights: routed `[Hr, D]`, shared `[Hs, D]`
    /// (when `Hs > 1`) and two-way `[2, D]` (when `Hs > 0`); none with the
    /// query-norm router or without MoH.
    pub fn head_router_rows(&self) -> [usize; 3] {
        if !self.is_moh() || self.attn_router != AttnRouterKind::Learned {
            return [0; 3];
        }
        let hs = self.attn_shared_heads;
        [self.routed_heads(), if hs > 1 { hs } else { 0 }, if hs > 0 { 2 } else { 0 }]
    }

    /// Whether attention is JetMoE's attention experts.
    pub fn is_moa(&self) -> bool {
        self.attention == AttentionKind::Moa
    }

    /// Whether the attention core runs tiled with an online softmax
    /// (`ops::tiled_attention`: it saves a log-sum-exp per query row, not
    /// the `seq x seq` probabilities): dense attention from
    /// [`TILED_ATTENTION_FROM_SEQ`] tokens on; routed heads (whose gated
    /// rows the plain core skips) and attention experts keep the plain core.
    pub fn tiled_attention(&self) -> bool {
        self.attention == AttentionKind::Dense && self.seq_len >= TILED_ATTENTION_FROM_SEQ
    }

    /// The router of the attention experts as a router config: softmax,
    /// top-`attn_top_k` of `attn_experts`, renormalised, dropless, no bias,
    /// groups or computation-free experts; the model's aux and z coefficients.
    pub fn attention_router(&self) -> ModelConfig {
        ModelConfig {
            n_experts: self.attn_experts,
            top_k: self.attn_top_k,
            capacity_factor: 0.0,
            norm_topk_prob: true,
            router_score: RouterScoreKind::Softmax,
            routed_scaling_factor: 1.0,
            n_groups: 1,
            topk_groups: 1,
            expert_bias: false,
            seq_aux_loss_coef: 0.0,
            constant_experts: 0,
            copy_experts: 0,
            zero_experts: 0,
            gating_residuals: false,
            router_mlp: false,
            ..self.clone()
        }
    }

    /// Values of one layer's attention parameters (projections, head
    /// norms; with MoA the experts, router and bias).
    pub fn attention_values(&self) -> usize {
        let (d, hd) = (self.d_model, self.head_dim());
        let qk_norm = if self.qk_norm { 2 * hd } else { 0 };
        let kv = d * self.n_kv_heads * hd * 2;
        let q_and_o = d * self.n_heads * hd * 2;
        match self.attention {
            AttentionKind::Dense => q_and_o + kv + qk_norm,
            AttentionKind::Moh => q_and_o + kv + qk_norm + self.head_router_rows().iter().sum::<usize>() * d,
            AttentionKind::Moa => self.attn_experts * (q_and_o + d) + d + kv + qk_norm,
        }
    }

    /// Mixture-of-Transformers: modality `m`'s experts are the global ids
    /// `m * E/M .. (m+1) * E/M` (all of them without modalities).
    pub fn modality_experts(&self, m: usize) -> std::ops::Range<usize> {
        let per = self.n_experts / self.modalities;
        m * per..(m + 1) * per
    }

    /// Whether the model unties its non-embedding weights by modality.
    pub fn is_mot(&self) -> bool {
        self.modalities > 1
    }

    /// Values of one modality's own tensors of layer `l`: attention
    /// projections, norms and, in a dense layer, the FFN (what each
    /// modality beyond the first adds to the layer).
    pub fn modality_values(&self, l: usize) -> usize {
        let d = self.d_model;
        let norms = d * if self.block == BlockKind::Sequential { 2 } else { 1 };
        let ffn = if self.is_moe_layer(l) { 0 } else { 3 * d * self.dense_ffn_width() };
        self.attention_values() + norms + ffn
    }

    /// Mixture-of-Transformers (docs/model.md): the modalities split the
    /// experts evenly, and only what is built per modality may be on.
    fn validate_modalities(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, reason: String| Err(ModelError::InvalidConfig { key, reason });
        if self.modalities == 0 || self.modalities > u8::MAX as usize {
            return bad("modalities", format!("must be between 1 and 255, got {}", self.modalities));
        }
        if !self.is_mot() {
            return Ok(());
        }
        if !self.n_experts.is_multiple_of(self.modalities) {
            let reason = format!(
                "the {} modalities must split n_experts = {} evenly (each modality routes among its own block)",
                self.modalities, self.n_experts
            );
            return bad("modalities", reason);
        }
        let per = self.n_experts / self.modalities;
        if self.top_k > per {
            let reason =
                format!("top_k {} exceeds the {per} experts of each of the {} modalities", self.top_k, self.modalities);
            return bad("top_k", reason);
        }
        let unsupported = [
            ("attention", self.attention != AttentionKind::Dense, "attention experts or routed heads per modality"),
            ("qk_norm", self.qk_norm, "head norms per modality"),
            ("n_shared_experts", self.n_shared_experts > 0, "shared experts per modality"),
            ("n_groups", self.n_groups > 1, "group-limited routing across modality blocks"),
            ("router_mlp", self.router_mlp, "an MLP router per modality"),
            ("gating_residuals", self.gating_residuals, "gating residuals across modality blocks"),
            ("constant_experts", self.computation_free_experts() > 0, "computation-free experts per modality"),
        ];
        for (key, on, what) in unsupported {
            if on {
                let reason = format!(
                    "is set, but modalities = {} does not build {what} yet: remove the key or set modalities = 1",
                    self.modalities
                );
                return bad(key, reason);
            }
        }
        Ok(())
    }

    /// Group-limited routing must leave `top_k` experts to choose from.
    fn validate_groups(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, reason: String| Err(ModelError::InvalidConfig { key, reason });
        if self.n_groups > 1 && self.computation_free_experts() > 0 {
            let reason = "group-limited routing places FFN experts on nodes; it cannot be combined with \
                          computation-free experts (constant_experts, copy_experts, zero_experts)";
            return bad("n_groups", reason.into());
        }
        if !self.n_experts.is_multiple_of(self.n_groups) {
            let reason = format!("{} groups do not divide n_experts = {}", self.n_groups, self.n_experts);
            return bad("n_groups", reason);
        }
        if self.topk_groups > self.n_groups {
            return bad("topk_groups", format!("{} exceeds n_groups = {}", self.topk_groups, self.n_groups));
        }
        let choosable = self.topk_groups * self.group_size();
        if self.top_k > choosable {
            let reason = format!(
                "top_k {} exceeds the {choosable} experts of the topk_groups = {} kept groups of {} experts",
                self.top_k,
                self.topk_groups,
                self.group_size()
            );
            return bad("top_k", reason);
        }
        Ok(())
    }

    /// Values of layer `l`'s dense (replicated) parameters: attention,
    /// norms and either the dense FFN or the router, shared experts and the
    /// later families' tensors (not the routed experts). What the layer's
    /// gradient buckets carry; `DenseLayerWeights::params` lists the same.
    pub fn layer_dense_values(&self, l: usize) -> usize {
        let (d, r) = (self.d_model, self.n_router_outputs());
        let attn = self.attention_values();
        let norms = d * if self.block == BlockKind::Sequential { 2 } else { 1 };
        let other_modalities = (self.modalities - 1) * self.modality_values(l);
        if !self.is_moe_layer(l) {
            return attn + norms + 3 * d * self.dense_ffn_width() + other_modalities;
        }
        let shared = self.n_shared_experts * 3 * d * self.ffn_hidden;
        let gate = if self.shared_expert_gate { d } else { 0 };
        let constants = self.constant_experts * 3 * d;
        let residual = if self.gating_residuals && l > self.first_dense_layers { r * r } else { 0 };
        let hidden = if self.router_mlp { self.router_input_width() * d } else { 0 };
        attn + norms + r * self.router_input_width() + hidden + shared + gate + constants + residual + other_modalities
    }

    /// Number of parameters of the whole model (all experts).
    pub fn num_params(&self) -> usize {
        let (d, v) = (self.d_model, self.vocab);
        let layers: usize = (0..self.n_layers).map(|l| self.layer_dense_values(l)).sum();
        let moe_layers = (0..self.n_layers).filter(|&l| self.is_moe_layer(l)).count();
        let experts = moe_layers * self.n_experts * 3 * d * self.ffn_hidden;
        let output = if self.tie_embeddings { 0 } else { v * d };
        v * d + layers + experts + d + output
    }

    /// Parameters touched by one token (top-k of the routed experts, and
    /// of the attention experts with MoA).
    pub fn num_active_params(&self) -> usize {
        let inactive = self.n_experts.saturating_sub(self.top_k) * 3 * self.d_model * self.ffn_hidden;
        let moe_layers = (0..self.n_layers).filter(|&l| self.is_moe_layer(l)).count();
        // A head's query rows and output columns, for each unchosen head.
        let heads_per_choice = if self.is_moa() { self.n_heads } else { 1 };
        let unchosen = self.attention_choices().saturating_sub(self.attn_top_k) * heads_per_choice;
        let inactive_attn = unchosen * 2 * self.d_model * self.head_dim() * self.n_layers;
        // A token uses its own modality's tensors only.
        let other_modalities: usize = (0..self.n_layers).map(|l| (self.modalities - 1) * self.modality_values(l)).sum();
        self.num_params() - moe_layers * inactive - inactive_attn - other_modalities
    }
}
