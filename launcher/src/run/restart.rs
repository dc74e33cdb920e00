//! The restart policy of `switchyard train --max-restarts N`, as pure
//! functions: what to do after an attempt ended, which hosts remain when a
//! rank's host is lost, and where the next attempt resumes. The loop in
//! `run/mod.rs` only carries them out.

use worker::api::Resume;

/// How an attempt of the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Every rank finished.
    Finished,
    /// Stopped on SIGTERM after committing a checkpoint: the scheduler's
    /// decision, never retried here.
    Preempted,
    /// A rank failed; `lost_rank` is the one the coordinator saw go, if any.
    Failed { lost_rank: Option<usize> },
}

/// What the launcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Return the attempt's result (success, pre-emption, or the last failure).
    Stop,
    /// Start attempt number `attempt` (1-based count of restarts).
    Restart { attempt: u32, drop_host_of: Option<usize> },
}

/// The decision after attempt `restarts_done` (0 for the first run) ended.
/// A lost rank's host is dropped only in a multi-host job (`has_hosts`):
/// on one machine the same host is all there is.
pub fn after_attempt(end: AttemptEnd, restarts_done: u32, max_restarts: u32, has_hosts: bool) -> Next {
    match end {
        AttemptEnd::Finished | AttemptEnd::Preempted => Next::Stop,
        AttemptEnd::Failed { .. } if restarts_done >= max_restarts => Next::Stop,
        AttemptEnd::Failed { lost_rank } => {
            Next::Restart { attempt: restarts_done + 1, drop_host_of: lost_rank.filter(|_| has_hosts) }
        }
    }
}

/// The `host:slots` entries left when the host that ran `lost_rank` is
/// gone (mpirun fills each host's slots in order), with the gone entry and
/// the ranks that remain; `None` when no entry held that rank.
pub fn without_host_of(hosts: &[String], lost_rank: usize) -> Option<HostLoss> {
    let slots = |entry: &str| entry.rsplit_once(':').and_then(|(_, n)| n.parse().ok()).unwrap_or(1usize);
    let mut first = 0;
    let mut gone = None;
    let mut remaining = Vec::new();
    for entry in hosts {
        let n = slots(entry);
        if (first..first + n).contains(&lost_rank) {
            gone = Some(entry.clone());
        } else {
            remaining.push(entry.clone());
        }
        first += n;
    }
    let world = remaining.iter().map(|e| slots(e)).sum();
    gone.map(|gone| HostLoss { gone, remaining, world })
}

/// A host dropped after it lost a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoss {
    /// Its `host:slots` entry.
    pub gone: String,
    /// The entries that remain, in order.
    pub remaining: Vec<String>,
    /// Ranks the remaining hosts hold.
    pub world: usize,
}

/// Where a restart resumes: the newest committed step, or the start when
/// nothing was committed yet.
pub fn resume_after_restart(latest_committed: Option<u64>) -> Resume {
    match latest_committed {
        Some(_) => Resume::Latest,
        None => Resume::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_restart_until_the_budget_is_spent() {
        let failed = AttemptEnd::Failed { lost_rank: None };
        assert_eq!(after_attempt(failed, 0, 2, false), Next::Restart { attempt: 1, drop_host_of: None });
        assert_eq!(after_attempt(failed, 1, 2, false), Next::Restart { attempt: 2, drop_host_of: None });
        assert_eq!(after_attempt(failed, 2, 2, false), Next::Stop);
        assert_eq!(after_attempt(failed, 0, 0, false), Next::Stop);
    }

    #[test]
    fn success_and_preemption_never_restart() {
        assert_eq!(after_attempt(AttemptEnd::Finished, 0, 5, true), Next::Stop);
        assert_eq!(after_attempt(AttemptEnd::Preempted, 0, 5, true), Next::Stop);
    }

    #[test]
    fn a_lost_rank_drops_its_host_only_in_multi_host_jobs() {
        let lost = AttemptEnd::Failed { lost_rank: Some(3) };
        assert_eq!(after_attempt(lost, 0, 1, true), Next::Restart { attempt: 1, drop_host_of: Some(3) });
        assert_eq!(after_attempt(lost, 0, 1, false), Next::Restart { attempt: 1, drop_host_of: None });
    }

    #[test]
    fn the_host_holding_the_rank_is_dropped() {
        let hosts: Vec<String> = ["a:2", "b:2", "c"].map(String::from).to_vec();
        let loss = without_host_of(&hosts, 3).unwrap();
        assert_eq!(loss.gone, "b:2");
        assert_eq!(loss.remaining, ["a:2", "c"]);
        assert_eq!(loss.world, 3);
        assert_eq!(without_host_of(&hosts, 4).unwrap().gone, "c");
        assert_eq!(without_host_of(&hosts, 5), None);
        assert_eq!(without_host_of(&["only:1".to_string()], 0).unwrap().world, 0);
    }

    #[test]
    fn restarts_resume_from_the_newest_commit_if_any() {
        assert_eq!(resume_after_restart(Some(40)), Resume::Latest);
        assert_eq!(resume_after_restart(None), Resume::No);
    }
}
