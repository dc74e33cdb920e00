//! `switchyard ckpt import`: a Hugging Face model folder (Llama, Mistral,
//! Qwen2, Qwen3 dense; Mixtral, Qwen2-MoE, Qwen3-MoE) as a switchyard run folder whose
//! checkpoint step 0 holds its weights, ready for `train --resume` on any
//! layout. A dense model becomes an MoE of one expert with top-1 routing
//! (its router's one softmax output is always 1): the same function, and
//! what `ckpt upcycle` starts from. Unsupported architectures, settings
//! and shapes are refused naming the file and key or tensor; nothing is
//! written then (docs/interop.md).

use anyhow::{anyhow, bail, Context, Result};
use checkpoint::CheckpointStore;
use layout::{ParallelDims, PlacementPlan};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use worker::state::{write_snapshot, ShardWrites, TrainState};
use worker::JobConfig;

/// Every tensor of a folder's safetensors files, as f32.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads one safetensors file (F32, BF16 or F16 tensors, converted to f32).
fn read_safetensors(path: &Path, out: &mut Tensors) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bad = |why: &str| anyhow!("{} is not a readable safetensors file: {why}", path.display());
    let header_len = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("shorter than its header"))?.try_into()?);
    let header_end =
        8usize.checked_add(header_len as usize).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("truncated header"))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..header_end]).map_err(|e| bad(&format!("header is not JSON ({e})")))?;
    let data = &bytes[header_end..];
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry["dtype"].as_str().unwrap_or("?");
        let shape: Vec<usize> =
            (entry["shape"].as_array().into_iter().flatten()).filter_map(|v| v.as_u64()).map(|v| v as usize).collect();
        let offsets: Vec<usize> = (entry["data_offsets"].as_array().into_iter().flatten())
            .filter_map(|v| v.as_u64())
            .map(|v| v as usize)
            .collect();
        let [start, end] = offsets[..] else { return Err(bad(&format!("tensor `{name}` has no data_offsets"))) };
        let raw = data
            .get(start..end)
            .ok_or_else(|| bad(&format!("tensor `{name}` runs past the end of the file (truncated?)")))?;
        let count: usize = shape.iter().product();
        let values: Vec<f32> = match dtype {
            "F32" => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            "BF16" => {
                raw.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            "F16" => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => bail!("{}: tensor `{name}` is {other}; import reads F32, BF16 and F16", path.display()),
        };
        if values.len() != count {
            return Err(bad(&format!("tensor `{name}` holds {} values for shape {shape:?}", values.len())));
        }
        out.insert(name, (shape, values));
    }
    Ok(())
}

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let (sign, exp, frac) = ((h >> 15) as u32, ((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, frac) {
        (0, 0) => sign << 31,
        (0, _) => {
            // Subnormal: normalise.
            let shift = frac.leading_zeros() - 21;
            ((sign << 31) | ((127 - 15 - shift + 1) << 23)) | ((frac << shift) & 0x3ff) << 13
        }
        (0x1f, _) => (sign << 31) | (0xff << 23) | (frac << 13),
        _ => (sign << 31) | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// The folder's weights: `model.safetensors`, or the files its index names.
fn read_weights(dir: &Path) -> Result<Tensors> {
    let mut tensors = Tensors::new();
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path)?;
        let index: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index_path.display()))?;
        let mut files: Vec<&str> =
            (index["weight_map"].as_object().into_iter().flatten()).filter_map(|(_, f)| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        for file in files {
            let path = dir.join(file);
            if !path.exists() {
                bail!(
                    "{} names {file}, which is missing from {}: copy the whole model folder",
                    index_path.display(),
                    dir.display()
                );
            }
            read_safetensors(&path, &mut tensors)?;
        }
    } else {
        let single = dir.join("model.safetensors");
        if !single.exists() {
            bail!("{} has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin files are not read: save with safe_serialization=True)", dir.display());
        }
        read_safetensors(&single, &mut tensors)?;
    }
    Ok(tensors)
}

/// A config.json number, or an error naming the key.
fn num(cfg: &Value, key: &str, file: &Path) -> Result<f64> {
    cfg[key].as_f64().ok_or_else(|| anyhow!("{}: `{key}` is missing or not a number", file.display()))
}

/// The switchyard `[model]` settings (as `--set` lines) for a config.json.
fn model_sets(cfg: &Value, file: &Path, seq_len: usize) -> Result<(Vec<String>, Arch)> {
    let model_type = cfg["model_type"].as_str().unwrap_or("?");
    let arch = match model_type {
        "llama" | "mistral" | "qwen2" | "qwen3" => Arch::Dense,
        "mixtral" => Arch::Mixtral,
        "qwen2_moe" => Arch::Qwen2Moe,
        "qwen3_moe" => Arch::Qwen3Moe,
        other => bail!(
            "{}: model_type `{other}` cannot be imported; import reads llama, mistral, qwen2, qwen3 (dense), mixtral, qwen2_moe and qwen3_moe",
            file.display()
        ),
    };
    // Qwen3's query and key head norms.
    let qk_norm = model_type.starts_with("qwen3");
    if cfg["hidden_act"].as_str().is_some_and(|a| a != "silu") {
        bail!("{}: hidden_act `{}`: switchyard's FFN is SwiGLU (silu)", file.display(), cfg["hidden_act"]);
    }
    if !cfg["rope_scaling"].is_null() {
        bail!("{}: rope_scaling {}: switchyard's RoPE has no scaling", file.display(), cfg["rope_scaling"]);
    }
    if let Some(window) = cfg["sliding_window"].as_u64() {
        let used = cfg["use_sliding_window"].as_bool().unwrap_or(model_type == "mistral" || model_type == "mixtral");
        if used && (window as usize) < seq_len {
            bail!("{}: sliding_window {window} is shorter than seq_len {seq_len}: switchyard attends to the whole sequence", file.display());
        }
    }
    let (d, heads) = (num(cfg, "hidden_size", file)? as usize, num(cfg, "num_attention_heads", file)? as usize);
    if let Some(hd) = cfg["head_dim"].as_u64() {
        if hd as usize * heads != d {
            bail!("{}: head_dim {hd} x {heads} heads is not hidden_size {d}: switchyard's head_dim is hidden_size / heads", file.display());
        }
    }
    let kv = cfg["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize);
    let mut sets = vec![
        format!("model.vocab={}", num(cfg, "vocab_size", file)?),
        format!("model.d_model={d}"),
        format!("model.n_layers={}", num(cfg, "num_hidden_layers", file)?),
        format!("model.n_heads={heads}"),
        format!("model.n_kv_heads={kv}"),
        format!("model.seq_len={seq_len}"),
        format!("model.rope_theta={}", cfg["rope_theta"].as_f64().unwrap_or(10000.0)),
        format!("model.norm_eps={}", cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6)),
        format!("model.tie_embeddings={}", cfg["tie_word_embeddings"].as_bool().unwrap_or(false)),
        "model.capacity_factor=0.0".into(),
        "model.block=\"sequential\"".into(),
        format!("model.qk_norm={qk_norm}"),
    ];
    match arch {
        Arch::Dense => sets.extend([
            format!("model.ffn_hidden={}", num(cfg, "intermediate_size", file)?),
            "model.n_experts=1".into(),
            "model.top_k=1".into(),
            "model.aux_loss_coef=0.0".into(),
            "model.z_loss_coef=0.0".into(),
        ]),
        Arch::Mixtral => sets.extend([
            format!("model.ffn_hidden={}", num(cfg, "intermediate_size", file)?),
            format!("model.n_experts={}", num(cfg, "num_local_experts", file)?),
            format!("model.top_k={}", num(cfg, "num_experts_per_tok", file)?),
            "model.norm_topk_prob=true".into(),
        ]),
        Arch::Qwen2Moe => {
            let f = num(cfg, "moe_intermediate_size", file)? as usize;
            let shared = num(cfg, "shared_expert_intermediate_size", file)? as usize;
            if shared == 0 || !shared.is_multiple_of(f) {
                bail!("{}: shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size {f}: switchyard's shared experts have the routed experts' width", file.display());
            }
            sets.extend(qwen_moe_sets(cfg, file, f)?);
            sets.extend([format!("model.n_shared_experts={}", shared / f), "model.shared_expert_gate=true".into()]);
        }
        Arch::Qwen3Moe => {
            let f = num(cfg, "moe_intermediate_size", file)? as usize;
            sets.extend(qwen_moe_sets(cfg, file, f)?);
        }
    }
    Ok((sets, arch))
}

/// What Qwen2-MoE and Qwen3-MoE configure alike: experts of width `f`,
/// top-k, gates renormalised or not, dense first layers (`mlp_only_layers`).
fn qwen_moe_sets(cfg: &Value, file: &Path, f: usize) -> Result<Vec<String>> {
    if cfg["decoder_sparse_step"].as_u64().unwrap_or(1) != 1 {
        bail!(
            "{}: decoder_sparse_step {}: switchyard's dense layers come first (mlp_only_layers)",
            file.display(),
            cfg["decoder_sparse_step"]
        );
    }
    let dense: Vec<u64> =
        (cfg["mlp_only_layers"].as_array().into_iter().flatten()).filter_map(|v| v.as_u64()).collect();
    if dense.iter().enumerate().any(|(i, &l)| l != i as u64) {
        bail!(
            "{}: mlp_only_layers {dense:?}: switchyard's dense layers are the first ones (0, 1, ...)",
            file.display()
        );
    }
    Ok(vec![
        format!("model.ffn_hidden={f}"),
        format!("model.n_experts={}", num(cfg, "num_experts", file)?),
        format!("model.top_k={}", num(cfg, "num_experts_per_tok", file)?),
        format!("model.norm_topk_prob={}", cfg["norm_topk_prob"].as_bool().unwrap_or(false)),
        format!("model.first_dense_layers={}", dense.len()),
        format!("model.dense_ffn_hidden={}", num(cfg, "intermediate_size", file)?),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Dense,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

/// Moves the folder's tensors into switchyard's names on `state`'s weights,
/// checking every shape; biases must be zero (switchyard has none).
fn fill_weights(job: &JobConfig, arch: Arch, mut t: Tensors, state: &mut TrainState, dir: &Path) -> Result<()> {
    let cfg = &job.model;
    let take = |t: &mut Tensors, name: &str| -> Result<Vec<f32>> {
        t.remove(name).map(|(_, v)| v).ok_or_else(|| anyhow!("{} has no tensor `{name}`", dir.display()))
    };
    // Zero biases compute what switchyard computes without them.
    let mut names: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    names.insert("tok_embeddings.weight".into(), take(&mut t, "model.embed_tokens.weight")?);
    names.insert("norm.weight".into(), take(&mut t, "model.norm.weight")?);
    if !cfg.tie_embeddings {
        names.insert("output.weight".into(), take(&mut t, "lm_head.weight")?);
    }
    for l in 0..cfg.n_layers {
        let (src, dst) = (format!("model.layers.{l}"), format!("layers.{l}"));
        names.insert(format!("{dst}.attn_norm.weight"), take(&mut t, &format!("{src}.input_layernorm.weight"))?);
        names
            .insert(format!("{dst}.ffn_norm.weight"), take(&mut t, &format!("{src}.post_attention_layernorm.weight"))?);
        for (theirs, ours) in [("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")] {
            names.insert(
                format!("{dst}.attn.{ours}.weight"),
                take(&mut t, &format!("{src}.self_attn.{theirs}.weight"))?,
            );
            if let Ok(bias) = take(&mut t, &format!("{src}.self_attn.{theirs}.bias")) {
                if bias.iter().any(|&b| b != 0.0) {
                    bail!(
                        "{}: `{src}.self_attn.{theirs}.bias` is not zero: switchyard's attention has no biases",
                        dir.display()
                    );
                }
            }
        }
        if cfg.qk_norm {
            for norm in ["q_norm", "k_norm"] {
                names.insert(
                    format!("{dst}.attn.{norm}.weight"),
                    take(&mut t, &format!("{src}.self_attn.{norm}.weight"))?,
                );
            }
        }
        let swiglu = |t: &mut Tensors, from: &str, to: &str, names: &mut BTreeMap<String, Vec<f32>>| -> Result<()> {
            names.insert(format!("{to}.w1.weight"), take(t, &format!("{from}.gate_proj.weight"))?);
            names.insert(format!("{to}.w3.weight"), take(t, &format!("{from}.up_proj.weight"))?);
            names.insert(format!("{to}.w2.weight"), take(t, &format!("{from}.down_proj.weight"))?);
            Ok(())
        };
        match arch {
            Arch::Dense => {
                swiglu(&mut t, &format!("{src}.mlp"), &format!("{dst}.moe.experts.0"), &mut names)?;
                // One expert: its softmax gate is 1 whatever the router says.
                names.insert(format!("{dst}.moe.router.weight"), vec![0.0; cfg.d_model]);
            }
            Arch::Qwen2Moe | Arch::Qwen3Moe if !cfg.is_moe_layer(l) => {
                swiglu(&mut t, &format!("{src}.mlp"), &format!("{dst}.ffn"), &mut names)?
            }
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                names.insert(format!("{dst}.moe.router.weight"), take(&mut t, &format!("{src}.mlp.gate.weight"))?);
                for e in 0..cfg.n_experts {
                    swiglu(&mut t, &format!("{src}.mlp.experts.{e}"), &format!("{dst}.moe.experts.{e}"), &mut names)?;
                }
                if arch == Arch::Qwen3Moe {
                    continue; // no shared expert
                }
                // One shared expert of width S x F: S experts of width F
                // (gate and up rows in blocks, down columns in blocks).
                let (f, s, d) = (cfg.ffn_hidden, cfg.n_shared_experts, cfg.d_model);
                let (gate, up, down) = (
                    take(&mut t, &format!("{src}.mlp.shared_expert.gate_proj.weight"))?,
                    take(&mut t, &format!("{src}.mlp.shared_expert.up_proj.weight"))?,
                    take(&mut t, &format!("{src}.mlp.shared_expert.down_proj.weight"))?,
                );
                for i in 0..s {
                    let to = format!("{dst}.moe.shared.{i}");
                    names.insert(format!("{to}.w1.weight"), gate[i * f * d..(i + 1) * f * d].to_vec());
                    names.insert(format!("{to}.w3.weight"), up[i * f * d..(i + 1) * f * d].to_vec());
                    let cols: Vec<f32> =
                        down.chunks_exact(s * f).flat_map(|row| row[i * f..(i + 1) * f].iter().copied()).collect();
                    names.insert(format!("{to}.w2.weight"), cols);
                }
                names.insert(
                    format!("{dst}.moe.shared_gate.weight"),
                    take(&mut t, &format!("{src}.mlp.shared_expert_gate.weight"))?,
                );
            }
            Arch::Mixtral => {
                names.insert(
                    format!("{dst}.moe.router.weight"),
                    take(&mut t, &format!("{src}.block_sparse_moe.gate.weight"))?,
                );
                for e in 0..cfg.n_experts {
                    let (from, to) = (format!("{src}.block_sparse_moe.experts.{e}"), format!("{dst}.moe.experts.{e}"));
                    for w in ["w1", "w2", "w3"] {
                        names.insert(format!("{to}.{w}.weight"), take(&mut t, &format!("{from}.{w}.weight"))?);
                    }
                }
            }
        }
    }
    if let Some(extra) = t.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
        bail!(
            "{}: tensor `{extra}` has no place in switchyard's model (an architecture variant import does not know)",
            dir.display()
        );
    }
    for (name, dst) in state.weights.tensors_mut() {
        let src =
            names.remove(&name).ok_or_else(|| anyhow!("{}: nothing gives switchyard's `{name}`", dir.display()))?;
        if src.len() != dst.len() {
            let shape = model::weights::tensor_shape(cfg, &name).unwrap_or_default();
            bail!(
                "{}: the tensor for `{name}` has {} values; config.json's sizes make it {shape:?} = {}",
                dir.display(),
                src.len(),
                dst.len()
            );
        }
        dst.copy_from_slice(&src);
    }
    Ok(())
}

/// Commits `state` as step 0 of `run_dir`'s checkpoints (one rank's
/// layout; any layout resumes from it) and writes the job as
/// `run_dir/config.toml`; returns the store and that file.
pub fn write_step_zero(
    job: &JobConfig,
    state: &TrainState,
    plan: &PlacementPlan,
    run_dir: &Path,
) -> Result<(CheckpointStore, PathBuf)> {
    let root = std::fs::canonicalize(run_dir)?.join("checkpoints");
    let store = CheckpointStore::open(&format!("file://{}", root.display()))?;
    let tensors = state.shard_tensors(job, ShardWrites::ALL);
    let refs: Vec<_> = tensors.iter().map(|t| t.as_ref()).collect();
    let report = write_snapshot(&store, 0, 0, &refs)?.expect("a model has tensors");
    let sizes = layout::ModelSizes {
        n_heads: job.model.n_heads,
        n_kv_heads: job.model.n_kv_heads,
        n_experts: job.model.n_experts,
    };
    let dims = ParallelDims::new(1, 1, 1, sizes)?;
    store.commit(&state.manifest(job, &dims, plan, vec![report]))?;
    let config_out = run_dir.join("config.toml");
    std::fs::write(&config_out, job.to_toml())?;
    Ok((store, config_out))
}

/// Imports the model folder `from` into the run folder `run_dir`.
pub fn run(from: &Path, run_dir: &Path, seq_len: usize, sets: &[String]) -> Result<()> {
    let config_path = from.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let hf: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", config_path.display()))?;
    let (mut all_sets, arch) = model_sets(&hf, &config_path, seq_len)?;
    let name = from.file_name().map_or("imported".into(), |n| n.to_string_lossy().to_string());
    all_sets.push(format!("name=\"{name}\""));
    let tokenizer = from.join("tokenizer.json");
    if tokenizer.exists() {
        all_sets.push(format!("data.tokenizer=\"{}\"", run_dir.join("tokenizer.json").display()));
    }
    all_sets.extend(sets.iter().cloned());
    let job = JobConfig::load(None, &all_sets).context("the switchyard config made from config.json")?;
    let checkpoints = run_dir.join("checkpoints");
    if checkpoints.exists() {
        bail!("{} already holds checkpoints: import into a new --run-dir (nothing was written)", run_dir.display());
    }
    let plan = PlacementPlan::contiguous(job.model.n_layers, job.model.n_experts, 1);
    let mut state = TrainState::fresh(&job, &plan, None, 0);
    fill_weights(&job, arch, read_weights(from)?, &mut state, from)?;
    // Written only once everything above was read and checked.
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    if tokenizer.exists() {
        std::fs::copy(&tokenizer, run_dir.join("tokenizer.json"))?;
    }
    let (store, config_out) = write_step_zero(&job, &state, &plan, run_dir)?;
    println!(
        "imported {} ({}) as {}: {} parameters, step 0 committed at {}",
        from.display(),
        hf["model_type"].as_str().unwrap_or("?"),
        match arch {
            Arch::Dense =>
                "an MoE of one expert, top-1 (the dense FFN: the same function; `ckpt upcycle` splits it later)",
            Arch::Mixtral | Arch::Qwen3Moe => "a top-k softmax MoE",
            Arch::Qwen2Moe => "an MoE with a gated shared expert",
        },
        job.model.num_params(),
        store.url()
    );
    println!("config: {} (set [data] source before training on your text)", config_out.display());
    println!("train:  switchyard train --run-dir {} --config {} --resume", run_dir.display(), config_out.display());
    Ok(())
}
