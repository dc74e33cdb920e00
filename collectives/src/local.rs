//! The `local` backend: ranks are threads of one process.
//!
//! [`LocalWorld::new`] makes one [`LocalComm`] per rank; each moves into its
//! rank's thread. A collective is a round (see `exchange`): every rank posts
//! its contribution without blocking, then reads the others' once all have
//! posted, copying out only what it receives. A large blocking all-to-all
//! lends its send buffer to the round instead of copying it in (see
//! `LocalComm::all_to_all_lent`). Sums run in rank order, so
//! every rank gets the same bits. A rank that does not arrive before the
//! deadline makes the others fail with [`CommError::Timeout`] naming it;
//! [`LocalComm::abort`] makes every rank of the world, and of the groups
//! split from it, fail at once instead.

mod assemble;
mod exchange;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{CommError, Communicator, MessageBuffer, Pending, PendingOp, Received};
use exchange::{Data, Elem, Family, Group, Post, Posts, Ticket};

/// Blocking exchanges lend send buffers from this size up (see
/// `all_to_all_lent`); smaller ones are copied, which saves the lender's
/// wait for its readers, a second meeting of the ranks that costs more
/// than a small copy.
const LEND_FROM_BYTES: usize = 256 << 10;

/// A world of thread ranks and every group split from it; clones share it.
#[derive(Clone)]
pub struct LocalWorld {
    family: Arc<Family>,
}

impl LocalWorld {
    /// One communicator per rank (in rank order) of a new world of `size`
    /// thread ranks whose collectives wait at most `timeout`.
    // The world itself lives inside the communicators (`LocalComm::world`
    // hands it out): callers want the ranks, one per thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize, timeout: Duration) -> Vec<LocalComm> {
        let group = Group::new(size, timeout, Family::new());
        (0..size).map(|rank| LocalComm { group: Arc::clone(&group), rank, seq: 0 }).collect()
    }

    /// Makes every collective of the world and its sub-groups, waiting now
    /// or called later, fail with [`CommError::Aborted`]; the first reason sticks.
    pub fn abort(&self, reason: &str) {
        self.family.abort(reason);
    }

    /// The reason of the first abort, if the world was aborted.
    pub fn abort_reason(&self) -> Option<String> {
        self.family.abort_reason()
    }
}

impl fmt::Debug for LocalWorld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalWorld").field("aborted", &self.abort_reason()).finish()
    }
}

/// One rank's handle on a group of thread ranks.
pub struct LocalComm {
    group: Arc<Group>,
    rank: usize,
    /// The number of this rank's next collective on the group, which is the
    /// round it posts to: ranks call collectives in the same order, so the
    /// k-th call of every rank meets in round k.
    seq: u64,
}

impl LocalComm {
    /// Aborts the whole world (see [`LocalWorld::abort`]), so that when one
    /// rank fails the others stop now rather than at the deadline.
    pub fn abort(&self, reason: &str) {
        self.group.family.abort(reason);
    }

    /// The world this rank belongs to, e.g. to abort it from another thread.
    pub fn world(&self) -> LocalWorld {
        LocalWorld { family: Arc::clone(&self.group.family) }
    }

    /// Posts this rank's contribution to its next round, for a blocking call.
    fn start(&mut self, op: &'static str, data: Data, meta: Vec<usize>) -> Result<Ticket, CommError> {
        self.post(op, data, meta, true)
    }

    /// Posts this rank's contribution to its next round; `blocking`: the
    /// rank reads the round at once (see `Post::blocking`).
    fn post(&mut self, op: &'static str, data: Data, meta: Vec<usize>, blocking: bool) -> Result<Ticket, CommError> {
        if let Some(reason) = self.group.family.abort_reason() {
            return Err(CommError::Aborted { op, rank: self.rank, reason });
        }
        let seq = self.seq;
        self.seq += 1;
        Ok(self.group.post(seq, self.rank, Post { op, data, meta, bad: None, blocking }))
    }

    /// The error for this rank's bad arguments, after posting the reason so
    /// the other ranks fail at once instead of waiting for this one.
    fn reject(&mut self, op: &'static str, reason: String) -> CommError {
        if self.group.family.abort_reason().is_none() {
            let seq = self.seq;
            self.seq += 1;
            let post = Post { op, data: Data::Empty, meta: Vec::new(), bad: Some(reason.clone()), blocking: true };
            // Dropping the ticket leaves the round: this rank will not read it.
            drop(self.group.post(seq, self.rank, post));
        }
        CommError::BadArgument { op, reason }
    }

    /// Checks one count per rank, adding up to the buffer's length.
    fn check_counts(&mut self, op: &'static str, counts: &[usize], len: usize) -> Result<(), CommError> {
        let size = self.group.size;
        let total: usize = counts.iter().sum();
        let reason = if counts.len() != size {
            format!("{} counts for a group of {size} ranks: pass one count per rank", counts.len())
        } else if total != len {
            format!("the counts add up to {total} but the buffer holds {len} values")
        } else {
            return Ok(());
        };
        Err(self.reject(op, reason))
    }

    fn all_reduce<T: Elem>(&mut self, op: &'static str, buf: &mut [T]) -> Result<(), CommError> {
        let ticket = self.start(op, T::wrap(buf.to_vec()), Vec::new())?;
        // `wait_sum` checks first that every rank's length is buf's.
        let mut at = 0;
        ticket.wait_sum::<T>(&mut |piece| {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        })
    }

    fn all_gather<T: Elem>(&mut self, op: &'static str, send: &[T]) -> Result<Vec<Arc<Post>>, CommError> {
        self.start(op, T::wrap(send.to_vec()), Vec::new())?.wait_posts().map(Posts::into_vec)
    }

    fn start_all_to_all<T: Elem>(
        &mut self,
        op: &'static str,
        send: Vec<T>,
        send_counts: &[usize],
    ) -> Result<Ticket, CommError> {
        self.check_counts(op, send_counts, send.len())?;
        self.post(op, T::wrap(send), assemble::offsets(send_counts), false)
    }

    fn all_to_all<T: Elem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<usize>), CommError> {
        // Checked before the copy, so bad counts cost no copy.
        self.check_counts(op, send_counts, send.len())?;
        let ticket = self.start(op, T::wrap(send.to_vec()), assemble::offsets(send_counts))?;
        let posts = ticket.wait_posts()?;
        Ok(assemble::segments(&posts, self.rank))
    }

    /// The blocking all-to-all-v into `recv`. A large `send` is lent to the
    /// round rather than copied, and each rank copies its blocks straight
    /// from the senders' buffers into `recv`: one copy per value, as MPI's
    /// single-copy transport makes. With `expect`, the counts received
    /// must be those.
    fn all_to_all_lent(
        &mut self,
        op: &'static str,
        send: &[f32],
        send_counts: &[usize],
        expect: Option<&[usize]>,
        recv: &mut MessageBuffer<f32>,
    ) -> Result<Vec<usize>, CommError> {
        self.check_counts(op, send_counts, send.len())?;
        let data = if std::mem::size_of_val(send) >= LEND_FROM_BYTES {
            // SAFETY: `send` outlives the ticket, whose `end_loan` below (or
            // drop, on a panic) returns only once no rank can read it.
            unsafe { Data::lend(send) }
        } else {
            Data::F32(send.to_vec())
        };
        let ticket = self.start(op, data, assemble::offsets(send_counts))?;
        let (read, got) = match ticket.wait_posts() {
            Ok(posts) => (true, assemble::segments_into(op, &posts, self.rank, expect, recv)),
            Err(error) => (false, Err(error)),
        };
        ticket.end_loan(send, read);
        got
    }
}

impl fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("size", &self.group.size)
            .field("collectives_called", &self.seq)
            .finish()
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        // A rank thread that panics never reaches its next collective: abort
        // so that the others stop now instead of at the deadline.
        if std::thread::panicking() {
            self.abort(&format!("rank {} of a group of {} panicked", self.rank, self.group.size));
        }
    }
}

/// A started all-to-all-v; waiting reads this rank's blocks.
struct AllToAllPending(Ticket);

impl PendingOp for AllToAllPending {
    fn wait(self: Box<Self>) -> Result<Received, CommError> {
        let (values, counts) = assemble::segments::<f32>(&self.0.wait_posts()?, self.0.rank());
        Ok(Received { values: values.into(), counts })
    }
}

/// A started all-reduce; waiting sums, sharing the work with the ranks
/// that wait at the same time.
struct AllReducePending {
    ticket: Ticket,
    len: usize,
}

impl PendingOp for AllReducePending {
    fn wait(self: Box<Self>) -> Result<Received, CommError> {
        let mut values = MessageBuffer::with_capacity(self.len);
        self.ticket.wait_sum::<f32>(&mut |piece| values.extend_from_slice(piece))?;
        Ok(Received { values, counts: Vec::new() })
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn timeout(&self) -> Duration {
        self.group.timeout
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.start("barrier", Data::Empty, Vec::new())?.wait_posts().map(drop)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        let size = self.group.size;
        if root >= size {
            return Err(self.reject(OP, format!("root {root} is not a rank of this group of {size}")));
        }
        let data = if self.rank == root { Data::F32(buf.to_vec()) } else { Data::Empty };
        let ticket = self.start(OP, data, vec![root, buf.len()])?;
        let posts = ticket.wait_posts()?;
        assemble::check_same_meta(OP, &posts, |m| format!("root {} and {} values", m[0], m[1]))?;
        if self.rank != root {
            buf.copy_from_slice(f32::slice(&posts[root].data));
        }
        Ok(())
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce("all_reduce_sum", buf)
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce("all_reduce_sum_f64", buf)
    }

    fn all_gather_v(&mut self, send: &[f32]) -> Result<Received, CommError> {
        let (values, counts) = assemble::concat::<f32>(&self.all_gather("all_gather_v", send)?);
        Ok(Received { values: values.into(), counts })
    }

    fn all_gather_u64(&mut self, send: &[u64]) -> Result<Vec<Vec<u64>>, CommError> {
        let posts = self.all_gather("all_gather_u64", send)?;
        Ok(posts.iter().map(|p| u64::slice(&p.data).to_vec()).collect())
    }

    fn reduce_scatter_sum(&mut self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>, CommError> {
        const OP: &str = "reduce_scatter_sum";
        self.check_counts(OP, counts, send.len())?;
        let ticket = self.start(OP, Data::F32(send.to_vec()), counts.to_vec())?;
        let posts = ticket.wait_posts()?;
        assemble::check_same_meta(OP, &posts, |counts| format!("counts {counts:?}"))?;
        let offsets = assemble::offsets(counts);
        // Each rank sums only its own block: no work is done twice.
        Ok(assemble::sum_range::<f32>(&posts, offsets[self.rank]..offsets[self.rank + 1]))
    }

    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> Result<Received, CommError> {
        let mut values = MessageBuffer::new();
        let counts = self.all_to_all_lent("all_to_all_v", send, send_counts, None, &mut values)?;
        Ok(Received { values, counts })
    }

    fn all_to_all_v_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<Vec<usize>, CommError> {
        self.all_to_all_lent("all_to_all_v", send, send_counts, None, recv)
    }

    fn all_to_all_v_known_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<(), CommError> {
        self.all_to_all_lent("all_to_all_v", send, send_counts, Some(recv_counts), recv).map(drop)
    }

    fn all_to_all_v_u64(&mut self, send: &[u64], send_counts: &[usize]) -> Result<(Vec<u64>, Vec<usize>), CommError> {
        self.all_to_all("all_to_all_v_u64", send, send_counts)
    }

    fn start_all_to_all_v(&mut self, send: Vec<f32>, send_counts: Vec<usize>) -> Result<Pending, CommError> {
        // The same op name as the blocking form: it is the same collective,
        // so one rank may block where another overlaps.
        let ticket = self.start_all_to_all("all_to_all_v", send, &send_counts)?;
        Ok(Pending(Box::new(AllToAllPending(ticket))))
    }

    fn start_all_reduce_sum(&mut self, buf: Vec<f32>) -> Result<Pending, CommError> {
        let len = buf.len();
        let ticket = self.post("all_reduce_sum", Data::F32(buf), Vec::new(), false)?;
        Ok(Pending(Box::new(AllReducePending { ticket, len })))
    }

    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>, CommError> {
        let ticket = self.start("split", Data::Empty, vec![color, key])?;
        let posts = ticket.wait_posts()?;
        let mut members: Vec<usize> = (0..posts.len()).filter(|&r| posts[r].meta[0] == color).collect();
        members.sort_by_key(|&r| (posts[r].meta[1], r));
        let rank = members.iter().position(|&r| r == self.rank).expect("a rank has its own color");
        let group = ticket.take_split(color, members.len());
        Ok(Box::new(LocalComm { group, rank, seq: 0 }))
    }
}
