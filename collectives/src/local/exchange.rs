//! Rounds, the one primitive of the `local` backend.
//!
//! A collective is a round: every rank posts its contribution into its slot
//! of round `seq` (the rank's `seq`-th collective on the group, so the ranks
//! agree on it without talking) and reads the others' once all have posted.
//! Posting never blocks, which is what makes the `start_*` forms
//! non-blocking and lets several rounds be in flight at once. A round is
//! dropped when every rank has read or left it, so memory does not pile up.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Add;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::assemble;
use crate::CommError;

/// Sums longer than this are cut in chunks of this many values that the
/// waiting ranks share; shorter ones each rank computes on its own, which
/// saves a wake-up on the small, latency-bound reductions (losses, norms).
const CHUNK: usize = 1 << 16;

/// How long a rank waiting for a round polls before it sleeps.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// The values one rank contributes to a round.
pub(super) enum Data {
    /// No values (barrier, split, the non-root ranks of a broadcast).
    Empty,
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    /// Values a rank lends from its own buffer for the length of a
    /// blocking all-to-all, so that readers copy them once, straight from
    /// the sender (see [`Ticket::end_loan`]).
    LentF32(Lent),
}

/// A borrowed slice of a lender's buffer. Readers may look at it only
/// through [`Posts`], between the round's completion and their release;
/// the lender keeps the buffer until [`Ticket::end_loan`] has seen every
/// such reader off.
pub(super) struct Lent {
    ptr: *const f32,
    len: usize,
}

// SAFETY: the pointed-to values are only read (by any thread), and only
// while the lender keeps them alive and unchanged (see `Lent`).
unsafe impl Send for Lent {}
// SAFETY: as above: shared reads only.
unsafe impl Sync for Lent {}

impl Data {
    /// Lends `values` to a round.
    ///
    /// # Safety
    /// `values` must stay alive and unchanged until [`Ticket::end_loan`]
    /// (or the ticket's drop) returns for the ticket of the post.
    pub(super) unsafe fn lend(values: &[f32]) -> Self {
        Data::LentF32(Lent { ptr: values.as_ptr(), len: values.len() })
    }

    fn is_lent(&self) -> bool {
        matches!(self, Data::LentF32(_))
    }
}

/// Element types that travel in rounds.
pub(super) trait Elem: Copy + Send + Sync + Add<Output = Self> + 'static {
    /// Wraps values for posting.
    fn wrap(values: Vec<Self>) -> Data;
    /// The values of a post (none for [`Data::Empty`]).
    fn slice(data: &Data) -> &[Self];
}

macro_rules! elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn wrap(values: Vec<Self>) -> Data {
                Data::$variant(values)
            }
            fn slice(data: &Data) -> &[Self] {
                match data {
                    Data::$variant(values) => values,
                    Data::Empty => &[],
                    // Reads check first that every post of a round has the
                    // reader's op, and each op has one element type.
                    _ => unreachable!("a round mixes element types"),
                }
            }
        }
    };
}
elem!(f64, F64);
elem!(u64, U64);

impl Elem for f32 {
    fn wrap(values: Vec<Self>) -> Data {
        Data::F32(values)
    }
    fn slice(data: &Data) -> &[Self] {
        match data {
            Data::F32(values) => values,
            // SAFETY: a lent post is only reachable through `Posts`, which
            // the lender outlives (see `Lent`).
            Data::LentF32(lent) => unsafe { std::slice::from_raw_parts(lent.ptr, lent.len) },
            Data::Empty => &[],
            _ => unreachable!("a round mixes element types"),
        }
    }
}

/// One rank's contribution to one round.
pub(super) struct Post {
    /// The collective the rank called, to catch ranks that call different ones.
    pub(super) op: &'static str,
    pub(super) data: Data,
    /// What the op needs besides values: offsets, counts, root, color and key.
    pub(super) meta: Vec<usize>,
    /// Why the rank rejected its own arguments: the others then fail at once
    /// instead of waiting for a rank that will not read.
    pub(super) bad: Option<String>,
    /// Posted by a blocking call, whose rank reads the round as soon as it
    /// completes; false for the `start_*` forms, read whenever the rank
    /// waits (see [`Ticket::end_loan`]).
    pub(super) blocking: bool,
}

/// Everything made by one `LocalWorld::new` and split from it: one abort
/// reaches all of it, as one failed rank dooms the whole job.
pub(super) struct Family {
    /// Set after `reason`, so a reader that sees it finds the reason.
    aborted: AtomicBool,
    reason: Mutex<Option<String>>,
    /// The groups to wake on abort; weak, so dropped groups are freed.
    groups: Mutex<Vec<Weak<Group>>>,
}

impl Family {
    /// A new world's family, not aborted.
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self { aborted: AtomicBool::new(false), reason: Mutex::new(None), groups: Mutex::new(Vec::new()) })
    }

    /// Fails every wait of every group of the family, now and later; the
    /// first reason sticks (later ones are mostly echoes of it).
    pub(super) fn abort(&self, reason: &str) {
        lock(&self.reason).get_or_insert_with(|| reason.to_string());
        self.aborted.store(true, Ordering::SeqCst);
        // Collected first: taking a group's lock while holding `groups` would
        // invert the order of a split, which registers under its group's lock.
        let groups: Vec<Arc<Group>> = lock(&self.groups).iter().filter_map(Weak::upgrade).collect();
        for group in groups {
            // Taking the lock orders this wake-up after the waiter's check of
            // `aborted`, so no waiter misses it.
            let _state = lock(&group.state);
            group.wake_all();
        }
    }

    /// The reason of the first abort, if any.
    pub(super) fn abort_reason(&self) -> Option<String> {
        if !self.aborted.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.reason).clone()
    }

    fn register(&self, group: &Arc<Group>) {
        let mut groups = lock(&self.groups);
        groups.retain(|g| g.strong_count() > 0);
        groups.push(Arc::downgrade(group));
    }
}

/// The state shared by the ranks of one communicator group.
pub(super) struct Group {
    pub(super) size: usize,
    pub(super) timeout: Duration,
    pub(super) family: Arc<Family>,
    state: Mutex<State>,
    /// Signalled when a round completes or fails, a shared sum is done, or
    /// the family is aborted.
    cv: Condvar,
    /// Counts the signals of `cv`, for a waiter that polls before sleeping.
    wakes: AtomicU64,
}

#[derive(Default)]
struct State {
    rounds: HashMap<u64, Round>,
    /// Groups being made by a split round, keyed by (round, color).
    splits: HashMap<(u64, usize), Split>,
}

/// A group made by a split: the first member to arrive creates it.
struct Split {
    group: Arc<Group>,
    /// Members that have not taken it yet; at zero the entry goes.
    takers_left: usize,
}

struct Round {
    posts: Vec<Option<Arc<Post>>>,
    num_posted: usize,
    /// Ranks that have not read or left the round; at zero it is dropped.
    readers_left: usize,
    /// Set when a rank timed out on the round: a rank that completes it
    /// late must fail too, or some ranks would finish a collective that
    /// others reported as failed.
    gave_up: Option<String>,
    /// The shared work of a long sum, empty until its first reader.
    chunks: Vec<Chunk>,
    /// Ranks reading posts of this round while some of them were lent.
    holders: usize,
    /// Per rank: done with the round (read it, failed, or left).
    finished: Vec<bool>,
    /// Why lent values may no longer be read: a lender left early.
    closed: Option<String>,
}

enum Chunk {
    Free,
    /// Being summed by this rank.
    Claimed(usize),
    Done(Arc<Data>),
}

impl Round {
    fn new(size: usize) -> Self {
        Self {
            posts: vec![None; size],
            num_posted: 0,
            readers_left: size,
            gave_up: None,
            chunks: Vec::new(),
            holders: 0,
            finished: vec![false; size],
            closed: None,
        }
    }

    fn missing(&self) -> Vec<usize> {
        self.posts.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(r, _)| r).collect()
    }

    fn posted(&self) -> impl Iterator<Item = (usize, &Post)> {
        self.posts.iter().enumerate().filter_map(|(r, p)| p.as_deref().map(|p| (r, p)))
    }

    fn has_loans(&self) -> bool {
        self.posted().any(|(_, p)| p.data.is_lent())
    }
}

/// A poisoned lock only means another rank panicked; the state stays
/// consistent (no invariant spans a panic point), so carry on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Group {
    /// A new group of `size` ranks in `family`.
    pub(super) fn new(size: usize, timeout: Duration, family: Arc<Family>) -> Arc<Self> {
        let group = Arc::new(Self {
            size,
            timeout,
            family: Arc::clone(&family),
            state: Mutex::default(),
            cv: Condvar::new(),
            wakes: AtomicU64::new(0),
        });
        family.register(&group);
        group
    }

    /// Wakes every waiter. Called with `state` locked, so that a waiter
    /// that saw `wakes` unchanged under the lock cannot miss the signal.
    fn wake_all(&self) {
        self.wakes.fetch_add(1, Ordering::Release);
        self.cv.notify_all();
    }

    /// Posts `rank`'s contribution to round `seq` and returns the ticket to
    /// read the round with. Never waits for other ranks.
    pub(super) fn post(self: &Arc<Self>, seq: u64, rank: usize, post: Post) -> Ticket {
        let op = post.op;
        let bad = post.bad.is_some();
        let lent = post.data.is_lent();
        let post = Arc::new(post);
        let mut state = lock(&self.state);
        let round = state.rounds.entry(seq).or_insert_with(|| Round::new(self.size));
        debug_assert!(round.posts[rank].is_none(), "rank {rank} posted twice to round {seq}");
        round.posts[rank] = Some(post);
        round.num_posted += 1;
        // Waiters only care about a complete round or a doomed one.
        if round.num_posted == self.size || bad {
            self.wake_all();
        }
        drop(state);
        Ticket { group: Arc::clone(self), seq, rank, op, lent, loan_ended: Cell::new(false) }
    }
}

/// A rank's place in one round: it reads the round through it, and leaves
/// the round when dropped (after reading, failing, or as a `Pending` that
/// was never waited), so the round's memory is freed once all have left.
pub(super) struct Ticket {
    group: Arc<Group>,
    seq: u64,
    rank: usize,
    op: &'static str,
    /// The post lends its values (see [`Ticket::end_loan`]).
    lent: bool,
    loan_ended: Cell<bool>,
}

/// The posts of a complete round, as one rank reads them. While some are
/// lent, the rank counts as a holder of the round until this is dropped,
/// and lenders wait for it (see [`Ticket::end_loan`]).
pub(super) struct Posts<'a> {
    ticket: &'a Ticket,
    posts: Vec<Arc<Post>>,
    holds: bool,
}

impl Posts<'_> {
    /// The posts themselves, for ops whose posts are never lent.
    pub(super) fn into_vec(mut self) -> Vec<Arc<Post>> {
        assert!(!self.holds, "lent posts cannot leave their guard");
        std::mem::take(&mut self.posts)
    }
}

impl std::ops::Deref for Posts<'_> {
    type Target = [Arc<Post>];
    fn deref(&self) -> &Self::Target {
        &self.posts
    }
}

impl Drop for Posts<'_> {
    fn drop(&mut self) {
        if !self.holds {
            return;
        }
        let group = &self.ticket.group;
        let mut state = lock(&group.state);
        let round = round_of(&mut state, self.ticket.seq);
        round.holders -= 1;
        round.finished[self.ticket.rank] = true;
        group.wake_all();
    }
}

impl Ticket {
    /// This rank in the round's group.
    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    /// Blocks until every rank posted, then returns the posts in rank order.
    /// Fails at the deadline naming the ranks that never posted, at once if
    /// the family is aborted, and as soon as a rank's post is bad.
    pub(super) fn wait_posts(&self) -> Result<Posts<'_>, CommError> {
        // Counted from the wait, not the post: a rank may compute for long
        // between starting a non-blocking op and waiting on it.
        let deadline = Instant::now().checked_add(self.group.timeout);
        let mut state = lock(&self.group.state);
        loop {
            self.check_abort()?;
            let round = round_of(&mut state, self.seq);
            self.check_posted(round)?;
            if round.num_posted == self.group.size {
                if let Some(why) = round.gave_up.as_ref().or(round.closed.as_ref()) {
                    return Err(self.aborted(why.clone()));
                }
                let holds = round.has_loans();
                round.holders += usize::from(holds);
                return Ok(Posts { ticket: self, posts: round.posts.iter().flatten().cloned().collect(), holds });
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                let missing = round.missing();
                let seconds = self.group.timeout.as_secs_f64();
                round.gave_up.get_or_insert_with(|| {
                    format!(
                        "rank {} gave up on this {} after {seconds:.1}s waiting for rank(s) {missing:?}",
                        self.rank, self.op
                    )
                });
                return Err(CommError::Timeout { op: self.op, rank: self.rank, missing, seconds });
            }
            // Poll before sleeping: a small exchange completes within
            // microseconds, sooner than a sleeping thread is woken.
            let seen = self.group.wakes.load(Ordering::Acquire);
            drop(state);
            let polled = Instant::now();
            while self.group.wakes.load(Ordering::Acquire) == seen && polled.elapsed() < POLL_BEFORE_SLEEP {
                // Yields, so that ranks sharing a core let each other run.
                std::thread::yield_now();
            }
            state = lock(&self.group.state);
            if self.group.wakes.load(Ordering::Acquire) != seen {
                continue;
            }
            let left = left.map(|l| l.saturating_sub(polled.elapsed()));
            state = match left {
                None => self.group.cv.wait(state).unwrap_or_else(PoisonError::into_inner),
                Some(left) => self.group.cv.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0,
            };
        }
    }

    /// Waits, then hands `emit` the element-wise sum of every rank's values
    /// in consecutive pieces. Sums run in rank order (rank 0's values plus
    /// rank 1's plus ...), so every rank gets the same bits whoever computes
    /// them. Long sums are cut in chunks that the waiting ranks claim: each
    /// chunk is summed once, in parallel, and no rank depends on another
    /// calling wait (a rank still computing before its wait costs nothing).
    pub(super) fn wait_sum<T: Elem>(&self, emit: &mut dyn FnMut(&[T])) -> Result<(), CommError> {
        let posts = self.wait_posts()?;
        let n = assemble::common_len::<T>(self.op, &posts)?;
        if n <= CHUNK {
            emit(&assemble::sum_range::<T>(&posts, 0..n));
            return Ok(());
        }
        let num_chunks = n.div_ceil(CHUNK);
        let mut state = lock(&self.group.state);
        loop {
            self.check_abort()?;
            let round = round_of(&mut state, self.seq);
            if round.chunks.is_empty() {
                round.chunks.resize_with(num_chunks, || Chunk::Free);
            }
            if let Some(c) = round.chunks.iter().position(|c| matches!(c, Chunk::Free)) {
                round.chunks[c] = Chunk::Claimed(self.rank);
                drop(state);
                let piece = assemble::sum_range::<T>(&posts, c * CHUNK..((c + 1) * CHUNK).min(n));
                state = lock(&self.group.state);
                let round = round_of(&mut state, self.seq);
                round.chunks[c] = Chunk::Done(Arc::new(T::wrap(piece)));
                if round.chunks.iter().all(|c| matches!(c, Chunk::Done(_))) {
                    self.group.wake_all();
                }
                continue;
            }
            let done: Option<Vec<Arc<Data>>> = round
                .chunks
                .iter()
                .map(|c| match c {
                    Chunk::Done(piece) => Some(Arc::clone(piece)),
                    _ => None,
                })
                .collect();
            if let Some(pieces) = done {
                drop(state);
                for piece in &pieces {
                    emit(T::slice(piece));
                }
                return Ok(());
            }
            // Other ranks are summing the rest: pure code on live threads
            // (a panicking one frees its chunk), so no deadline is needed.
            state = self.group.cv.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The group of the ranks that chose `color` in this split round, of
    /// `size` ranks: the first member to get here creates it, the others
    /// share it.
    pub(super) fn take_split(&self, color: usize, size: usize) -> Arc<Group> {
        let mut state = lock(&self.group.state);
        let key = (self.seq, color);
        let split = state.splits.entry(key).or_insert_with(|| Split {
            group: Group::new(size, self.group.timeout, Arc::clone(&self.group.family)),
            takers_left: size,
        });
        let group = Arc::clone(&split.group);
        split.takers_left -= 1;
        if split.takers_left == 0 {
            state.splits.remove(&key);
        }
        group
    }

    /// Ends the loan of this rank's post (values it lent, see
    /// [`Data::lend`]; nothing to do for a post it owns, or a loan already
    /// ended); returns once no rank can read them any more, after
    /// which the lender may free or change them. `read` says whether this
    /// rank got the round's posts (then every rank can read them).
    ///
    /// - Every rank posted from a blocking call (lent or copied): each is
    ///   inside it, reading the round now, so wait for all to finish. No
    ///   deadline is needed: they are copying, or failing.
    /// - Some rank started the exchange non-blocking: it reads when it
    ///   waits, maybe after other collectives, so it gets a copy instead,
    ///   and only the readers already holding the lent values are awaited.
    /// - The round never became readable for this rank (timeout, abort):
    ///   it is closed to readers, and those already reading are awaited.
    pub(super) fn end_loan(&self, own: &[f32], read: bool) {
        if !self.lent || self.loan_ended.get() {
            return;
        }
        self.see_readers_off(own, read);
        // Only now: should the above fail midway, the ticket's drop tries again.
        self.loan_ended.set(true);
    }

    fn see_readers_off(&self, own: &[f32], read: bool) {
        let group = &self.group;
        let mut state = lock(&group.state);
        let round = round_of(&mut state, self.seq);
        let readable = round.num_posted == group.size && round.gave_up.is_none() && round.closed.is_none();
        if readable && read && round.posted().all(|(_, p)| p.blocking) {
            loop {
                let round = round_of(&mut state, self.seq);
                if round.finished.iter().all(|&f| f) || (round.closed.is_some() && round.holders == 0) {
                    return;
                }
                state = group.cv.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
        }
        if readable && read {
            let post = Arc::clone(round.posts[self.rank].as_ref().expect("a lender posted"));
            drop(state);
            let copy = Post {
                op: post.op,
                data: Data::F32(own.to_vec()),
                meta: post.meta.clone(),
                bad: None,
                blocking: post.blocking,
            };
            state = lock(&group.state);
            round_of(&mut state, self.seq).posts[self.rank] = Some(Arc::new(copy));
        } else {
            round.closed.get_or_insert_with(|| format!("rank {} left this {} before it completed", self.rank, self.op));
            // A lender waiting for all to finish stops waiting on a closed round.
            group.wake_all();
        }
        while round_of(&mut state, self.seq).holders > 0 {
            state = group.cv.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn check_abort(&self) -> Result<(), CommError> {
        match self.group.family.abort_reason() {
            Some(reason) => Err(self.aborted(reason)),
            None => Ok(()),
        }
    }

    fn aborted(&self, reason: String) -> CommError {
        CommError::Aborted { op: self.op, rank: self.rank, reason }
    }

    /// Fails if a rank called another collective in this round, or rejected
    /// its arguments: the round can never succeed then.
    fn check_posted(&self, round: &Round) -> Result<(), CommError> {
        if let Some((r, post)) = round.posted().find(|(_, p)| p.op != self.op) {
            return Err(CommError::BadArgument {
                op: self.op,
                reason: format!(
                    "rank {r} called {} where rank {} called {} (collective #{} of this group): every rank must \
                     call the same collectives in the same order",
                    post.op, self.rank, self.op, self.seq
                ),
            });
        }
        if let Some((r, why)) = round.posted().find_map(|(r, p)| p.bad.as_ref().map(|why| (r, why))) {
            return Err(CommError::BadArgument {
                op: self.op,
                reason: format!("rank {r} rejected its arguments: {why}"),
            });
        }
        Ok(())
    }
}

fn round_of(state: &mut State, seq: u64) -> &mut Round {
    state.rounds.get_mut(&seq).expect("a round lives while a rank holds a ticket for it")
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A lender leaving without ending its loan (an early return or a
        // panic) must still see its readers off before its values go.
        self.end_loan(&[], false);
        let mut state = lock(&self.group.state);
        let round = round_of(&mut state, self.seq);
        if !round.finished[self.rank] {
            round.finished[self.rank] = true;
            // Only lenders wait for ranks to finish.
            if round.has_loans() {
                self.group.wake_all();
            }
        }
        // A rank that panicked mid-sum hands its chunk back to the others.
        let mut freed = false;
        for chunk in &mut round.chunks {
            if matches!(chunk, Chunk::Claimed(r) if *r == self.rank) {
                *chunk = Chunk::Free;
                freed = true;
            }
        }
        if freed {
            self.group.wake_all();
        }
        round.readers_left -= 1;
        if round.readers_left == 0 {
            let round = state.rounds.remove(&self.seq);
            // Big buffers are freed outside the lock.
            drop(state);
            drop(round);
        }
    }
}
