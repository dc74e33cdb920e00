//! Exposed communication: the time during which every lane of a rank (one,
//! or two when micro-batches interleave) waits for communication, so the
//! rank computes nothing. Waiting on one lane while the other computes is
//! hidden, not exposed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts a rank's exposed waiting across its lanes.
#[derive(Debug)]
pub struct Exposure {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    lanes: usize,
    waiting: usize,
    /// When every lane began waiting, while they all do.
    all_since: Option<Instant>,
    total: Duration,
}

impl Exposure {
    /// A rank computing on `lanes` lanes.
    pub fn new(lanes: usize) -> Self {
        Self { state: Mutex::new(State { lanes: lanes.max(1), waiting: 0, all_since: None, total: Duration::ZERO }) }
    }

    /// Runs `wait` (a lane blocked on communication), counting the time
    /// during which every lane was blocked.
    pub fn waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        {
            let mut s = self.lock();
            s.waiting += 1;
            if s.waiting == s.lanes {
                s.all_since = Some(Instant::now());
            }
        }
        let out = wait();
        let mut s = self.lock();
        if let Some(since) = s.all_since.take() {
            s.total += since.elapsed();
        }
        s.waiting -= 1;
        out
    }

    /// Sets the number of lanes computing from now on (when no lane waits).
    pub fn set_lanes(&self, lanes: usize) {
        self.lock().lanes = lanes.max(1);
    }

    /// Exposed time so far, and resets it.
    pub fn take(&self) -> Duration {
        std::mem::take(&mut self.lock().total)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_is_exposed_only_when_every_lane_waits() {
        let one = Exposure::new(1);
        one.waiting(|| std::thread::sleep(Duration::from_millis(20)));
        assert!(one.take() >= Duration::from_millis(20));
        assert_eq!(one.take(), Duration::ZERO);

        // Lane A waits until released; lane B computes a while (hidden:
        // A alone waits), then waits 20 ms itself (exposed: both wait).
        let two = Exposure::new(2);
        let (inside, a_is_waiting) = std::sync::mpsc::channel();
        let (release, go) = std::sync::mpsc::channel::<()>();
        let b_waited = std::thread::scope(|s| {
            let two = &two;
            s.spawn(move || {
                two.waiting(|| {
                    inside.send(()).unwrap();
                    go.recv().unwrap();
                })
            });
            a_is_waiting.recv().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let started = std::time::Instant::now();
            two.waiting(|| std::thread::sleep(Duration::from_millis(20)));
            let b_waited = started.elapsed();
            release.send(()).unwrap();
            b_waited
        });
        let exposed = two.take();
        assert!(exposed >= Duration::from_millis(20) && exposed <= b_waited, "{exposed:?} of {b_waited:?}");
    }
}
