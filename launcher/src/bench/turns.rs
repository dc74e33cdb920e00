//! Turn-taking between two benchmark jobs that run at the same time.
//!
//! On a shared machine the speed of memory moves in spells of seconds (the
//! same mpi4py exchange of 16 MiB took 0.9 to 2.1 ms within one process
//! here), so two jobs timed one after the other compare spells, not code.
//! `bench alltoall` therefore starts switchyard's job and the peer's job
//! together and lets them take turns, one timed repeat each, through a
//! file holding the number of the current turn: turn `2k + side` is side
//! `side`'s repeat `k` (switchyard is side 0, the peer side 1). A job
//! waiting for its turn sleeps, so it takes no core from the one timing
//! (and looks at the file seldom: see [`POLL`]).
//! `bench/mpi4py_alltoallv.py` follows the same protocol.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The variable that hands a job its turn file and side: `PATH:SIDE`.
pub const TURNS_VAR: &str = "SWITCHYARD_BENCH_TURNS";

/// How long a job waits for its turn before it gives up on the other job.
const PATIENCE: Duration = Duration::from_secs(120);

/// Pause between two looks at the turn file. Every look wakes the waiting
/// job's ranks, which then take the cores for a moment from the job being
/// timed: with ranks sharing cores that moved its times. The probe of 4
/// MPI ranks on 2 cores (`bench alltoall --probe-kib`) took 0.98-1.13 ms
/// at 4 MiB and 0.36-0.38 ms at 1 MiB beside 4 processes looking every
/// 2 ms, 0.70-0.91 and 0.29-0.35 beside ones looking every 20 ms, and
/// 0.64-0.82 and 0.27-0.33 alone (AVX2 AMD EPYC). A turn now changes
/// hands 10 ms later on average: a few seconds per run.
const POLL: Duration = Duration::from_millis(20);

/// One side's view of the turn file.
#[derive(Debug, Clone)]
pub struct Turns {
    path: PathBuf,
    side: u64,
}

impl Turns {
    /// Creates the turn file at `path`, at turn 0 (switchyard's first).
    pub fn start(path: &Path) -> Result<()> {
        write_turn(path, 0)
    }

    pub fn new(path: &Path, side: u64) -> Self {
        Self { path: path.to_path_buf(), side }
    }

    /// This side's value of [`TURNS_VAR`].
    pub fn env_value(&self) -> String {
        format!("{}:{}", self.path.display(), self.side)
    }

    /// The turns given to this process through [`TURNS_VAR`], if any.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(value) = std::env::var(TURNS_VAR) else { return Ok(None) };
        let (path, side) =
            value.rsplit_once(':').with_context(|| format!("{TURNS_VAR}={value}: expected PATH:SIDE"))?;
        let side = side.parse().with_context(|| format!("{TURNS_VAR}={value}: the side must be 0 or 1"))?;
        Ok(Some(Self::new(Path::new(path), side)))
    }

    /// Sleeps until this side's repeat `k` may run.
    pub fn wait(&self, k: u64) -> Result<()> {
        let mine = 2 * k + self.side;
        let started = Instant::now();
        loop {
            // A read can meet the file between its replacement's steps; the next look sees it whole.
            let now = std::fs::read_to_string(&self.path).ok().and_then(|s| s.trim().parse::<u64>().ok());
            if now == Some(mine) {
                return Ok(());
            }
            if started.elapsed() > PATIENCE {
                bail!(
                    "waited {PATIENCE:?} for turn {mine} in {} (it says {now:?}): the other benchmark job stopped taking turns",
                    self.path.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Hands the machine to the other side after this side's repeat `k`.
    pub fn pass(&self, k: u64) -> Result<()> {
        write_turn(&self.path, 2 * k + self.side + 1)
    }
}

/// Replaces the turn file whole (write, then rename), so no reader sees half a number.
fn write_turn(path: &Path, turn: u64) -> Result<()> {
    let next = path.with_extension("next");
    std::fs::write(&next, turn.to_string()).with_context(|| format!("cannot write {}", next.display()))?;
    std::fs::rename(&next, path).with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sides_alternate() {
        let dir = std::env::temp_dir().join(format!("switchyard-turns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("turn");
        Turns::start(&path).unwrap();
        let log = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for side in [1, 0] {
                let (turns, log) = (Turns::new(&path, side), &log);
                s.spawn(move || {
                    for k in 0..3 {
                        turns.wait(k).unwrap();
                        log.lock().unwrap().push((k, side));
                        turns.pass(k).unwrap();
                    }
                });
            }
        });
        assert_eq!(log.into_inner().unwrap(), vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
