//! Matrix products for every layer, in fp32 or bf16.
//!
//! All matrices are row-major. `C[m,n] = beta*C + op(A)[m,k] · op(B)[k,n]`
//! where `op` optionally transposes. Linear layers store weights as
//! `[out, in]`, so the three products of a layer are:
//! forward `y = x W^T` ([`matmul_nt`]), input grad `dx = dy W` ([`matmul_nn`]),
//! weight grad `dW += dy^T x` ([`matmul_tn`]).
//!
//! Precision is the process's ([`set_precision`]; a job sets it from
//! `[train] precision` when it starts, as it sets the thread count): fp32
//! products run the built-in kernels (`builtin`, the `gemm` crate) unless
//! `SWITCHYARD_KERNELS=onednn`; bf16 products round both factors to
//! bfloat16 and accumulate in fp32, on oneDNN's matrix-unit kernels
//! (`onednn`, loaded at run time) when the library is there, else on the
//! built-in kernels over the rounded values (the same numbers, no speed-up).
//! A factor is f32 values or bf16 values ([`Values`]): one that several
//! products read is converted once ([`prepare`]), with the same bits.

pub mod bf16;
mod builtin;
mod dest;
mod factor;
pub mod onednn;

pub use bf16::{round as round_to_bf16, Bf16};
use dest::Dest;
pub use factor::{factors_in_bf16, prepare, FactorElement, Prepared, Values};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The element type matrix products multiply in (they always accumulate
/// and return fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every later product of this process.
pub fn set_precision(precision: Precision) {
    PRECISION.store(precision as u8, Ordering::Relaxed);
}

/// The precision products run in now.
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => Precision::Fp32,
        _ => Precision::Bf16,
    }
}

/// Which kernels run products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The `gemm` crate (every build).
    Builtin,
    /// oneDNN's matmul (loaded at run time).
    OneDnn,
}

/// The kernels asked for: [`set_kernels`], else `SWITCHYARD_KERNELS`
/// (`builtin`, `onednn`, or unset/`auto`: oneDNN for bf16 when it loads,
/// built-in for fp32).
fn asked() -> Option<Kernels> {
    static FROM_ENV: OnceLock<Option<Kernels>> = OnceLock::new();
    match ASKED.load(Ordering::Relaxed) {
        1 => None,
        2 => Some(Kernels::Builtin),
        3 => Some(Kernels::OneDnn),
        _ => *FROM_ENV.get_or_init(|| match std::env::var("SWITCHYARD_KERNELS").as_deref() {
            Ok("builtin") => Some(Kernels::Builtin),
            Ok("onednn") => Some(Kernels::OneDnn),
            _ => None,
        }),
    }
}

/// 0: as `SWITCHYARD_KERNELS` says; 1: automatic; 2: built-in; 3: oneDNN.
static ASKED: AtomicU8 = AtomicU8::new(0);

/// Asks for `kernels` (`None`: the automatic choice) in this process, over
/// `SWITCHYARD_KERNELS` (benchmarks and tests compare them).
pub fn set_kernels(kernels: Option<Kernels>) {
    let code = match kernels {
        None => 1,
        Some(Kernels::Builtin) => 2,
        Some(Kernels::OneDnn) => 3,
    };
    ASKED.store(code, Ordering::Relaxed);
}

/// fp32 products of at least this many multiply-adds run on oneDNN when
/// it is installed (and no kernels are asked for): there it is 1.8-2.2x the
/// built-in kernels (`switchyard bench kernels`), below it the built-in
/// ones win (a call's fixed costs). The golden-loss jobs stay below it.
pub const FP32_ONEDNN_MIN_MACS: usize = 1 << 26;

/// The kernels large products of `precision` run on in this process.
pub fn kernels_for(precision: Precision) -> Kernels {
    kernels_for_size(precision, usize::MAX)
}

/// The kernels a product of `macs` multiply-adds in `precision` runs on
/// (oneDNN is loaded only when asked for or needed).
pub fn kernels_for_size(precision: Precision, macs: usize) -> Kernels {
    match onednn_for_size(precision, macs) {
        Some(_) => Kernels::OneDnn,
        None => Kernels::Builtin,
    }
}

/// oneDNN when a product of `macs` multiply-adds in `precision` runs on
/// it; None when it runs on the built-in kernels.
fn onednn_for_size(precision: Precision, macs: usize) -> Option<&'static onednn::OneDnn> {
    let wanted = match (asked(), precision) {
        (Some(kernels), _) => kernels == Kernels::OneDnn,
        (None, Precision::Bf16) => true,
        (None, Precision::Fp32) => macs >= FP32_ONEDNN_MIN_MACS,
    };
    wanted.then(|| onednn_for(precision).ok()).flatten()
}

/// oneDNN, if it is installed and multiplies in `precision` on this CPU;
/// why not, if not.
pub fn onednn_for(precision: Precision) -> Result<&'static onednn::OneDnn, &'static str> {
    let library = onednn::get()?;
    match precision {
        Precision::Bf16 => library.bf16().map(|()| library),
        Precision::Fp32 => Ok(library),
    }
}

/// One line for a start banner: which kernels run products of `precision`,
/// and why. For fp32 it does not load oneDNN (a job whose products are all
/// small never maps it).
pub fn describe(precision: Precision) -> String {
    if precision == Precision::Fp32 && asked().is_none() {
        return "the built-in kernels (gemm crate), oneDNN for products of 64M+ multiply-adds when installed"
            .to_string();
    }
    match (kernels_for(precision), precision) {
        (Kernels::OneDnn, _) => onednn::get().map(|l| l.description().to_string()).unwrap_or_default(),
        (Kernels::Builtin, Precision::Fp32) => "the built-in kernels (gemm crate)".to_string(),
        (Kernels::Builtin, Precision::Bf16) => {
            let why = onednn_for(precision).err().map(|e| format!(": {e}")).unwrap_or_default();
            format!("the built-in fp32 kernels over bf16-rounded factors (bf16 numbers without the speed{why})")
        }
    }
}

/// Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16).
pub fn cpu_has_bf16_units() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16") || amx_bf16()
}

/// CPUID leaf 7's AMX-BF16 bit (the standard library's detection of it is
/// not stable yet).
#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    // CPUID exists on every x86-64 CPU; where leaf 7 does not, the bit reads 0.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    leaf.edx & (1 << 22) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_bf16() -> bool {
    false
}

/// One factor of a product: its row-major values, read transposed or not.
#[derive(Clone, Copy)]
struct Operand<'a> {
    values: Values<'a>,
    transposed: bool,
}

/// Which factors a product reads transposed: `nt` (a forward pass), `nn`
/// (an input gradient), `tn` (a weight gradient).
#[derive(Clone, Copy)]
enum Layout {
    Nt,
    Nn,
    Tn,
}

impl Layout {
    fn operands<'a, 'b>(self, a: impl Into<Values<'a>>, b: impl Into<Values<'b>>) -> (Operand<'a>, Operand<'b>) {
        let (a_t, b_t) = match self {
            Layout::Nt => (false, true),
            Layout::Nn => (false, false),
            Layout::Tn => (true, false),
        };
        (Operand { values: a.into(), transposed: a_t }, Operand { values: b.into(), transposed: b_t })
    }
}

/// Strided product `C[m,n] (+)= op(A) op(B)` in the process's precision.
fn product(m: usize, k: usize, n: usize, a: Operand<'_>, b: Operand<'_>, c: Dest<'_>, accumulate: bool) {
    product_in(precision(), (m, k, n), a, b, c, accumulate)
}

/// Strided product `C[m,n] (+)= op(A) op(B)` in `precision`.
fn product_in(
    precision: Precision,
    (m, k, n): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    mut c: Dest<'_>,
    accumulate: bool,
) {
    assert!(a.values.len() >= m * k, "A has {} values, needs {m}x{k}", a.values.len());
    assert!(b.values.len() >= k * n, "B has {} values, needs {k}x{n}", b.values.len());
    assert!(c.len() >= m * n, "C has {} values, needs {m}x{n}", c.len());
    assert!(c.is_initialised() || !accumulate, "a product can only add to initialised values");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.zero(m * n);
        }
        return;
    }
    if let Some(library) = onednn_for_size(precision, m * k * n) {
        if let Err(e) = library.product((m, k, n), a, b, c, accumulate, precision == Precision::Bf16) {
            // A shape oneDNN refuses is a bug here, not the user's input.
            panic!("{e} ({m}x{k}x{n})");
        }
        return;
    }
    let (a_len, b_len) = (m * k, k * n);
    let (a_f32, b_f32) = match precision {
        Precision::Fp32 => (a.values.f32s(a_len), b.values.f32s(b_len)),
        Precision::Bf16 => (a.values.bf16_rounded(a_len), b.values.bf16_rounded(b_len)),
    };
    builtin::product((m, k, n), (&a_f32, a.transposed), (&b_f32, b.transposed), c, accumulate)
}

/// `C[m,n] (+)= A[m,k] · B[n,k]^T` — a linear layer's forward pass.
pub fn matmul_nt<'a, 'b>(
    m: usize,
    k: usize,
    n: usize,
    a: impl Into<Values<'a>>,
    b: impl Into<Values<'b>>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (a, b) = Layout::Nt.operands(a, b);
    product(m, k, n, a, b, Dest::init(c), accumulate)
}

/// `C[m,n] (+)= A[m,k] · B[k,n]` — a linear layer's input gradient.
pub fn matmul_nn<'a, 'b>(
    m: usize,
    k: usize,
    n: usize,
    a: impl Into<Values<'a>>,
    b: impl Into<Values<'b>>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (a, b) = Layout::Nn.operands(a, b);
    product(m, k, n, a, b, Dest::init(c), accumulate)
}

/// `C[m,n] (+)= A[k,m]^T · B[k,n]` — a linear layer's weight gradient.
pub fn matmul_tn<'a, 'b>(
    m: usize,
    k: usize,
    n: usize,
    a: impl Into<Values<'a>>,
    b: impl Into<Values<'b>>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (a, b) = Layout::Tn.operands(a, b);
    product(m, k, n, a, b, Dest::init(c), accumulate)
}

/// `A[m,k] · B[n,k]^T` in a new vector, which the product writes once
/// (it is not zero-filled first).
pub fn matmul_nt_new<'a, 'b>(
    m: usize,
    k: usize,
    n: usize,
    a: impl Into<Values<'a>>,
    b: impl Into<Values<'b>>,
) -> Vec<f32> {
    let (a, b) = Layout::Nt.operands(a, b);
    fresh(m * n, |c| product(m, k, n, a, b, c, false))
}

/// `A[m,k] · B[k,n]` in a new vector, written once.
pub fn matmul_nn_new<'a, 'b>(
    m: usize,
    k: usize,
    n: usize,
    a: impl Into<Values<'a>>,
    b: impl Into<Values<'b>>,
) -> Vec<f32> {
    let (a, b) = Layout::Nn.operands(a, b);
    fresh(m * n, |c| product(m, k, n, a, b, c, false))
}

/// A vector of `len` values that `product` writes in full (a product
/// that does not accumulate writes every value of `C`).
fn fresh(len: usize, product: impl FnOnce(Dest<'_>)) -> Vec<f32> {
    let mut c: Vec<f32> = Vec::with_capacity(len);
    let spare: &mut [MaybeUninit<f32>] = &mut c.spare_capacity_mut()[..len];
    product(Dest::uninit(spare));
    // SAFETY: the product wrote all `len` values (it did not accumulate:
    // every kernel path then writes the whole of `C`, and `k = 0` zeros it).
    unsafe { c.set_len(len) };
    c
}

/// The same three products, always in fp32: for routers, whose choices
/// must not move with the precision of the rest of the model.
pub mod fp32 {
    use super::{product_in, Layout, Precision};

    /// `C[m,n] (+)= A[m,k] · B[n,k]^T` in fp32.
    pub fn matmul_nt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        let (a, b) = Layout::Nt.operands(a, b);
        product_in(Precision::Fp32, (m, k, n), a, b, super::Dest::init(c), accumulate)
    }

    /// `C[m,n] (+)= A[m,k] · B[k,n]` in fp32.
    pub fn matmul_nn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        let (a, b) = Layout::Nn.operands(a, b);
        product_in(Precision::Fp32, (m, k, n), a, b, super::Dest::init(c), accumulate)
    }

    /// `C[m,n] (+)= A[k,m]^T · B[k,n]` in fp32.
    pub fn matmul_tn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        let (a, b) = Layout::Tn.operands(a, b);
        product_in(Precision::Fp32, (m, k, n), a, b, super::Dest::init(c), accumulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    fn close(x: &[f32], y: &[f32]) {
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }

    #[test]
    fn all_three_layouts_match_naive_products() {
        for &(m, k, n) in &[(3, 5, 7), (130, 70, 110), (1, 1, 1), (64, 200, 3)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
            let mut c = vec![1.0; m * n];
            // B stored as [n,k] for nt.
            matmul_nt(m, k, n, &a, &b, &mut c, false);
            close(&c, &naive(m, k, n, |i, p| a[i * k + p], |p, j| b[j * k + p]));
            matmul_nn(m, k, n, &a, &b, &mut c, false);
            close(&c, &naive(m, k, n, |i, p| a[i * k + p], |p, j| b[p * n + j]));
            // A stored as [k,m] for tn.
            let expect = naive(m, k, n, |i, p| a[p * m + i], |p, j| b[p * n + j]);
            let mut acc = expect.clone();
            matmul_tn(m, k, n, &a, &b, &mut acc, true);
            close(&acc, &expect.iter().map(|x| 2.0 * x).collect::<Vec<_>>());
        }
    }
}
