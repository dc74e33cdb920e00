//! Finding out which ranks never reached a collective that timed out.
//!
//! MPI does not say which rank a stuck collective waits for. So a rank whose
//! operation timed out sends the operation's sequence number to every peer
//! on a communicator kept for this alone, and listens for theirs: ranks that
//! are stuck in the same operation time out too and answer with the same
//! number; a rank that is stopped, hung or elsewhere does not.

use super::ffi_util::{null_request, poll, MpiElem, Polled};
use mpi::ffi;
use std::os::raw::c_int;
use std::time::{Duration, Instant};

/// Tag of roll-call messages (on the roll-call communicator only).
const ROLL_TAG: c_int = 7;

/// The group ranks that did not answer with `seq` within `grace`.
pub(super) fn missing_ranks(roll: ffi::MPI_Comm, rank: usize, size: usize, seq: u64, grace: Duration) -> Vec<usize> {
    let peers: Vec<usize> = (0..size).filter(|&r| r != rank).collect();
    // The buffers and requests are leaked on purpose: requests to a rank
    // that never answers stay posted, and the job ends right after this.
    let mine: &'static u64 = Box::leak(Box::new(seq));
    let answers: &'static mut [u64] = Box::leak(vec![u64::MAX; size].into_boxed_slice());
    let mut receives = vec![null_request(); size];
    for &peer in &peers {
        let mut send = null_request();
        // SAFETY: `mine` and `answers` live for the rest of the process; the
        // communicator is live; peer < size.
        unsafe {
            ffi::MPI_Isend((mine as *const u64).cast(), 1, u64::datatype(), peer as c_int, ROLL_TAG, roll, &mut send);
            ffi::MPI_Irecv(
                (&mut answers[peer] as *mut u64).cast(),
                1,
                u64::datatype(),
                peer as c_int,
                ROLL_TAG,
                roll,
                &mut receives[peer],
            );
        }
    }
    let deadline = Instant::now() + grace;
    let mut answered = vec![false; size];
    for &peer in &peers {
        answered[peer] = poll("roll call", std::slice::from_mut(&mut receives[peer]), None, deadline)
            .is_ok_and(|p| p == Polled::Done);
    }
    peers.into_iter().filter(|&peer| !answered[peer] || answers[peer] != seq).collect()
}
