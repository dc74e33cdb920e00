//! The whole model: embeddings, blocks, head and loss — forward and backward.
//!
//! [`forward_backward`] runs one micro-batch and adds its gradients; the
//! routed experts are reached only through an [`ExpertExecutor`], so the
//! same code serves one rank and expert-parallel runs. With attention
//! shards ([`TokenShards`]) a rank holds a slice of the micro-batch's tokens
//! and a group of its heads (see `shards.rs`).
//!
//! Legend: `t` tokens of this rank's slice of the micro-batch (all of it
//! without shards), `a` all tokens of the micro-batch, `d` d_model, `v`
//! vocab, `q` query width of this rank's heads, `g` their kv width, `k` top-k.

use crate::attention_experts::{moa_backward, moa_forward, AttnExperts, MoaCache, MoaInput, MoaInputGrads};
use crate::attention_heads::{head_gates, head_gates_backward, head_norms, HeadGates};
use crate::config::{AttnRouterKind, BlockKind, ModelConfig};
use crate::error::ModelError;
use crate::gemm::{matmul_nn, matmul_nt, matmul_tn, prepare};
use crate::modality::ModalityRows;
use crate::moe::layer::{
    moe_backward, moe_backward_finish, moe_backward_start, moe_forward_finish, moe_forward_start, MoeBackwardInput,
    MoeCache, MoeGrads, MoeLayer,
};
use crate::moe::{ExpertExecutor, RouterLossScales};
use crate::ops::attention::{attention_backward_gated, attention_forward_gated, AttentionShape, Qkv, QkvGrads};
use crate::ops::loss::{cross_entropy_forward_backward, cross_entropy_sum};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::RopeTable;
use crate::ops::swiglu::{SwiGlu, SwigluCache};
use crate::ops::tiled_attention::{lse_len, tiled_attention_backward, tiled_attention_forward};
use crate::shards::{sum_over_group, NoShards, TokenShards};
use crate::weights::{DenseLayerWeights, DenseWeights, ModalTensor};

/// One micro-batch: `batch` sequences of `seq_len + 1` tokens each
/// (inputs are positions `0..T`, targets `1..T+1`).
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    pub tokens: &'a [u32],
    pub batch: usize,
    /// Mixture-of-Transformers: each token's modality id, aligned with
    /// `tokens`; empty: every token is modality 0.
    pub modality: &'a [u8],
}

/// How this micro-batch's losses enter the optimised total: the loss is the
/// mean cross-entropy over every token of the GLOBAL batch plus the aux and
/// z losses averaged over all its micro-batches.
#[derive(Debug, Clone, Copy)]
pub struct LossScales {
    /// `1 / (tokens in the global batch)`.
    pub ce: f32,
    /// `aux_loss_coef / (micro-batches in the global batch)`.
    pub aux: f32,
    /// `z_loss_coef / (micro-batches in the global batch)`.
    pub z: f32,
    /// `seq_aux_loss_coef / (micro-batches in the global batch)`.
    pub seq: f32,
    /// `attn_aux_loss_coef / (micro-batches in the global batch)` (MoH's
    /// balance loss; the model divides it by the layers, MoH's mean).
    pub attn_aux: f32,
}

impl LossScales {
    /// The weights of the router's losses.
    pub fn router(self) -> RouterLossScales {
        RouterLossScales { aux: self.aux, z: self.z, seq: self.seq }
    }
}

/// What one micro-batch's forward pass measured.
#[derive(Debug, Clone, Default)]
pub struct ForwardStats {
    /// Sum of next-token cross-entropy over the micro-batch's tokens (nats).
    pub ce_sum: f64,
    pub num_tokens: usize,
    /// Per layer: the aux loss, z-loss and sequence-wise balance loss
    /// (before coefficients).
    pub aux_loss: Vec<f32>,
    pub z_loss: Vec<f32>,
    pub seq_aux_loss: Vec<f32>,
    /// Per layer: kept assignments per expert, and dropped assignments.
    pub tokens_per_expert: Vec<Vec<usize>>,
    pub dropped: Vec<usize>,
    /// Per layer: assignments per router output before capacity drops (the
    /// load the aux-loss-free bias balances).
    pub chosen_per_expert: Vec<Vec<usize>>,
    /// Per layer: assignments to MoE++'s computation-free experts.
    pub free_assignments: Vec<usize>,
    /// Per layer: this rank's tokens per attention expert (MoA) or routed
    /// head (MoH) chosen; empty with dense attention.
    pub attn_load: Vec<Vec<usize>>,
}

/// How a forward-backward pass orders its work (DESIGN section 4, overlap).
/// The default is the plain order with no hooks.
#[derive(Default)]
pub struct PassOptions<'h> {
    /// Parallel blocks: hand the MoE its rows before computing attention, so
    /// they travel to the experts' ranks while attention runs (and the
    /// output gradients likewise in the backward pass).
    pub attention_during_moe: bool,
    /// Called once a layer's dense gradients are complete in this pass
    /// (backward, from the last layer down), e.g. to start their all-reduce.
    pub on_layer_grads: Option<LayerGradsHook<'h>>,
}

/// See [`PassOptions::on_layer_grads`]: (layer, its dense gradients).
pub type LayerGradsHook<'h> = &'h mut dyn FnMut(usize, &DenseLayerWeights);

/// Everything the backward pass of one block needs from its forward pass.
struct BlockCache {
    x_td: Vec<f32>,
    attn_in_td: Vec<f32>,
    attn_rstd_t: Vec<f32>,
    q_tq: Vec<f32>,
    k_tg: Vec<f32>,
    v_tg: Vec<f32>,
    /// `qk_norm`: q and k before their head norms.
    head_norms: HeadNorms,
    /// The attention core's saved softmax: its probabilities, or with the
    /// tiled core one log-sum-exp per query row.
    probs: Vec<f32>,
    attn_tq: Vec<f32>,
    /// With shards: the attention input of every shard's tokens `[a, d]`.
    attn_in_ad: Vec<f32>,
    /// Sequential blocks: `h = x + attn`, and the MoE input `RMSNorm(h)`.
    h_td: Vec<f32>,
    ffn_in_td: Vec<f32>,
    ffn_rstd_t: Vec<f32>,
    moe: MoeCache,
    /// A dense layer's FFN (`first_dense_layers`), one cache per modality.
    dense_ffn: Vec<SwigluCache>,
    /// MoA's attention experts (`attention = "moa"`).
    moa: MoaCache,
    /// MoH's head gates (`attention = "moh"`), and with attention shards
    /// those of this shard's heads (empty: all heads are this rank's).
    head_gates: HeadGates,
    shard_gates: Vec<f32>,
}

/// MoH: the gates `[a, heads]` of this rank's heads (empty without MoH):
/// the shard's copy, or every head's without shards.
fn this_shard_gates<'c>(head_gates: &'c HeadGates, shard_gates: &'c [f32]) -> &'c [f32] {
    if shard_gates.is_empty() {
        &head_gates.gates_th
    } else {
        shard_gates
    }
}

/// How one layer's router is tied to its neighbours' by MoE++'s gating
/// residuals (all None without them).
struct RouterLinks<'a> {
    /// The previous layer's logits, which this layer's residual read.
    prev_logits_te: Option<&'a [f32]>,
    /// The gradient of this layer's logits from the next layer's residual.
    dlogits_in_te: Option<&'a [f32]>,
    /// Where the gradient of the previous layer's logits goes.
    dprev_logits_te: Option<&'a mut [f32]>,
}

/// Sizes shared by every block of one micro-batch.
struct Dims {
    /// This rank's tokens.
    t: usize,
    /// The micro-batch's tokens (attention runs on all of them).
    a: usize,
    d: usize,
    q: usize,
    g: usize,
    /// Attention shards (1: none).
    shards: usize,
    attn: AttentionShape,
}

impl Dims {
    fn new(cfg: &ModelConfig, batch: usize, shards: usize) -> Result<Self, ModelError> {
        let hd = cfg.head_dim();
        let a = batch * cfg.seq_len;
        if !a.is_multiple_of(shards) || !cfg.n_heads.is_multiple_of(shards) || !cfg.n_kv_heads.is_multiple_of(shards) {
            let reason = format!(
                "they must divide the micro-batch's {a} tokens, n_heads = {} and n_kv_heads = {}",
                cfg.n_heads, cfg.n_kv_heads
            );
            return Err(ModelError::Shards { shards, reason });
        }
        let (n_heads, n_kv_heads) = (cfg.n_heads / shards, cfg.n_kv_heads / shards);
        Ok(Self {
            t: a / shards,
            a,
            d: cfg.d_model,
            q: n_heads * hd,
            g: n_kv_heads * hd,
            shards,
            attn: AttentionShape { batch, seq: cfg.seq_len, n_heads, n_kv_heads, head_dim: hd },
        })
    }
}

/// What every block of one pass works with: the model, the sizes, where
/// the expert rows go and how attention is split, and the order of work.
struct Pass<'p> {
    cfg: &'p ModelConfig,
    rope: &'p RopeTable,
    dims: Dims,
    experts: &'p mut dyn ExpertExecutor,
    shards: &'p mut dyn TokenShards,
    /// See [`PassOptions::attention_during_moe`].
    attention_during_moe: bool,
    /// Mixture-of-Transformers: the modalities of this rank's tokens and of
    /// all the micro-batch's (one group each without MoT).
    modal: &'p PassModalities,
}

/// The modality ids of one pass: this rank's tokens grouped, all tokens
/// grouped (attention with shards runs on all), and this rank's ids for
/// the router (empty without MoT).
#[derive(Default)]
struct PassModalities {
    own: ModalityRows,
    all: ModalityRows,
    own_ids: Vec<u8>,
}

impl PassModalities {
    /// The groups of a micro-batch's `a` input tokens of modalities
    /// `all_ids` (empty without MoT), this rank holding the slice `mine`.
    fn new(cfg: &ModelConfig, all_ids: &[u8], a: usize, mine: std::ops::Range<usize>) -> Self {
        let t = mine.len();
        if !cfg.is_mot() {
            return Self { own: ModalityRows::new(&[], t, 1), all: ModalityRows::new(&[], a, 1), own_ids: Vec::new() };
        }
        let own_ids = all_ids[mine].to_vec();
        Self {
            own: ModalityRows::new(&own_ids, t, cfg.modalities),
            all: ModalityRows::new(all_ids, a, cfg.modalities),
            own_ids,
        }
    }
}

/// The modality ids of a micro-batch's inputs (positions `0..T` of each
/// sequence; all 0 when the micro-batch carries none), checked against
/// `modalities`; empty without MoT.
fn input_modalities(cfg: &ModelConfig, mb: MicroBatch) -> Result<Vec<u8>, ModelError> {
    if !cfg.is_mot() {
        return Ok(Vec::new());
    }
    if mb.modality.is_empty() {
        return Ok(vec![0; mb.batch * cfg.seq_len]);
    }
    assert_eq!(mb.modality.len(), mb.tokens.len(), "one modality id per token");
    if let Some(position) = mb.modality.iter().position(|&m| m as usize >= cfg.modalities) {
        let modality = mb.modality[position];
        return Err(ModelError::ModalityOutOfRange { modality, position, modalities: cfg.modalities });
    }
    let len = cfg.seq_len + 1;
    Ok(mb.modality.chunks_exact(len).flat_map(|seq| seq[..cfg.seq_len].iter().copied()).collect())
}

/// Splits a micro-batch into inputs and targets, checking the vocabulary.
fn inputs_and_targets(cfg: &ModelConfig, mb: MicroBatch) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
    let len = cfg.seq_len + 1;
    assert_eq!(mb.tokens.len(), mb.batch * len, "micro-batch holds batch x (seq_len+1) tokens");
    if let Some(&token) = mb.tokens.iter().find(|&&tok| tok as usize >= cfg.vocab) {
        return Err(ModelError::TokenOutOfRange { token, vocab: cfg.vocab });
    }
    let mut inputs = Vec::with_capacity(mb.batch * cfg.seq_len);
    let mut targets = Vec::with_capacity(mb.batch * cfg.seq_len);
    for seq in mb.tokens.chunks_exact(len) {
        inputs.extend_from_slice(&seq[..cfg.seq_len]);
        targets.extend_from_slice(&seq[1..]);
    }
    Ok((inputs, targets))
}

fn embed(dense: &DenseWeights, d: usize, inputs: &[u32]) -> Vec<f32> {
    let mut x_td = Vec::with_capacity(inputs.len() * d);
    for &tok in inputs {
        let row = tok as usize * d;
        x_td.extend_from_slice(&dense.tok_embeddings[row..row + d]);
    }
    x_td
}

/// The LM head's weight: `output`, or the embeddings when tied.
fn head_weight(dense: &DenseWeights) -> &[f32] {
    dense.output.as_deref().unwrap_or(&dense.tok_embeddings)
}

impl Pass<'_> {
    /// Attention sub-layer on normalised input `n_td`: returns `Wo · attn(q,k,v)`.
    /// With shards: on every shard's tokens, this rank's heads, and the output
    /// projection's partial sums reduce-scattered back to this rank's tokens.
    fn attention_forward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        n_td: &[f32],
        cache: &mut BlockCache,
    ) -> Result<Vec<f32>, ModelError> {
        if self.cfg.is_moa() {
            return self.moa_forward(layer, w, n_td, cache);
        }
        let (dims, rope) = (&self.dims, self.rope);
        if dims.shards > 1 {
            cache.attn_in_ad = self.shards.gather_rows(n_td)?;
        }
        let n_ad = if dims.shards > 1 { &cache.attn_in_ad } else { n_td };
        let (t, d, q, g) = (dims.a, dims.d, dims.q, dims.g);
        let shape = dims.attn;
        cache.q_tq = vec![0.0; t * q];
        cache.k_tg = vec![0.0; t * g];
        cache.v_tg = vec![0.0; t * g];
        let rows = &self.modal.all;
        let x = prepare(n_ad);
        rows.matmul_nt(&x, &w.modal(ModalTensor::Wq), (d, q), &mut cache.q_tq, false);
        rows.matmul_nt(&x, &w.modal(ModalTensor::Wk), (d, g), &mut cache.k_tg, false);
        rows.matmul_nt(&x, &w.modal(ModalTensor::Wv), (d, g), &mut cache.v_tg, false);
        drop(x);
        if self.cfg.is_moh() {
            // MoH: every shard computes every head's gates from the input
            // (or from every head's query norm, summed over the shards).
            let mut norms = Vec::new();
            if self.cfg.attn_router == AttnRouterKind::QueryNorm {
                let local = head_norms(&cache.q_tq, self.cfg.head_dim());
                norms = all_heads(self.shards, self.cfg.n_heads, &local)?;
            }
            cache.head_gates = head_gates(self.cfg, w, n_ad, &norms);
            if dims.shards > 1 {
                cache.shard_gates = cache.head_gates.of_shard(self.cfg.n_heads, self.shards.index(), dims.shards);
            }
        }
        cache.head_norms = HeadNorms::forward(w, self.cfg.norm_eps, &mut cache.q_tq, &mut cache.k_tg);
        rope.apply(&mut cache.q_tq, shape.batch, shape.seq, shape.n_heads);
        rope.apply(&mut cache.k_tg, shape.batch, shape.seq, shape.n_kv_heads);
        cache.attn_tq = vec![0.0; t * q];
        // MoH: the query rows of heads a token did not choose are skipped.
        let qkv = Qkv { q_th: &cache.q_tq, k_tg: &cache.k_tg, v_tg: &cache.v_tg };
        let gates = self.cfg.is_moh().then_some(this_shard_gates(&cache.head_gates, &cache.shard_gates));
        if self.cfg.tiled_attention() {
            cache.probs = vec![0.0; lse_len(&shape)];
            tiled_attention_forward(shape, qkv, &mut cache.attn_tq, &mut cache.probs);
        } else {
            cache.probs = vec![0.0; shape.probs_len()];
            attention_forward_gated(shape, qkv, gates, &mut cache.attn_tq, &mut cache.probs);
        }
        let mut out_ad = vec![0.0; t * d];
        let gated = gate_heads(&cache.attn_tq, this_shard_gates(&cache.head_gates, &cache.shard_gates));
        let wo = w.modal(ModalTensor::Wo);
        self.modal.all.matmul_nt(gated.as_deref().unwrap_or(&cache.attn_tq), &wo, (q, d), &mut out_ad, false);
        if dims.shards > 1 {
            return self.shards.reduce_scatter_rows(&out_ad);
        }
        Ok(out_ad)
    }

    /// Backward of [`Pass::attention_forward`]: adds into `dn_td` and grads.
    /// With shards the output gradient is gathered (the forward's
    /// reduce-scatter) and the input gradient reduce-scattered (its gather).
    #[allow(clippy::too_many_arguments)] // weights, gradients, cache, loss scales and the two sides of the gradient
    fn attention_backward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        gw: &mut DenseLayerWeights,
        cache: &BlockCache,
        scales: LossScales,
        dout_td: &[f32],
        dn_td: &mut [f32],
    ) -> Result<(), ModelError> {
        if self.cfg.is_moa() {
            return self.moa_backward(layer, w, gw, cache, scales, dout_td, dn_td);
        }
        let (dims, rope) = (&self.dims, self.rope);
        let gathered;
        let dout_td = if dims.shards > 1 {
            gathered = self.shards.gather_rows(dout_td)?;
            &gathered[..]
        } else {
            dout_td
        };
        let mut dn_ad = if dims.shards > 1 { vec![0.0; dims.a * dims.d] } else { Vec::new() };
        let (t, d, q, g) = (dims.a, dims.d, dims.q, dims.g);
        let shape = dims.attn;
        // out = attn Wo^T: dWo += dout^T attn, dattn = dout Wo.
        let gated = gate_heads(&cache.attn_tq, this_shard_gates(&cache.head_gates, &cache.shard_gates));
        let rows = &self.modal.all;
        let attn = gated.as_deref().unwrap_or(&cache.attn_tq);
        let dout = prepare(dout_td);
        rows.weight_grads(&dout, attn, (q, d), &mut gw.modal_mut(ModalTensor::Wo));
        drop(gated);
        let mut dattn_tq = vec![0.0; t * q];
        rows.input_grads(&dout, &w.modal(ModalTensor::Wo), (q, d), &mut dattn_tq);
        drop(dout);
        // MoH: each head's output was times its gate.
        let dgates_th =
            ungate_heads(&mut dattn_tq, &cache.attn_tq, this_shard_gates(&cache.head_gates, &cache.shard_gates));
        let mut dq_tq = vec![0.0; t * q];
        let mut dk_tg = vec![0.0; t * g];
        let mut dv_tg = vec![0.0; t * g];
        let qkv = Qkv { q_th: &cache.q_tq, k_tg: &cache.k_tg, v_tg: &cache.v_tg };
        let grads = QkvGrads { dq_th: &mut dq_tq, dk_tg: &mut dk_tg, dv_tg: &mut dv_tg };
        let gates = self.cfg.is_moh().then_some(this_shard_gates(&cache.head_gates, &cache.shard_gates));
        if self.cfg.tiled_attention() {
            tiled_attention_backward(shape, qkv, &cache.attn_tq, &cache.probs, &dattn_tq, grads);
        } else {
            attention_backward_gated(shape, qkv, gates, &cache.probs, &dattn_tq, grads);
        }
        rope.apply_backward(&mut dq_tq, shape.batch, shape.seq, shape.n_heads);
        rope.apply_backward(&mut dk_tg, shape.batch, shape.seq, shape.n_kv_heads);
        cache.head_norms.backward(w, gw, &mut dq_tq, &mut dk_tg);
        let n_td = if dims.shards > 1 { &cache.attn_in_ad } else { &cache.attn_in_td };
        let dn_out: &mut [f32] = if dims.shards > 1 { &mut dn_ad } else { dn_td };
        let rows = &self.modal.all;
        // Each factor read by two or three products is converted once (bf16).
        let x = prepare(n_td);
        for (dp_tw, which, width) in
            [(&dq_tq, ModalTensor::Wq, q), (&dk_tg, ModalTensor::Wk, g), (&dv_tg, ModalTensor::Wv, g)]
        {
            let dp = prepare(dp_tw);
            rows.weight_grads(&dp, &x, (d, width), &mut gw.modal_mut(which));
            rows.input_grads(&dp, &w.modal(which), (d, width), dn_out);
        }
        drop(x);
        if let Some(dgates_th) = dgates_th {
            // Every head's gate gradient (each shard has its heads'); the
            // router's backward runs for this shard's slice of the tokens.
            let dgates_th = all_heads(self.shards, self.cfg.n_heads, &dgates_th)?;
            let aux_scale = scales.attn_aux / self.cfg.n_layers as f32;
            let tokens = self.shards.index() * dims.t..(self.shards.index() + 1) * dims.t;
            let (x, gates) = (n_td, &cache.head_gates);
            head_gates_backward(self.cfg, w, gw, x, gates, &dgates_th, (aux_scale, tokens), dn_out);
        }
        if dims.shards > 1 {
            add_into(dn_td, &self.shards.reduce_scatter_rows(&dn_ad)?);
        }
        Ok(())
    }

    /// MoA's attention experts on normalised input `n_td`: with shards on
    /// every shard's tokens and this rank's heads, the partial sums
    /// reduce-scattered back to this rank's tokens; then the shared bias.
    fn moa_forward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        n_td: &[f32],
        cache: &mut BlockCache,
    ) -> Result<Vec<f32>, ModelError> {
        let (shards, batch) = (self.dims.shards, self.dims.attn.batch);
        if shards > 1 {
            cache.attn_in_ad = self.shards.gather_rows(n_td)?;
        }
        let all_td = if shards > 1 { &cache.attn_in_ad[..] } else { n_td };
        let x = MoaInput { own_td: n_td, all_td };
        let experts = AttnExperts { executor: &mut *self.experts, layer };
        let (partial, moa) = moa_forward(self.cfg, self.rope, w, x, batch, self.shards, experts)?;
        cache.moa = moa;
        let mut out_td = if shards > 1 { self.shards.reduce_scatter_rows(&partial)? } else { partial };
        let bias = w.attn_bias.as_deref().expect("MoA layers have an output bias");
        for row in out_td.chunks_exact_mut(self.dims.d) {
            add_into(row, bias);
        }
        Ok(out_td)
    }

    /// Backward of [`Pass::moa_forward`]: adds into `dn_td` and grads.
    #[allow(clippy::too_many_arguments)] // weights, gradients, cache, loss scales and the two sides of the gradient
    fn moa_backward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        gw: &mut DenseLayerWeights,
        cache: &BlockCache,
        scales: LossScales,
        dout_td: &[f32],
        dn_td: &mut [f32],
    ) -> Result<(), ModelError> {
        let shards = self.dims.shards;
        let gbias = gw.attn_bias.as_mut().expect("MoA layers have an output bias");
        for row in dout_td.chunks_exact(self.dims.d) {
            add_into(gbias, row);
        }
        let dout_ad = if shards > 1 { self.shards.gather_rows(dout_td)? } else { dout_td.to_vec() };
        let all_td = if shards > 1 { &cache.attn_in_ad } else { &cache.attn_in_td };
        let x = MoaInput { own_td: &cache.attn_in_td, all_td };
        let mut dn_ad = vec![0.0; dout_ad.len()];
        let dx = MoaInputGrads { own_td: &mut *dn_td, all_td: &mut dn_ad };
        let experts = AttnExperts { executor: &mut *self.experts, layer };
        let scales = scales.router();
        moa_backward(self.cfg, self.rope, (w, gw), &cache.moa, x, &dout_ad, scales, dx, self.shards, experts)?;
        let dn_own = if shards > 1 { self.shards.reduce_scatter_rows(&dn_ad)? } else { dn_ad };
        add_into(dn_td, &dn_own);
        Ok(())
    }

    /// One block forward; returns its output and what backward needs.
    fn block_forward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        x_td: Vec<f32>,
        prev_logits_te: Option<&[f32]>,
    ) -> Result<(Vec<f32>, BlockCache), ModelError> {
        let cfg = self.cfg;
        let (t, d) = (self.dims.t, self.dims.d);
        let modal = self.modal;
        let moe_layer = MoeLayer { cfg, layer, w, prev_logits_te, modality_t: &modal.own_ids };
        let mut cache = BlockCache {
            x_td,
            attn_in_td: vec![0.0; t * d],
            attn_rstd_t: vec![0.0; t],
            q_tq: Vec::new(),
            k_tg: Vec::new(),
            v_tg: Vec::new(),
            head_norms: HeadNorms::default(),
            probs: Vec::new(),
            attn_tq: Vec::new(),
            attn_in_ad: Vec::new(),
            h_td: Vec::new(),
            ffn_in_td: Vec::new(),
            ffn_rstd_t: Vec::new(),
            moe: MoeCache::default(),
            dense_ffn: Vec::new(),
            moa: MoaCache::default(),
            head_gates: HeadGates::default(),
            shard_gates: Vec::new(),
        };
        let attn_norm = w.modal(ModalTensor::AttnNorm);
        self.modal.own.rmsnorm_forward(
            &cache.x_td,
            &attn_norm,
            cfg.norm_eps,
            &mut cache.attn_in_td,
            &mut cache.attn_rstd_t,
        );
        // BAM: the MoE reads the same normalised input as attention, so its
        // rows may leave before attention runs.
        let is_moe = cfg.is_moe_layer(layer);
        let early = cfg.block == BlockKind::Parallel && self.attention_during_moe && is_moe;
        let mut moe_started = None;
        if early {
            cache.ffn_in_td = cache.attn_in_td.clone();
            moe_started = Some(moe_forward_start(moe_layer, &cache.ffn_in_td, t, self.experts, self.shards)?);
        }
        let attn_in_td = std::mem::take(&mut cache.attn_in_td);
        let attn_td = self.attention_forward(layer, w, &attn_in_td, &mut cache)?;
        cache.attn_in_td = attn_in_td;
        let mut out_td = cache.x_td.clone();
        add_into(&mut out_td, &attn_td);
        let moe_started = match moe_started {
            Some(started) => started,
            None => {
                match cfg.block {
                    BlockKind::Sequential => {
                        let ffn_norm = w.modal(ModalTensor::FfnNorm);
                        cache.h_td = out_td.clone();
                        cache.ffn_in_td = vec![0.0; t * d];
                        cache.ffn_rstd_t = vec![0.0; t];
                        let (y, rstd) = (&mut cache.ffn_in_td, &mut cache.ffn_rstd_t);
                        self.modal.own.rmsnorm_forward(&cache.h_td, &ffn_norm, cfg.norm_eps, y, rstd);
                    }
                    BlockKind::Parallel => cache.ffn_in_td = cache.attn_in_td.clone(),
                }
                if w.dense_ffn.is_some() {
                    // A dense layer: one SwiGLU FFN where the MoE would be.
                    let mut ffn_td = vec![0.0; t * d];
                    let ffn = SwiGlu { d, f: cfg.dense_ffn_width() };
                    cache.dense_ffn = self.modal.own.swiglu_forward(ffn, &w.modal_ffn(), &cache.ffn_in_td, &mut ffn_td);
                    add_into(&mut out_td, &ffn_td);
                    return Ok((out_td, cache));
                }
                moe_forward_start(moe_layer, &cache.ffn_in_td, t, self.experts, self.shards)?
            }
        };
        let (moe_td, moe) = moe_forward_finish(moe_layer, &cache.ffn_in_td, moe_started, self.experts)?;
        add_into(&mut out_td, &moe_td);
        cache.moe = moe;
        Ok((out_td, cache))
    }

    /// One block backward: returns `d loss / d x` of the block's input.
    #[allow(clippy::too_many_arguments)] // the block's weights, cache and router links, each its own thing
    fn block_backward(
        &mut self,
        layer: usize,
        w: &DenseLayerWeights,
        gw: &mut DenseLayerWeights,
        mut cache: BlockCache,
        scales: LossScales,
        dout_td: Vec<f32>,
        links: RouterLinks<'_>,
    ) -> Result<Vec<f32>, ModelError> {
        // The dense FFN's backward spends its caches, and the MoE's its expert
        // outputs (their buffers become its scratch).
        let dense_ffn = std::mem::take(&mut cache.dense_ffn);
        let y_ad = std::mem::take(&mut cache.moe.y_ad);
        let cache = &cache;
        let cfg = self.cfg;
        let (t, d) = (self.dims.t, self.dims.d);
        let RouterLinks { prev_logits_te, dlogits_in_te, dprev_logits_te } = links;
        let modal = self.modal;
        let moe_layer = MoeLayer { cfg, layer, w, prev_logits_te, modality_t: &modal.own_ids };
        let moe_in = MoeBackwardInput { x_td: &cache.ffn_in_td, cache: &cache.moe, dout_td: &dout_td };
        // Both residual branches see dout; the skip path passes it through,
        // so dx starts as dout, in dout's own buffer once nothing else reads
        // it; dn is the gradient of the attention's normalised input.
        let (mut dx_td, dn_td) = match cfg.block {
            BlockKind::Sequential => {
                // out = h + MoE(RMSNorm(h)): dh = dout + RMSNorm'(dmoe_in).
                let mut dffn_in_td = vec![0.0; t * d];
                if w.dense_ffn.is_some() {
                    self.dense_ffn_backward(w, gw, (&cache.ffn_in_td, dense_ffn), &dout_td, &mut dffn_in_td);
                } else {
                    let grads = MoeGrads { gw: &mut *gw, dx_td: &mut dffn_in_td, dlogits_in_te, dprev_logits_te };
                    moe_backward(moe_layer, (moe_in, y_ad), scales.router(), grads, self.experts)?;
                }
                let (ffn_norm, mut gffn_norm) = (w.modal(ModalTensor::FfnNorm), gw.modal_mut(ModalTensor::FfnNorm));
                let x = (&cache.h_td[..], &cache.ffn_rstd_t[..]);
                let mut dh_td = dout_td;
                self.modal.own.rmsnorm_backward(x, &ffn_norm, &dffn_in_td, &mut dh_td, &mut gffn_norm);
                // h = x + Attn(n): the attention branch sees dh, and so does the
                // skip path. dn takes the spent dffn_in's buffer (one [t, d]
                // less at the pass's peak, which is in the MoE backward above).
                let mut dn_td = dffn_in_td;
                dn_td.fill(0.0);
                self.attention_backward(layer, w, gw, cache, scales, &dh_td, &mut dn_td)?;
                (dh_td, dn_td)
            }
            BlockKind::Parallel if w.dense_ffn.is_some() => {
                let mut dn_td = vec![0.0; t * d];
                self.attention_backward(layer, w, gw, cache, scales, &dout_td, &mut dn_td)?;
                self.dense_ffn_backward(w, gw, (&cache.ffn_in_td, dense_ffn), &dout_td, &mut dn_td);
                (dout_td, dn_td)
            }
            BlockKind::Parallel => {
                let mut dn_td = vec![0.0; t * d];
                // Attention's input gradient first, then the MoE's, in both
                // orders of work, so overlapping them changes no bits.
                let (started, y_ad) = if self.attention_during_moe {
                    (Some(moe_backward_start(moe_layer, moe_in, y_ad, self.experts)?), Vec::new())
                } else {
                    (None, y_ad)
                };
                self.attention_backward(layer, w, gw, cache, scales, &dout_td, &mut dn_td)?;
                let started = match started {
                    Some(started) => started,
                    None => moe_backward_start(moe_layer, moe_in, y_ad, self.experts)?,
                };
                let grads = MoeGrads { gw: &mut *gw, dx_td: &mut dn_td, dlogits_in_te, dprev_logits_te };
                moe_backward_finish(moe_layer, moe_in, scales.router(), grads, started, self.experts)?;
                (dout_td, dn_td)
            }
        };
        let (attn_norm, mut gattn_norm) = (w.modal(ModalTensor::AttnNorm), gw.modal_mut(ModalTensor::AttnNorm));
        let x = (&cache.x_td[..], &cache.attn_rstd_t[..]);
        self.modal.own.rmsnorm_backward(x, &attn_norm, &dn_td, &mut dx_td, &mut gattn_norm);
        Ok(dx_td)
    }

    /// Runs every block; returns the final hidden states and the caches.
    fn trunk_forward(
        &mut self,
        dense: &DenseWeights,
        inputs: &[u32],
        stats: &mut ForwardStats,
    ) -> Result<(Vec<f32>, Vec<BlockCache>), ModelError> {
        let mut x_td = embed(dense, self.dims.d, inputs);
        let mut caches = Vec::with_capacity(self.cfg.n_layers);
        for (layer, w) in dense.layers.iter().enumerate() {
            // Gating residuals read the previous MoE layer's logits.
            let previous_is_moe = layer > self.cfg.first_dense_layers && self.cfg.gating_residuals;
            let prev_logits =
                caches.last().filter(|_| previous_is_moe).map(|c: &BlockCache| &c.moe.routing.logits_te[..]);
            let (out_td, cache) = self.block_forward(layer, w, x_td, prev_logits)?;
            let routing = &cache.moe.routing;
            // MoA's router losses are reported with the FFN router's.
            let attn_routing = &cache.moa.routing;
            // Every shard computes MoH's loss on all tokens: report its part.
            let head_aux = cache.head_gates.aux_loss / self.dims.shards as f32;
            stats.aux_loss.push(routing.aux_loss + attn_routing.aux_loss + head_aux);
            stats.z_loss.push(routing.z_loss + attn_routing.z_loss);
            stats.seq_aux_loss.push(routing.seq_aux_loss);
            if self.cfg.is_moe_layer(layer) {
                stats.tokens_per_expert.push(routing.tokens_per_expert.clone());
                stats.chosen_per_expert.push(routing.chosen_per_expert.clone());
            } else {
                // A dense layer: every layer keeps its row of counts (zeros).
                stats.tokens_per_expert.push(vec![0; self.cfg.n_experts]);
                stats.chosen_per_expert.push(vec![0; self.cfg.n_router_outputs()]);
            }
            stats.free_assignments.push(routing.free_assignments);
            if let Some(load) = self.attention_load(&cache) {
                stats.attn_load.push(load);
            }
            stats.dropped.push(routing.dropped);
            caches.push(cache);
            x_td = out_td;
        }
        Ok((x_td, caches))
    }
}

impl Pass<'_> {
    /// The layer's attention choices by this rank's tokens: per MoA expert,
    /// or per MoH routed head (every shard has every token's gates: its own
    /// slice counts); None with dense attention.
    fn attention_load(&self, cache: &BlockCache) -> Option<Vec<usize>> {
        let cfg = self.cfg;
        if cfg.is_moa() {
            return Some(cache.moa.routing.chosen_per_expert.clone());
        }
        if !cfg.is_moh() {
            return None;
        }
        let (h, hs, t) = (cfg.n_heads, cfg.attn_shared_heads, self.dims.t);
        let own = &cache.head_gates.gates_th[self.shards.index() * t * h..(self.shards.index() + 1) * t * h];
        let mut load = vec![0; h - hs];
        for gates in own.chunks_exact(h) {
            load.iter_mut().zip(&gates[hs..]).for_each(|(c, &g)| *c += (g != 0.0) as usize);
        }
        Some(load)
    }
}

impl Pass<'_> {
    /// Backward of a dense layer's FFN (`first_dense_layers`, one per
    /// modality): adds its input's gradient into `dffn_in_td` and its
    /// weights' into `gw`.
    fn dense_ffn_backward(
        &self,
        w: &DenseLayerWeights,
        gw: &mut DenseLayerWeights,
        x: (&[f32], Vec<SwigluCache>),
        dout_td: &[f32],
        dffn_in_td: &mut [f32],
    ) {
        let ffn = SwiGlu { d: self.cfg.d_model, f: self.cfg.dense_ffn_width() };
        self.modal.own.swiglu_backward((ffn, &w.modal_ffn()), x, dout_td, dffn_in_td, &mut gw.modal_ffn_mut());
    }
}

/// Qwen3's query and key head norms of one attention call (`qk_norm`):
/// every head row RMS-normalised with the layer's `q_norm` / `k_norm`
/// weights. Keeps the raw projections and each row's 1/rms for backward
/// (all empty for a layer without head norms).
#[derive(Debug, Clone, Default)]
pub(crate) struct HeadNorms {
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    q_rstd: Vec<f32>,
    k_rstd: Vec<f32>,
}

impl HeadNorms {
    /// Normalises `q` and `k` in place when layer `w` has head norms.
    pub(crate) fn forward(w: &DenseLayerWeights, eps: f32, q: &mut Vec<f32>, k: &mut Vec<f32>) -> Self {
        let (Some(wq), Some(wk)) = (&w.q_norm, &w.k_norm) else { return Self::default() };
        let norm = |x: &[f32], weight: &[f32]| {
            let mut y = vec![0.0; x.len()];
            let mut rstd = vec![0.0; x.len() / weight.len()];
            rmsnorm_forward(x, weight, eps, &mut y, &mut rstd);
            (y, rstd)
        };
        let (q_raw, k_raw) = (std::mem::take(q), std::mem::take(k));
        let (q_rstd, k_rstd);
        (*q, q_rstd) = norm(&q_raw, wq);
        (*k, k_rstd) = norm(&k_raw, wk);
        Self { q_raw, k_raw, q_rstd, k_rstd }
    }

    /// Backward: turns the gradients of the normalised `q` and `k` into the
    /// raw projections' and adds the norm weights' into `gw`.
    pub(crate) fn backward(
        &self,
        w: &DenseLayerWeights,
        gw: &mut DenseLayerWeights,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
    ) {
        let (Some(wq), Some(wk), Some(gq), Some(gk)) = (&w.q_norm, &w.k_norm, &mut gw.q_norm, &mut gw.k_norm) else {
            return;
        };
        for (raw, weight, rstd, d, g) in
            [(&self.q_raw, wq, &self.q_rstd, dq, gq), (&self.k_raw, wk, &self.k_rstd, dk, gk)]
        {
            let mut d_raw = vec![0.0; d.len()];
            rmsnorm_backward(raw, weight, rstd, d, &mut d_raw, g);
            *d = d_raw;
        }
    }
}

/// Per-head values `[a, heads of this shard]` of every attention shard put
/// together: `[a, n_heads]` (summed over the group, each shard's block of
/// heads zero elsewhere).
fn all_heads(shards: &mut dyn TokenShards, n_heads: usize, local_th: &[f32]) -> Result<Vec<f32>, ModelError> {
    let (count, index) = (shards.count(), shards.index());
    if count == 1 {
        return Ok(local_th.to_vec());
    }
    let per = n_heads / count;
    let mut all = vec![0.0f32; local_th.len() * count];
    for (row, local) in all.chunks_exact_mut(n_heads).zip(local_th.chunks_exact(per)) {
        row[index * per..(index + 1) * per].copy_from_slice(local);
    }
    sum_over_group(shards, &mut all)?;
    Ok(all)
}

/// MoH: the head outputs `[t, heads * hd]` times their gates `[t, heads]`
/// (None without gates).
fn gate_heads(attn_tq: &[f32], gates_th: &[f32]) -> Option<Vec<f32>> {
    if gates_th.is_empty() {
        return None;
    }
    let hd = attn_tq.len() / gates_th.len();
    let mut gated = attn_tq.to_vec();
    for (head, &g) in gated.chunks_exact_mut(hd).zip(gates_th) {
        head.iter_mut().for_each(|v| *v *= g);
    }
    Some(gated)
}

/// Backward of [`gate_heads`]: turns the gated outputs' gradient in
/// `dattn_tq` into the head outputs' (times the gate) and returns the
/// gates' (`dot(dgated, attn)` per token and head); None without gates.
fn ungate_heads(dattn_tq: &mut [f32], attn_tq: &[f32], gates_th: &[f32]) -> Option<Vec<f32>> {
    if gates_th.is_empty() {
        return None;
    }
    let hd = attn_tq.len() / gates_th.len();
    let mut dgates = vec![0.0; gates_th.len()];
    for (((dg, &g), dhead), head) in
        dgates.iter_mut().zip(gates_th).zip(dattn_tq.chunks_exact_mut(hd)).zip(attn_tq.chunks_exact(hd))
    {
        *dg = dhead.iter().zip(head).map(|(a, b)| a * b).sum();
        dhead.iter_mut().for_each(|v| *v *= g);
    }
    Some(dgates)
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// Final norm and LM head: returns (normalised states, rstd, logits).
fn head_forward(cfg: &ModelConfig, dense: &DenseWeights, dims: &Dims, x_td: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, v) = (dims.t, dims.d, cfg.vocab);
    let mut xf_td = vec![0.0; t * d];
    let mut rstd_t = vec![0.0; t];
    rmsnorm_forward(x_td, &dense.norm, cfg.norm_eps, &mut xf_td, &mut rstd_t);
    let mut logits_tv = vec![0.0; t * v];
    matmul_nt(t, d, v, &xf_td, head_weight(dense), &mut logits_tv, false);
    (xf_td, rstd_t, logits_tv)
}

/// Forward and backward of one micro-batch. Gradients of dense tensors are
/// ADDED into `grads`; expert gradients go wherever `experts` keeps them.
pub fn forward_backward(
    cfg: &ModelConfig,
    rope: &RopeTable,
    dense: &DenseWeights,
    grads: &mut DenseWeights,
    experts: &mut dyn ExpertExecutor,
    mb: MicroBatch,
    scales: LossScales,
) -> Result<ForwardStats, ModelError> {
    let inputs = PassInputs { cfg, rope, dense, mb, scales };
    forward_backward_with(inputs, grads, experts, &mut NoShards, PassOptions::default())
}

/// What one micro-batch's pass reads: the model, its dense weights, the
/// tokens and how the losses are scaled.
#[derive(Clone, Copy)]
pub struct PassInputs<'a> {
    pub cfg: &'a ModelConfig,
    pub rope: &'a RopeTable,
    pub dense: &'a DenseWeights,
    pub mb: MicroBatch<'a>,
    pub scales: LossScales,
}

/// [`forward_backward`] of this rank's shard of the micro-batch (its slice
/// of the tokens, its heads: `dense` holds only those, the CE of its
/// tokens), with the order of work and hooks of `opts`.
pub fn forward_backward_with(
    inputs: PassInputs,
    grads: &mut DenseWeights,
    experts: &mut dyn ExpertExecutor,
    shards: &mut dyn TokenShards,
    mut opts: PassOptions,
) -> Result<ForwardStats, ModelError> {
    let PassInputs { cfg, rope, dense, mb, scales } = inputs;
    let (inputs, targets) = inputs_and_targets(cfg, mb)?;
    let dims = Dims::new(cfg, mb.batch, shards.count())?;
    let (t, d, v) = (dims.t, dims.d, cfg.vocab);
    let mine = shards.index() * t..(shards.index() + 1) * t;
    let modal = PassModalities::new(cfg, &input_modalities(cfg, mb)?, dims.a, mine.clone());
    let (inputs, targets) = (&inputs[mine.clone()], &targets[mine]);
    let mut stats = ForwardStats { num_tokens: t, ..Default::default() };
    let attention_during_moe = opts.attention_during_moe;
    let mut pass = Pass { cfg, rope, dims, experts, shards, attention_during_moe, modal: &modal };
    let forward = tracing::info_span!("forward", tokens = t).entered();
    let (x_td, caches) = pass.trunk_forward(dense, inputs, &mut stats)?;
    let (xf_td, rstd_t, logits_tv) = head_forward(cfg, dense, &pass.dims, &x_td);
    drop(forward);
    let _backward = tracing::info_span!("backward", tokens = t).entered();
    let mut dlogits_tv = vec![0.0; t * v];
    stats.ce_sum = cross_entropy_forward_backward(&logits_tv, targets, v, scales.ce, &mut dlogits_tv);
    drop(logits_tv);

    // Head: logits = xf W^T → dW += dlogits^T xf, dxf = dlogits W.
    let head_grad = grads.output.as_mut().unwrap_or(&mut grads.tok_embeddings);
    matmul_tn(v, t, d, &dlogits_tv, &xf_td, head_grad, true);
    let mut dxf_td = vec![0.0; t * d];
    matmul_nn(t, v, d, &dlogits_tv, head_weight(dense), &mut dxf_td, false);
    drop(dlogits_tv);
    let mut dx_td = vec![0.0; t * d];
    rmsnorm_backward(&x_td, &dense.norm, &rstd_t, &dxf_td, &mut dx_td, &mut grads.norm);
    // Not needed by the layers' backward, where the pass peaks.
    drop((x_td, xf_td, rstd_t, dxf_td));

    // Gating residuals: the gradient of layer l-1's logits, from layer l.
    let mut dlogits_in: Option<Vec<f32>> = None;
    // Each layer's cache is freed once its backward has run.
    let mut caches = caches;
    while let Some(cache) = caches.pop() {
        let layer = caches.len();
        let (w, gw) = (&dense.layers[layer], &mut grads.layers[layer]);
        let previous_is_moe = layer > cfg.first_dense_layers && cfg.gating_residuals;
        let prev = previous_is_moe.then(|| &caches[layer - 1].moe.routing.logits_te[..]);
        let mut dprev = prev.map(|p| vec![0.0; p.len()]);
        let links = RouterLinks {
            prev_logits_te: prev,
            dlogits_in_te: dlogits_in.as_deref(),
            dprev_logits_te: dprev.as_deref_mut(),
        };
        dx_td = pass.block_backward(layer, w, gw, cache, scales, dx_td, links)?;
        dlogits_in = dprev;
        if let Some(hook) = opts.on_layer_grads.as_mut() {
            hook(layer, gw);
        }
    }
    // Embedding rows receive the gradient of every position that used them.
    for (pos, &tok) in inputs.iter().enumerate() {
        let row = tok as usize * d;
        add_into(&mut grads.tok_embeddings[row..row + d], &dx_td[pos * d..pos * d + d]);
    }
    Ok(stats)
}

/// Forward only: the logits `[batch * seq_len, vocab]` of a micro-batch
/// (what `switchyard eval --logits-out` writes, to compare with other tools).
pub fn forward_logits(
    cfg: &ModelConfig,
    rope: &RopeTable,
    dense: &DenseWeights,
    experts: &mut dyn ExpertExecutor,
    mb: MicroBatch,
) -> Result<Vec<f32>, ModelError> {
    let (inputs, _) = inputs_and_targets(cfg, mb)?;
    let dims = Dims::new(cfg, mb.batch, 1)?;
    let mut stats = ForwardStats::default();
    let modal = PassModalities::new(cfg, &input_modalities(cfg, mb)?, dims.a, 0..dims.t);
    let mut pass = Pass { cfg, rope, dims, experts, shards: &mut NoShards, attention_during_moe: false, modal: &modal };
    let (x_td, _caches) = pass.trunk_forward(dense, &inputs, &mut stats)?;
    Ok(head_forward(cfg, dense, &pass.dims, &x_td).2)
}

/// Forward only (evaluation): returns the stats with `ce_sum` filled in.
pub fn forward(
    cfg: &ModelConfig,
    rope: &RopeTable,
    dense: &DenseWeights,
    experts: &mut dyn ExpertExecutor,
    mb: MicroBatch,
) -> Result<ForwardStats, ModelError> {
    forward_with(cfg, (rope, dense), experts, mb, &mut NoShards)
}

/// [`forward`] of this rank's shard of a micro-batch (validation during
/// training): `dense` holds this rank's heads, `ce_sum` is its tokens'.
pub fn forward_with(
    cfg: &ModelConfig,
    (rope, dense): (&RopeTable, &DenseWeights),
    experts: &mut dyn ExpertExecutor,
    mb: MicroBatch,
    shards: &mut dyn TokenShards,
) -> Result<ForwardStats, ModelError> {
    let (inputs, targets) = inputs_and_targets(cfg, mb)?;
    let dims = Dims::new(cfg, mb.batch, shards.count())?;
    let mine = shards.index() * dims.t..(shards.index() + 1) * dims.t;
    let mut stats = ForwardStats { num_tokens: dims.t, ..Default::default() };
    let modal = PassModalities::new(cfg, &input_modalities(cfg, mb)?, dims.a, mine.clone());
    let mut pass = Pass { cfg, rope, dims, experts, shards, attention_during_moe: false, modal: &modal };
    let _forward = tracing::info_span!("forward", tokens = pass.dims.t, validation = true).entered();
    let (x_td, _caches) = pass.trunk_forward(dense, &inputs[mine.clone()], &mut stats)?;
    let (_, _, logits_tv) = head_forward(cfg, dense, &pass.dims, &x_td);
    stats.ce_sum = cross_entropy_sum(&logits_tv, &targets[mine], cfg.vocab);
    Ok(stats)
}
