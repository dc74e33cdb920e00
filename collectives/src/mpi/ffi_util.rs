//! Thin, checked wrappers over the MPI C calls the backend makes.

use crate::CommError;
use mpi::ffi;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Element types the backend sends, with their MPI datatypes.
pub(super) trait MpiElem: Copy + Default + Send + 'static {
    fn datatype() -> ffi::MPI_Datatype;
}

impl MpiElem for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant handle set by the MPI library at link time.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl MpiElem for f64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_DOUBLE }
    }
}

impl MpiElem for u64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_UINT64_T }
    }
}

impl MpiElem for c_int {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_INT32_T }
    }
}

/// The text MPI gives for an error code.
pub(super) fn error_text(code: c_int) -> String {
    let mut text = vec![0u8; 512];
    let mut len: c_int = 0;
    // SAFETY: the buffer is MPI_MAX_ERROR_STRING (256) or more bytes long.
    let rc = unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return format!("MPI error code {code}");
    }
    text.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&text).into_owned()
}

/// Turns an MPI return code into a result.
pub(super) fn check(op: &'static str, code: c_int) -> Result<(), CommError> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(CommError::Transport { op, reason: error_text(code) })
    }
}

/// A count as MPI's `int`, or a clear error when a message is too large for one call.
pub(super) fn c_count(op: &'static str, n: usize) -> Result<c_int, CommError> {
    c_int::try_from(n).map_err(|_| CommError::BadArgument {
        op,
        reason: format!("{n} elements exceed MPI's 2^31-1 per call; split the message"),
    })
}

/// Counts and displacements (prefix sums) as MPI `int`s.
pub(super) fn counts_and_displs(op: &'static str, counts: &[usize]) -> Result<(Vec<c_int>, Vec<c_int>), CommError> {
    let total: usize = counts.iter().sum();
    c_count(op, total)?;
    let counts_c: Vec<c_int> = counts.iter().map(|&n| n as c_int).collect();
    let displs = counts_c
        .iter()
        .scan(0, |offset, &n| {
            let here = *offset;
            *offset += n;
            Some(here)
        })
        .collect();
    Ok((counts_c, displs))
}

/// The null request, what a completed request becomes.
pub(super) fn null_request() -> ffi::MPI_Request {
    // SAFETY: a constant handle set by the MPI library.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

/// Tests made without yielding the core at the start of a wait: many when
/// every rank has a core of its own, few when ranks share cores (then a
/// spinning rank would take the core from the peer it waits for).
static SPIN_TESTS: AtomicU32 = AtomicU32::new(20_000);

/// Sets how long waits spin before yielding (see [`SPIN_TESTS`]).
pub(super) fn set_spin_tests(tests: u32) {
    SPIN_TESTS.store(tests, Ordering::Relaxed);
}

thread_local! {
    /// Whether this thread is a communication thread (see `crate::comm_thread`).
    static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests a communication thread makes before it starts napping.
const BACKGROUND_SPIN_TESTS: u32 = 200;

/// How long a wait yields before it starts napping.
const NAP_AFTER: std::time::Duration = std::time::Duration::from_micros(200);

/// A communication thread's pause between tests once it naps.
const BACKGROUND_NAP: std::time::Duration = std::time::Duration::from_micros(20);

/// Marks this thread as a communication thread: its waits nap between tests.
pub(super) fn mark_background() {
    BACKGROUND.set(true);
}

/// How a wait ended.
#[derive(Debug, PartialEq)]
pub(super) enum Polled {
    Done,
    TimedOut,
    /// The process was asked to stop (see `crate::stop`).
    Stopped(String),
}

/// Drives `requests` with `MPI_Testall` (which is also what makes MPI
/// progress) until all completed, `deadline` passes, or a stop is
/// requested. Yields between tests so oversubscribed ranks let each other run.
pub(super) fn poll(
    op: &'static str,
    requests: &mut [ffi::MPI_Request],
    mut statuses: Option<&mut [ffi::MPI_Status]>,
    deadline: Instant,
) -> Result<Polled, CommError> {
    let n = c_count(op, requests.len())?;
    assert!(statuses.as_ref().is_none_or(|s| s.len() == requests.len()), "one status per request");
    let mut tests = 0u32;
    let started = Instant::now();
    loop {
        let mut flag: c_int = 0;
        // SAFETY: a constant set by the MPI library.
        let statuses_ptr = statuses.as_deref_mut().map_or(unsafe { ffi::RSMPI_STATUSES_IGNORE }, |s| s.as_mut_ptr());
        // SAFETY: every handle is a live request or the null request, with a status each (or none).
        check(op, unsafe { ffi::MPI_Testall(n, requests.as_mut_ptr(), &mut flag, statuses_ptr) })?;
        if flag != 0 {
            return Ok(Polled::Done);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Polled::TimedOut);
        }
        if let Some(reason) = crate::stop::requested() {
            return Ok(Polled::Stopped(reason));
        }
        // Spin first: a large transfer is pipelined through shared memory
        // and needs both sides to test often. Then yield, so that ranks
        // sharing a core (oversubscribed) let each other run.
        tests = tests.saturating_add(1);
        if BACKGROUND.get() && tests > BACKGROUND_SPIN_TESTS && now - started > NAP_AFTER {
            // A communication thread shares the cores with the rank's
            // compute: a long wait (a peer still computing) naps, which
            // keeps the transfer moving without taking a core from the
            // computation (a yield would hand it back at once). Short
            // waits (a small message on its way) only yield: a nap would
            // add its latency.
            std::thread::sleep(BACKGROUND_NAP);
        } else if tests > SPIN_TESTS.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
    }
}
