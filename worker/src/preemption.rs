//! Pre-emption: SIGTERM (scancel, a Slurm time limit with `--signal`, a
//! Kubernetes pod being evicted or deleted) asks the job to save a
//! checkpoint at the next step boundary and stop, so a requeued or
//! restarted job resumes where this one stopped instead of at the last
//! periodic checkpoint.
//!
//! The signal may reach one rank or all of them; at every step the ranks
//! agree in the step's metrics reduction (any rank asked = all stop), so
//! they save the same step together.

use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status of a job that stopped on SIGTERM after committing its
/// checkpoint: 128 + 15, what schedulers expect of a terminated process.
pub const PREEMPTED_EXIT_CODE: i32 = 143;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    // Only an atomic store: all that is safe inside a signal handler.
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM request a checkpoint-and-stop instead of killing the
/// process. Idempotent.
pub fn install() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the
    // sigaction struct is zeroed then filled as sigaction(2) describes.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Whether this process received SIGTERM.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
