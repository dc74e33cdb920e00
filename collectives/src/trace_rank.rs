//! Which rank a thread works for, for the timeline of `train --trace`: a
//! rank's own thread says so once, and the threads it starts (communication
//! threads, the second lane) carry it over. Ranks of the local backend are
//! threads of one process, so the process alone does not tell.

use std::cell::Cell;

thread_local! {
    static RANK: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as working for world rank `rank`.
pub fn set(rank: usize) {
    RANK.with(|r| r.set(Some(rank)));
}

/// The world rank the calling thread works for, if one was set.
pub fn get() -> Option<usize> {
    RANK.with(Cell::get)
}

/// Marks the calling thread with `rank` when it is Some (a thread started
/// by a rank's thread, handed the starter's [`get`]).
pub fn inherit(rank: Option<usize>) {
    if let Some(rank) = rank {
        set(rank);
    }
}
