//! A process-wide "stop now" that waiting collectives obey: the worker sets
//! it when the coordinator says the job must stop (a rank was lost), so a
//! rank blocked in a collective with a lost peer ends at once instead of at
//! the collective's deadline. The MPI backend checks it while it polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static REASON: Mutex<Option<String>> = Mutex::new(None);

/// Asks every waiting collective of this process to give up; the first reason sticks.
pub fn request(reason: &str) {
    let mut slot = REASON.lock().unwrap_or_else(|e| e.into_inner());
    slot.get_or_insert_with(|| reason.to_string());
    REQUESTED.store(true, Ordering::Release);
}

/// The reason, once a stop was requested (cheap when none was).
pub fn requested() -> Option<String> {
    if !REQUESTED.load(Ordering::Acquire) {
        return None;
    }
    REASON.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
