//! Shared helpers for the finite-difference gradient tests.
#![allow(dead_code)]

/// Deterministic test values in roughly [-1, 1].
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = model::rng::Rng::new(seed);
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

/// `sum(y * probe)` in f64: a scalar loss whose gradient w.r.t. y is `probe`.
pub fn probe_loss(y: &[f32], probe: &[f32]) -> f64 {
    y.iter().zip(probe).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Checks `analytic` (d loss / d x) against central differences of `loss`
/// at up to `max_checks` positions of `x` spread over the whole tensor.
/// f32 forward passes limit the precision, so the tolerance is
/// `atol + rtol * |numeric|` with the step `eps`.
pub fn check_gradient(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    check_gradient_with(name, x, analytic, loss, Fd { eps: 1e-2, atol: 2e-3, rtol: 2e-2, max_checks: 48 })
}

/// Step, tolerances and number of positions of a finite-difference check.
#[derive(Debug, Clone, Copy)]
pub struct Fd {
    pub eps: f32,
    pub atol: f64,
    pub rtol: f64,
    pub max_checks: usize,
}

/// [`check_gradient`] with explicit step and tolerances.
pub fn check_gradient_with(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64, fd: Fd) {
    let Fd { eps, atol, rtol, max_checks } = fd;
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let stride = (x.len() / max_checks).max(1);
    let mut xp = x.to_vec();
    let mut checked = 0;
    for i in (0..x.len()).step_by(stride).take(max_checks) {
        let orig = xp[i];
        xp[i] = orig + eps;
        let up = loss(&xp);
        xp[i] = orig - eps;
        let down = loss(&xp);
        xp[i] = orig;
        let numeric = (up - down) / (2.0 * eps as f64);
        let a = analytic[i] as f64;
        assert!(
            (a - numeric).abs() <= atol + rtol * numeric.abs(),
            "{name}[{i}]: analytic {a:.6e} vs numeric {numeric:.6e}"
        );
        checked += 1;
    }
    assert!(checked > 0, "{name}: nothing checked");
}
