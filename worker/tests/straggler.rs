//! The all-to-all split into waiting for the last peer and transfer, with a
//! made straggler. Its own test binary: the fault variable is process-wide,
//! and the ranks here are threads of this process.

mod common;

use common::{fresh_run, layout_job};
use worker::rank::straggler::SLOW_RANK_VAR;

#[test]
fn ranks_that_wait_for_a_straggler_count_it_as_waiting_not_transfer() {
    const DELAY_S: f64 = 0.06;
    // SAFETY: the only test of this binary; the ranks start after this.
    unsafe { std::env::set_var(SLOW_RANK_VAR, format!("1:{}", (DELAY_S * 1e3) as u64)) };
    let job = layout_job(&[], 4, &["parallel.ep=4", "train.steps=6", "checkpoint.every=0"]);
    let steps = fresh_run(&job, "straggler");
    for m in &steps[1..] {
        let r = &m.per_rank;
        // Rank 1 arrives last at the step's first exchange, so the others
        // wait for it there; it waits for nobody that long.
        for other in [0, 2, 3] {
            assert!(
                r[other].alltoall_peer_wait_s > 0.5 * DELAY_S,
                "step {}: rank {other} waited {:.4} s for rank 1 (slept {DELAY_S} s): {r:?}",
                m.step,
                r[other].alltoall_peer_wait_s
            );
            assert!(r[1].alltoall_peer_wait_s < r[other].alltoall_peer_wait_s, "step {}: {r:?}", m.step);
        }
        for rank in r {
            // The parts add up to the rank's all-to-all time.
            let sum = rank.alltoall_peer_wait_s + rank.alltoall_transfer_s;
            assert!((sum - rank.alltoall_s).abs() < 1e-6, "step {}: {rank:?}", m.step);
        }
        assert_eq!(m.alltoall_peer_wait_s, r.iter().map(|x| x.alltoall_peer_wait_s).fold(0.0, f64::max));
    }
}
