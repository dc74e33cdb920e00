//! A communication thread: collectives that run while the caller computes.
//!
//! [`CommThread`] owns a communicator (its own group, split for it, so its
//! operations never interleave with the caller's) on a thread of its own
//! and runs the operations submitted to it one after another, in the order
//! they were submitted. Every rank submits the same operations in the same
//! order, so they meet as the collectives they are. The thread itself
//! drives each operation to completion (for MPI it keeps testing the
//! request; for the local backend it does the copies and sums), so progress
//! never depends on the caller calling into the library while it computes.
//!
//! Each [`Ticket`] says how long its operation ran on the thread and how
//! long the caller waited for it: the difference is communication hidden
//! behind computation.

use crate::{CommError, Communicator, MessageBuffer, Received};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An operation handed to the thread.
enum Work {
    /// `known`: what each rank sends here, when the caller knows it, and a
    /// buffer to receive into (its allocation is reused).
    AllToAllV {
        send: Vec<f32>,
        counts: Vec<usize>,
        known: Option<(Vec<usize>, MessageBuffer<f32>)>,
    },
    AllReduceSum {
        buf: Vec<f32>,
    },
}

struct Job {
    /// The operation's name, for the timeline.
    op: &'static str,
    work: Work,
    reply: mpsc::SyncSender<Finished>,
}

/// What the thread sends back for one operation.
struct Finished {
    result: Result<Received, CommError>,
    /// When the operation started on the thread, and how long it ran there.
    started: Instant,
    busy: Duration,
}

/// How one operation's time split between hidden and waited-for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpTimes {
    /// When the operation started on the communication thread: this
    /// rank's arrival at the collective.
    pub started: Instant,
    /// Time the operation ran on the communication thread.
    pub busy: Duration,
    /// Time the caller was blocked in [`Ticket::wait`].
    pub waited: Duration,
}

/// A submitted operation; [`Ticket::wait`] returns its result.
#[must_use = "an operation's result arrives only through wait"]
pub struct Ticket {
    reply: mpsc::Receiver<Finished>,
    op: &'static str,
    /// The answer, once [`Ticket::is_finished`] saw it.
    early: Option<Finished>,
}

impl Ticket {
    /// Blocks until the operation finished; returns what it received and its times.
    pub fn wait(mut self) -> Result<(Received, OpTimes), CommError> {
        let started = Instant::now();
        let finished = match self.early.take() {
            Some(finished) => Ok(finished),
            None => self.reply.recv(),
        };
        let finished = finished.map_err(|_| CommError::Aborted {
            op: self.op,
            rank: usize::MAX,
            reason: "the communication thread ended before finishing this operation".into(),
        })?;
        let times = OpTimes { started: finished.started, busy: finished.busy, waited: started.elapsed() };
        finished.result.map(|received| (received, times))
    }

    /// Whether the operation has finished (without blocking; the caller
    /// makes no library call, so this shows the thread drives it alone).
    pub fn is_finished(&mut self) -> bool {
        if self.early.is_none() {
            self.early = self.reply.try_recv().ok();
        }
        self.early.is_some()
    }
}

/// A thread that runs one group's collectives in submission order.
pub struct CommThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    size: usize,
}

impl CommThread {
    /// Moves `comm` onto a new thread. `comm` must be a group used by
    /// nothing else (split one for it): the thread calls it while the
    /// caller may call other groups.
    pub fn spawn(comm: Box<dyn Communicator>) -> std::io::Result<Self> {
        let (rank, size) = (comm.rank(), comm.size());
        let (jobs, inbox) = mpsc::channel::<Job>();
        let world_rank = crate::trace_rank::get();
        let thread = std::thread::Builder::new().name(format!("comm-r{rank}")).spawn(move || {
            crate::trace_rank::inherit(world_rank);
            serve(comm, inbox)
        })?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread), rank, size })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Starts [`Communicator::all_to_all_v`] of `send` on the thread.
    pub fn all_to_all_v(&self, send: Vec<f32>, counts: Vec<usize>) -> Ticket {
        self.submit("all_to_all_v", Work::AllToAllV { send, counts, known: None })
    }

    /// Starts [`Communicator::all_to_all_v_known_into`] of `send` on the
    /// thread: `recv_counts[r]` values come from rank r, into `recv`, whose
    /// allocation is reused (hand back a buffer an earlier ticket returned:
    /// a fresh large one costs page faults on every exchange).
    pub fn all_to_all_v_known(
        &self,
        send: Vec<f32>,
        counts: Vec<usize>,
        recv_counts: Vec<usize>,
        recv: MessageBuffer<f32>,
    ) -> Ticket {
        self.submit("all_to_all_v", Work::AllToAllV { send, counts, known: Some((recv_counts, recv)) })
    }

    /// Starts [`Communicator::all_reduce_sum`] of `buf`; the sum comes back as `values`.
    pub fn all_reduce_sum(&self, buf: Vec<f32>) -> Ticket {
        self.submit("all_reduce_sum", Work::AllReduceSum { buf })
    }

    fn submit(&self, op: &'static str, work: Work) -> Ticket {
        let (reply, answer) = mpsc::sync_channel(1);
        // A thread that ended drops the job, and wait reports that.
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job { op, work, reply });
        }
        Ticket { reply: answer, op, early: None }
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it ran what it was given.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut comm: Box<dyn Communicator>, inbox: mpsc::Receiver<Job>) {
    crate::mpi::mark_background_thread();
    while let Ok(job) = inbox.recv() {
        let _span = tracing::info_span!("comm thread", op = job.op).entered();
        let started = Instant::now();
        let result = match job.work {
            Work::AllToAllV { send, counts, known: None } => comm.all_to_all_v(&send, &counts),
            Work::AllToAllV { send, counts, known: Some((recv_counts, mut values)) } => comm
                .all_to_all_v_known_into(&send, &counts, &recv_counts, &mut values)
                .map(|()| Received { values, counts: recv_counts }),
            Work::AllReduceSum { mut buf } => {
                comm.all_reduce_sum(&mut buf).map(|()| Received { values: buf.into(), counts: Vec::new() })
            }
        };
        // The caller may have given up on the ticket; nothing to do then.
        let _ = job.reply.send(Finished { result, started, busy: started.elapsed() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalWorld;

    #[test]
    fn operations_run_in_order_while_the_caller_goes_on() {
        let comms = LocalWorld::new(3, Duration::from_secs(10));
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let r = comm.rank() as f32;
                        let thread = CommThread::spawn(Box::new(comm)).unwrap();
                        // Rank r sends r+1 values of r to each rank.
                        let a2a = thread.all_to_all_v(vec![r; 3 * (r as usize + 1)], vec![r as usize + 1; 3]);
                        let sum = thread.all_reduce_sum(vec![r, 1.0]);
                        // The same exchange with the counts known, into a used buffer.
                        let known = thread.all_to_all_v_known(
                            vec![r; 3 * (r as usize + 1)],
                            vec![r as usize + 1; 3],
                            vec![1, 2, 3],
                            MessageBuffer::from(vec![9.0; 7]),
                        );
                        let (sum, _) = sum.wait().unwrap();
                        let (got, times) = a2a.wait().unwrap();
                        let (known, _) = known.wait().unwrap();
                        assert_eq!((&known.values, &known.counts), (&got.values, &got.counts));
                        assert_eq!(got.counts, vec![1, 2, 3]);
                        assert!(times.busy > Duration::ZERO);
                        (got.values.into_vec(), sum.values.into_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (got, sum) in results {
            assert_eq!(got, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(sum, vec![3.0, 3.0]);
        }
    }

    #[test]
    fn a_missing_rank_times_out_through_the_ticket() {
        let mut comms = LocalWorld::new(2, Duration::from_millis(200));
        let _absent = comms.pop();
        let thread = CommThread::spawn(Box::new(comms.pop().unwrap())).unwrap();
        let err = thread.all_reduce_sum(vec![1.0]).wait().unwrap_err();
        assert!(matches!(err, CommError::Timeout { ref missing, .. } if *missing == vec![1]), "{err}");
    }
}
