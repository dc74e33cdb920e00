//! Data patterns shared by the backend suites, so every backend is held to
//! the same expectations.
#![allow(dead_code)]

/// A value whose sums depend on the order of addition (mixed magnitudes and signs).
pub fn mixed(rank: usize, i: usize) -> f32 {
    let x = ((rank * 31 + i * 17) % 101) as f32 - 50.0;
    x * 10f32.powi(((rank + i) % 9) as i32 - 4) + 0.1 * rank as f32
}

/// The rank-order sum of [`mixed`] over `size` ranks.
pub fn mixed_sum(size: usize, i: usize) -> f32 {
    (1..size).fold(mixed(0, i), |acc, r| acc + mixed(r, i))
}

/// Values sent from `src` to `dst` in the all-to-all tests: uneven, some zero.
pub fn a2a_count(src: usize, dst: usize) -> usize {
    (src + 2 * dst) % 3
}

pub fn a2a_value(src: usize, dst: usize, i: usize) -> f32 {
    (src * 10_000 + dst * 100 + i) as f32
}

pub fn a2a_send(rank: usize, size: usize) -> (Vec<f32>, Vec<usize>) {
    let counts: Vec<usize> = (0..size).map(|dst| a2a_count(rank, dst)).collect();
    let send = (0..size).flat_map(|dst| (0..a2a_count(rank, dst)).map(move |i| a2a_value(rank, dst, i))).collect();
    (send, counts)
}

pub fn a2a_expected(rank: usize, size: usize) -> (Vec<f32>, Vec<usize>) {
    let counts: Vec<usize> = (0..size).map(|src| a2a_count(src, rank)).collect();
    let values = (0..size).flat_map(|src| (0..a2a_count(src, rank)).map(move |i| a2a_value(src, rank, i))).collect();
    (values, counts)
}

/// Elements per rank of the large-message tests: 16 Mi f32 = 64 MiB.
pub const LARGE: usize = 16 << 20;

/// Distinct bits per (source, destination, index) for the large all-to-all:
/// catches any misplaced block.
pub fn large_value(size: usize, src: usize, dst: usize, i: usize) -> f32 {
    f32::from_bits((((src * size + dst) << 22) | i) as u32)
}
