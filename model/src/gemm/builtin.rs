//! Products through the `gemm` crate (fp32, pure Rust): the kernels every
//! build has, chosen by measurement on the 2-core development machine
//! (docs/kernels.md has the table): it beat `matrixmultiply` at every
//! transformer-sized shape, by up to 1.9x on small expert blocks.

use super::Dest;
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

/// `C[m,n] (+)= op(A) op(B)` (sizes checked, none zero, by the caller),
/// each factor given as its values and whether it is read transposed.
pub(super) fn product(
    (m, k, n): (usize, usize, usize),
    (a, a_trans): (&[f32], bool),
    (b, b_trans): (&[f32], bool),
    mut c: Dest<'_>,
    accumulate: bool,
) {
    // (row stride, column stride) of op(A) [m,k] and op(B) [k,n].
    let (a_rs, a_cs) = if a_trans { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_trans { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the caller's size checks bound every index the strides can
    // reach, and `c` does not alias `a` or `b` (distinct borrows).
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
