//! Model tensors, their DESIGN section 5 names, and seeded initialisation.
//!
//! The same types hold weights, gradients and optimizer moments. Dense
//! tensors (replicated on every data-parallel rank) and routed experts
//! (owned by the ranks the placement plan names) are kept apart, because
//! they are synchronised over different groups; experts are always keyed by
//! global expert id.

use crate::config::{BlockKind, ModelConfig};
use crate::moe::ExpertKind;
use crate::ops::swiglu::SwiGlu;
use crate::rng::Rng;
use std::collections::BTreeMap;

/// One SwiGLU FFN: `w1, w3: [F, D]`, `w2: [D, F]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    pub w1: Vec<f32>,
    pub w3: Vec<f32>,
    pub w2: Vec<f32>,
}

impl ExpertWeights {
    /// All zeros, for gradients and optimizer moments.
    pub fn zeros(cfg: &ModelConfig) -> Self {
        let n = cfg.ffn_hidden * cfg.d_model;
        Self { w1: vec![0.0; n], w3: vec![0.0; n], w2: vec![0.0; n] }
    }

    fn init(cfg: &ModelConfig, rng: &mut Rng) -> Self {
        Self::init_width(cfg, cfg.ffn_hidden, rng)
    }

    /// A SwiGLU FFN of hidden width `f`.
    fn init_width(cfg: &ModelConfig, f: usize, rng: &mut Rng) -> Self {
        let n = f * cfg.d_model;
        let std = cfg.init_std;
        let out_std = residual_std(cfg);
        Self { w1: rng.normal_vec(n, std), w3: rng.normal_vec(n, std), w2: rng.normal_vec(n, out_std) }
    }
}

/// Lists the tensors of a weights value with their names, in one fixed
/// order, either by `&` or by `&mut` — one definition for both, so the
/// read-only and the mutable lists can never disagree.
macro_rules! list_tensors {
    (expert $w:expr, $prefix:expr, $out:expr, $($m:tt)?) => {{
        let prefix = $prefix;
        $out.push((format!("{prefix}.w1.weight"), & $($m)? $w.w1));
        $out.push((format!("{prefix}.w3.weight"), & $($m)? $w.w3));
        $out.push((format!("{prefix}.w2.weight"), & $($m)? $w.w2));
    }};
    (layer $layer:expr, $iter:ident, $opt:ident, $($m:tt)?) => {{
        let layer = $layer;
        let mut out = vec![("attn_norm.weight".to_string(), & $($m)? layer.attn_norm)];
        // MoA keeps its query and output projections per expert.
        let dense_attention = layer.attn_experts.is_empty();
        if dense_attention {
            out.push(("attn.wq.weight".to_string(), & $($m)? layer.wq));
        }
        out.push(("attn.wk.weight".to_string(), & $($m)? layer.wk));
        out.push(("attn.wv.weight".to_string(), & $($m)? layer.wv));
        if dense_attention {
            out.push(("attn.wo.weight".to_string(), & $($m)? layer.wo));
        }
        for (e, expert) in layer.attn_experts.$iter().enumerate() {
            out.push((format!("attn.experts.{e}.wq.weight"), & $($m)? expert.wq));
            out.push((format!("attn.experts.{e}.wo.weight"), & $($m)? expert.wo));
        }
        if let Some(w) = layer.attn_router.$opt() {
            out.push(("attn.router.weight".to_string(), w));
        }
        if let Some(w) = layer.attn_bias.$opt() {
            out.push(("attn.bias".to_string(), w));
        }
        if let Some(w) = layer.head_router.$opt() {
            out.push(("attn.head_router.weight".to_string(), w));
        }
        if let Some(w) = layer.shared_head_router.$opt() {
            out.push(("attn.shared_head_router.weight".to_string(), w));
        }
        if let Some(w) = layer.head_mix.$opt() {
            out.push(("attn.head_mix.weight".to_string(), w));
        }
        if let Some(w) = layer.q_norm.$opt() {
            out.push(("attn.q_norm.weight".to_string(), w));
        }
        if let Some(w) = layer.k_norm.$opt() {
            out.push(("attn.k_norm.weight".to_string(), w));
        }
        if let Some(w) = layer.ffn_norm.$opt() {
            out.push(("ffn_norm.weight".to_string(), w));
        }
        if let Some(ffn) = layer.dense_ffn.$opt() {
            list_tensors!(expert ffn, "ffn", out, $($m)?);
        } else {
            out.push(("moe.router.weight".to_string(), & $($m)? layer.router));
        }
        for (s, shared) in layer.shared.$iter().enumerate() {
            list_tensors!(expert shared, format!("moe.shared.{s}"), out, $($m)?);
        }
        if let Some(w) = layer.shared_gate.$opt() {
            out.push(("moe.shared_gate.weight".to_string(), w));
        }
        for (j, constant) in layer.constant.$iter().enumerate() {
            out.push((format!("moe.constant.{j}.gate.weight"), & $($m)? constant.gate));
            out.push((format!("moe.constant.{j}.value.weight"), & $($m)? constant.value));
        }
        if let Some(w) = layer.router_residual.$opt() {
            out.push(("moe.router_residual.weight".to_string(), w));
        }
        if let Some(w) = layer.router_hidden.$opt() {
            out.push(("moe.router_hidden.weight".to_string(), w));
        }
        // Mixture-of-Transformers: modality m >= 1's own tensors.
        for (i, modality) in layer.modalities.$iter().enumerate() {
            let prefix = format!("modality.{}", i + 1);
            out.push((format!("{prefix}.attn_norm.weight"), & $($m)? modality.attn_norm));
            out.push((format!("{prefix}.attn.wq.weight"), & $($m)? modality.wq));
            out.push((format!("{prefix}.attn.wk.weight"), & $($m)? modality.wk));
            out.push((format!("{prefix}.attn.wv.weight"), & $($m)? modality.wv));
            out.push((format!("{prefix}.attn.wo.weight"), & $($m)? modality.wo));
            if let Some(w) = modality.ffn_norm.$opt() {
                out.push((format!("{prefix}.ffn_norm.weight"), w));
            }
            if let Some(ffn) = modality.dense_ffn.$opt() {
                list_tensors!(expert ffn, format!("{prefix}.ffn"), out, $($m)?);
            }
        }
        out
    }};
    (dense $w:expr, $iter:ident, $opt:ident, $($m:tt)?) => {{
        let mut out = Vec::new();
        out.push(("tok_embeddings.weight".to_string(), & $($m)? $w.tok_embeddings));
        for (l, layer) in $w.layers.$iter().enumerate() {
            let params = list_tensors!(layer layer, $iter, $opt, $($m)?);
            out.extend(params.into_iter().map(|(part, t)| (format!("layers.{l}.{part}"), t)));
        }
        out.push(("norm.weight".to_string(), & $($m)? $w.norm));
        if let Some(w) = $w.output.$opt() {
            out.push(("output.weight".to_string(), w));
        }
        out
    }};
    (experts $w:expr, $iter:ident, $($m:tt)?) => {{
        let mut out = Vec::new();
        for (l, layer) in $w.layers.$iter().enumerate() {
            for (e, expert) in layer.$iter() {
                list_tensors!(expert expert, format!("layers.{l}.moe.experts.{e}"), out, $($m)?);
            }
        }
        out
    }};
}

/// One MoA attention expert (JetMoE): its query projection `wq: [H*hd, D]`
/// and output projection `wo: [D, H*hd]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnExpertWeights {
    pub wq: Vec<f32>,
    pub wo: Vec<f32>,
}

/// The dense (non-routed) tensors of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayerWeights {
    pub attn_norm: Vec<f32>,
    /// Empty with MoA (each expert has its own `wq`, `wo`).
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    /// MoA's attention experts (`attention = "moa"`; empty otherwise), ...
    pub attn_experts: Vec<AttnExpertWeights>,
    /// ... their router `[Ea, D]` ...
    pub attn_router: Option<Vec<f32>>,
    /// ... and their shared output bias `[D]`.
    pub attn_bias: Option<Vec<f32>>,
    /// MoH's learned router (`attention = "moh"`): routed heads `[Hr, D]`,
    /// shared heads `[Hs, D]` (when `Hs > 1`), two-way weights `[2, D]`
    /// (when `Hs > 0`).
    pub head_router: Option<Vec<f32>>,
    pub shared_head_router: Option<Vec<f32>>,
    pub head_mix: Option<Vec<f32>>,
    /// `[hd]` each: the query and key head norms (`qk_norm` only).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Absent in parallel (BAM) blocks, which share `attn_norm`.
    pub ffn_norm: Option<Vec<f32>>,
    pub router: Vec<f32>,
    pub shared: Vec<ExpertWeights>,
    /// `[1, D]` the shared experts' gate (`shared_expert_gate` only).
    pub shared_gate: Option<Vec<f32>>,
    /// `[R]` the aux-loss-free selection bias (`expert_bias` only; R router
    /// outputs): state the optimizer never touches, so a buffer, not a parameter.
    pub expert_bias: Option<Vec<f32>>,
    /// MoE++'s constant experts (`constant_experts`).
    pub constant: Vec<ConstantExpertWeights>,
    /// `[R, R]` MoE++'s gating residual `W_map` (`gating_residuals`, every
    /// MoE layer but the first).
    pub router_residual: Option<Vec<f32>>,
    /// A dense layer's SwiGLU FFN (`first_dense_layers`); such a layer has
    /// no router (an empty `router`) and none of the MoE's tensors.
    pub dense_ffn: Option<ExpertWeights>,
    /// `[8R, D]` the MLP router's first layer `W_1` (`router_mlp`); `router`
    /// is then its output layer `[R, 8R]`.
    pub router_hidden: Option<Vec<f32>>,
    /// Mixture-of-Transformers: the own tensors of modalities `1..M`
    /// (modality 0's are the fields above); empty with one modality.
    pub modalities: Vec<ModalityWeights>,
}

/// One modality's own tensors of a layer (Mixture-of-Transformers): the
/// attention projections and norms, and a dense layer's FFN. Shapes are
/// those of the layer's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ModalityWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Option<Vec<f32>>,
    pub dense_ffn: Option<ExpertWeights>,
}

/// A tensor every modality has its own copy of (see [`DenseLayerWeights::modal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModalTensor {
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    FfnNorm,
}

/// One MoE++ constant expert: `y = a1 x + a2 v`, `[a1, a2] = softmax(W_c x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantExpertWeights {
    /// `[2, D]` `W_c`.
    pub gate: Vec<f32>,
    /// `[D]` `v`.
    pub value: Vec<f32>,
}

impl DenseLayerWeights {
    /// Tensor `which` of every modality, modality 0 (the layer's own) first.
    pub fn modal(&self, which: ModalTensor) -> Vec<&[f32]> {
        let own: &[f32] = match which {
            ModalTensor::AttnNorm => &self.attn_norm,
            ModalTensor::Wq => &self.wq,
            ModalTensor::Wk => &self.wk,
            ModalTensor::Wv => &self.wv,
            ModalTensor::Wo => &self.wo,
            ModalTensor::FfnNorm => self.ffn_norm.as_deref().expect("sequential blocks have ffn_norm"),
        };
        let others = self.modalities.iter().map(|m| -> &[f32] {
            match which {
                ModalTensor::AttnNorm => &m.attn_norm,
                ModalTensor::Wq => &m.wq,
                ModalTensor::Wk => &m.wk,
                ModalTensor::Wv => &m.wv,
                ModalTensor::Wo => &m.wo,
                ModalTensor::FfnNorm => m.ffn_norm.as_deref().expect("sequential blocks have ffn_norm"),
            }
        });
        std::iter::once(own).chain(others).collect()
    }

    /// [`DenseLayerWeights::modal`], mutable (for gradients).
    pub fn modal_mut(&mut self, which: ModalTensor) -> Vec<&mut [f32]> {
        fn pick<'a>(
            which: ModalTensor,
            [norm, wq, wk, wv, wo]: [&'a mut Vec<f32>; 5],
            ffn_norm: Option<&'a mut Vec<f32>>,
        ) -> &'a mut [f32] {
            match which {
                ModalTensor::AttnNorm => norm,
                ModalTensor::Wq => wq,
                ModalTensor::Wk => wk,
                ModalTensor::Wv => wv,
                ModalTensor::Wo => wo,
                ModalTensor::FfnNorm => ffn_norm.expect("sequential blocks have ffn_norm"),
            }
        }
        let own = pick(
            which,
            [&mut self.attn_norm, &mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo],
            self.ffn_norm.as_mut(),
        );
        let others = self
            .modalities
            .iter_mut()
            .map(|m| pick(which, [&mut m.attn_norm, &mut m.wq, &mut m.wk, &mut m.wv, &mut m.wo], m.ffn_norm.as_mut()));
        std::iter::once(own).chain(others).collect()
    }

    /// A dense layer's FFN of every modality, modality 0 first.
    pub fn modal_ffn(&self) -> Vec<&ExpertWeights> {
        let own = self.dense_ffn.as_ref().expect("dense layers have an FFN");
        let others = self.modalities.iter().map(|m| m.dense_ffn.as_ref().expect("dense layers have an FFN"));
        std::iter::once(own).chain(others).collect()
    }

    /// [`DenseLayerWeights::modal_ffn`], mutable.
    pub fn modal_ffn_mut(&mut self) -> Vec<&mut ExpertWeights> {
        let own = self.dense_ffn.as_mut().expect("dense layers have an FFN");
        let others = self.modalities.iter_mut().map(|m| m.dense_ffn.as_mut().expect("dense layers have an FFN"));
        std::iter::once(own).chain(others).collect()
    }

    /// The layer's parameters with their names inside the layer
    /// (`attn.wq.weight`, ...), in the fixed order every list uses.
    pub fn params(&self) -> Vec<(String, &Vec<f32>)> {
        list_tensors!(layer self, iter, as_ref,)
    }

    /// [`DenseLayerWeights::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        list_tensors!(layer self, iter_mut, as_mut, mut)
    }
}

/// Every tensor replicated across data-parallel ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseWeights {
    pub tok_embeddings: Vec<f32>,
    pub layers: Vec<DenseLayerWeights>,
    pub norm: Vec<f32>,
    /// Absent when `tie_embeddings` (the head reuses `tok_embeddings`).
    pub output: Option<Vec<f32>>,
}

/// Routed experts held by this rank: per layer, global expert id → weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExpertStore {
    pub layers: Vec<BTreeMap<usize, ExpertWeights>>,
}

/// Dense tensors plus the routed experts this rank holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    pub dense: DenseWeights,
    pub experts: ExpertStore,
}

/// A layer's attention tensors and norms, drawn first in every layer,
/// with nothing yet where the MoE or the dense FFN goes.
fn attention_layer(cfg: &ModelConfig, rng: &mut Rng) -> DenseLayerWeights {
    let (d, hd, std) = (cfg.d_model, cfg.head_dim(), cfg.init_std);
    let (q, kv) = (cfg.n_heads * hd * d, cfg.n_kv_heads * hd * d);
    // v1 draws wq, wk, wv, wo; MoA wk, wv, then each expert's wq and wo,
    // then its router (the bias starts at zero).
    let (wq, wk, wv, wo, attn_experts, attn_router, attn_bias) = if cfg.is_moa() {
        let (wk, wv) = (rng.normal_vec(kv, std), rng.normal_vec(kv, std));
        let experts = (0..cfg.attn_experts)
            .map(|_| AttnExpertWeights { wq: rng.normal_vec(q, std), wo: rng.normal_vec(q, residual_std(cfg)) })
            .collect();
        let router = rng.normal_vec(cfg.attn_experts * d, std);
        (Vec::new(), wk, wv, Vec::new(), experts, Some(router), Some(vec![0.0; d]))
    } else {
        let (wq, wk, wv) = (rng.normal_vec(q, std), rng.normal_vec(kv, std), rng.normal_vec(kv, std));
        (wq, wk, wv, rng.normal_vec(q, residual_std(cfg)), Vec::new(), None, None)
    };
    // MoH's routers, drawn after the projections (none for v1).
    let [routed, shared, mix] = cfg.head_router_rows().map(|rows| (rows > 0).then(|| rng.normal_vec(rows * d, std)));
    DenseLayerWeights {
        attn_norm: vec![1.0; d],
        wq,
        wk,
        wv,
        wo,
        attn_experts,
        attn_router,
        attn_bias,
        head_router: routed,
        shared_head_router: shared,
        head_mix: mix,
        q_norm: cfg.qk_norm.then(|| vec![1.0; hd]),
        k_norm: cfg.qk_norm.then(|| vec![1.0; hd]),
        ffn_norm: (cfg.block == BlockKind::Sequential).then(|| vec![1.0; d]),
        router: Vec::new(),
        shared: Vec::new(),
        shared_gate: None,
        expert_bias: None,
        constant: Vec::new(),
        router_residual: None,
        dense_ffn: None,
        router_hidden: None,
        modalities: Vec::new(),
    }
}

/// Mixture-of-Transformers: modalities `1..M`'s own tensors of layer `l`,
/// drawn after the layer's other tensors (so one modality keeps v1's draws)
/// in the order of the layer's own.
fn modality_layers(cfg: &ModelConfig, l: usize, rng: &mut Rng) -> Vec<ModalityWeights> {
    let (d, hd, std) = (cfg.d_model, cfg.head_dim(), cfg.init_std);
    let (q, kv) = (cfg.n_heads * hd * d, cfg.n_kv_heads * hd * d);
    (1..cfg.modalities)
        .map(|_| ModalityWeights {
            attn_norm: vec![1.0; d],
            wq: rng.normal_vec(q, std),
            wk: rng.normal_vec(kv, std),
            wv: rng.normal_vec(kv, std),
            wo: rng.normal_vec(q, residual_std(cfg)),
            ffn_norm: (cfg.block == BlockKind::Sequential).then(|| vec![1.0; d]),
            dense_ffn: (!cfg.is_moe_layer(l)).then(|| ExpertWeights::init_width(cfg, cfg.dense_ffn_width(), rng)),
        })
        .collect()
}

/// One MoE layer's dense tensors, drawn in v1's order (attention, router,
/// shared experts), then the later families' tensors, each only when
/// configured, so that v1 models keep their draws.
fn moe_layer(cfg: &ModelConfig, l: usize, rng: &mut Rng) -> DenseLayerWeights {
    let (d, std, routed) = (cfg.d_model, cfg.init_std, cfg.n_router_outputs());
    let mut layer = attention_layer(cfg, rng);
    layer.router = rng.normal_vec(routed * cfg.router_input_width(), std);
    layer.shared = (0..cfg.n_shared_experts).map(|_| ExpertWeights::init(cfg, rng)).collect();
    layer.shared_gate = cfg.shared_expert_gate.then(|| rng.normal_vec(d, std));
    layer.expert_bias = cfg.expert_bias.then(|| vec![0.0; routed]);
    // MoE++'s reference code draws v from normal(0, 1): the scale of the
    // normalised rows it stands in for.
    layer.constant = (0..cfg.constant_experts)
        .map(|_| ConstantExpertWeights { gate: rng.normal_vec(2 * d, std), value: rng.normal_vec(d, 1.0) })
        .collect();
    // The first MoE layer after the dense ones has no previous logits.
    let has_previous = l > cfg.first_dense_layers;
    layer.router_residual = (cfg.gating_residuals && has_previous).then(|| rng.normal_vec(routed * routed, std));
    layer.router_hidden = cfg.router_mlp.then(|| rng.normal_vec(cfg.router_input_width() * d, std));
    layer
}

/// A dense layer (`first_dense_layers`): attention, then one SwiGLU FFN
/// of width `dense_ffn_hidden`; no router, no experts.
fn dense_ffn_layer(cfg: &ModelConfig, rng: &mut Rng) -> DenseLayerWeights {
    let mut layer = attention_layer(cfg, rng);
    layer.dense_ffn = Some(ExpertWeights::init_width(cfg, cfg.dense_ffn_width(), rng));
    layer
}

/// Output projections (wo, w2) start smaller so the residual stream's
/// variance does not grow with depth (GPT-2's `1/sqrt(2L)`).
fn residual_std(cfg: &ModelConfig) -> f32 {
    cfg.init_std / (2.0 * cfg.n_layers as f32).sqrt()
}

impl DenseWeights {
    /// Seeded initialisation: normal(0, init_std) matrices, ones for norms.
    /// The draw order is fixed (embeddings, then layer by layer), so a seed
    /// gives the same model on any layout.
    pub fn init(cfg: &ModelConfig, rng: &mut Rng) -> Self {
        let d = cfg.d_model;
        let std = cfg.init_std;
        let tok_embeddings = rng.normal_vec(cfg.vocab * d, std);
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let mut layer = if cfg.is_moe_layer(l) { moe_layer(cfg, l, rng) } else { dense_ffn_layer(cfg, rng) };
                layer.modalities = modality_layers(cfg, l, rng);
                layer
            })
            .collect();
        let norm = vec![1.0; d];
        let output = (!cfg.tie_embeddings).then(|| rng.normal_vec(cfg.vocab * d, std));
        Self { tok_embeddings, layers, norm, output }
    }

    /// Every dense tensor with its DESIGN section 5 name, in a fixed order.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        list_tensors!(dense self, iter_mut, as_mut, mut)
    }

    /// [`DenseWeights::tensors_mut`], read-only.
    pub fn tensors(&self) -> Vec<(String, &Vec<f32>)> {
        list_tensors!(dense self, iter, as_ref,)
    }

    /// The non-trained state with its names: each layer's expert bias.
    pub fn buffers(&self) -> Vec<(String, &Vec<f32>)> {
        let biases = self.layers.iter().enumerate();
        biases
            .filter_map(|(l, layer)| Some((format!("layers.{l}.moe.expert_bias"), layer.expert_bias.as_ref()?)))
            .collect()
    }

    /// [`DenseWeights::buffers`], mutable.
    pub fn buffers_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        let biases = self.layers.iter_mut().enumerate();
        biases
            .filter_map(|(l, layer)| Some((format!("layers.{l}.moe.expert_bias"), layer.expert_bias.as_mut()?)))
            .collect()
    }

    /// A zeroed copy with the same structure (for gradients and moments).
    pub fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        for (_, t) in z.tensors_mut() {
            t.fill(0.0);
        }
        for (_, t) in z.buffers_mut() {
            t.fill(0.0);
        }
        z
    }
}

impl ExpertStore {
    /// Seeded experts for the global ids in `owned` (per layer). Each expert
    /// draws from its own stream keyed by (layer, global id), so an expert's
    /// initial weights do not depend on which rank holds it.
    pub fn init(cfg: &ModelConfig, seed: u64, owned: &[Vec<usize>]) -> Self {
        let layers = owned
            .iter()
            .enumerate()
            .map(|(l, ids)| {
                ids.iter()
                    .map(|&e| {
                        let mut rng = Rng::for_stream(seed, &[0xE4, l as u64, e as u64]);
                        (e, ExpertWeights::init(cfg, &mut rng))
                    })
                    .collect()
            })
            .collect();
        Self { layers }
    }

    /// Every expert tensor with its global name, in (layer, id) order.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        list_tensors!(experts self, iter_mut, mut)
    }

    /// [`ExpertStore::tensors_mut`], read-only.
    pub fn tensors(&self) -> Vec<(String, &Vec<f32>)> {
        list_tensors!(experts self, iter,)
    }

    /// A zeroed copy with the same experts.
    pub fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        for (_, t) in z.tensors_mut() {
            t.fill(0.0);
        }
        z
    }
}

impl ModelWeights {
    /// The whole model on one rank: all experts of every layer.
    pub fn init(cfg: &ModelConfig, seed: u64) -> Self {
        let all: Vec<Vec<usize>> = (0..cfg.n_layers).map(|_| (0..cfg.n_experts).collect()).collect();
        Self::init_owned(cfg, seed, &all)
    }

    /// Dense tensors plus only the experts in `owned` (per layer).
    /// Dense layers (`first_dense_layers`) hold no experts whatever the plan says.
    pub fn init_owned(cfg: &ModelConfig, seed: u64, owned: &[Vec<usize>]) -> Self {
        let mut rng = Rng::for_stream(seed, &[0xD0]);
        let owned: Vec<Vec<usize>> = (owned.iter().enumerate())
            .map(|(l, ids)| if cfg.is_moe_layer(l) { ids.clone() } else { Vec::new() })
            .collect();
        Self { dense: DenseWeights::init(cfg, &mut rng), experts: ExpertStore::init(cfg, seed, &owned) }
    }

    /// Every tensor with its name: dense first, then experts.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        let mut out = self.dense.tensors_mut();
        out.extend(self.experts.tensors_mut());
        out
    }

    /// [`ModelWeights::tensors_mut`], read-only.
    pub fn tensors(&self) -> Vec<(String, &Vec<f32>)> {
        let mut out = self.dense.tensors();
        out.extend(self.experts.tensors());
        out
    }

    /// A zeroed copy with the same structure.
    pub fn zeros_like(&self) -> Self {
        Self { dense: self.dense.zeros_like(), experts: self.experts.zeros_like() }
    }
}

/// The global shape of a named tensor under `cfg`, or None for an unknown name.
pub fn tensor_shape(cfg: &ModelConfig, name: &str) -> Option<Vec<usize>> {
    let (d, v, hd) = (cfg.d_model, cfg.vocab, cfg.head_dim());
    let parts: Vec<&str> = name.split('.').collect();
    let shape = match parts.as_slice() {
        ["tok_embeddings", "weight"] | ["output", "weight"] => vec![v, d],
        ["norm", "weight"] => vec![d],
        // Mixture-of-Transformers: a modality's copy has its layer's shape.
        ["layers", l, "modality", m, rest @ ..] => {
            let m: usize = m.parse().ok()?;
            let own =
                matches!(rest, ["attn_norm" | "ffn_norm", "weight"] | ["attn", "wq" | "wk" | "wv" | "wo", "weight"])
                    || matches!(rest, ["ffn", _, "weight"]);
            if !(1..cfg.modalities).contains(&m) || !own {
                return None;
            }
            return tensor_shape(cfg, &format!("layers.{l}.{}", rest.join(".")));
        }
        ["layers", _, rest @ ..] => match rest {
            ["attn_norm", "weight"] | ["ffn_norm", "weight"] => vec![d],
            ["attn", "wq", "weight"] if !cfg.is_moa() => vec![cfg.n_heads * hd, d],
            ["attn", "wk", "weight"] | ["attn", "wv", "weight"] => vec![cfg.n_kv_heads * hd, d],
            ["attn", "wo", "weight"] if !cfg.is_moa() => vec![d, cfg.n_heads * hd],
            ["attn", "q_norm" | "k_norm", "weight"] if cfg.qk_norm => vec![hd],
            ["attn", "experts", _, "wq", "weight"] if cfg.is_moa() => vec![cfg.n_heads * hd, d],
            ["attn", "experts", _, "wo", "weight"] if cfg.is_moa() => vec![d, cfg.n_heads * hd],
            ["attn", "router", "weight"] if cfg.is_moa() => vec![cfg.attn_experts, d],
            ["attn", "bias"] if cfg.is_moa() => vec![d],
            ["attn", "head_router", "weight"] if cfg.head_router_rows()[0] > 0 => vec![cfg.head_router_rows()[0], d],
            ["attn", "shared_head_router", "weight"] if cfg.head_router_rows()[1] > 0 => {
                vec![cfg.head_router_rows()[1], d]
            }
            ["attn", "head_mix", "weight"] if cfg.head_router_rows()[2] > 0 => vec![2, d],
            ["moe", "router", "weight"] => vec![cfg.n_router_outputs(), cfg.router_input_width()],
            ["moe", "router_hidden", "weight"] if cfg.router_mlp => vec![cfg.router_input_width(), d],
            ["moe", "shared_gate", "weight"] if cfg.shared_expert_gate => vec![1, d],
            ["moe", "expert_bias"] if cfg.expert_bias => vec![cfg.n_router_outputs()],
            ["moe", "constant", _, "gate", "weight"] if cfg.constant_experts > 0 => vec![2, d],
            ["moe", "constant", _, "value", "weight"] if cfg.constant_experts > 0 => vec![d],
            ["moe", "router_residual", "weight"] if cfg.gating_residuals => {
                vec![cfg.n_router_outputs(), cfg.n_router_outputs()]
            }
            ["moe", "experts" | "shared", _, part, "weight"] => return SwiGlu::of(cfg).tensor_shape(part),
            ["ffn", part, "weight"] if cfg.first_dense_layers > 0 => {
                return SwiGlu { d, f: cfg.dense_ffn_width() }.tensor_shape(part)
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(shape)
}
