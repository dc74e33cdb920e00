//! The routers beyond v1 (docs/model.md, "Routers beyond v1"): sigmoid
//! scores, the selection bias, group-limited choice, scaled gates and the
//! sequence-wise balance loss — finite-difference checks of every term's
//! backward, and the forward values against a direct computation.

mod common;

use common::{check_gradient, probe_loss, values};
use model::moe::{route, route_backward, RouterGrads, RouterLossScales, RouterWeights, Routing};
use model::{ModelConfig, RouterScoreKind};

fn scaled(n: usize, seed: u64, s: f32) -> Vec<f32> {
    values(n, seed).into_iter().map(|v| v * s).collect()
}

/// DeepSeek-V3's router in small: 8 experts in 4 groups, 2 kept, top-3.
fn deepseek(norm_topk_prob: bool) -> ModelConfig {
    ModelConfig {
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        n_experts: 8,
        top_k: 3,
        n_layers: 1,
        seq_len: 4,
        router_score: RouterScoreKind::Sigmoid,
        n_groups: 4,
        topk_groups: 2,
        expert_bias: true,
        routed_scaling_factor: 2.5,
        seq_aux_loss_coef: 1e-4,
        norm_topk_prob,
        ..ModelConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Gates,
    Aux,
    Z,
    Seq,
}

fn check(cfg: &ModelConfig, which: Loss) {
    cfg.validate().unwrap();
    let (n, d, e, k) = (12, cfg.d_model, cfg.n_router_outputs(), cfg.top_k);
    let x = scaled(n * d, 41, 1.0);
    let router = scaled(e * d, 42, 1.5);
    let bias = scaled(e, 43, 0.3);
    let run = |x: &[f32], w: &[f32]| {
        route(
            cfg,
            x,
            RouterWeights {
                weight_ed: w,
                expert_bias_e: cfg.expert_bias.then_some(&bias[..]),
                residual: None,
                hidden_hd: None,
                modality_t: &[],
            },
            n,
        )
    };
    let base = run(&x, &router);
    let probe = values(n * k, 44);
    let mut scales = RouterLossScales::default();
    let mut dgate = vec![0.0; n * k];
    match which {
        Loss::Gates => dgate.copy_from_slice(&probe),
        Loss::Aux => scales.aux = 1.0,
        Loss::Z => scales.z = 1.0,
        Loss::Seq => scales.seq = 1.0,
    }
    let loss = |r: &Routing| -> f64 {
        assert_eq!(r.expert_tk, base.expert_tk, "perturbation changed the choice: pick other inputs");
        match which {
            Loss::Gates => probe_loss(&r.gate_tk, &probe),
            Loss::Aux => r.aux_loss as f64,
            Loss::Z => r.z_loss as f64,
            Loss::Seq => r.seq_aux_loss as f64,
        }
    };
    let (mut dx, mut drouter) = (vec![0.0; n * d], vec![0.0; e * d]);
    route_backward(
        cfg,
        &x,
        RouterWeights::plain(&router),
        &base,
        &dgate,
        scales,
        RouterGrads::plain(&mut dx, &mut drouter),
    );
    assert!(dx.iter().any(|v| v.abs() > 1e-5), "{which:?}: gradient is trivially zero");
    // Sigmoid: ds/dl = s (1 - s); gates g = r s_j / S: ds_j = (r dg_j - sum dg_i g_i) / S;
    // balance losses through q = s / sum s; the z-loss through softmax(l).
    let name = format!("{which:?} norm={}", cfg.norm_topk_prob);
    check_gradient(&format!("{name} dx"), &x, &dx, |xp| loss(&run(xp, &router)));
    check_gradient(&format!("{name} drouter"), &router, &drouter, |wp| loss(&run(&x, wp)));
}

#[test]
fn sigmoid_gates_renormalised_and_scaled() {
    check(&deepseek(true), Loss::Gates);
}

#[test]
fn sigmoid_gates_unnormalised_and_scaled() {
    check(&deepseek(false), Loss::Gates);
}

#[test]
fn sigmoid_balance_and_z_losses() {
    for which in [Loss::Aux, Loss::Z, Loss::Seq] {
        check(&deepseek(true), which);
    }
}

#[test]
fn softmax_sequence_loss() {
    let cfg = ModelConfig {
        router_score: RouterScoreKind::Softmax,
        n_groups: 1,
        topk_groups: 1,
        expert_bias: false,
        ..deepseek(true)
    };
    check(&cfg, Loss::Seq);
}

/// The forward values by the definitions, computed here from the routing's
/// own scores and choices.
#[test]
fn gates_choice_and_sequence_loss_follow_the_definitions() {
    let cfg = deepseek(true);
    let (n, d, e, k) = (12, cfg.d_model, cfg.n_experts, cfg.top_k);
    let x = scaled(n * d, 51, 1.0);
    let router = scaled(e * d, 52, 1.5);
    let bias = scaled(e, 53, 0.3);
    let r = route(
        &cfg,
        &x,
        RouterWeights {
            weight_ed: &router,
            expert_bias_e: Some(&bias),
            residual: None,
            hidden_hd: None,
            modality_t: &[],
        },
        n,
    );
    let (group, seqs) = (e / cfg.n_groups, n / cfg.seq_len);
    let mut seq_loss = 0.0f64;
    let mut counts = vec![vec![0.0f64; e]; seqs];
    let mut q_sums = vec![vec![0.0f64; e]; seqs];
    for t in 0..n {
        let s = &r.scores_te[t * e..(t + 1) * e];
        let logits = &r.logits_te[t * e..(t + 1) * e];
        for (se, l) in s.iter().zip(logits) {
            assert!((se - 1.0 / (1.0 + (-l).exp())).abs() < 1e-6);
        }
        let ex = &r.expert_tk[t * k..(t + 1) * k];
        // Every chosen expert lies in one of the two best groups by the
        // sum of their two largest biased scores.
        let c: Vec<f32> = s.iter().zip(&bias).map(|(a, b)| a + b).collect();
        let mut group_scores: Vec<(f32, usize)> = c
            .chunks(group)
            .enumerate()
            .map(|(g, cs)| {
                let mut v = cs.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (v[0] + v[1], g)
            })
            .collect();
        group_scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let kept: Vec<usize> = group_scores[..cfg.topk_groups].iter().map(|&(_, g)| g).collect();
        assert!(ex.iter().all(|&j| kept.contains(&(j as usize / group))), "token {t}: {ex:?} outside groups {kept:?}");
        // Gates: the unbiased scores, renormalised, times 2.5.
        let sum: f32 = ex.iter().map(|&j| s[j as usize]).sum();
        for (slot, &j) in ex.iter().enumerate() {
            let want = s[j as usize] / sum * 2.5;
            assert!((r.gate_tk[t * k + slot] - want).abs() < 1e-6, "gate of token {t}");
        }
        let total: f32 = s.iter().sum();
        for (j, &se) in s.iter().enumerate() {
            q_sums[t / cfg.seq_len][j] += (se / total) as f64;
        }
        for &j in ex {
            counts[t / cfg.seq_len][j as usize] += 1.0;
        }
    }
    let t_q = cfg.seq_len as f64;
    for (c, qs) in counts.iter().zip(&q_sums) {
        for (ci, qi) in c.iter().zip(qs) {
            seq_loss += (e as f64 / (k as f64 * t_q) * ci) * (qi / t_q) / seqs as f64;
        }
    }
    assert!((r.seq_aux_loss as f64 - seq_loss).abs() < 1e-6, "{} vs {seq_loss}", r.seq_aux_loss);
    assert_eq!(r.chosen_per_expert.iter().sum::<usize>(), n * k);
}

#[test]
fn bad_group_settings_name_their_key() {
    let cases = [
        (ModelConfig { n_groups: 3, ..deepseek(true) }, "n_groups"),
        (ModelConfig { topk_groups: 5, ..deepseek(true) }, "topk_groups"),
        (ModelConfig { top_k: 5, ..deepseek(true) }, "top_k"),
        (ModelConfig { routed_scaling_factor: 0.0, ..deepseek(true) }, "routed_scaling_factor"),
        (ModelConfig { shared_expert_gate: true, n_shared_experts: 0, ..deepseek(true) }, "shared_expert_gate"),
    ];
    for (cfg, key) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// MoE++ in small: 5 FFN experts beside a constant, a copy and a zero expert.
fn moe_plus_plus() -> ModelConfig {
    ModelConfig {
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        n_experts: 5,
        constant_experts: 1,
        copy_experts: 1,
        zero_experts: 1,
        top_k: 3,
        n_layers: 1,
        seq_len: 4,
        seq_aux_loss_coef: 1e-4,
        ..ModelConfig::default()
    }
}

#[test]
fn computation_free_experts_gates_and_balance_losses() {
    for which in [Loss::Gates, Loss::Aux, Loss::Seq] {
        check(&moe_plus_plus(), which);
    }
}

#[test]
fn a_zero_expert_gets_no_gate_and_its_share_goes_to_the_others() {
    let cfg = moe_plus_plus();
    let (n, d, k) = (12, cfg.d_model, cfg.top_k);
    let e = cfg.n_router_outputs();
    // A router that favours the zero expert (id 7) for every token.
    let mut router = scaled(e * d, 61, 0.5);
    router[7 * d..8 * d].iter_mut().for_each(|w| *w = 3.0);
    let x: Vec<f32> = scaled(n * d, 62, 1.0).into_iter().map(|v| v.abs() + 0.1).collect();
    let r = route(&cfg, &x, RouterWeights::plain(&router), n);
    let mut saw_zero = false;
    for t in 0..n {
        let ex = &r.expert_tk[t * k..(t + 1) * k];
        let g = &r.gate_tk[t * k..(t + 1) * k];
        for (&id, &gate) in ex.iter().zip(g) {
            if id == 7 {
                saw_zero = true;
                assert_eq!(gate, 0.0, "token {t}: the zero expert's gate");
            }
        }
        assert!(
            (g.iter().sum::<f32>() - 1.0).abs() < 1e-6,
            "token {t}: gates {g:?} renormalised without the zero expert"
        );
    }
    assert!(saw_zero, "the test router must choose the zero expert");
    // Only FFN assignments count as expert tokens; the others are free.
    assert_eq!(r.tokens_per_expert.iter().sum::<usize>() + r.free_assignments, n * k);
    assert_eq!(r.tokens_per_expert.len(), 5);
}

#[test]
fn mlp_router_gradients() {
    let cfg = ModelConfig { router_mlp: true, ..moe_plus_plus() };
    let (n, d, e, k) = (12, cfg.d_model, cfg.n_router_outputs(), cfg.top_k);
    let h = cfg.router_input_width();
    let x = scaled(n * d, 71, 1.0);
    let w2 = scaled(e * h, 72, 1.0);
    let w1 = scaled(h * d, 73, 0.8);
    let run = |x: &[f32], w1: &[f32], w2: &[f32]| {
        route(
            &cfg,
            x,
            RouterWeights { weight_ed: w2, expert_bias_e: None, residual: None, hidden_hd: Some(w1), modality_t: &[] },
            n,
        )
    };
    let base = run(&x, &w1, &w2);
    let probe = values(n * k, 74);
    let scales = RouterLossScales { aux: 1.0, z: 0.5, seq: 1.0 };
    let loss = |r: &Routing| -> f64 {
        assert_eq!(r.expert_tk, base.expert_tk, "perturbation changed the choice: pick other inputs");
        probe_loss(&r.gate_tk, &probe) + r.aux_loss as f64 + 0.5 * r.z_loss as f64 + r.seq_aux_loss as f64
    };
    let (mut dx, mut dw2, mut dw1) = (vec![0.0; n * d], vec![0.0; e * h], vec![0.0; h * d]);
    let mut grads = RouterGrads::plain(&mut dx, &mut dw2);
    grads.dhidden_hd = Some(&mut dw1);
    let weights =
        RouterWeights { weight_ed: &w2, expert_bias_e: None, residual: None, hidden_hd: Some(&w1), modality_t: &[] };
    route_backward(&cfg, &x, weights, &base, &probe, scales, grads);
    // logits = tanh(x W1^T) W2^T: dW2 = dlogits^T h, dpre = dlogits W2 (1 - h^2),
    // dW1 = dpre^T x, dx = dpre W1.
    check_gradient("mlp router dx", &x, &dx, |xp| loss(&run(xp, &w1, &w2)));
    check_gradient("mlp router dw1", &w1, &dw1, |wp| loss(&run(&x, wp, &w2)));
    check_gradient("mlp router dw2", &w2, &dw2, |wp| loss(&run(&x, &w1, wp)));
}

/// Mixture-of-Transformers: a token scores and chooses only its modality's
/// block of experts, even when the selection bias favours another block,
/// and its block's scores are those of a router of the block's rows alone.
#[test]
fn modality_blocks_confine_scores_and_choice() {
    for score in [RouterScoreKind::Softmax, RouterScoreKind::Sigmoid] {
        let cfg = ModelConfig {
            d_model: 8,
            n_heads: 2,
            n_kv_heads: 1,
            n_experts: 6,
            top_k: 2,
            modalities: 3,
            router_score: score,
            expert_bias: true,
            ..ModelConfig::default()
        };
        cfg.validate().unwrap();
        let (n, d, e) = (9, cfg.d_model, cfg.n_experts);
        let x = scaled(n * d, 61, 1.0);
        let router = scaled(e * d, 62, 1.5);
        // A bias far above any score, on a block no token of modality 0 may use.
        let bias = [0.0, 0.0, 9.0, 9.0, 0.0, 0.0];
        let modality: Vec<u8> = (0..n).map(|t| (t % 3) as u8).collect();
        let weights = RouterWeights {
            weight_ed: &router,
            expert_bias_e: Some(&bias),
            residual: None,
            hidden_hd: None,
            modality_t: &modality,
        };
        let r = route(&cfg, &x, weights, n);
        for t in 0..n {
            let own = cfg.modality_experts(modality[t] as usize);
            for &ex in &r.expert_tk[t * 2..t * 2 + 2] {
                assert!(own.contains(&(ex as usize)), "{score:?}: token {t} of modality {} chose {ex}", modality[t]);
            }
            let s = &r.scores_te[t * e..(t + 1) * e];
            for (i, &si) in s.iter().enumerate() {
                assert!(own.contains(&i) || si == 0.0, "{score:?}: token {t} scores expert {i} outside its block");
            }
            // The block's scores are a router of the block's rows alone.
            let rows = &router[own.start * d..own.end * d];
            let alone = route(
                &ModelConfig { n_experts: 2, modalities: 1, ..cfg.clone() },
                &x[t * d..(t + 1) * d],
                RouterWeights::plain(rows),
                1,
            );
            for (a, b) in alone.scores_te.iter().zip(&s[own]) {
                assert!((a - b).abs() < 1e-6, "{score:?}: token {t}: {a} alone, {b} in the block");
            }
        }
    }
}
