//! Expert parallelism: the MoE layer's rows travel to the ranks that own
//! their experts and back, with all-to-all-v (DESIGN section 4).
//!
//! [`AllToAllExperts`] is an [`ExpertExecutor`]: the model routes and
//! combines exactly as on one rank; between those stages this executor
//! 1. permutes the dispatch rows by owner rank (the plan may place experts
//!    anywhere), and tells every owner how many rows of each of its experts
//!    are coming (a small all-to-all of counts);
//! 2. sends the rows (all-to-all-v), regroups what arrived expert by expert
//!    and runs the local experts on it ([`LocalExperts`], the same code as
//!    the single-rank reference);
//! 3. sends the outputs back (all-to-all-v) and undoes the permutation.
//!
//! A token whose top-k experts share an owner travels to it once: with
//! top-k > 1 the forward rows to one rank are numbered by token (in order
//! of first appearance) and only the first of each token's rows is sent;
//! the owner copies it to the token's other rows. The backward pass sends
//! back, per token and rank, the sum of the input gradients of its rows
//! there (what the sender would sum anyway). The other two exchanges, the
//! outputs and the output gradients, differ row by row (gates) and travel
//! whole. With `placement = "grouped"` and node-limited routing this is
//! what makes the limit save bytes: a token's experts crowd onto fewer ranks.
//!
//! Overlap: with a communication thread ([`AllToAllExperts::pipelined`]),
//! rows travel while this rank computes. Each exchange is cut in chunks
//! (a share of every rank's block): the experts run on chunk i as soon as
//! it arrived, while chunk i+1 is still travelling and chunk i-1's outputs
//! travel back. `start_forward`/`start_backward` only send, so the model
//! can compute attention or shared experts before `finish_*` waits.
//! Forward outputs are the same bits as unchunked; the experts' weight
//! gradients are summed chunk by chunk, so they differ in rounding.
//!
//! The backward pass runs the same exchange in reverse: combine's backward
//! is a dispatch, dispatch's a combine.
//!
//! MoA's attention experts, when partitioned over the group
//! ([`AllToAllExperts::with_attention_experts`]), travel through the same
//! communicator (or pipe): `attn_plan` exchanges the row counts of a layer
//! and keeps its route (`attn_dispatch.rs`), `attn_to_owners` and
//! `attn_to_sources` move rows along it, each exchange blocking.
//!
//! Legend: `a` dispatch rows, `d` d_model.

use crate::attn_dispatch::{counts_for_owners, AttnRoute};
use crate::bf16_payload;
use crate::config::ExpertOverflow;
use crate::overlap::exposure::Exposure;
use collectives::comm_thread::{CommThread, OpTimes, Ticket};
use collectives::{Communicator, MessageBuffer};
use layout::PlacementPlan;
use model::moe::{DispatchPlan, ExpertExecutor, LocalExperts, Started};
use model::{ModelConfig, ModelError};
use std::collections::VecDeque;
use std::time::Instant;

/// Communication and compute spent in the expert stage, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchStats {
    /// Bytes of rows sent to / received from other ranks (forward and backward).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Time the row exchanges took (on the communication thread when they
    /// overlap with computation).
    pub alltoall_s: f64,
    /// Of that, the time this rank waited for them (not hidden).
    pub alltoall_exposed_s: f64,
    /// Each exchange in order: when this rank arrived at it and how long it
    /// ran here. Every rank of the expert-parallel group runs the same
    /// exchanges in the same order, so the arrivals, compared across the
    /// group, split the time into waiting for the last peer and transfer.
    pub exchanges: Vec<(Instant, f64)>,
    pub expert_s: f64,
    /// Rows this rank's experts processed (forward).
    pub rows_computed: u64,
    /// Rows this rank's experts dropped to stay within their row budget
    /// (`parallel.expert_overflow = "cap"`).
    pub rows_over_budget: u64,
    /// Forward rows this rank sent to an expert on another node, and the
    /// distinct (token, other node) pairs among them: what a dispatch that
    /// sends a token once per node would carry between nodes. 0 on one node.
    pub internode_rows: u64,
    pub internode_token_nodes: u64,
    /// Forward rows to other nodes that travelled (after the per-rank
    /// deduplication: one per token and destination rank).
    pub internode_rows_sent: u64,
    /// Forward rows that did not travel because their token already went
    /// to that rank for another of its experts (the backward pass saves as many).
    pub rows_deduplicated: u64,
}

impl DispatchStats {
    /// Counts one finished exchange: its time, the part this rank waited
    /// for it, and its arrival (for the waiting/transfer split).
    fn record(&mut self, times: OpTimes) {
        self.alltoall_s += times.busy.as_secs_f64();
        self.alltoall_exposed_s += times.waited.as_secs_f64();
        self.exchanges.push((times.started, times.busy.as_secs_f64()));
    }

    /// Adds another executor's totals.
    pub fn add(&mut self, other: &DispatchStats) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.alltoall_s += other.alltoall_s;
        self.alltoall_exposed_s += other.alltoall_exposed_s;
        self.exchanges.extend_from_slice(&other.exchanges);
        self.expert_s += other.expert_s;
        self.rows_computed += other.rows_computed;
        self.rows_over_budget += other.rows_over_budget;
        self.internode_rows += other.internode_rows;
        self.internode_token_nodes += other.internode_token_nodes;
        self.internode_rows_sent += other.internode_rows_sent;
        self.rows_deduplicated += other.rows_deduplicated;
    }
}

/// One piece of a pipelined exchange: some rows of every rank's block.
#[derive(Debug, Clone)]
struct Chunk {
    /// The dispatch-plan row of each row this chunk sends, in send order
    /// (owner-major).
    send_rows: Vec<usize>,
    /// Rows this chunk sends to each rank.
    send_counts: Vec<usize>,
    /// Of `send_rows`, the first row of each token to each rank: the rows
    /// whose input travels (see the module comment).
    send_travel: Vec<usize>,
    send_travel_counts: Vec<usize>,
    /// Rows this chunk receives from each rank.
    recv_counts: Vec<usize>,
    /// For each row received (source-major), the travelling row that
    /// carried its input (an index into the received travelling rows).
    recv_slot: Vec<usize>,
    recv_travel_counts: Vec<usize>,
    /// For each row received (source-major), its row in `plan`, or
    /// [`DROPPED`] for a row over the rank's budget (no expert runs it).
    recv_to_plan: Vec<usize>,
    /// The expert-major grouping of the rows received.
    plan: DispatchPlan,
}

/// What one chunk sends: its rows to every rank in turn, and the
/// travelling rows among them.
#[derive(Debug, Default)]
struct SendSide {
    rows: Vec<usize>,
    counts: Vec<usize>,
    travel: Vec<usize>,
    travel_counts: Vec<usize>,
}

/// Numbers the distinct tokens of a block of rows in order of first
/// appearance, one block after another without clearing per block.
struct TokenNumbering {
    /// Per token, the last block it appeared in and its slot there.
    block_of: Vec<usize>,
    slot_of: Vec<usize>,
    block: usize,
}

impl TokenNumbering {
    fn new(tokens: usize) -> Self {
        Self { block_of: vec![0; tokens], slot_of: vec![0; tokens], block: 0 }
    }

    /// Pushes each row's slot (its token's number in this block) onto
    /// `slots`, and each token's first row onto `firsts`.
    fn number(
        &mut self,
        rows: &[usize],
        token: impl Fn(usize) -> usize,
        slots: &mut Vec<usize>,
        firsts: &mut Vec<usize>,
    ) {
        self.block += 1;
        let mut next = 0;
        for &row in rows {
            let t = token(row);
            if self.block_of[t] != self.block {
                self.block_of[t] = self.block;
                self.slot_of[t] = next;
                next += 1;
                firsts.push(row);
            }
            slots.push(self.slot_of[t]);
        }
    }
}

impl Chunk {
    /// Travelling rows this chunk receives.
    fn recv_slot_count(&self) -> usize {
        self.recv_travel_counts.iter().sum()
    }
}

/// How one layer's rows were exchanged, kept for the backward pass.
#[derive(Debug, Clone)]
struct Exchange {
    /// Rows of the dispatch plan.
    rows: usize,
    chunks: Vec<Chunk>,
}

/// Which pass a flight belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pass {
    Forward,
    Backward,
}

/// A row exchange, in flight on the communication thread, or done on the
/// rank's thread (its rows are then in the executor's `received` buffer).
enum Transfer {
    /// Values received from each rank, and the exchange's times.
    Done(Vec<usize>, OpTimes),
    InFlight(Ticket),
}

/// A started pass of one layer: its exchange and the chunks on their way.
struct Flight {
    pass: Pass,
    exchange: Exchange,
    outbound: VecDeque<Transfer>,
}

/// In place of an expert id or a plan row: a row over the rank's budget,
/// which no expert runs and whose output is zero (a dropped token).
const DROPPED: usize = usize::MAX;

/// At most `rows` rows go to one rank's experts in one exchange; past it,
/// `overflow` says what happens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowBudget {
    pub rows: usize,
    pub overflow: ExpertOverflow,
}

/// Runs the experts where the placement plan puts them.
pub struct AllToAllExperts<'a> {
    comm: &'a mut dyn Communicator,
    /// The node of each rank of `comm` when they span several (else empty).
    nodes: Vec<usize>,
    /// When set, rows travel on this thread's group while this rank computes.
    pipe: Option<&'a CommThread>,
    /// Where waits for rows are counted as exposed communication.
    exposure: Option<&'a Exposure>,
    placement: &'a PlacementPlan,
    local: LocalExperts<'a>,
    d: usize,
    /// Rows travel as bf16 pairs (bf16 mode, even `d`): see `bf16_payload`.
    bf16_rows: bool,
    top_k: usize,
    /// Pieces each exchange is cut in (1 without a pipe).
    chunk_count: usize,
    /// The bound on rows this rank's experts take per exchange, if any.
    budget: Option<RowBudget>,
    saved: Vec<Option<Exchange>>,
    flights: Vec<Option<Flight>>,
    /// The rows of the exchange received last; its allocation is reused
    /// (a fresh buffer costs page faults).
    received: MessageBuffer<f32>,
    /// Receive buffers done with, handed to the pipe's next exchanges.
    spare: Vec<MessageBuffer<f32>>,
    /// Where MoA's attention experts live, when partitioned over the group
    /// (None: replicated on every rank).
    attn_placement: Option<&'a PlacementPlan>,
    /// Per layer: the route of its attention experts' rows in this pass.
    attn_routes: Vec<Option<AttnRoute>>,
    /// Totals since construction.
    pub stats: DispatchStats,
}

/// `out[i] = src[order[i]]`, row by row.
/// A [`DROPPED`] entry gives a row of zeros.
fn gather_rows(src: &[f32], d: usize, order: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(order.len() * d);
    for &row in order {
        match row {
            DROPPED => out.resize(out.len() + d, 0.0),
            row => out.extend_from_slice(&src[row * d..(row + 1) * d]),
        }
    }
    out
}

/// `out[order[i]] = src[i]`, row by row, into `rows` rows (the inverse of
/// [`gather_rows`]); rows whose entry is [`DROPPED`] are left out.
fn scatter_rows(src: &[f32], d: usize, order: &[usize], rows: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * d];
    scatter_rows_into(src, d, order, &mut out);
    out
}

/// `out[order[i]] = src[i]`, row by row, into an existing buffer.
fn scatter_rows_into(src: &[f32], d: usize, order: &[usize], out: &mut [f32]) {
    for (i, &row) in order.iter().enumerate().filter(|(_, &row)| row != DROPPED) {
        out[row * d..(row + 1) * d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
}

/// The rows the experts run on: `out[to_plan[i]] = src[slot[i]]` for each
/// row received, `src` holding the rows that travelled. [`DROPPED`] rows
/// are left out.
fn expand_rows(src: &[f32], d: usize, slot: &[usize], to_plan: &[usize], rows: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * d];
    for (&s, &row) in slot.iter().zip(to_plan).filter(|(_, &row)| row != DROPPED) {
        out[row * d..(row + 1) * d].copy_from_slice(&src[s * d..(s + 1) * d]);
    }
    out
}

/// The backward of [`expand_rows`]: `out[slot[i]] += src[from_plan[i]]`,
/// into `slots` rows ([`DROPPED`] rows add nothing).
fn sum_rows(src: &[f32], d: usize, from_plan: &[usize], slot: &[usize], slots: usize) -> Vec<f32> {
    let mut out = vec![0.0; slots * d];
    for (&row, &s) in from_plan.iter().zip(slot).filter(|(&row, _)| row != DROPPED) {
        for (o, &v) in out[s * d..(s + 1) * d].iter_mut().zip(&src[row * d..(row + 1) * d]) {
            *o += v;
        }
    }
    out
}

/// The largest per-expert cap `c` with `sum(min(rows_e, c)) <= budget`:
/// the most loaded experts give up rows first, the others none.
fn cap_per_expert(rows_e: &[usize], budget: usize) -> usize {
    let kept = |cap: usize| rows_e.iter().map(|&n| n.min(cap)).sum::<usize>();
    let (mut lo, mut hi) = (0, rows_e.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if kept(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Rows `[lo, hi)` of piece `c` of `n` rows cut in `pieces` near-equal pieces.
fn piece(n: usize, c: usize, pieces: usize) -> std::ops::Range<usize> {
    n * c / pieces..n * (c + 1) / pieces
}

/// Runs a collective on this thread while the rank waits for it (counted
/// in `exposure` when there is one), with its times: all of it waited.
fn blocking<T>(
    exposure: Option<&Exposure>,
    exchange: impl FnOnce() -> Result<T, collectives::CommError>,
) -> Result<(T, OpTimes), ModelError> {
    let started = Instant::now();
    let got = match exposure {
        Some(exposure) => exposure.waiting(exchange),
        None => exchange(),
    }
    .map_err(comm_error)?;
    let took = started.elapsed();
    Ok((got, OpTimes { started, busy: took, waited: took }))
}

/// Keeps the communicator's error as the source, so an abort stays recognisable by type.
fn comm_error(e: collectives::CommError) -> ModelError {
    ModelError::comm(e)
}

impl<'a> AllToAllExperts<'a> {
    /// `comm` is the expert-parallel group (its ranks are the plan's
    /// owners); `local` runs the experts this rank holds. Without a `pipe`
    /// every exchange runs on `comm` while this rank waits.
    pub fn new(
        cfg: &ModelConfig,
        comm: &'a mut dyn Communicator,
        placement: &'a PlacementPlan,
        local: LocalExperts<'a>,
    ) -> Self {
        Self {
            nodes: Vec::new(),
            comm,
            pipe: None,
            exposure: None,
            placement,
            local,
            d: cfg.d_model,
            // The products' precision is the job's (set once per process):
            // in bf16 mode the experts round their inputs to bf16 anyway.
            bf16_rows: model::gemm::precision() == model::gemm::Precision::Bf16 && cfg.d_model.is_multiple_of(2),
            top_k: cfg.top_k,
            chunk_count: 1,
            budget: None,
            saved: vec![None; cfg.n_layers],
            flights: (0..cfg.n_layers).map(|_| None).collect(),
            received: MessageBuffer::new(),
            spare: Vec::new(),
            attn_placement: None,
            attn_routes: vec![None; cfg.n_layers],
            stats: DispatchStats::default(),
        }
    }

    /// MoA's attention experts partitioned over the group as `plan` says
    /// (None keeps them replicated: every rank computes its own rows).
    pub fn with_attention_experts(mut self, plan: Option<&'a PlacementPlan>) -> Self {
        self.attn_placement = plan;
        self
    }

    /// Sends rows on `pipe` (a group of the same ranks as `comm`, on its
    /// own thread) in `chunks` pieces: the experts compute piece i while
    /// piece i+1 travels, and piece i's outputs travel back meanwhile.
    pub fn pipelined(mut self, pipe: &'a CommThread, chunks: usize) -> Self {
        let chunks = chunks.max(1);
        self.pipe = Some(pipe);
        self.local = self.local.with_slots(chunks);
        self.chunk_count = chunks;
        self
    }

    /// Bounds the rows this rank's experts take per exchange (a skewed
    /// dropless router could otherwise send one rank every row).
    pub fn with_row_budget(mut self, budget: Option<RowBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Counts this executor's waits in `exposure` (see `overlap::exposure`).
    pub fn exposed_to(mut self, exposure: &'a Exposure) -> Self {
        self.exposure = Some(exposure);
        self
    }

    /// Starts an all-to-all-v of rows: `counts[r]` rows to rank r and
    /// `recv_counts[r]` rows from it (both known from the plan, so no
    /// counts travel first).
    fn send(&mut self, rows: Vec<f32>, counts: &[usize], recv_counts: &[usize]) -> Result<Transfer, ModelError> {
        let (rows, value_counts, value_recv_counts) = self.encode(rows, (counts, recv_counts), self.d, self.bf16_rows);
        if let Some(pipe) = self.pipe {
            let into = self.spare.pop().unwrap_or_default();
            return Ok(Transfer::InFlight(pipe.all_to_all_v_known(rows, value_counts, value_recv_counts, into)));
        }
        let (comm, received) = (&mut *self.comm, &mut self.received);
        let ((), times) = blocking(self.exposure, || {
            comm.all_to_all_v_known_into(&rows, &value_counts, &value_recv_counts, received)
        })?;
        Ok(Transfer::Done(value_recv_counts, times))
    }

    /// Rows of `width` values as they travel (bf16 pairs when `packed`),
    /// with the counts to and from each rank in values; counts the bytes sent.
    fn encode(
        &mut self,
        rows: Vec<f32>,
        (counts, recv_counts): (&[usize], &[usize]),
        width: usize,
        packed: bool,
    ) -> (Vec<f32>, Vec<usize>, Vec<usize>) {
        let (rows, words) = if packed { (bf16_payload::pack(&rows), width / 2) } else { (rows, width) };
        let values = |rows: &[usize]| -> Vec<usize> { rows.iter().map(|c| c * words).collect() };
        let (value_counts, value_recv_counts) = (values(counts), values(recv_counts));
        self.stats.bytes_sent += self.bytes_from_others(&value_counts);
        (rows, value_counts, value_recv_counts)
    }

    /// Bytes of `value_counts` (per rank) that cross to or from other ranks.
    fn bytes_from_others(&self, value_counts: &[usize]) -> u64 {
        let me = self.comm.rank();
        value_counts.iter().enumerate().filter(|(r, _)| *r != me).map(|(_, c)| *c as u64 * 4).sum()
    }

    /// Waits for an exchange on the pipe, counted as exposed when it is.
    fn wait_ticket(&self, ticket: Ticket) -> Result<(collectives::Received, OpTimes), ModelError> {
        let wait = || ticket.wait().map_err(comm_error);
        match self.exposure {
            Some(exposure) => exposure.waiting(wait),
            None => wait(),
        }
    }

    /// Waits for an exchange, counting its bytes and times; its rows are
    /// then in `self.received`.
    fn receive(&mut self, transfer: Transfer) -> Result<(), ModelError> {
        let (counts, times) = match transfer {
            Transfer::Done(counts, times) => (counts, times),
            Transfer::InFlight(ticket) => {
                let (got, times) = self.wait_ticket(ticket)?;
                let done_with = std::mem::replace(&mut self.received, got.values);
                self.spare.push(done_with);
                (got.counts, times)
            }
        };
        self.stats.bytes_received += self.bytes_from_others(&counts);
        self.stats.record(times);
        if self.bf16_rows {
            let mut wide = self.spare.pop().unwrap_or_default();
            bf16_payload::unpack(&self.received, &mut wide);
            let packed = std::mem::replace(&mut self.received, wide);
            self.spare.push(packed);
        }
        Ok(())
    }

    /// One blocking exchange of rows of `width` values (as bf16 pairs in
    /// bf16 mode when `rows_of_values`; counts travel exact), counted in
    /// the stats like the experts' rows. It leaves `self.received` alone:
    /// an expert exchange may be in flight while attention runs.
    fn exchange_rows(
        &mut self,
        rows: Vec<f32>,
        counts: (&[usize], &[usize]),
        width: usize,
        rows_of_values: bool,
    ) -> Result<Vec<f32>, ModelError> {
        let packed = rows_of_values && self.bf16_rows && width.is_multiple_of(2);
        let (rows, value_counts, value_recv_counts) = self.encode(rows, counts, width, packed);
        self.stats.bytes_received += self.bytes_from_others(&value_recv_counts);
        let (received, times) = match self.pipe {
            Some(pipe) => {
                let ticket = pipe.all_to_all_v_known(rows, value_counts, value_recv_counts, MessageBuffer::new());
                let (got, times) = self.wait_ticket(ticket)?;
                (got.values, times)
            }
            None => {
                let (comm, mut into) = (&mut *self.comm, MessageBuffer::new());
                let ((), times) = blocking(self.exposure, || {
                    comm.all_to_all_v_known_into(&rows, &value_counts, &value_recv_counts, &mut into)
                })?;
                (into, times)
            }
        };
        self.stats.record(times);
        if !packed {
            return Ok(received.into_vec());
        }
        let mut wide = MessageBuffer::new();
        bf16_payload::unpack(&received, &mut wide);
        Ok(wide.into_vec())
    }

    /// The route `attn_plan` made for `layer`'s attention experts.
    fn attn_route(&mut self, layer: usize) -> Result<AttnRoute, ModelError> {
        self.attn_routes
            .get_mut(layer)
            .and_then(Option::take)
            .ok_or_else(|| ModelError::executor(layer, "attention expert rows moved before attn_plan"))
    }

    /// Whether a token's rows to one rank travel once (top-k > 1; see the
    /// module comment): both sides of an exchange must agree.
    fn deduplicates(&self) -> bool {
        self.top_k > 1
    }

    /// Counts node crossings: `nodes[position]` is the node of each rank
    /// of the expert-parallel group (empty, or all equal: nothing to count).
    pub fn on_nodes(mut self, nodes: Vec<usize>) -> Self {
        self.nodes = if nodes.iter().any(|&n| n != nodes[0]) { nodes } else { Vec::new() };
        self
    }

    /// Adds this layer's forward rows that cross nodes, and the distinct
    /// (token, node) pairs among them, to the stats.
    fn count_node_crossings(&mut self, layer: usize, plan: &DispatchPlan) {
        if self.nodes.is_empty() {
            return;
        }
        let me = self.comm.rank();
        let (k, here) = (plan.top_k, self.nodes[me]);
        // Per token, a bit per node it already sends to (past 64 nodes each
        // row counts as a new pair: an over-count, never an under-count).
        let mut sent = vec![0u64; plan.token_bound()];
        for e in 0..plan.num_experts {
            let node = self.nodes[self.placement.owner_for(layer, e, me)];
            if node == here {
                continue;
            }
            for &src in &plan.source_a[plan.offsets_e[e]..plan.offsets_e[e + 1]] {
                self.stats.internode_rows += 1;
                let seen = &mut sent[src as usize / k];
                let bit = if node < 64 { 1u64 << node } else { 0 };
                if bit == 0 || *seen & bit == 0 {
                    *seen |= bit;
                    self.stats.internode_token_nodes += 1;
                }
            }
        }
    }

    /// This rank's side of [`Self::plan_exchange`]: what each chunk sends
    /// to each owner, and the message telling each owner how many rows of
    /// each of its experts come in each chunk, then (top-k > 1) the
    /// travelling row of each row.
    fn plan_sends(&self, layer: usize, plan: &DispatchPlan) -> (Vec<SendSide>, Vec<Vec<u64>>) {
        let (ranks, me) = (self.comm.size(), self.comm.rank());
        let owner = |e: usize| self.placement.owner_for(layer, e, me);
        // Per owner, its experts in id order.
        let mut owned: Vec<Vec<usize>> = vec![Vec::new(); ranks];
        (0..plan.num_experts).for_each(|e| owned[owner(e)].push(e));
        let (k, pieces, dedup, tokens) = (plan.top_k, self.chunk_count, self.deduplicates(), plan.token_bound());
        let token = |row: usize| plan.source_a[row] as usize / k;
        // The plan rows of expert e whose token lies in chunk c's range
        // (an expert's rows are in token order).
        let rows_of = |e: usize, c: usize| {
            let (first, last) = (plan.offsets_e[e], plan.offsets_e[e + 1]);
            let starting =
                |bound: usize| first + plan.source_a[first..last].partition_point(|&src| (src as usize / k) < bound);
            starting(piece(tokens, c, pieces).start)..starting(piece(tokens, c, pieces).end)
        };
        let mut counts_to: Vec<Vec<u64>> = vec![Vec::new(); ranks];
        let mut slots_to: Vec<Vec<u64>> = vec![Vec::new(); ranks];
        let mut numbering = TokenNumbering::new(tokens);
        let sides = (0..pieces)
            .map(|c| {
                let mut side = SendSide { counts: vec![0; ranks], travel_counts: vec![0; ranks], ..Default::default() };
                for r in 0..ranks {
                    let first = side.rows.len();
                    for &e in &owned[r] {
                        let rows = rows_of(e, c);
                        counts_to[r].push(rows.len() as u64);
                        side.rows.extend(rows);
                    }
                    let rows = &side.rows[first..];
                    let before = side.travel.len();
                    if dedup {
                        let mut slots = Vec::with_capacity(rows.len());
                        numbering.number(rows, token, &mut slots, &mut side.travel);
                        slots_to[r].extend(slots.iter().map(|&x| x as u64));
                    } else {
                        side.travel.extend_from_slice(rows);
                    }
                    side.counts[r] = rows.len();
                    side.travel_counts[r] = side.travel.len() - before;
                }
                side
            })
            .collect();
        let meta_to = counts_to.into_iter().zip(slots_to).map(|(counts, slots)| [counts, slots].concat()).collect();
        (sides, meta_to)
    }

    /// Works out who sends what to whom for one layer's dispatch plan. An
    /// expert with replicas gets each source's rows at the replica the plan
    /// picks for that source, so every rank can tell which of its experts
    /// each source sends to it.
    ///
    /// Chunk c carries the rows of the c-th range of this rank's tokens
    /// (all of a token's rows in one chunk, so it travels once per rank);
    /// to each owner, chunk by chunk, expert by expert, in token order.
    fn plan_exchange(&mut self, layer: usize, plan: &DispatchPlan) -> Result<Exchange, ModelError> {
        let ranks = self.comm.size();
        let me = self.comm.rank();
        let (pieces, dedup) = (self.chunk_count, self.deduplicates());
        let (send_sides, meta_to) = self.plan_sends(layer, plan);
        let meta_counts: Vec<usize> = meta_to.iter().map(Vec::len).collect();
        let meta = meta_to.concat();
        // The counts travel first, on this thread: a synchronising exchange
        // (it waits for the slowest peer), so it counts as all-to-all time.
        let comm = &mut *self.comm;
        let ((recv_meta, recv_meta_counts), times) =
            blocking(self.exposure, || comm.all_to_all_v_u64(&meta, &meta_counts))?;
        self.stats.record(times);
        let owner = |e: usize, source: usize| self.placement.owner_for(layer, e, source);
        // Per source, the experts it sends here (ascending id, as it sent them).
        let from: Vec<Vec<usize>> =
            (0..ranks).map(|s| (0..plan.num_experts).filter(|&e| owner(e, s) == me).collect()).collect();
        // Per source, the expert of each row it sends here, in its send
        // order; where each chunk's rows start; the travelling row (within
        // its chunk) of each row.
        let mut expert_rows: Vec<Vec<usize>> = vec![Vec::new(); ranks];
        let mut chunk_starts: Vec<Vec<usize>> = vec![Vec::new(); ranks];
        let mut slots_from: Vec<&[u64]> = vec![&[]; ranks];
        let mut cursor = 0;
        for (s, experts) in from.iter().enumerate() {
            let message = &recv_meta[cursor..cursor + recv_meta_counts[s]];
            cursor += recv_meta_counts[s];
            let counted = (pieces * experts.len()).min(message.len());
            for (i, &count) in message[..counted].iter().enumerate() {
                if i % experts.len() == 0 {
                    chunk_starts[s].push(expert_rows[s].len());
                }
                expert_rows[s].extend(std::iter::repeat_n(experts[i % experts.len()], count as usize));
            }
            chunk_starts[s].resize(pieces, expert_rows[s].len());
            chunk_starts[s].push(expert_rows[s].len());
            slots_from[s] = &message[counted..];
            let expected = if dedup { expert_rows[s].len() } else { 0 };
            if counted != pieces * experts.len() || slots_from[s].len() != expected {
                return Err(ModelError::executor(
                    layer,
                    format!(
                        "rank {s} sent {} values announcing its rows for this rank's {} experts in {pieces} \
                         chunks; expected {} counts and a slot per row (do all ranks run the same build and config?)",
                        message.len(),
                        experts.len(),
                        pieces * experts.len()
                    ),
                ));
            }
        }
        self.apply_row_budget(layer, plan.num_experts, &mut expert_rows)?;
        let chunks = send_sides
            .into_iter()
            .enumerate()
            .map(|(c, side)| {
                // Received rows are source-major; the local experts want expert-major.
                let mut recv_counts = vec![0usize; ranks];
                let mut recv_travel_counts = vec![0usize; ranks];
                let mut recv_slot = Vec::new();
                let mut counts_e = vec![0usize; plan.num_experts];
                let mut arriving = Vec::new();
                for (s, experts) in expert_rows.iter().enumerate() {
                    let rows = chunk_starts[s][c]..chunk_starts[s][c + 1];
                    recv_counts[s] = rows.len();
                    // Travelling rows from earlier sources come first.
                    let base: usize = recv_travel_counts.iter().sum();
                    if dedup {
                        let slots = &slots_from[s][rows.clone()];
                        recv_travel_counts[s] = slots.iter().map(|&x| x as usize + 1).max().unwrap_or(0);
                        recv_slot.extend(slots.iter().map(|&x| base + x as usize));
                    } else {
                        recv_travel_counts[s] = rows.len();
                        recv_slot.extend(base..base + rows.len());
                    }
                    for &e in &experts[rows] {
                        if e != DROPPED {
                            counts_e[e] += 1;
                        }
                        arriving.push(e);
                    }
                }
                let chunk_plan = DispatchPlan::grouped(counts_e, self.top_k);
                let mut next_free: Vec<usize> = chunk_plan.offsets_e[..plan.num_experts].to_vec();
                let recv_to_plan = arriving
                    .into_iter()
                    .map(|e| {
                        if e == DROPPED {
                            return DROPPED;
                        }
                        next_free[e] += 1;
                        next_free[e] - 1
                    })
                    .collect();
                Chunk {
                    send_rows: side.rows,
                    send_counts: side.counts,
                    send_travel: side.travel,
                    send_travel_counts: side.travel_counts,
                    recv_counts,
                    recv_slot,
                    recv_travel_counts,
                    recv_to_plan,
                    plan: chunk_plan,
                }
            })
            .collect::<Vec<_>>();
        self.count_sent_rows(&chunks);
        Ok(Exchange { rows: plan.num_rows(), chunks })
    }

    /// Adds the forward rows that did not travel, and those that crossed
    /// nodes, to the stats.
    fn count_sent_rows(&mut self, chunks: &[Chunk]) {
        let me = self.comm.rank();
        for chunk in chunks {
            self.stats.rows_deduplicated += (chunk.send_rows.len() - chunk.send_travel.len()) as u64;
            if !self.nodes.is_empty() {
                let remote =
                    chunk.send_travel_counts.iter().enumerate().filter(|&(r, _)| self.nodes[r] != self.nodes[me]);
                self.stats.internode_rows_sent += remote.map(|(_, &n)| n as u64).sum::<u64>();
            }
        }
    }

    /// Holds this rank's experts to the row budget, before any row is
    /// received: `expert_rows[s]` is the expert of each row source `s`
    /// sends. Over the budget, fails naming the layer, rank and busiest
    /// expert, or (`cap`) marks the rows past each expert's cap [`DROPPED`],
    /// in source order so every layout of chunks drops the same rows.
    fn apply_row_budget(
        &mut self,
        layer: usize,
        num_experts: usize,
        expert_rows: &mut [Vec<usize>],
    ) -> Result<(), ModelError> {
        let Some(RowBudget { rows: budget, overflow }) = self.budget else { return Ok(()) };
        // Most steps are within budget: count rows by their runs, not one by one.
        let total: usize = expert_rows.iter().map(Vec::len).sum();
        if total <= budget {
            return Ok(());
        }
        let mut rows_e = vec![0usize; num_experts];
        expert_rows.iter().flatten().for_each(|&e| rows_e[e] += 1);
        let (busiest, most) =
            rows_e.iter().copied().enumerate().max_by_key(|&(e, n)| (n, std::cmp::Reverse(e))).unwrap_or_default();
        let rank = self.comm.rank();
        match overflow {
            ExpertOverflow::Fail => Err(ModelError::executor(
                layer,
                format!(
                    "the router sends rank {rank}'s experts {total} rows of one micro-batch (expert {busiest}: \
                     {most}), more than its budget of {budget} (parallel.max_expert_rows, or when that is 0 what \
                     the memory check found room for on its machine). Set parallel.expert_overflow = \"cap\" to \
                     drop the excess rows and go on, or model.capacity_factor to bound every expert, or give the \
                     ranks more memory"
                ),
            )),
            ExpertOverflow::Cap => {
                let cap = cap_per_expert(&rows_e, budget);
                let mut kept = vec![0usize; num_experts];
                for e in expert_rows.iter_mut().flatten() {
                    if kept[*e] < cap {
                        kept[*e] += 1;
                    } else {
                        *e = DROPPED;
                        self.stats.rows_over_budget += 1;
                    }
                }
                Ok(())
            }
        }
    }

    /// Sends every chunk of `rows_ad` (rows in dispatch-plan order).
    fn start(&mut self, layer: usize, pass: Pass, exchange: Exchange, rows_ad: &[f32]) -> Result<(), ModelError> {
        let _span = tracing::info_span!("dispatch", layer, pass = ?pass).entered();
        let mut outbound = VecDeque::with_capacity(exchange.chunks.len());
        for chunk in &exchange.chunks {
            // Inputs travel once per token and rank; output gradients row by row.
            outbound.push_back(match pass {
                Pass::Forward => self.send(
                    gather_rows(rows_ad, self.d, &chunk.send_travel),
                    &chunk.send_travel_counts,
                    &chunk.recv_travel_counts,
                )?,
                Pass::Backward => {
                    self.send(gather_rows(rows_ad, self.d, &chunk.send_rows), &chunk.send_counts, &chunk.recv_counts)?
                }
            });
        }
        self.flights[layer] = Some(Flight { pass, exchange, outbound });
        Ok(())
    }

    /// Runs the experts on each chunk as it arrives, sends its results
    /// back, and assembles them in dispatch-plan order.
    fn finish(&mut self, layer: usize, pass: Pass) -> Result<(Exchange, Vec<f32>), ModelError> {
        let d = self.d;
        let Flight { pass: started_as, exchange, mut outbound } = self.flights[layer]
            .take()
            .ok_or_else(|| ModelError::executor(layer, "no expert pass in flight to finish"))?;
        if started_as != pass {
            return Err(ModelError::executor(layer, format!("finishing a {pass:?} pass started as {started_as:?}")));
        }
        let mut inbound = VecDeque::with_capacity(exchange.chunks.len());
        for (c, chunk) in exchange.chunks.iter().enumerate() {
            let transfer = outbound.pop_front().expect("one transfer per chunk");
            let arriving = tracing::info_span!("dispatch", layer, pass = ?pass, chunk = c).entered();
            self.receive(transfer)?;
            drop(arriving);
            let computing = tracing::info_span!("expert compute", layer, pass = ?pass, chunk = c).entered();
            let x_local = match pass {
                Pass::Forward => {
                    expand_rows(&self.received, d, &chunk.recv_slot, &chunk.recv_to_plan, chunk.plan.num_rows())
                }
                Pass::Backward => scatter_rows(&self.received, d, &chunk.recv_to_plan, chunk.plan.num_rows()),
            };
            let started = Instant::now();
            let y_local = match pass {
                Pass::Forward => self.local.forward_in(c, layer, &chunk.plan, x_local)?,
                Pass::Backward => self.local.backward_in(c, layer, &chunk.plan, &x_local)?,
            };
            self.stats.expert_s += started.elapsed().as_secs_f64();
            if pass == Pass::Forward {
                self.stats.rows_computed += chunk.plan.num_rows() as u64;
            }
            drop(computing);
            let _returning = tracing::info_span!("combine", layer, pass = ?pass, chunk = c).entered();
            // Outputs go back row by row; input gradients summed per travelling row.
            inbound.push_back(match pass {
                Pass::Forward => {
                    self.send(gather_rows(&y_local, d, &chunk.recv_to_plan), &chunk.recv_counts, &chunk.send_counts)?
                }
                Pass::Backward => self.send(
                    sum_rows(&y_local, d, &chunk.recv_to_plan, &chunk.recv_slot, chunk.recv_slot_count()),
                    &chunk.recv_travel_counts,
                    &chunk.send_travel_counts,
                )?,
            });
        }
        let _span = tracing::info_span!("combine", layer, pass = ?pass).entered();
        let mut out_ad = vec![0.0; exchange.rows * d];
        for chunk in &exchange.chunks {
            let transfer = inbound.pop_front().expect("one transfer per chunk");
            self.receive(transfer)?;
            // A token's summed input gradient lands in its first row, zeros in
            // the others: the layer sums a token's rows.
            let rows = match pass {
                Pass::Forward => &chunk.send_rows,
                Pass::Backward => &chunk.send_travel,
            };
            scatter_rows_into(&self.received, d, rows, &mut out_ad);
        }
        Ok((exchange, out_ad))
    }
}

impl ExpertExecutor for AllToAllExperts<'_> {
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        let started = self.start_forward(layer, plan, x_ad)?;
        self.finish_forward(layer, started)
    }

    fn backward(&mut self, layer: usize, plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        let started = self.start_backward(layer, plan, dy_ad)?;
        self.finish_backward(layer, started)
    }

    fn start_forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: Vec<f32>) -> Result<Started, ModelError> {
        self.count_node_crossings(layer, plan);
        let exchange = self.plan_exchange(layer, plan)?;
        self.start(layer, Pass::Forward, exchange, &x_ad)?;
        Ok(Started::InFlight)
    }

    fn finish_forward(&mut self, layer: usize, _started: Started) -> Result<Vec<f32>, ModelError> {
        let (exchange, y_ad) = self.finish(layer, Pass::Forward)?;
        self.saved[layer] = Some(exchange);
        Ok(y_ad)
    }

    fn start_backward(&mut self, layer: usize, _plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Started, ModelError> {
        // Combine's backward is a dispatch along the forward's exchange.
        let exchange =
            self.saved[layer].take().ok_or_else(|| ModelError::executor(layer, "backward without a forward"))?;
        self.start(layer, Pass::Backward, exchange, dy_ad)?;
        Ok(Started::InFlight)
    }

    fn finish_backward(&mut self, layer: usize, _started: Started) -> Result<Vec<f32>, ModelError> {
        Ok(self.finish(layer, Pass::Backward)?.1)
    }

    fn attn_plan(&mut self, layer: usize, plan: &DispatchPlan) -> Result<DispatchPlan, ModelError> {
        let Some(placement) = self.attn_placement else {
            return Ok(DispatchPlan::grouped(plan.counts_e.clone(), plan.top_k));
        };
        let (me, ranks) = (self.comm.rank(), self.comm.size());
        let owners: Vec<usize> = (0..plan.num_experts).map(|e| placement.owner(layer, e)).collect();
        let (counts, per_rank) = counts_for_owners(plan, &owners, ranks);
        let mine = owners.iter().filter(|&&o| o == me).count();
        let received = self.exchange_rows(counts, (&per_rank, &vec![mine; ranks]), 1, false)?;
        let route = AttnRoute::new(plan, &owners, (me, ranks), &received);
        let owned = route.owned.clone();
        self.attn_routes[layer] = Some(route);
        Ok(owned)
    }

    fn attn_to_owners(&mut self, layer: usize, rows: Vec<f32>, width: usize) -> Result<Vec<f32>, ModelError> {
        if self.attn_placement.is_none() {
            return Ok(rows);
        }
        let route = self.attn_route(layer)?;
        let send = gather_rows(&rows, width, &route.send_order);
        let received = self.exchange_rows(send, (&route.send_counts, &route.recv_counts), width, true);
        let local = received.map(|received| gather_rows(&received, width, &route.local_order));
        self.attn_routes[layer] = Some(route);
        local
    }

    fn attn_to_sources(&mut self, layer: usize, rows: Vec<f32>, width: usize) -> Result<Vec<f32>, ModelError> {
        if self.attn_placement.is_none() {
            return Ok(rows);
        }
        let route = self.attn_route(layer)?;
        let back = scatter_rows(&rows, width, &route.local_order, route.local_order.len());
        let received = self.exchange_rows(back, (&route.recv_counts, &route.send_counts), width, true);
        let out = received.map(|received| scatter_rows(&received, width, &route.send_order, route.send_order.len()));
        self.attn_routes[layer] = Some(route);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_takes_rows_from_the_busiest_experts_first() {
        assert_eq!(cap_per_expert(&[100, 10, 5], 40), 25);
        assert_eq!(cap_per_expert(&[100, 10, 5], 115), 100, "within budget: no cap");
        assert_eq!(cap_per_expert(&[30, 30], 41), 20);
        assert_eq!(cap_per_expert(&[7], 0), 0);
        for (rows, budget) in [(vec![100, 10, 5], 40), (vec![3, 9, 9, 1], 12), (vec![50, 50], 99)] {
            let cap = cap_per_expert(&rows, budget);
            let kept = |c: usize| rows.iter().map(|&n| n.min(c)).sum::<usize>();
            assert!(kept(cap) <= budget && kept(cap + 1) > budget, "{rows:?} {budget}: cap {cap}");
        }
    }

    #[test]
    fn dropped_rows_gather_as_zeros_and_scatter_nowhere() {
        let src = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(gather_rows(&src, 2, &[1, DROPPED, 0]), [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
        assert_eq!(scatter_rows(&[9.0, 9.0, 5.0, 6.0], 2, &[DROPPED, 0], 1), [5.0, 6.0]);
    }

    #[test]
    fn a_token_travels_once_to_each_rank() {
        let mut numbering = TokenNumbering::new(4);
        let token = |row: usize| [3, 1, 3, 0, 1][row];
        let (mut slots, mut firsts) = (Vec::new(), Vec::new());
        numbering.number(&[0, 1, 2, 3, 4], token, &mut slots, &mut firsts);
        assert_eq!((slots.as_slice(), firsts.as_slice()), ([0, 1, 0, 2, 1].as_slice(), [0, 1, 3].as_slice()));
        // A new block numbers afresh.
        let (mut slots, mut firsts) = (Vec::new(), Vec::new());
        numbering.number(&[2, 4], token, &mut slots, &mut firsts);
        assert_eq!((slots, firsts), (vec![0, 1], vec![2, 4]));
    }

    #[test]
    fn summing_rows_is_the_backward_of_expanding_them() {
        // Two travelling rows fan out to three rows (one dropped); the
        // gradients of the rows sharing a slot add up.
        let travelled = [1.0, 2.0, 3.0, 4.0];
        let (slot, to_plan) = ([0, 1, 0, 1], [2, 0, 1, DROPPED]);
        assert_eq!(expand_rows(&travelled, 2, &slot, &to_plan, 3), [3.0, 4.0, 1.0, 2.0, 1.0, 2.0]);
        let grads = [1.0, 1.0, 10.0, 10.0, 100.0, 100.0];
        assert_eq!(sum_rows(&grads, 2, &to_plan, &slot, 2), [110.0, 110.0, 1.0, 1.0]);
    }

    /// Runs one layer of `plans` (one per rank) through the experts of
    /// two thread ranks (experts 0-1 on rank 0, 2-3 on rank 1): each
    /// rank's outputs, input gradients per token, and stats.
    fn two_rank_layer(plans: [DispatchPlan; 2], x: [Vec<f32>; 2]) -> Vec<(Vec<f32>, Vec<f32>, DispatchStats)> {
        let cfg = ModelConfig { d_model: 8, ffn_hidden: 12, n_experts: 4, top_k: 2, n_layers: 1, ..Default::default() };
        let placement = PlacementPlan::contiguous(1, 4, 2);
        let comms = collectives::local::LocalWorld::new(2, std::time::Duration::from_secs(10));
        let runs: Vec<_> = comms
            .into_iter()
            .zip(plans.into_iter().zip(x))
            .map(|(mut comm, (plan, x_td))| {
                let (cfg, placement) = (cfg.clone(), placement.clone());
                std::thread::spawn(move || {
                    let mine = vec![(2 * comm.rank()..2 * comm.rank() + 2).collect::<Vec<_>>()];
                    let weights = model::ExpertStore::init(&cfg, 7, &mine);
                    let mut grads = model::ExpertStore::init(&cfg, 7, &mine);
                    let local = LocalExperts::new(&cfg, &weights, &mut grads);
                    let mut exec = AllToAllExperts::new(&cfg, &mut comm, &placement, local);
                    let y = exec.forward(0, &plan, plan.gather(&x_td, cfg.d_model)).unwrap();
                    let dx_ad = exec.backward(0, &plan, &y).unwrap();
                    let mut dx_td = vec![0.0; x_td.len()];
                    plan.gather_backward(&dx_ad, cfg.d_model, &mut dx_td);
                    (y, dx_td, exec.stats.clone())
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    }

    /// The plan of `choices[t] = [expert, expert]`, every assignment kept.
    fn plan_of(choices: &[[usize; 2]]) -> DispatchPlan {
        let mut counts_e = vec![0; 4];
        choices.iter().flatten().for_each(|&e| counts_e[e] += 1);
        let mut plan = DispatchPlan::grouped(counts_e, 2);
        let mut next = plan.offsets_e.clone();
        for (t, pair) in choices.iter().enumerate() {
            for (slot, &e) in pair.iter().enumerate() {
                plan.source_a[next[e]] = (2 * t + slot) as u32;
                next[e] += 1;
            }
        }
        plan
    }

    #[test]
    fn rows_of_one_token_to_one_rank_travel_once_and_compute_the_same() {
        // Rank 0's token 0 chose experts 2 and 3 (both on rank 1), token 1
        // experts 0 and 2; rank 1's token chose 0 and 1 (both on rank 0).
        let plans = [plan_of(&[[2, 3], [0, 2]]), plan_of(&[[0, 1]])];
        let x: [Vec<f32>; 2] =
            [(0..16).map(|i| (i as f32 * 0.37).sin()).collect(), (0..8).map(|i| i as f32 * 0.1).collect()];
        let runs = two_rank_layer(plans.clone(), x.clone());
        // The same rows, each its own token (no two rows of a token share a rank).
        let spread = |p: &DispatchPlan, x: &[f32]| {
            let mut one = p.clone();
            one.top_k = 1;
            one.source_a = (0..p.num_rows() as u32).collect();
            (one, p.gather(x, 8))
        };
        let ((p0, x0), (p1, x1)) = (spread(&plans[0], &x[0]), spread(&plans[1], &x[1]));
        let apart = two_rank_layer([p0, p1], [x0, x1]);
        for rank in 0..2 {
            let (y, dx, stats) = &runs[rank];
            assert_eq!(y, &apart[rank].0, "rank {rank}: forward outputs are the same bits");
            let mut dx_apart = vec![0.0; x[rank].len()];
            plans[rank].gather_backward(&apart[rank].1, 8, &mut dx_apart);
            for (a, b) in dx.iter().zip(&dx_apart) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "rank {rank}: input gradient {a} vs {b}");
            }
            assert_eq!(stats.rows_deduplicated, 1, "rank {rank}: {stats:?}");
            assert_eq!(apart[rank].2.rows_deduplicated, 0);
        }
        // Rank 0 sends rank 1 its inputs (2 rows, not 3) and output
        // gradients (3), and returns rank 1's outputs (2) and input
        // gradients (1, summed); rank 1 the same the other way.
        let row = 8 * 4;
        assert_eq!(runs[0].2.bytes_sent, (2 + 3 + 2 + 1) * row);
        assert_eq!(apart[0].2.bytes_sent, (3 + 3 + 2 + 2) * row);
        assert_eq!(runs[1].2.bytes_sent, (1 + 2 + 3 + 2) * row);
        assert_eq!(apart[1].2.bytes_sent, (2 + 2 + 3 + 3) * row);
    }

    #[test]
    fn scatter_undoes_gather() {
        let src: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let order = [2, 0, 3, 1, 5, 4];
        let there = gather_rows(&src, 2, &order);
        assert_eq!(&there[..4], &[4.0, 5.0, 0.0, 1.0]);
        assert_eq!(scatter_rows(&there, 2, &order, order.len()), src);
    }
}
