//! The PyTorch peer of `switchyard bench step`: the same job's whole
//! training steps in plain PyTorch (bench/torch_train_step.py) on this
//! process's threads, in the modes a PyTorch user picks from: eager fp32,
//! bf16 autocast, torch.compile, and torch.compile under autocast.

use super::python_peer;
use anyhow::Result;
use model::{AttentionKind, BlockKind, RouterScoreKind};
use serde::Serialize;
use worker::JobConfig;

/// One mode's result (or why it has none).
#[derive(Debug, Serialize)]
pub struct TorchRow {
    pub mode: String,
    pub tokens_per_s: Option<f64>,
    pub step_s: Option<f64>,
    pub error: Option<String>,
}

/// What a mode is called in the table.
pub fn label(mode: &str) -> &str {
    match mode {
        "eager" => "PyTorch eager fp32",
        "autocast" => "PyTorch eager bf16 autocast",
        "compile" => "PyTorch torch.compile fp32",
        "compile_autocast" => "PyTorch torch.compile bf16 autocast",
        other => other,
    }
}

/// The model keys the peer does not implement, where `job` sets them (the
/// peer is the default architecture; another one would be a different model).
fn unsupported(job: &JobConfig) -> Vec<&'static str> {
    let m = &job.model;
    let checks = [
        (m.n_shared_experts != 0, "model.n_shared_experts"),
        (m.block != BlockKind::Sequential, "model.block"),
        (m.capacity_factor != 0.0, "model.capacity_factor"),
        (m.tie_embeddings, "model.tie_embeddings"),
        (m.router_score != RouterScoreKind::Softmax || !m.norm_topk_prob, "model.router_score / norm_topk_prob"),
        (m.n_groups != 1 || m.expert_bias || m.router_mlp || m.gating_residuals, "the router options"),
        (m.constant_experts + m.copy_experts + m.zero_experts != 0, "computation-free experts"),
        (m.qk_norm, "model.qk_norm"),
        (m.first_dense_layers != 0, "model.first_dense_layers"),
        (m.attention != AttentionKind::Dense, "model.attention"),
        (m.modalities != 1, "model.modalities"),
    ];
    checks.into_iter().filter(|(differs, _)| *differs).map(|(_, key)| key).collect()
}

/// Measures `modes` for `job`, `steps` timed steps each (after the
/// script's own warm-up); every row says why it has no number when it has none.
pub fn measure(job: &JobConfig, modes: &[String], steps: u64) -> Result<Vec<TorchRow>> {
    let error_rows = |why: String| modes.iter().map(|mode| row_error(mode, &why)).collect();
    let keys = unsupported(job);
    if !keys.is_empty() {
        return Ok(error_rows(format!("the peer is the default architecture; this job sets {}", keys.join(", "))));
    }
    let (m, o, t) = (&job.model, &job.optim, &job.train);
    let args = serde_json::json!({
        "vocab": m.vocab, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads, "ffn_hidden": m.ffn_hidden, "n_experts": m.n_experts, "top_k": m.top_k,
        "seq_len": m.seq_len, "rope_theta": m.rope_theta, "norm_eps": m.norm_eps, "init_std": m.init_std,
        "aux_loss_coef": m.aux_loss_coef, "z_loss_coef": m.z_loss_coef,
        "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps, "weight_decay": o.weight_decay,
        "grad_clip": o.grad_clip, "steps": steps, "modes": modes,
    });
    eprintln!("bench step: PyTorch peer ({}) ...", modes.join(", "));
    let report = match python_peer("torch_train_step.py", &[args.to_string()], "torch", "pip install torch") {
        Ok(report) => report,
        Err(why) => return Ok(error_rows(why)),
    };
    Ok(modes
        .iter()
        .map(|mode| {
            let got = &report["modes"][mode.as_str()];
            match got["tokens_per_s"].as_f64() {
                Some(tps) => TorchRow {
                    mode: mode.clone(),
                    tokens_per_s: Some(tps),
                    step_s: got["step_s"].as_f64(),
                    error: None,
                },
                None => row_error(mode, got["error"].as_str().unwrap_or("no result")),
            }
        })
        .collect())
}

fn row_error(mode: &str, why: &str) -> TorchRow {
    TorchRow { mode: mode.to_string(), tokens_per_s: None, step_s: None, error: Some(why.to_string()) }
}
