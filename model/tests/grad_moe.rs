//! Finite-difference checks of the MoE stages (router, dispatch, SwiGLU
//! experts, combine, the whole layer) and unit tests of their semantics.

mod common;

use common::{check_gradient, probe_loss, values};
use model::moe::{
    route, route_backward, DispatchPlan, ExpertExecutor, LocalExperts, RouterGrads, RouterLossScales, RouterWeights,
    Routing,
};
use model::moe::{ExpertKind, Rows};
use model::ops::swiglu::{SwiGlu, SwigluCache};
use model::{ExpertStore, ExpertWeights, ModelConfig, ModelError};
use std::collections::BTreeMap;

fn scaled(n: usize, seed: u64, s: f32) -> Vec<f32> {
    values(n, seed).into_iter().map(|v| v * s).collect()
}

fn moe_cfg(capacity_factor: f32, norm_topk_prob: bool) -> ModelConfig {
    ModelConfig {
        d_model: 6,
        ffn_hidden: 5,
        n_experts: 4,
        top_k: 2,
        n_layers: 1,
        capacity_factor,
        norm_topk_prob,
        ..ModelConfig::default()
    }
}

fn expert(cfg: &ModelConfig, seed: u64) -> ExpertWeights {
    let n = cfg.d_model * cfg.ffn_hidden;
    ExpertWeights { w1: scaled(n, seed, 0.8), w3: scaled(n, seed + 1, 0.8), w2: scaled(n, seed + 2, 0.8) }
}

fn store(cfg: &ModelConfig, seed: u64) -> ExpertStore {
    let layer: BTreeMap<usize, ExpertWeights> =
        (0..cfg.n_experts).map(|e| (e, expert(cfg, seed + 10 * e as u64))).collect();
    ExpertStore { layers: vec![layer] }
}

// ---------------------------------------------------------------- SwiGLU

fn swiglu_loss(w: &ExpertWeights, d: usize, f: usize, x: &[f32], rows: usize, probe: &[f32]) -> f64 {
    let mut y = vec![0.0; rows * d];
    SwiGlu { d, f }.forward(w, Rows { x_rd: x, rows }, &mut y, &mut SwigluCache::default());
    probe_loss(&y, probe)
}

#[test]
fn swiglu_gradients_match_finite_differences() {
    let cfg = moe_cfg(0.0, true);
    let (d, f, rows) = (cfg.d_model, cfg.ffn_hidden, 7);
    let w = expert(&cfg, 11);
    let x = scaled(rows * d, 1, 1.5);
    let probe = values(rows * d, 2);
    let mut y = vec![f32::NAN; rows * d];
    let mut cache = SwigluCache::default();
    SwiGlu { d, f }.forward(&w, Rows { x_rd: &x, rows }, &mut y, &mut cache);
    assert!(y.iter().all(|v| v.is_finite()), "forward must overwrite y");
    // The executor's backward turns x into dx in place; the weight
    // gradients add: start them non-zero and subtract afterwards.
    let mut dx = x.clone();
    let g0 = ExpertWeights { w1: vec![0.25; d * f], w3: vec![-0.25; d * f], w2: vec![1.0; d * f] };
    let mut g = g0.clone();
    SwiGlu { d, f }.backward(&w, &mut dx, rows, cache.clone(), &probe, &mut g);
    // backward_into keeps x and adds dx into what is there; the same weight gradients.
    let mut dx_added = vec![0.5; rows * d];
    let mut g_into = g0;
    SwiGlu { d, f }.backward_into(&w, Rows { x_rd: &x, rows }, cache, &probe, &mut dx_added, &mut g_into);
    assert_eq!(g_into, g, "backward_into and backward must give the same weight gradients");
    for (i, (a, b)) in dx_added.iter().zip(&dx).enumerate() {
        assert!((a - 0.5 - b).abs() < 1e-6 * (1.0 + b.abs()), "backward_into dx[{i}]: {a} - 0.5 vs {b}");
    }
    g.w1.iter_mut().for_each(|v| *v -= 0.25);
    g.w3.iter_mut().for_each(|v| *v += 0.25);
    g.w2.iter_mut().for_each(|v| *v -= 1.0);
    // a = silu(h1) * h3, h1 = W1 x, h3 = W3 x, y = W2 a, L = probe . y:
    // dL/da = W2^T probe; dL/dh1 = dL/da * h3 * silu'(h1), silu'(z) = s(1 + z(1 - s));
    // dL/dh3 = dL/da * silu(h1); dL/dx = W1^T dL/dh1 + W3^T dL/dh3.
    check_gradient("swiglu dx", &x, &dx, |x| swiglu_loss(&w, d, f, x, rows, &probe));
    // dL/dW1 = sum_rows dL/dh1 x^T.
    check_gradient("swiglu dw1", &w.w1, &g.w1, |w1| {
        swiglu_loss(&ExpertWeights { w1: w1.to_vec(), ..w.clone() }, d, f, &x, rows, &probe)
    });
    // dL/dW3 = sum_rows dL/dh3 x^T.
    check_gradient("swiglu dw3", &w.w3, &g.w3, |w3| {
        swiglu_loss(&ExpertWeights { w3: w3.to_vec(), ..w.clone() }, d, f, &x, rows, &probe)
    });
    // dL/dW2 = sum_rows probe a^T.
    check_gradient("swiglu dw2", &w.w2, &g.w2, |w2| {
        swiglu_loss(&ExpertWeights { w2: w2.to_vec(), ..w.clone() }, d, f, &x, rows, &probe)
    });
}

#[test]
fn swiglu_zero_rows_is_a_no_op() {
    let cfg = moe_cfg(0.0, true);
    let (d, f) = (cfg.d_model, cfg.ffn_hidden);
    let w = expert(&cfg, 3);
    let mut cache = SwigluCache::default();
    SwiGlu { d, f }.forward(&w, Rows { x_rd: &[], rows: 0 }, &mut [], &mut cache);
    let mut g = ExpertWeights::zeros(&cfg);
    SwiGlu { d, f }.backward(&w, &mut [], 0, cache, &[], &mut g);
    assert_eq!(g, ExpertWeights::zeros(&cfg));
}

// ---------------------------------------------------------------- router

/// `route`, asserting that the top-k choices (and so the piecewise-constant
/// selection) are those of the unperturbed input.
fn route_same(cfg: &ModelConfig, x: &[f32], router: &[f32], n: usize, base: &Routing) -> Routing {
    let r = route(cfg, x, RouterWeights::plain(router), n);
    assert_eq!(r.expert_tk, base.expert_tk, "perturbation changed the top-k order: pick other inputs");
    assert_eq!(r.kept_tk, base.kept_tk, "perturbation changed the capacity drops");
    r
}

/// Which scalar of the routing the loss is made of.
#[derive(Clone, Copy, Debug)]
enum RouterLoss {
    Gates,
    Aux,
    Z,
}

fn check_router(norm_topk_prob: bool, which: RouterLoss) {
    let cfg = moe_cfg(0.0, norm_topk_prob);
    let (n, d, e, k) = (9, cfg.d_model, cfg.n_experts, cfg.top_k);
    let x = scaled(n * d, 21, 1.0);
    let router = scaled(e * d, 22, 1.5);
    let gate_probe = values(n * k, 23);
    let base = route(&cfg, &x, RouterWeights::plain(&router), n);
    let (dgate, aux_scale, z_scale) = match which {
        RouterLoss::Gates => (gate_probe.clone(), 0.0, 0.0),
        RouterLoss::Aux => (vec![0.0; n * k], 1.0, 0.0),
        RouterLoss::Z => (vec![0.0; n * k], 0.0, 1.0),
    };
    let loss = |r: &Routing| -> f64 {
        match which {
            RouterLoss::Gates => probe_loss(&r.gate_tk, &gate_probe),
            RouterLoss::Aux => r.aux_loss as f64,
            RouterLoss::Z => r.z_loss as f64,
        }
    };
    // Adds into the outputs: start them non-zero.
    let mut dx = vec![1.0; n * d];
    let mut drouter = vec![-1.0; e * d];
    let scales = RouterLossScales { aux: aux_scale, z: z_scale, seq: 0.0 };
    route_backward(
        &cfg,
        &x,
        RouterWeights::plain(&router),
        &base,
        &dgate,
        scales,
        RouterGrads::plain(&mut dx, &mut drouter),
    );
    dx.iter_mut().for_each(|v| *v -= 1.0);
    drouter.iter_mut().for_each(|v| *v += 1.0);
    assert!(dx.iter().any(|v| v.abs() > 1e-4), "{which:?}: gradient is trivially zero");
    // Gates: g_j = p_j / S (S = sum of the top-k p) when normalised, else p_j:
    //   dL/dp_j = (dg_j - sum_i dg_i g_i) / S  (or dg_j) for selected j, 0 otherwise.
    // Aux = E sum_e f_e P_e with f_e constant: dL/dp_te = E f_e / N.
    // Softmax: dL/dlogit_te = p_te (dL/dp_te - sum_i p_ti dL/dp_ti).
    // Z = mean_t lse_t^2: dZ/dlogit_te = 2 lse_t p_te / N.
    // logits = x W_r^T: dL/dx = dL/dlogits W_r, dL/dW_r = dL/dlogits^T x.
    let name = format!("router {which:?} norm={norm_topk_prob}");
    check_gradient(&format!("{name} dx"), &x, &dx, |x| loss(&route_same(&cfg, x, &router, n, &base)));
    check_gradient(&format!("{name} drouter"), &router, &drouter, |w| loss(&route_same(&cfg, &x, w, n, &base)));
}

#[test]
fn router_gate_gradients_normalised() {
    check_router(true, RouterLoss::Gates);
}

#[test]
fn router_gate_gradients_unnormalised() {
    check_router(false, RouterLoss::Gates);
}

#[test]
fn router_aux_loss_gradients() {
    check_router(true, RouterLoss::Aux);
    check_router(false, RouterLoss::Aux);
}

#[test]
fn router_z_loss_gradients() {
    check_router(true, RouterLoss::Z);
    check_router(false, RouterLoss::Z);
}

// ---------------------------------------------------------------- dispatch

/// A routing with capacity drops for the dispatch tests.
fn dropping_routing() -> (ModelConfig, Vec<f32>, Routing) {
    let cfg = moe_cfg(0.5, true);
    let n = 10;
    let x = scaled(n * cfg.d_model, 31, 1.0);
    let router = scaled(cfg.n_experts * cfg.d_model, 32, 1.5);
    let r = route(&cfg, &x, RouterWeights::plain(&router), n);
    assert!(r.dropped > 0, "test routing must drop something");
    (cfg, x, r)
}

#[test]
fn gather_and_combine_backward_match_finite_differences() {
    let (cfg, x, routing) = dropping_routing();
    let (n, d, k) = (routing.num_tokens, cfg.d_model, cfg.top_k);
    let plan = DispatchPlan::from_routing(&routing, cfg.n_experts, k);
    let rows = plan.num_rows();
    assert_eq!(rows, n * k - routing.dropped);

    // gather: x_ad[a] = x[t(a)], so dL/dx_t = sum_{a from t} dL/dx_ad[a].
    let probe_a = values(rows * d, 33);
    let mut dx = vec![0.25; n * d];
    plan.gather_backward(&probe_a, d, &mut dx);
    dx.iter_mut().for_each(|v| *v -= 0.25);
    check_gradient("gather dx", &x, &dx, |x| probe_loss(&plan.gather(x, d), &probe_a));

    // combine: out_t = sum_a g_a y_a, L = probe . out:
    // dL/dy_a = g_a probe_t, dL/dg_a = probe_t . y_a (dropped slots: 0).
    let y = scaled(rows * d, 34, 1.0);
    let probe = values(n * d, 35);
    let combine_loss = |r: &Routing, y: &[f32]| {
        let mut out = vec![0.0; n * d];
        plan.combine(r, y, d, &mut out);
        probe_loss(&out, &probe)
    };
    let mut dgate = vec![0.5; n * k];
    let dy = plan.combine_backward(&routing, &y, &probe, d, &mut dgate);
    dgate.iter_mut().for_each(|v| *v -= 0.5);
    for (i, kept) in routing.kept_tk.iter().enumerate() {
        if !kept {
            assert_eq!(dgate[i], 0.0, "dropped slot {i} must get no gate gradient");
        }
    }
    check_gradient("combine dy", &y, &dy, |y| combine_loss(&routing, y));
    check_gradient("combine dgate", &routing.gate_tk, &dgate, |g| {
        combine_loss(&Routing { gate_tk: g.to_vec(), ..routing.clone() }, &y)
    });
}

// ---------------------------------------------------------------- whole layer

struct Layer<'a> {
    cfg: &'a ModelConfig,
    n: usize,
    probe: &'a [f32],
    aux_scale: f32,
    z_scale: f32,
}

impl Layer<'_> {
    /// route → plan → gather → experts → combine; loss = probe.out + aux + z.
    fn forward(&self, x: &[f32], router: &[f32], experts: &ExpertStore, base: Option<&Routing>) -> f64 {
        let (cfg, n, d) = (self.cfg, self.n, self.cfg.d_model);
        let r = match base {
            Some(b) => route_same(cfg, x, router, n, b),
            None => route(cfg, x, RouterWeights::plain(router), n),
        };
        let plan = DispatchPlan::from_routing(&r, cfg.n_experts, cfg.top_k);
        let mut grads = experts.zeros_like();
        let mut exec = LocalExperts::new(cfg, experts, &mut grads);
        let y = exec.forward(0, &plan, plan.gather(x, d)).unwrap();
        let mut out = vec![0.0; n * d];
        plan.combine(&r, &y, d, &mut out);
        probe_loss(&out, self.probe) + self.aux_scale as f64 * r.aux_loss as f64 + self.z_scale as f64 * r.z_loss as f64
    }
}

fn check_layer(capacity_factor: f32, norm_topk_prob: bool) {
    let cfg = moe_cfg(capacity_factor, norm_topk_prob);
    let (n, d, e, k) = (12, cfg.d_model, cfg.n_experts, cfg.top_k);
    let x = scaled(n * d, 41, 1.0);
    let router = scaled(e * d, 42, 1.5);
    let experts = store(&cfg, 100);
    let probe = values(n * d, 43);
    let layer = Layer { cfg: &cfg, n, probe: &probe, aux_scale: 0.3, z_scale: 0.05 };

    let routing = route(&cfg, &x, RouterWeights::plain(&router), n);
    if capacity_factor > 0.0 {
        assert!(routing.dropped > 0, "capacity test must drop something");
    } else {
        assert_eq!(routing.dropped, 0);
    }
    let plan = DispatchPlan::from_routing(&routing, e, k);
    let mut grads = experts.zeros_like();
    let mut dx = vec![0.0; n * d];
    let mut drouter = vec![0.0; e * d];
    {
        let mut exec = LocalExperts::new(&cfg, &experts, &mut grads);
        let y = exec.forward(0, &plan, plan.gather(&x, d)).unwrap();
        let mut dgate = vec![0.0; n * k];
        let dy = plan.combine_backward(&routing, &y, &probe, d, &mut dgate);
        let dx_ad = exec.backward(0, &plan, &dy).unwrap();
        plan.gather_backward(&dx_ad, d, &mut dx);
        let scales = RouterLossScales { aux: layer.aux_scale, z: layer.z_scale, seq: 0.0 };
        let grads = RouterGrads::plain(&mut dx, &mut drouter);
        route_backward(&cfg, &x, RouterWeights::plain(&router), &routing, &dgate, scales, grads);
        // The saved state was taken: a second backward is an error.
        assert!(matches!(exec.backward(0, &plan, &dy), Err(ModelError::Executor { .. })));
    }
    let base = Some(&routing);
    let name = format!("moe layer c={capacity_factor} norm={norm_topk_prob}");
    // dL/dx = gather^T(expert dx of (gate * probe)) + router path (gates, aux, z) as above.
    check_gradient(&format!("{name} dx"), &x, &dx, |x| layer.forward(x, &router, &experts, base));
    // dL/dW_r = dL/dlogits^T x with dL/dlogits from gates, aux and z.
    check_gradient(&format!("{name} drouter"), &router, &drouter, |w| layer.forward(&x, w, &experts, base));
    // Expert weights: the SwiGLU formulas above with dy_a = gate_a * probe_t(a),
    // over the expert's kept rows only. Check the expert with the most rows
    // (with capacity: one that dropped assignments).
    let busiest = (0..e).max_by_key(|&i| (plan.counts_e[i], std::cmp::Reverse(i))).unwrap();
    if capacity_factor > 0.0 {
        let chosen = routing.expert_tk.iter().filter(|&&x| x as usize == busiest).count();
        assert!(chosen > plan.counts_e[busiest], "busiest expert should have dropped rows");
    }
    let w = &experts.layers[0][&busiest];
    let g = &grads.layers[0][&busiest];
    assert!(g.w1.iter().any(|v| *v != 0.0));
    for (part, base_w, grad) in [("w1", &w.w1, &g.w1), ("w3", &w.w3, &g.w3), ("w2", &w.w2, &g.w2)] {
        check_gradient(&format!("{name} expert {busiest} {part}"), base_w, grad, |v| {
            let mut s = experts.clone();
            let ew = s.layers[0].get_mut(&busiest).unwrap();
            match part {
                "w1" => ew.w1 = v.to_vec(),
                "w3" => ew.w3 = v.to_vec(),
                _ => ew.w2 = v.to_vec(),
            }
            layer.forward(&x, &router, &s, base)
        });
    }
    // Experts without rows get no gradient.
    for (id, gi) in &grads.layers[0] {
        if plan.counts_e[*id] == 0 {
            assert_eq!(*gi, ExpertWeights::zeros(&cfg));
        }
    }
}

#[test]
fn moe_layer_gradients_dropless() {
    check_layer(0.0, true);
    check_layer(0.0, false);
}

#[test]
fn moe_layer_gradients_with_capacity_drops() {
    check_layer(0.6, true);
    check_layer(0.6, false);
}

/// LocalExperts forward/backward against running SwiGLU token by token.
fn check_local_experts_against_per_token(d: usize, f: usize, n: usize) {
    let cfg = ModelConfig { d_model: d, ffn_hidden: f, ..moe_cfg(0.0, true) };
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let x = scaled(n * d, 51, 1.0);
    let router = scaled(e * d, 52, 1.5);
    let experts = store(&cfg, 200);
    let r = route(&cfg, &x, RouterWeights::plain(&router), n);
    let plan = DispatchPlan::from_routing(&r, e, k);
    let dout = values(n * d, 53);
    let mut grads = experts.zeros_like();
    let (out, dx) = {
        let mut exec = LocalExperts::new(&cfg, &experts, &mut grads);
        let y = exec.forward(0, &plan, plan.gather(&x, d)).unwrap();
        let mut out = vec![0.0; n * d];
        plan.combine(&r, &y, d, &mut out);
        let mut dgate = vec![0.0; n * k];
        let dy = plan.combine_backward(&r, &y, &dout, d, &mut dgate);
        let mut dx = vec![0.0; n * d];
        plan.gather_backward(&exec.backward(0, &plan, &dy).unwrap(), d, &mut dx);
        (out, dx)
    };
    let mut expect_grads = experts.zeros_like();
    let mut expect_dx = vec![0.0f32; n * d];
    for t in 0..n {
        let mut expect = vec![0.0f32; d];
        for s in 0..k {
            let (id, gate) = (r.expert_tk[t * k + s] as usize, r.gate_tk[t * k + s]);
            let (xt, mut yt, mut cache) = (&x[t * d..(t + 1) * d], vec![0.0; d], SwigluCache::default());
            let w = &experts.layers[0][&id];
            SwiGlu { d, f }.forward(w, Rows { x_rd: xt, rows: 1 }, &mut yt, &mut cache);
            for (o, v) in expect.iter_mut().zip(&yt) {
                *o += gate * v;
            }
            let dyt: Vec<f32> = dout[t * d..(t + 1) * d].iter().map(|v| gate * v).collect();
            let g = expect_grads.layers[0].get_mut(&id).unwrap();
            let mut x_dx = xt.to_vec();
            SwiGlu { d, f }.backward(w, &mut x_dx, 1, cache, &dyt, g);
            for (o, v) in expect_dx[t * d..(t + 1) * d].iter_mut().zip(&x_dx) {
                *o += v;
            }
        }
        for (a, b) in out[t * d..(t + 1) * d].iter().zip(&expect) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "out token {t}: {a} vs {b}");
        }
    }
    let close = |name: &str, a: &[f32], b: &[f32]| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{name}[{i}]: {p} vs {q}");
        }
    };
    close("dx", &dx, &expect_dx);
    for (id, g) in &grads.layers[0] {
        let eg = &expect_grads.layers[0][id];
        close(&format!("expert {id} w1"), &g.w1, &eg.w1);
        close(&format!("expert {id} w3"), &g.w3, &eg.w3);
        close(&format!("expert {id} w2"), &g.w2, &eg.w2);
    }
}

#[test]
fn local_experts_match_direct_per_token_computation() {
    // Small: the experts run one after another.
    check_local_experts_against_per_token(6, 5, 16);
    // rows * d * f = 192 * 32 * 64 > 2^18: the experts run as rayon tasks.
    check_local_experts_against_per_token(32, 64, 96);
}

#[test]
fn local_experts_report_missing_experts() {
    let cfg = moe_cfg(0.0, true);
    let (n, d, e, k) = (8, cfg.d_model, cfg.n_experts, cfg.top_k);
    let x = scaled(n * d, 61, 1.0);
    let router = scaled(e * d, 62, 1.5);
    let r = route(&cfg, &x, RouterWeights::plain(&router), n);
    let plan = DispatchPlan::from_routing(&r, e, k);
    let used = r.expert_tk[0] as usize;
    let mut partial = store(&cfg, 300);
    partial.layers[0].remove(&used);
    let mut grads = partial.zeros_like();
    let mut exec = LocalExperts::new(&cfg, &partial, &mut grads);
    match exec.forward(0, &plan, plan.gather(&x, d)) {
        Err(e @ ModelError::Executor { layer: 0, .. }) => {
            assert!(e.to_string().contains(&format!("expert {used}")), "{e}")
        }
        other => panic!("expected an executor error, got {other:?}"),
    }
    // Gradients must hold the experts the weights hold.
    let full = store(&cfg, 300);
    let mut grads = partial.zeros_like();
    let mut exec = LocalExperts::new(&cfg, &full, &mut grads);
    let y = exec.forward(0, &plan, plan.gather(&x, d)).unwrap();
    assert!(matches!(exec.backward(0, &plan, &y), Err(ModelError::Executor { .. })));
    // Backward without forward.
    let mut grads = full.zeros_like();
    let mut exec = LocalExperts::new(&cfg, &full, &mut grads);
    assert!(matches!(exec.backward(0, &plan, &y), Err(ModelError::Executor { .. })));
}

// ---------------------------------------------------------------- semantics

/// `E = 2`, `d = 2`, identity router: token `t` has logits `x_t`.
fn two_expert_cfg(top_k: usize, capacity_factor: f32) -> ModelConfig {
    ModelConfig { d_model: 2, n_experts: 2, top_k, capacity_factor, ..ModelConfig::default() }
}

#[test]
fn capacity_keeps_first_assignments_in_token_order() {
    // N = 6, k = 1, E = 2, c = 0.5: cap = ceil(0.5 * 6 / 2) = 2.
    let cfg = two_expert_cfg(1, 0.5);
    assert_eq!(cfg.capacity(6), 2);
    let choice = [0, 1, 0, 0, 1, 0];
    let x: Vec<f32> = choice.iter().flat_map(|&c| if c == 0 { [1.0, 0.0] } else { [0.0, 1.0] }).collect();
    let router = [1.0, 0.0, 0.0, 1.0];
    let r = route(&cfg, &x, RouterWeights::plain(&router), 6);
    assert_eq!(r.expert_tk, vec![0, 1, 0, 0, 1, 0]);
    // Expert 0 was chosen by tokens 0, 2, 3, 5: it keeps 0 and 2.
    assert_eq!(r.kept_tk, vec![true, true, true, false, true, false]);
    assert_eq!(r.tokens_per_expert, vec![2, 2]);
    assert_eq!(r.dropped, 2);
    let plan = DispatchPlan::from_routing(&r, 2, 1);
    assert_eq!(plan.source_a, vec![0, 2, 1, 4]);
    // A dropped token gets nothing from its expert.
    let mut out = vec![0.0; 12];
    plan.combine(&r, &[1.0; 8], 2, &mut out);
    assert_eq!(&out[6..8], &[0.0, 0.0]);
    assert_eq!(&out[10..12], &[0.0, 0.0]);
    assert!(out[0] > 0.0);

    // k = 2, E = 3, N = 4: every token's first choice is expert 0, cap = ceil(0.7*8/3) = 2.
    let cfg = ModelConfig { d_model: 3, n_experts: 3, top_k: 2, capacity_factor: 0.7, ..ModelConfig::default() };
    assert_eq!(cfg.capacity(4), 2);
    let x = [3.0, 1.0, 0.0, 3.0, 0.0, 1.0, 3.0, 1.0, 0.0, 3.0, 0.0, 1.0];
    let router = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let r = route(&cfg, &x, RouterWeights::plain(&router), 4);
    assert_eq!(r.expert_tk, vec![0, 1, 0, 2, 0, 1, 0, 2]);
    assert_eq!(r.kept_tk, vec![true, true, true, true, false, true, false, true]);
    assert_eq!(r.tokens_per_expert, vec![2, 2, 2]);
    assert_eq!(r.dropped, 2);
    // Gates are not renormalised after a drop: same as the dropless routing.
    let dropless = route(&ModelConfig { capacity_factor: 0.0, ..cfg.clone() }, &x, RouterWeights::plain(&router), 4);
    assert_eq!(r.gate_tk, dropless.gate_tk);
    assert!(dropless.kept_tk.iter().all(|&k| k));
    assert_eq!(dropless.tokens_per_expert, vec![4, 2, 2]);
}

#[test]
fn ties_go_to_the_lower_expert_id() {
    let cfg = ModelConfig { d_model: 4, n_experts: 4, top_k: 3, ..ModelConfig::default() };
    let router: Vec<f32> = (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect();
    // Logits equal x: all equal; (1, 2, 2, 0); (2, 1, 2, 1).
    let x = [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.0, 2.0, 1.0, 2.0, 1.0];
    let r = route(&cfg, &x, RouterWeights::plain(&router), 3);
    assert_eq!(r.expert_tk, vec![0, 1, 2, 1, 2, 0, 0, 2, 1]);
    // Highest probability first.
    for t in 0..3 {
        let g = &r.gate_tk[t * 3..t * 3 + 3];
        assert!(g[0] >= g[1] && g[1] >= g[2]);
    }
}

#[test]
fn aux_and_z_loss_values() {
    // Uniform probabilities (zero router) give aux = E * sum_e f_e / E = 1.
    let cfg = moe_cfg(0.0, true);
    let x = values(10 * cfg.d_model, 71);
    let r = route(&cfg, &x, RouterWeights::plain(&vec![0.0; cfg.n_experts * cfg.d_model]), 10);
    assert!((r.aux_loss - 1.0).abs() < 1e-6, "aux {}", r.aux_loss);
    // z = lse^2 = ln(E)^2 for zero logits.
    assert!((r.z_loss - (4f32).ln().powi(2)).abs() < 1e-5, "z {}", r.z_loss);

    // Balanced counts with mirrored probabilities: P = f = (1/2, 1/2), aux = 1.
    let cfg = two_expert_cfg(1, 0.0);
    let router = [1.0, 0.0, 0.0, 1.0];
    let x = [2.0, 0.0, 0.0, 2.0];
    let r = route(&cfg, &x, RouterWeights::plain(&router), 2);
    assert_eq!(r.expert_tk, vec![0, 1]);
    assert!((r.aux_loss - 1.0).abs() < 1e-6, "aux {}", r.aux_loss);

    // Imbalanced: both tokens pick expert 0 with p0 = q: aux = 2 * (1 * q + 0) = 2q.
    let x = [2.0, 0.0, 2.0, 0.0];
    let r = route(&cfg, &x, RouterWeights::plain(&router), 2);
    let q = 1.0 / (1.0 + (-2f32).exp());
    assert!((r.aux_loss - 2.0 * q).abs() < 1e-6, "aux {} vs {}", r.aux_loss, 2.0 * q);
    let lse = (2f32.exp() + 1.0).ln();
    assert!((r.z_loss - lse * lse).abs() < 1e-5);
}

#[test]
fn plan_groups_rows_by_expert_in_token_order() {
    let routing = Routing {
        num_tokens: 4,
        expert_tk: vec![2, 0, 0, 1, 2, 1, 0, 2],
        kept_tk: vec![true, true, true, true, false, true, true, true],
        gate_tk: vec![0.5; 8],
        ..Routing::default()
    };
    let plan = DispatchPlan::from_routing(&routing, 4, 2);
    assert_eq!(plan.counts_e, vec![3, 2, 2, 0]);
    assert_eq!(plan.offsets_e, vec![0, 3, 5, 7, 7]);
    // Expert 0: (t0,s1), (t1,s0), (t3,s0); expert 1: (t1,s1), (t2,s1); expert 2: (t0,s0), (t3,s1).
    assert_eq!(plan.source_a, vec![1, 2, 6, 3, 5, 0, 7]);
    let x: Vec<f32> = (0..4).flat_map(|t| [t as f32, 10.0 + t as f32]).collect();
    let x_ad = plan.gather(&x, 2);
    assert_eq!(x_ad, vec![0.0, 10.0, 1.0, 11.0, 3.0, 13.0, 1.0, 11.0, 2.0, 12.0, 0.0, 10.0, 3.0, 13.0]);
    let mut dx = vec![0.0; 8];
    plan.gather_backward(&x_ad, 2, &mut dx);
    // Token 2 has one kept row (its slot 0 was dropped), the others two.
    assert_eq!(dx, vec![0.0, 20.0, 2.0, 22.0, 2.0, 12.0, 6.0, 26.0]);
}
