//! Matrix products for every layer, through the `gemm` crate.
//!
//! `gemm` was chosen by measurement on the 2-core development machine
//! (docs/kernels.md has the table): it beat `matrixmultiply` at every
//! transformer-sized shape, by up to 1.9x on small expert blocks.
//!
//! All matrices are row-major. `C[m,n] = beta*C + op(A)[m,k] · op(B)[k,n]`
//! where `op` optionally transposes. Linear layers store weights as
//! `[out, in]`, so the three products of a layer are:
//! forward `y = x W^T` ([`matmul_nt`]), input grad `dx = dy W` ([`matmul_nn`]),
//! weight grad `dW += dy^T x` ([`matmul_tn`]).

use gemm::Parallelism;

/// Below this many multiply-adds a product runs on the calling thread:
/// splitting it costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 96 * 96 * 96;

fn parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    if m * k * n < PARALLEL_MIN_FLOPS || rayon::current_thread_index().is_some() {
        // Inside a rayon task the outer loop already owns the threads.
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// One factor of a product: its row-major values, read transposed or not.
#[derive(Clone, Copy)]
struct Operand<'a> {
    values: &'a [f32],
    transposed: bool,
}

/// Strided product `C[m,n] (+)= op(A) op(B)`.
fn product(m: usize, k: usize, n: usize, a: Operand<'_>, b: Operand<'_>, c: &mut [f32], accumulate: bool) {
    let (Operand { values: a, transposed: a_trans }, Operand { values: b, transposed: b_trans }) = (a, b);
    assert!(a.len() >= m * k, "A has {} values, needs {m}x{k}", a.len());
    assert!(b.len() >= k * n, "B has {} values, needs {k}x{n}", b.len());
    assert!(c.len() >= m * n, "C has {} values, needs {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of op(A) [m,k] and op(B) [k,n].
    let (a_rs, a_cs) = if a_trans { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_trans { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides can reach,
    // and `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, k, n),
        );
    }
}

/// `C[m,n] (+)= A[m,k] · B[n,k]^T` — a linear layer's forward pass.
pub fn matmul_nt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    product(m, k, n, Operand { values: a, transposed: false }, Operand { values: b, transposed: true }, c, accumulate)
}

/// `C[m,n] (+)= A[m,k] · B[k,n]` — a linear layer's input gradient.
pub fn matmul_nn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    product(m, k, n, Operand { values: a, transposed: false }, Operand { values: b, transposed: false }, c, accumulate)
}

/// `C[m,n] (+)= A[k,m]^T · B[k,n]` — a linear layer's weight gradient.
pub fn matmul_tn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    product(m, k, n, Operand { values: a, transposed: true }, Operand { values: b, transposed: false }, c, accumulate)
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
