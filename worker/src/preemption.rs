//! Pre-emption: SIGTERM (scancel, a Slurm time limit with `--signal`, a
//! Kubernetes pod being evicted or deleted) or SIGINT (Ctrl-C) asks the job
//! to save a checkpoint at the next step boundary and stop, so a requeued
//! or restarted job resumes where this one stopped instead of at the last
//! periodic checkpoint. SIGUSR1 asks the same: it is what the launcher of
//! an MPI job sends its `mpirun`, which forwards it to every rank (it does
//! not forward SIGTERM, which ends the job instead), and what Slurm's
//! `--signal=USR1@60` sends ahead of a time limit.
//!
//! The signal may reach one rank or all of them; at every step the ranks
//! agree in the step's metrics reduction (any rank asked = all stop), so
//! they save the same step together.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Exit status of a job that stopped on SIGTERM after committing its
/// checkpoint: 128 + 15, what schedulers expect of a terminated process.
pub const PREEMPTED_EXIT_CODE: i32 = 143;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The first stop signal received (0: none).
static FIRST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigterm(signal: libc::c_int) {
    // Only atomic stores: all that is safe inside a signal handler.
    let _ = FIRST_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
}

/// The signals that ask for a checkpoint-and-stop.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// Makes [`STOP_SIGNALS`] request a checkpoint-and-stop instead of killing
/// the process. Idempotent.
pub fn install() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the
    // sigaction struct is zeroed then filled as sigaction(2) describes.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in STOP_SIGNALS {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether this process received one of the [`STOP_SIGNALS`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks for the same checkpoint-and-stop as a stop signal, from code: a
/// rank whose coordinator was told to stop calls it.
pub fn request_by_coordinator() {
    let _ = FIRST_SIGNAL.compare_exchange(0, BY_COORDINATOR, Ordering::SeqCst, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
}

/// [`FIRST_SIGNAL`]'s value for a stop the coordinator asked for.
const BY_COORDINATOR: libc::c_int = -1;

/// The name of the first stop signal this process received, for messages
/// ("stopped on SIGINT"); "a stop signal" when it is not known.
pub fn signal_name() -> &'static str {
    match FIRST_SIGNAL.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        BY_COORDINATOR => "the coordinator's request",
        _ => "a stop signal",
    }
}
