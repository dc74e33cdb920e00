//! `switchyard ckpt export --format hf`: a committed step as a Hugging Face
//! model folder (`config.json`, `model.safetensors`, `generation_config.json`,
//! the tokenizer when the run had one), in the `transformers` architecture
//! that computes the same function: Mixtral, Qwen2-MoE, or for DeepSeek-V3
//! routing GLM-4-MoE (DeepSeek-V3's router with grouped-query attention),
//! for attention experts JetMoE.
//! A model no `transformers` architecture computes exactly is refused,
//! naming the config key, and nothing is written (docs/interop.md).

use anyhow::{anyhow, bail, Context, Result};
use checkpoint::{is_optimizer_state, TensorRef};
use model::{BlockKind, ModelConfig, RouterScoreKind};
use serde_json::json;
use std::path::{Path, PathBuf};
use worker::JobConfig;

use crate::ckpt::open_step;
use crate::format::human_bytes;

/// The `transformers` architecture an export uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// `MixtralForCausalLM`: softmax top-k, gates renormalised, no shared experts.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: a gated shared expert, gates renormalised or
    /// not, dense first layers (`mlp_only_layers`).
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: softmax top-k with per-head query/key norms,
    /// no shared expert, gates renormalised or not, dense first layers.
    Qwen3Moe,
    /// `Glm4MoeForCausalLM`: DeepSeek-V3's router (sigmoid scores, the
    /// selection bias `e_score_correction_bias`, groups, scaling factor),
    /// ungated shared experts, dense first layers, and grouped-query
    /// attention (DeepSeek-V3's own model needs latent attention).
    Glm4Moe,
    /// `JetMoeForCausalLM`: attention experts (MoA) and FFN experts with one
    /// expert count and top-k, softmax over the top-k logits.
    JetMoe,
}

impl HfArch {
    fn model_type(self) -> &'static str {
        match self {
            HfArch::Mixtral => "mixtral",
            HfArch::Qwen2Moe => "qwen2_moe",
            HfArch::Qwen3Moe => "qwen3_moe",
            HfArch::Glm4Moe => "glm4_moe",
            HfArch::JetMoe => "jetmoe",
        }
    }

    fn class(self) -> &'static str {
        match self {
            HfArch::Mixtral => "MixtralForCausalLM",
            HfArch::Qwen2Moe => "Qwen2MoeForCausalLM",
            HfArch::Qwen3Moe => "Qwen3MoeForCausalLM",
            HfArch::Glm4Moe => "Glm4MoeForCausalLM",
            HfArch::JetMoe => "JetMoeForCausalLM",
        }
    }
}

/// The architecture that computes `cfg`'s forward pass exactly, or why none
/// does (naming the `[model]` key).
pub fn choose(cfg: &ModelConfig) -> std::result::Result<HfArch, String> {
    if cfg.block == BlockKind::Parallel {
        return Err("[model] block = \"parallel\": no transformers decoder adds attention and MoE read from one \
                    norm (BAM blocks)"
            .into());
    }
    if cfg.computation_free_experts() > 0 || cfg.gating_residuals || cfg.router_mlp {
        return Err("MoE++ ([model] constant_experts, copy_experts, zero_experts, gating_residuals, router_mlp) \
                    has no transformers architecture"
            .into());
    }
    let deepseek_routing = cfg.expert_bias || cfg.n_groups > 1 || cfg.routed_scaling_factor != 1.0;
    if cfg.is_mot() {
        return Err(format!(
            "[model] modalities = {}: no transformers architecture unties its weights by modality \
             (Mixture-of-Transformers ships its own modeling code)",
            cfg.modalities
        ));
    }
    if cfg.is_moh() {
        return Err("[model] attention = \"moh\": no transformers architecture gates its attention heads \
                    (MoH's models ship their own modeling code)"
            .into());
    }
    if cfg.is_moa() {
        return choose_jetmoe(cfg, deepseek_routing);
    }
    if cfg.router_score == RouterScoreKind::Sigmoid {
        if cfg.shared_expert_gate {
            return Err("DeepSeek-V3 routing with [model] shared_expert_gate: GLM-4-MoE (the transformers model \
                        with DeepSeek-V3's router and grouped-query attention) does not gate its shared experts"
                .into());
        }
        if cfg.n_groups > 1 && cfg.group_size() < 2 {
            return Err("[model] n_groups = n_experts: GLM-4-MoE scores a group by its two best experts, so \
                        groups need 2 experts or more"
                .into());
        }
        return Ok(HfArch::Glm4Moe);
    }
    if cfg.qk_norm {
        if cfg.n_shared_experts > 0 || deepseek_routing {
            return Err("[model] qk_norm with softmax routing and n_shared_experts or DeepSeek-V3 routing keys: \
                        Qwen3-MoE (the transformers model with query/key norms and a softmax router) has no shared \
                        expert, bias or groups; GLM-4-MoE takes qk_norm with router_score = \"sigmoid\""
                .into());
        }
        return Ok(HfArch::Qwen3Moe);
    }
    if deepseek_routing {
        return Err("DeepSeek-V3 routing ([model] expert_bias, n_groups, routed_scaling_factor) with \
                    router_score = \"softmax\": the transformers models with those (GLM-4-MoE; DeepSeek-V3 needs \
                    latent attention) score by sigmoid; set router_score = \"sigmoid\""
            .into());
    }
    if cfg.n_shared_experts > 0 && !cfg.shared_expert_gate {
        return Err("[model] n_shared_experts without shared_expert_gate: transformers' Qwen2-MoE gates its shared \
                    expert by sigmoid(w_g . x), and its shared-expert models with ungated ones (DeepSeek) use \
                    another attention"
            .into());
    }
    if cfg.n_shared_experts > 0 || !cfg.norm_topk_prob || cfg.first_dense_layers > 0 {
        if cfg.n_shared_experts == 0 {
            return Err("[model] norm_topk_prob = false or first_dense_layers > 0 without a shared expert: \
                        Qwen2-MoE (the transformers model with those) always has a gated shared expert; set \
                        norm_topk_prob = true for Mixtral, or add n_shared_experts with shared_expert_gate"
                .into());
        }
        return Ok(HfArch::Qwen2Moe);
    }
    Ok(HfArch::Mixtral)
}

/// JetMoE is the one transformers model with attention experts; what it
/// cannot express is refused naming the key.
fn choose_jetmoe(cfg: &ModelConfig, deepseek_routing: bool) -> std::result::Result<HfArch, String> {
    let jetmoe = "JetMoE (the transformers model with attention experts)";
    if cfg.attn_experts != cfg.n_experts || cfg.attn_top_k != cfg.top_k {
        return Err(format!(
            "[model] attn_experts = {} and attn_top_k = {} differ from n_experts = {} and top_k = {}: {jetmoe} \
             has one expert count and top-k for both",
            cfg.attn_experts, cfg.attn_top_k, cfg.n_experts, cfg.top_k
        ));
    }
    if cfg.n_kv_heads != cfg.n_heads {
        return Err(format!(
            "[model] n_kv_heads = {} is not n_heads = {}: {jetmoe} gives each expert as many query heads as there \
             are key/value heads",
            cfg.n_kv_heads, cfg.n_heads
        ));
    }
    if cfg.norm_eps != 1e-6 {
        return Err(format!(
            "[model] norm_eps = {}: {jetmoe} normalises inside its blocks with eps 1e-6 whatever its config says",
            cfg.norm_eps
        ));
    }
    let unsupported = [
        ("router_score = \"sigmoid\"", cfg.router_score == RouterScoreKind::Sigmoid),
        ("expert_bias, n_groups or routed_scaling_factor", deepseek_routing),
        ("norm_topk_prob = false", !cfg.norm_topk_prob),
        ("n_shared_experts", cfg.n_shared_experts > 0),
        ("first_dense_layers", cfg.first_dense_layers > 0),
        ("qk_norm", cfg.qk_norm),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!("[model] {key} with attention experts: {jetmoe} has no such option"));
    }
    Ok(HfArch::JetMoe)
}

/// One tensor of the export.
struct HfTensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Takes a switchyard tensor out of the step's tensors, or says which is missing.
fn take(tensors: &mut checkpoint::LoadedTensors, name: &str, url: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    tensors.remove(name).ok_or_else(|| {
        anyhow!("{url} has no tensor `{name}`: the checkpoint does not hold every tensor of its model (every expert is exported once; a missing one is an error)")
    })
}

/// transformers' names of a SwiGLU's w1, w3 and w2 (Llama's MLP).
const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// A SwiGLU's w1, w3 and w2 from the step's tensors under `from`.
fn swiglu(t: &mut checkpoint::LoadedTensors, from: &str, url: &str) -> Result<[(Vec<usize>, Vec<f32>); 3]> {
    Ok([
        take(t, &format!("{from}.w1.weight"), url)?,
        take(t, &format!("{from}.w3.weight"), url)?,
        take(t, &format!("{from}.w2.weight"), url)?,
    ])
}

/// The shared experts of the MoE layer `src` as one SwiGLU: S experts of
/// width F sum to one of width S*F (gate and up rows stacked, down columns
/// side by side). Without shared experts, one of width F of zeros, which
/// adds nothing (GLM-4-MoE always has one).
fn shared_merged(
    cfg: &ModelConfig,
    t: &mut checkpoint::LoadedTensors,
    src: &str,
    url: &str,
) -> Result<[(Vec<usize>, Vec<f32>); 3]> {
    let (d, f, s) = (cfg.d_model, cfg.ffn_hidden, cfg.n_shared_experts);
    let width = s.max(1) * f;
    let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), vec![0.0f32; d * width]);
    for i in 0..s {
        let [g, u, dn] = swiglu(t, &format!("{src}.moe.shared.{i}"), url)?;
        gate.extend(g.1);
        up.extend(u.1);
        for (row, piece) in dn.1.chunks_exact(f).enumerate() {
            down[row * width + i * f..row * width + (i + 1) * f].copy_from_slice(piece);
        }
    }
    gate.resize(width * d, 0.0);
    up.resize(width * d, 0.0);
    Ok([(vec![width, d], gate), (vec![width, d], up), (vec![d, width], down)])
}

/// The Hugging Face tensors of the model, in a fixed order.
fn hf_tensors(cfg: &ModelConfig, arch: HfArch, mut t: checkpoint::LoadedTensors, url: &str) -> Result<Vec<HfTensor>> {
    let mut out = Vec::new();
    let mut put = |name: String, (shape, data): (Vec<usize>, Vec<f32>)| out.push(HfTensor { name, shape, data });
    put("model.embed_tokens.weight".into(), take(&mut t, "tok_embeddings.weight", url)?);
    let hd = cfg.head_dim();
    for l in 0..cfg.n_layers {
        let (src, dst) = (format!("layers.{l}"), format!("model.layers.{l}"));
        if arch == HfArch::JetMoe {
            for HfTensor { name, shape, data } in jetmoe_layer(cfg, &mut t, &src, url)? {
                put(format!("{dst}.{name}"), (shape, data));
            }
            continue;
        }
        put(format!("{dst}.input_layernorm.weight"), take(&mut t, &format!("{src}.attn_norm.weight"), url)?);
        for (ours, theirs) in [("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")] {
            put(format!("{dst}.self_attn.{theirs}.weight"), take(&mut t, &format!("{src}.attn.{ours}.weight"), url)?);
        }
        if arch == HfArch::Qwen2Moe {
            // Qwen2's q, k and v projections have biases: zeros compute ours.
            for (proj, width) in
                [("q_proj", cfg.n_heads * hd), ("k_proj", cfg.n_kv_heads * hd), ("v_proj", cfg.n_kv_heads * hd)]
            {
                put(format!("{dst}.self_attn.{proj}.bias"), (vec![width], vec![0.0; width]));
            }
        }
        if cfg.qk_norm {
            for norm in ["q_norm", "k_norm"] {
                put(format!("{dst}.self_attn.{norm}.weight"), take(&mut t, &format!("{src}.attn.{norm}.weight"), url)?);
            }
        }
        put(format!("{dst}.post_attention_layernorm.weight"), take(&mut t, &format!("{src}.ffn_norm.weight"), url)?);
        let swiglu = |t: &mut checkpoint::LoadedTensors, from: &str| swiglu(t, from, url);
        if !cfg.is_moe_layer(l) {
            // Qwen2-MoE's mlp_only_layers, GLM-4-MoE's first_k_dense_replace: a plain MLP.
            for (name, tensor) in PROJECTIONS.into_iter().zip(swiglu(&mut t, &format!("{src}.ffn"))?) {
                put(format!("{dst}.mlp.{name}.weight"), tensor);
            }
            continue;
        }
        let router = take(&mut t, &format!("{src}.moe.router.weight"), url)?;
        match arch {
            HfArch::JetMoe => unreachable!("JetMoE layers are written whole above"),
            HfArch::Mixtral => {
                put(format!("{dst}.block_sparse_moe.gate.weight"), router);
                for e in 0..cfg.n_experts {
                    let experts = swiglu(&mut t, &format!("{src}.moe.experts.{e}"))?;
                    for (name, tensor) in ["w1", "w3", "w2"].into_iter().zip(experts) {
                        put(format!("{dst}.block_sparse_moe.experts.{e}.{name}.weight"), tensor);
                    }
                }
            }
            // Qwen2-MoE, Qwen3-MoE and GLM-4-MoE name the router and experts alike.
            HfArch::Qwen2Moe | HfArch::Qwen3Moe | HfArch::Glm4Moe => {
                put(format!("{dst}.mlp.gate.weight"), router);
                if arch == HfArch::Glm4Moe {
                    // Without expert_bias, zeros select as switchyard does.
                    let bias = match cfg.expert_bias {
                        true => take(&mut t, &format!("{src}.moe.expert_bias"), url)?,
                        false => (vec![cfg.n_experts], vec![0.0; cfg.n_experts]),
                    };
                    put(format!("{dst}.mlp.gate.e_score_correction_bias"), bias);
                }
                for e in 0..cfg.n_experts {
                    let expert = swiglu(&mut t, &format!("{src}.moe.experts.{e}"))?;
                    for (name, tensor) in PROJECTIONS.into_iter().zip(expert) {
                        put(format!("{dst}.mlp.experts.{e}.{name}.weight"), tensor);
                    }
                }
                if arch == HfArch::Qwen3Moe {
                    continue; // no shared expert
                }
                let shared = if arch == HfArch::Qwen2Moe { "shared_expert" } else { "shared_experts" };
                for (name, tensor) in PROJECTIONS.into_iter().zip(shared_merged(cfg, &mut t, &src, url)?) {
                    put(format!("{dst}.mlp.{shared}.{name}.weight"), tensor);
                }
                if arch == HfArch::Qwen2Moe {
                    put(
                        format!("{dst}.mlp.shared_expert_gate.weight"),
                        take(&mut t, &format!("{src}.moe.shared_gate.weight"), url)?,
                    );
                }
            }
        }
    }
    put("model.norm.weight".into(), take(&mut t, "norm.weight", url)?);
    if !cfg.tie_embeddings {
        put("lm_head.weight".into(), take(&mut t, "output.weight", url)?);
    }
    Ok(out)
}

/// JetMoE's tensors of layer `src` (names inside `model.layers.{l}`): its
/// experts stacked `[E, out, in]`, keys and values in one projection, FFN
/// gate and up rows in one, and an FFN output bias of zeros.
fn jetmoe_layer(cfg: &ModelConfig, t: &mut checkpoint::LoadedTensors, src: &str, url: &str) -> Result<Vec<HfTensor>> {
    let (d, e_n, f, w) = (cfg.d_model, cfg.n_experts, cfg.ffn_hidden, cfg.n_heads * cfg.head_dim());
    let mut take = |name: String| take(t, &name, url).map(|(_, data)| data);
    let mut out = Vec::new();
    let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| out.push(HfTensor { name: name.into(), shape, data });
    put("input_layernorm.weight", vec![d], take(format!("{src}.attn_norm.weight"))?);
    let mut kv = take(format!("{src}.attn.wk.weight"))?;
    kv.extend(take(format!("{src}.attn.wv.weight"))?);
    put("self_attention.kv_proj.weight", vec![kv.len() / d, d], kv);
    let (mut wq, mut wo) = (Vec::new(), Vec::new());
    for e in 0..e_n {
        wq.extend(take(format!("{src}.attn.experts.{e}.wq.weight"))?);
        wo.extend(take(format!("{src}.attn.experts.{e}.wo.weight"))?);
    }
    put("self_attention.experts.input_linear.weight", vec![e_n, w, d], wq);
    put("self_attention.experts.output_linear.weight", vec![e_n, d, w], wo);
    put("self_attention.experts.router.layer.weight", vec![e_n, d], take(format!("{src}.attn.router.weight"))?);
    put("self_attention.experts.bias", vec![d], take(format!("{src}.attn.bias"))?);
    put("post_attention_layernorm.weight", vec![d], take(format!("{src}.ffn_norm.weight"))?);
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    for e in 0..e_n {
        // JetMoE's input_linear computes [gate; up]: silu of the first half.
        gate_up.extend(take(format!("{src}.moe.experts.{e}.w1.weight"))?);
        gate_up.extend(take(format!("{src}.moe.experts.{e}.w3.weight"))?);
        down.extend(take(format!("{src}.moe.experts.{e}.w2.weight"))?);
    }
    put("mlp.input_linear.weight", vec![e_n, 2 * f, d], gate_up);
    put("mlp.output_linear.weight", vec![e_n, d, f], down);
    put("mlp.router.layer.weight", vec![e_n, d], take(format!("{src}.moe.router.weight"))?);
    put("mlp.bias", vec![d], vec![0.0; d]);
    Ok(out)
}

/// `config.json` for `arch`.
fn hf_config(cfg: &ModelConfig, arch: HfArch) -> serde_json::Value {
    let mut c = json!({
        "architectures": [arch.class()],
        "model_type": arch.model_type(),
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": false,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": true,
        "torch_dtype": "float32",
        "sliding_window": null,
    });
    let extra = match arch {
        HfArch::Mixtral => json!({
            "intermediate_size": cfg.ffn_hidden,
            "num_local_experts": cfg.n_experts,
        }),
        HfArch::Qwen2Moe => json!({
            "intermediate_size": cfg.dense_ffn_width(),
            "moe_intermediate_size": cfg.ffn_hidden,
            "shared_expert_intermediate_size": cfg.n_shared_experts * cfg.ffn_hidden,
            "num_experts": cfg.n_experts,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": (0..cfg.first_dense_layers).collect::<Vec<_>>(),
            "use_sliding_window": false,
            "max_window_layers": cfg.n_layers,
        }),
        HfArch::Qwen3Moe => json!({
            "intermediate_size": cfg.dense_ffn_width(),
            "moe_intermediate_size": cfg.ffn_hidden,
            "num_experts": cfg.n_experts,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": (0..cfg.first_dense_layers).collect::<Vec<_>>(),
            "attention_bias": false,
            "use_sliding_window": false,
            "max_window_layers": cfg.n_layers,
        }),
        HfArch::Glm4Moe => json!({
            "intermediate_size": cfg.dense_ffn_width(),
            "moe_intermediate_size": cfg.ffn_hidden,
            "n_routed_experts": cfg.n_experts,
            "n_shared_experts": cfg.n_shared_experts.max(1),
            "routed_scaling_factor": cfg.routed_scaling_factor,
            "n_group": cfg.n_groups,
            "topk_group": cfg.topk_groups,
            "first_k_dense_replace": cfg.first_dense_layers,
            "norm_topk_prob": cfg.norm_topk_prob,
            "partial_rotary_factor": 1.0,
            "attention_bias": false,
            "use_qk_norm": cfg.qk_norm,
            "num_nextn_predict_layers": 0,
        }),
        // JetMoE's query heads per token are the top-k experts' heads.
        HfArch::JetMoe => json!({
            "num_attention_heads": cfg.n_heads * cfg.attn_top_k,
            "kv_channels": cfg.head_dim(),
            "intermediate_size": cfg.ffn_hidden,
            "num_local_experts": cfg.n_experts,
            "activation_function": "silu",
            "aux_loss_coef": cfg.aux_loss_coef,
        }),
    };
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// Writes `tensors` as `model.safetensors`, or in files of at most
/// `max_shard_bytes` with `model.safetensors.index.json` (transformers'
/// layout) when they are larger.
fn write_weights(dir: &Path, tensors: &[HfTensor], max_shard_bytes: u64) -> Result<u64> {
    let mut groups: Vec<Vec<&HfTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let bytes = 4 * t.data.len() as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        size += bytes;
        groups.last_mut().expect("a group").push(t);
    }
    fn refs<'t>(group: &[&'t HfTensor]) -> Vec<TensorRef<'t>> {
        group.iter().map(|t| TensorRef { name: &t.name, shape: &t.shape, data: &t.data }).collect()
    }
    if groups.len() == 1 {
        return Ok(checkpoint::write_safetensors(&dir.join("model.safetensors"), &refs(&groups[0]))?);
    }
    let (mut total, mut map) = (0u64, serde_json::Map::new());
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        total += checkpoint::write_safetensors(&dir.join(&file), &refs(group))?;
        for t in group {
            map.insert(t.name.clone(), json!(file));
        }
    }
    let weights: u64 = tensors.iter().map(|t| 4 * t.data.len() as u64).sum();
    let index = json!({ "metadata": { "total_size": weights }, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    Ok(total)
}

/// Exports the model of a step to the folder `to` (created; an existing
/// folder is refused so nothing is overwritten).
pub fn run(arg: &str, to: &Path, max_shard_bytes: u64) -> Result<()> {
    let (store, step) = open_step(arg)?;
    let url = store.step_url(step);
    let manifest = store.read_manifest(step)?;
    let job: JobConfig = serde_json::from_value(manifest.config.clone())
        .with_context(|| format!("the config saved in {url} cannot be read by this version"))?;
    let cfg = &job.model;
    let arch = choose(cfg).map_err(|reason| anyhow!("cannot export {url} as a Hugging Face model: {reason}"))?;
    if to.exists() {
        bail!("{} already exists: give --to a new folder (nothing was written)", to.display());
    }
    let tensors = store.read_tensors(step, &manifest, |name| !is_optimizer_state(name))?;
    let hf = hf_tensors(cfg, arch, tensors, &url)?;
    // The run's tokenizer: a prepared data folder's copy, or [data] tokenizer.
    let tokenizer = crate::eval::tokenizer_file(&job);
    // Everything goes to a temporary folder first: a failed export leaves nothing.
    let temp = temp_dir_beside(to)?;
    let written = (|| -> Result<u64> {
        std::fs::create_dir_all(&temp)?;
        let bytes = write_weights(&temp, &hf, max_shard_bytes)?;
        std::fs::write(temp.join("config.json"), serde_json::to_string_pretty(&hf_config(cfg, arch))?)?;
        let generation = json!({ "_from_model_config": true, "do_sample": false });
        std::fs::write(temp.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
        if let Some(file) = &tokenizer {
            std::fs::copy(file, temp.join("tokenizer.json"))
                .with_context(|| format!("cannot copy the run's tokenizer {}", file.display()))?;
            // Names the class AutoTokenizer should build around tokenizer.json
            // (else it guesses from model_type, e.g. Llama's, which expects <s>).
            let config = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.seq_len,
                "clean_up_tokenization_spaces": false,
            });
            std::fs::write(temp.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
        }
        Ok(bytes)
    })();
    let bytes = match written.and_then(|b| std::fs::rename(&temp, to).map(|_| b).map_err(Into::into)) {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e.context(format!("cannot write the export to {}", to.display())));
        }
    };
    println!(
        "exported {url} as {} ({}): {} tensors, {} in {}",
        arch.class(),
        arch.model_type(),
        hf.len(),
        human_bytes(bytes as f64),
        to.display()
    );
    match &tokenizer {
        Some(file) => println!(
            "tokenizer: {} copied as tokenizer.json: AutoTokenizer.from_pretrained(\"{}\")",
            file.display(),
            to.display()
        ),
        None => {
            println!(
                "tokenizer: bytes (token id = byte value), which transformers has no file for; decode ids yourself"
            )
        }
    }
    if cfg.capacity_factor > 0.0 {
        println!(
            "note: trained with capacity_factor {} (dropped tokens); transformers runs every token through its \
             experts, as `switchyard eval` does",
            cfg.capacity_factor
        );
    }
    println!("load it: AutoModelForCausalLM.from_pretrained(\"{}\")", to.display());
    Ok(())
}

/// A hidden folder next to `to` for the export to be written into.
fn temp_dir_beside(to: &Path) -> Result<PathBuf> {
    let name = to.file_name().ok_or_else(|| anyhow!("--to {} names no folder", to.display()))?;
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id())))
}
