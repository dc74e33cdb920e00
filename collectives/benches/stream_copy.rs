//! `cargo bench -p collectives --bench stream_copy`: copying one block of
//! 1 to 32 MiB with the streaming stores the MPI all-to-all uses for a
//! rank's own block, against the C library's `memcpy` (what an ordinary
//! copy, and OpenMPI's own copy, calls), in the same run and in turns.
//! Each time is the fastest of 7 rounds of 20 copies into 8 rotating
//! destinations already touched, so page faults are not timed.

use collectives::stream_copy::copy_bytes;
use std::time::Instant;

const ROUNDS: usize = 7;
const COPIES: usize = 20;

fn main() {
    println!("| block | memcpy | GB/s | streaming | GB/s | speed vs memcpy |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for mib in [1usize, 2, 4, 8, 16, 32] {
        let len = mib << 20;
        let src = vec![1u8; len];
        let mut dsts: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; len]).collect();
        let mut best = [f64::INFINITY; 2];
        for _ in 0..ROUNDS {
            for (way, stream) in [false, true].into_iter().enumerate() {
                let started = Instant::now();
                for copy in 0..COPIES {
                    let dst = &mut dsts[copy % 8];
                    // SAFETY: two distinct vectors of `len` bytes each.
                    unsafe { copy_bytes(src.as_ptr(), dst.as_mut_ptr(), len, stream) };
                }
                best[way] = best[way].min(started.elapsed().as_secs_f64() / COPIES as f64);
            }
        }
        let gbs = |s: f64| len as f64 / s / 1e9;
        println!(
            "| {mib} MiB | {:.3} ms | {:.1} | {:.3} ms | {:.1} | {:.2}x |",
            best[0] * 1e3,
            gbs(best[0]),
            best[1] * 1e3,
            gbs(best[1]),
            best[0] / best[1]
        );
    }
}
