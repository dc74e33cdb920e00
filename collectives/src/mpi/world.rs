//! MPI initialisation, communicators and the collectives over them.

use super::ffi_util::{c_count, check, counts_and_displs, null_request, poll, set_spin_tests, MpiElem, Polled};
use super::roll_call::missing_ranks;
use crate::stream_copy::{copy_bytes, worth_streaming};
use crate::{CommError, Communicator, MessageBuffer, Pending, PendingOp, Received};
use mpi::ffi;
use std::os::raw::{c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of the own block copied between two progress tests.
const SELF_COPY_PIECE: usize = 1 << 20;

/// First tag of the point-to-point messages of the all-to-all; call `seq`
/// uses `P2P_TAG + seq % P2P_TAGS` (within the 32767 MPI guarantees).
const P2P_TAG: c_int = 16;
const P2P_TAGS: u64 = 16_384;

/// Exchanges where some rank sends more bytes than this go as posted
/// point-to-point messages rather than one `MPI_Ialltoallv`.
const LINEAR_FROM_BYTES: usize = 256 << 10;

/// The longest a timed-out rank waits for its peers' roll-call answers.
const ROLL_CALL_GRACE: Duration = Duration::from_secs(10);

/// Whether MPI lets several threads call it at once (communication threads
/// need that); true until MPI is initialised with less.
pub(super) static THREAD_MULTIPLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// MPI, initialised for this process; finalised when dropped (after every
/// communicator made from it is gone).
pub struct MpiWorld {
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MpiWorld")
    }
}

impl MpiWorld {
    /// Initialises MPI. Ranks call collectives from one thread at a time,
    /// but that may not be the thread that initialised MPI, hence at least
    /// `MPI_THREAD_SERIALIZED`.
    pub fn init() -> Result<Self, CommError> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple).ok_or_else(|| {
            CommError::Transport { op: "MPI_Init_thread", reason: "MPI is already initialised in this process".into() }
        })?;
        if threading < mpi::Threading::Serialized {
            return Err(CommError::Transport {
                op: "MPI_Init_thread",
                reason: format!(
                    "this MPI library gives only {threading:?} thread support; switchyard needs Serialized"
                ),
            });
        }
        THREAD_MULTIPLE.store(threading == mpi::Threading::Multiple, std::sync::atomic::Ordering::Relaxed);
        if oversubscribed() {
            // A short spin still catches replies that are already on their way.
            set_spin_tests(200);
        }
        Ok(Self { _universe: universe })
    }

    /// A communicator over every rank of the job, whose collectives wait at most `timeout`.
    pub fn world(&self, timeout: Duration) -> Result<Box<dyn Communicator>, CommError> {
        // SAFETY: MPI is initialised (self exists) and COMM_WORLD is valid until finalize.
        let world = unsafe { ffi::RSMPI_COMM_WORLD };
        Ok(Box::new(MpiComm::duplicate(world, timeout)?))
    }

    /// The library's own blocking `MPI_Alltoallv` on every rank of the job
    /// (what mpi4py's `Alltoallv` calls), for benchmarks to compare with in
    /// the same processes. It has no deadline: a missing rank hangs it, so
    /// nothing but a benchmark uses it.
    pub fn library_all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut [f32],
    ) -> Result<(), CommError> {
        let op = "MPI_Alltoallv";
        let (send_c, send_displs) = counts_and_displs(op, send_counts)?;
        let (recv_c, recv_displs) = counts_and_displs(op, recv_counts)?;
        if send.len() != send_counts.iter().sum::<usize>() || recv.len() != recv_counts.iter().sum::<usize>() {
            return Err(CommError::BadArgument { op, reason: "buffer lengths do not match the counts".into() });
        }
        // SAFETY: the counts and displacements describe both buffers, which
        // outlive this blocking call.
        check(op, unsafe {
            ffi::MPI_Alltoallv(
                send.as_ptr().cast(),
                send_c.as_ptr(),
                send_displs.as_ptr(),
                f32::datatype(),
                recv.as_mut_ptr().cast(),
                recv_c.as_ptr(),
                recv_displs.as_ptr(),
                f32::datatype(),
                ffi::RSMPI_COMM_WORLD,
            )
        })
    }

    /// Prints `message` (prefixed with this process's world rank) to stderr
    /// and ends every rank of the job with `code`.
    pub fn abort(&self, message: &str, code: i32) -> ! {
        abort_job(message, code)
    }
}

/// Whether this node runs more ranks than it has cores (mpirun says so,
/// or the local rank count says so).
fn oversubscribed() -> bool {
    let var = |name: &str| std::env::var(name).ok();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local_ranks = var("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| var("SLURM_NTASKS_PER_NODE"));
    var("OMPI_MCA_mpi_oversubscribe").as_deref() == Some("1")
        || local_ranks.and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n > cores)
}

fn world_rank() -> usize {
    let mut rank: c_int = 0;
    // SAFETY: MPI is initialised whenever a communicator or world exists.
    unsafe { ffi::MPI_Comm_rank(ffi::RSMPI_COMM_WORLD, &mut rank) };
    rank as usize
}

fn abort_job(message: &str, code: i32) -> ! {
    eprintln!("switchyard rank {}: {message}", world_rank());
    // SAFETY: MPI is initialised; MPI_Abort does not return.
    unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    std::process::exit(code)
}

/// The MPI communicators of one group: one for data, one for roll calls
/// (so roll-call messages never match a data receive).
struct Handles {
    data: ffi::MPI_Comm,
    roll: ffi::MPI_Comm,
}

// SAFETY: MPI handles are plain identifiers; MPI is initialised with at
// least THREAD_SERIALIZED and a communicator is used by one thread at a
// time (through `&mut MpiComm`, or by the one pending operation it started).
unsafe impl Send for Handles {}
unsafe impl Sync for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        let mut finalized: c_int = 0;
        // SAFETY: MPI_Finalized may be called at any time; the handles were made by MPI_Comm_dup/split.
        unsafe {
            ffi::MPI_Finalized(&mut finalized);
            if finalized == 0 {
                ffi::MPI_Comm_free(&mut self.data);
                ffi::MPI_Comm_free(&mut self.roll);
            }
        }
    }
}

/// One rank's handle on a group of MPI ranks.
pub struct MpiComm {
    handles: Arc<Handles>,
    rank: usize,
    size: usize,
    /// World rank of every group rank, for messages.
    world_ranks: Vec<usize>,
    timeout: Duration,
    /// The number of this rank's next collective on the group (the same on
    /// every rank: they call collectives in the same order); roll calls compare it.
    seq: u64,
}

impl MpiComm {
    /// Takes over `comm` (a fresh communicator this rank owns): errors are
    /// returned rather than fatal, and a twin is made for roll calls.
    fn adopt(data: ffi::MPI_Comm, timeout: Duration) -> Result<Self, CommError> {
        let mut roll = data;
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: `data` is a valid communicator owned by this rank.
        unsafe {
            check("MPI_Comm_set_errhandler", ffi::MPI_Comm_set_errhandler(data, ffi::RSMPI_ERRORS_RETURN))?;
            check("MPI_Comm_dup", ffi::MPI_Comm_dup(data, &mut roll))?;
            check("MPI_Comm_rank", ffi::MPI_Comm_rank(data, &mut rank))?;
            check("MPI_Comm_size", ffi::MPI_Comm_size(data, &mut size))?;
        }
        let handles = Arc::new(Handles { data, roll });
        let mut comm =
            Self { handles, rank: rank as usize, size: size as usize, world_ranks: Vec::new(), timeout, seq: 0 };
        let mine = [world_rank() as u64];
        comm.world_ranks = comm.all_gather(&mine)?.0.into_iter().map(|r| r as usize).collect();
        Ok(comm)
    }

    /// A new communicator over the same ranks as `comm`.
    fn duplicate(comm: ffi::MPI_Comm, timeout: Duration) -> Result<Self, CommError> {
        let mut dup = comm;
        // SAFETY: `comm` is a valid communicator.
        check("MPI_Comm_dup", unsafe { ffi::MPI_Comm_dup(comm, &mut dup) })?;
        Self::adopt(dup, timeout)
    }

    /// Starts one operation on the data communicator and drives it to
    /// completion. Every buffer the operation touches must stay alive and
    /// untouched until it completes, which `wait_or_abort` guarantees by
    /// never returning early.
    fn run(
        &mut self,
        op: &'static str,
        start: impl FnOnce(ffi::MPI_Comm, *mut ffi::MPI_Request) -> c_int,
    ) -> Result<(), CommError> {
        let seq = self.seq;
        self.seq += 1;
        let mut request = null_request();
        check(op, start(self.handles.data, &mut request))?;
        let deadline = Instant::now() + self.timeout;
        wait_or_abort(op, std::slice::from_mut(&mut request), None, deadline, &self.timeout_context(seq))
    }

    fn timeout_context(&self, seq: u64) -> TimeoutContext {
        TimeoutContext {
            handles: Arc::clone(&self.handles),
            rank: self.rank,
            size: self.size,
            world_ranks: self.world_ranks.clone(),
            seq,
            timeout: self.timeout,
        }
    }

    fn check_counts(&self, op: &'static str, counts: &[usize], len: usize) -> Result<(), CommError> {
        if counts.len() != self.size {
            return Err(CommError::BadArgument {
                op,
                reason: format!("{} counts for a group of {} ranks", counts.len(), self.size),
            });
        }
        let total: usize = counts.iter().sum();
        if total != len {
            return Err(CommError::BadArgument { op, reason: format!("counts sum to {total} but {len} values given") });
        }
        Ok(())
    }

    fn all_reduce<T: MpiElem>(&mut self, op: &'static str, buf: &mut [T]) -> Result<(), CommError> {
        let n = c_count(op, buf.len())?;
        let send = buf.to_vec();
        // SAFETY: both buffers hold n elements of T and outlive the operation.
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Iallreduce(
                send.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                n,
                T::datatype(),
                ffi::RSMPI_SUM,
                comm,
                req,
            )
        })
    }

    /// Every rank's `send`, concatenated in rank order, and the lengths.
    fn all_gather<T: MpiElem>(&mut self, send: &[T]) -> Result<(Vec<T>, Vec<usize>), CommError> {
        let op = "all_gather_v";
        let mine = [c_count(op, send.len())?];
        let mut lens = vec![0 as c_int; self.size];
        // SAFETY: one int sent, one int per rank received.
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Iallgather(
                mine.as_ptr().cast(),
                1,
                c_int::datatype(),
                lens.as_mut_ptr().cast(),
                1,
                c_int::datatype(),
                comm,
                req,
            )
        })?;
        let counts: Vec<usize> = lens.iter().map(|&n| n as usize).collect();
        let (counts_c, displs) = counts_and_displs(op, &counts)?;
        let mut recv = vec![T::default(); counts.iter().sum()];
        // SAFETY: recv holds sum(counts) elements laid out by displs.
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Iallgatherv(
                send.as_ptr().cast(),
                mine[0],
                T::datatype(),
                recv.as_mut_ptr().cast(),
                counts_c.as_ptr(),
                displs.as_ptr(),
                T::datatype(),
                comm,
                req,
            )
        })?;
        Ok((recv, counts))
    }

    /// Tells every rank how many values it will receive from here, and how
    /// many this rank sends in all; returns the counts this rank receives
    /// and the largest total any rank sends (the same on every rank, so
    /// every rank picks the same algorithm).
    fn exchange_counts(&mut self, op: &'static str, send_counts: &[usize]) -> Result<(Vec<usize>, usize), CommError> {
        let total = c_count(op, send_counts.iter().sum())?;
        let mut send_c = Vec::with_capacity(2 * self.size);
        for &n in send_counts {
            send_c.extend([c_count(op, n)?, total]);
        }
        let mut recv_c = vec![0 as c_int; 2 * self.size];
        // SAFETY: two ints to and from every rank.
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Ialltoall(
                send_c.as_ptr().cast(),
                2,
                c_int::datatype(),
                recv_c.as_mut_ptr().cast(),
                2,
                c_int::datatype(),
                comm,
                req,
            )
        })?;
        let counts = recv_c.chunks_exact(2).map(|pair| pair[0] as usize).collect();
        let largest = recv_c.chunks_exact(2).map(|pair| pair[1] as usize).max().unwrap_or(0);
        Ok((counts, largest))
    }

    /// Blocking all-to-all-v into `recv` (its allocation reused: a fresh
    /// buffer of tens of MiB costs more in page faults than the transfer),
    /// counts exchanged first; returns the counts this rank received.
    ///
    /// Small exchanges are one `MPI_Ialltoallv` (latency-bound: one call).
    /// Large ones go as posted point-to-point messages (see
    /// [`MpiComm::post_and_wait`]), as OpenMPI's blocking `MPI_Alltoallv` does.
    fn all_to_all_into<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
        recv: &mut MessageBuffer<T>,
    ) -> Result<Vec<usize>, CommError> {
        self.check_counts(op, send_counts, send.len())?;
        let (recv_counts, largest_send) = self.exchange_counts(op, send_counts)?;
        // Decided from the largest sender, so every rank takes the same path.
        if largest_send * std::mem::size_of::<T>() <= LINEAR_FROM_BYTES {
            self.one_call_into(op, send, send_counts, &recv_counts, recv)?;
        } else {
            self.post_and_wait(op, send, send_counts, &recv_counts, recv)?;
        }
        Ok(recv_counts)
    }

    /// Blocking all-to-all-v into `recv` when this rank already knows what
    /// every peer sends it: no counts travel first. Always point-to-point
    /// messages, so that no rank needs the others' sizes to pick a path;
    /// each receive's size is checked against `recv_counts`.
    fn all_to_all_known_into<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<T>,
    ) -> Result<(), CommError> {
        self.check_counts(op, send_counts, send.len())?;
        if recv_counts.len() != self.size || recv_counts[self.rank] != send_counts[self.rank] {
            return Err(CommError::BadArgument {
                op,
                reason: format!(
                    "receive counts {recv_counts:?} do not fit a group of {} ranks whose rank {} keeps {} values",
                    self.size, self.rank, send_counts[self.rank]
                ),
            });
        }
        self.post_and_wait(op, send, send_counts, recv_counts, recv)
    }

    /// The exchange as one `MPI_Ialltoallv`, waited for.
    fn one_call_into<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<T>,
    ) -> Result<(), CommError> {
        let total: usize = recv_counts.iter().sum();
        recv.clear_for(total);
        // SAFETY: `send` and the `total` reserved elements of `recv` stay
        // put until the request completes below.
        let (mut request, seq, _arrays) =
            unsafe { self.start_ialltoallv(op, send.as_ptr(), send_counts, recv.as_mut_ptr(), recv_counts) }?;
        let deadline = Instant::now() + self.timeout;
        wait_or_abort(op, std::slice::from_mut(&mut request), None, deadline, &self.timeout_context(seq))?;
        // SAFETY: the exchange completed and wrote every one of the `total` elements.
        unsafe { recv.set_len(total) };
        Ok(())
    }

    /// Starts one `MPI_Ialltoallv` from `send` (`send_counts`, in rank
    /// order) into `recv` (`recv_counts`); returns the request, its
    /// sequence number and the count arrays MPI reads until it completes.
    ///
    /// # Safety
    /// Both buffers must hold what the counts describe and stay alive and
    /// in place until the request completes, as must the returned arrays.
    unsafe fn start_ialltoallv<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: *const T,
        send_counts: &[usize],
        recv: *mut T,
        recv_counts: &[usize],
    ) -> Result<(ffi::MPI_Request, u64, [Vec<c_int>; 4]), CommError> {
        let (send_c, send_displs) = counts_and_displs(op, send_counts)?;
        let (recv_c, recv_displs) = counts_and_displs(op, recv_counts)?;
        let mut request = null_request();
        let seq = self.seq;
        self.seq += 1;
        // SAFETY: the caller keeps the buffers; the arrays are returned to it.
        check(op, unsafe {
            ffi::MPI_Ialltoallv(
                send.cast::<c_void>(),
                send_c.as_ptr(),
                send_displs.as_ptr(),
                T::datatype(),
                recv.cast(),
                recv_c.as_ptr(),
                recv_displs.as_ptr(),
                T::datatype(),
                self.handles.data,
                &mut request,
            )
        })?;
        Ok((request, seq, [send_c, send_displs, recv_c, recv_displs]))
    }

    /// The exchange as point-to-point messages: every receive posted, then
    /// every send (to rank+1, rank+2, ... so that ranks do not all hit one
    /// peer first), the own block copied meanwhile, then all waited for.
    /// Each call has its own tag, so a message a wrong count left unmatched
    /// can never land in a later exchange. A message shorter than expected
    /// is an error naming its sender; a longer one ends the job naming it
    /// (the failed receive leaves others that may still use the buffers).
    fn post_and_wait<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<T>,
    ) -> Result<(), CommError> {
        let (send_c, send_displs) = counts_and_displs(op, send_counts)?;
        let (recv_c, recv_displs) = counts_and_displs(op, recv_counts)?;
        let total: usize = recv_counts.iter().sum();
        recv.clear_for(total);
        let recv_ptr = recv.as_mut_ptr();
        let (rank, size) = (self.rank, self.size);
        let seq = self.seq;
        self.seq += 1;
        let tag = P2P_TAG + (seq % P2P_TAGS) as c_int;
        let deadline = Instant::now() + self.timeout;
        // SAFETY (all blocks below): every range lies inside `send` or the
        // reserved `total` elements of `recv`, and is waited for before
        // this function returns (or the job ends).
        // Receives first, so every message finds its buffer posted.
        let mut requests = Vec::with_capacity(2 * size);
        let mut sources = Vec::with_capacity(size);
        for k in 1..size {
            let src = (rank + size - k) % size;
            if recv_counts[src] > 0 {
                let mut request = null_request();
                check(op, unsafe {
                    ffi::MPI_Irecv(
                        recv_ptr.add(recv_displs[src] as usize).cast(),
                        recv_c[src],
                        T::datatype(),
                        src as c_int,
                        tag,
                        self.handles.data,
                        &mut request,
                    )
                })?;
                requests.push(request);
                sources.push(src);
            }
        }
        for k in 1..size {
            let dst = (rank + k) % size;
            if send_counts[dst] > 0 {
                let mut request = null_request();
                check(op, unsafe {
                    ffi::MPI_Isend(
                        send.as_ptr().add(send_displs[dst] as usize).cast(),
                        send_c[dst],
                        T::datatype(),
                        dst as c_int,
                        tag,
                        self.handles.data,
                        &mut request,
                    )
                })?;
                requests.push(request);
            }
        }
        // SAFETY: MPI_Status is plain integers; MPI fills it on completion.
        let mut statuses = vec![unsafe { std::mem::zeroed::<ffi::MPI_Status>() }; requests.len()];
        // This rank's own block moves while the peers' transfers run, in
        // pieces with a test between them: the receiver drives the
        // single-copy transfers, so a long copy without tests stalls them.
        // A large one, in an exchange larger than the cache, with streaming
        // stores (`stream_copy::worth_streaming`).
        let (own_from, own_to) = (send_displs[rank] as usize, recv_displs[rank] as usize);
        let elem = std::mem::size_of::<T>();
        let stream = worth_streaming(send_counts[rank] * elem, std::mem::size_of_val(send) * size);
        let mut copied = 0;
        let mut done = false;
        let waited = (|| {
            while copied < send_counts[rank] {
                let n = (send_counts[rank] - copied).min(SELF_COPY_PIECE / std::mem::size_of::<T>());
                unsafe {
                    copy_bytes(
                        send.as_ptr().add(own_from + copied).cast(),
                        recv_ptr.add(own_to + copied).cast(),
                        n * std::mem::size_of::<T>(),
                        stream,
                    )
                };
                copied += n;
                // Once done, not again: a test of completed (null) requests would blank the statuses.
                if !done {
                    done = poll(op, &mut requests, Some(&mut statuses), Instant::now())? == Polled::Done;
                }
            }
            if !done {
                wait_or_abort(op, &mut requests, Some(&mut statuses), deadline, &self.timeout_context(seq))?;
            }
            Ok(())
        })();
        // A sender that disagrees on a count: more than expected fails the
        // receive (truncated), fewer completes it short.
        let disagree = |src: usize, sent: String| CommError::BadArgument {
            op,
            reason: format!(
                "rank {} sent {sent} values where rank {} expected {}: the ranks disagree on the counts",
                self.world_ranks[src], self.world_ranks[rank], recv_counts[src]
            ),
        };
        if let Err(error) = waited {
            // Requests that had not finished may still read or write the
            // buffers, so the job ends here, as after a timeout.
            let truncated = statuses.iter().zip(&sources).find(|(s, _)| s.MPI_ERROR == ffi::MPI_ERR_TRUNCATE as c_int);
            abort_job(&truncated.map_or(error, |(_, &src)| disagree(src, "more".into())).to_string(), 1)
        }
        for (status, &src) in statuses.iter().zip(&sources) {
            let mut got: c_int = 0;
            // SAFETY: a status MPI filled for a completed receive.
            check(op, unsafe { ffi::MPI_Get_count(status, T::datatype(), &mut got) })?;
            if got != recv_c[src] {
                return Err(disagree(src, got.to_string()));
            }
        }
        // SAFETY: the exchange completed and wrote every one of the `total` elements.
        unsafe { recv.set_len(total) };
        Ok(())
    }

    fn all_to_all<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: &[T],
        send_counts: &[usize],
    ) -> Result<(MessageBuffer<T>, Vec<usize>), CommError> {
        let mut recv = MessageBuffer::new();
        let counts = self.all_to_all_into(op, send, send_counts, &mut recv)?;
        Ok((recv, counts))
    }

    /// Exchanges counts, then starts the data transfer (non-blocking, so
    /// `MPI_Ialltoallv`). The returned value owns every buffer and array MPI
    /// reads or writes until completion, `send` included.
    fn start_all_to_all<T: MpiElem>(
        &mut self,
        op: &'static str,
        send: Vec<T>,
        send_counts: &[usize],
    ) -> Result<Transfer<T>, CommError> {
        self.check_counts(op, send_counts, send.len())?;
        let (recv_counts, _) = self.exchange_counts(op, send_counts)?;
        let mut recv = MessageBuffer::new();
        recv.resize(recv_counts.iter().sum(), T::default());
        // SAFETY: `send`, `recv` and the arrays move into the Transfer (their
        // heap blocks stay put) until the request completes.
        let (request, seq, arrays) =
            unsafe { self.start_ialltoallv(op, send.as_ptr(), send_counts, recv.as_mut_ptr(), &recv_counts) }?;
        Ok(Transfer {
            request,
            recv,
            recv_counts,
            _arrays: arrays,
            _send: send,
            deadline: Instant::now() + self.timeout,
            seq,
        })
    }
}

/// What a timed-out operation needs to name the ranks it waited for.
struct TimeoutContext {
    handles: Arc<Handles>,
    rank: usize,
    size: usize,
    world_ranks: Vec<usize>,
    seq: u64,
    timeout: Duration,
}

/// Drives `request` to completion; on timeout, finds the missing ranks and
/// ends the job (see the module docs: MPI may still use the buffers).
fn wait_or_abort(
    op: &'static str,
    requests: &mut [ffi::MPI_Request],
    statuses: Option<&mut [ffi::MPI_Status]>,
    deadline: Instant,
    ctx: &TimeoutContext,
) -> Result<(), CommError> {
    match poll(op, requests, statuses, deadline)? {
        Polled::Done => return Ok(()),
        Polled::Stopped(reason) => abort_job(&format!("{op} stopped: {reason}"), 1),
        Polled::TimedOut => {}
    }
    let grace = ctx.timeout.min(ROLL_CALL_GRACE);
    let missing = missing_ranks(ctx.handles.roll, ctx.rank, ctx.size, ctx.seq, grace);
    let error = CommError::Timeout {
        op,
        rank: ctx.world_ranks[ctx.rank],
        missing: missing.into_iter().map(|r| ctx.world_ranks[r]).collect(),
        seconds: ctx.timeout.as_secs_f64(),
    };
    abort_job(&error.to_string(), 1)
}

/// An all-to-all-v in flight with everything MPI may touch.
struct Transfer<T: Copy> {
    request: ffi::MPI_Request,
    recv: MessageBuffer<T>,
    recv_counts: Vec<usize>,
    _arrays: [Vec<c_int>; 4],
    /// The send buffer.
    _send: Vec<T>,
    deadline: Instant,
    seq: u64,
}

/// A non-blocking operation with its buffers, waited on later.
struct InFlight {
    op: &'static str,
    transfer: Transfer<f32>,
    ctx: TimeoutContext,
}

// SAFETY: see `Handles`; the request handle is used by one thread at a time.
unsafe impl Send for InFlight {}

impl PendingOp for InFlight {
    fn wait(mut self: Box<Self>) -> Result<Received, CommError> {
        let t = &mut self.transfer;
        wait_or_abort(self.op, std::slice::from_mut(&mut t.request), None, t.deadline, &self.ctx)?;
        Ok(Received { values: std::mem::take(&mut t.recv), counts: std::mem::take(&mut t.recv_counts) })
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        // SAFETY: no buffers.
        self.run("barrier", |comm, req| unsafe { ffi::MPI_Ibarrier(comm, req) })
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let op = "broadcast";
        if root >= self.size {
            return Err(CommError::BadArgument { op, reason: format!("root {root} in a group of {}", self.size) });
        }
        let n = c_count(op, buf.len())?;
        // SAFETY: buf holds n floats and outlives the operation.
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Ibcast(buf.as_mut_ptr().cast(), n, f32::datatype(), root as c_int, comm, req)
        })
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce("all_reduce_sum", buf)
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce("all_reduce_sum_f64", buf)
    }
    fn all_gather_v(&mut self, send: &[f32]) -> Result<Received, CommError> {
        let (values, counts) = self.all_gather(send)?;
        Ok(Received { values: values.into(), counts })
    }
    fn all_gather_u64(&mut self, send: &[u64]) -> Result<Vec<Vec<u64>>, CommError> {
        let (values, counts) = self.all_gather(send)?;
        let mut rest = values.as_slice();
        Ok(counts
            .into_iter()
            .map(|n| {
                let (head, tail) = rest.split_at(n);
                rest = tail;
                head.to_vec()
            })
            .collect())
    }
    fn reduce_scatter_sum(&mut self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>, CommError> {
        let op = "reduce_scatter_sum";
        self.check_counts(op, counts, send.len())?;
        let (counts_c, _) = counts_and_displs(op, counts)?;
        let mut recv = vec![0.0f32; counts[self.rank]];
        // SAFETY: send holds sum(counts) floats, recv counts[rank].
        self.run(op, |comm, req| unsafe {
            ffi::MPI_Ireduce_scatter(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                counts_c.as_ptr(),
                f32::datatype(),
                ffi::RSMPI_SUM,
                comm,
                req,
            )
        })?;
        Ok(recv)
    }
    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> Result<Received, CommError> {
        let (values, counts) = self.all_to_all("all_to_all_v", send, send_counts)?;
        Ok(Received { values, counts })
    }
    fn all_to_all_v_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<Vec<usize>, CommError> {
        self.all_to_all_into("all_to_all_v", send, send_counts, recv)
    }
    fn all_to_all_v_known_into(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut MessageBuffer<f32>,
    ) -> Result<(), CommError> {
        self.all_to_all_known_into("all_to_all_v", send, send_counts, recv_counts, recv)
    }
    fn all_to_all_v_u64(&mut self, send: &[u64], send_counts: &[usize]) -> Result<(Vec<u64>, Vec<usize>), CommError> {
        let (values, counts) = self.all_to_all("all_to_all_v_u64", send, send_counts)?;
        Ok((values.into_vec(), counts))
    }
    fn start_all_to_all_v(&mut self, send: Vec<f32>, send_counts: Vec<usize>) -> Result<Pending, CommError> {
        let op = "all_to_all_v";
        // The heap block of `send` does not move with the Vec, so MPI keeps reading valid memory.
        let transfer = self.start_all_to_all(op, send, &send_counts)?;
        let ctx = self.timeout_context(transfer.seq);
        Ok(Pending(Box::new(InFlight { op, transfer, ctx })))
    }
    fn start_all_reduce_sum(&mut self, buf: Vec<f32>) -> Result<Pending, CommError> {
        let op = "all_reduce_sum";
        let n = c_count(op, buf.len())?;
        let mut recv = MessageBuffer::new();
        recv.resize(buf.len(), 0.0f32);
        let seq = self.seq;
        self.seq += 1;
        let mut request = null_request();
        // SAFETY: both buffers hold n floats and move into the InFlight below
        // (their heap blocks stay put) until the request completes.
        check(op, unsafe {
            ffi::MPI_Iallreduce(
                buf.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                n,
                f32::datatype(),
                ffi::RSMPI_SUM,
                self.handles.data,
                &mut request,
            )
        })?;
        let transfer = Transfer {
            request,
            recv,
            recv_counts: Vec::new(),
            _arrays: Default::default(),
            _send: buf,
            deadline: Instant::now() + self.timeout,
            seq,
        };
        let ctx = self.timeout_context(seq);
        Ok(Pending(Box::new(InFlight { op, transfer, ctx })))
    }
    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>, CommError> {
        let op = "split";
        // MPI_Comm_split blocks with no deadline: meet first, with one.
        self.barrier()?;
        self.seq += 1;
        let mut new = self.handles.data;
        // SAFETY: every rank reached the barrier, so every rank calls this.
        check(op, unsafe { ffi::MPI_Comm_split(self.handles.data, c_count(op, color)?, c_count(op, key)?, &mut new) })?;
        Ok(Box::new(Self::adopt(new, self.timeout)?))
    }
}
