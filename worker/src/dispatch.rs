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
//! The backward pass runs the same exchange in reverse: combine's backward
//! is a dispatch, dispatch's a combine.
//!
//! Legend: `a` dispatch rows, `d` d_model.

use collectives::Communicator;
use coordinator::PlacementPlan;
use model::moe::{DispatchPlan, ExpertExecutor, LocalExperts};
use model::{ModelConfig, ModelError};
use std::time::Instant;

/// Communication and compute spent in the expert stage, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchStats {
    /// Bytes of rows sent to / received from other ranks (forward and backward).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub alltoall_s: f64,
    pub expert_s: f64,
    /// Rows this rank's experts processed (forward).
    pub rows_computed: u64,
}

impl DispatchStats {
    /// Adds another executor's totals.
    pub fn add(&mut self, other: &DispatchStats) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.alltoall_s += other.alltoall_s;
        self.expert_s += other.expert_s;
        self.rows_computed += other.rows_computed;
    }
}

/// How one layer's rows were exchanged, kept for the backward pass.
#[derive(Debug, Clone)]
struct Exchange {
    /// The dispatch-plan row of each row sent, in send order (owner-major).
    send_order: Vec<usize>,
    /// Rows sent to each rank.
    send_counts: Vec<usize>,
    /// Rows received from each rank.
    recv_counts: Vec<usize>,
    /// For each received row (source-major), its row in the expert-major buffer.
    recv_to_local: Vec<usize>,
    /// The expert-major grouping of the received rows.
    local_plan: DispatchPlan,
}

/// Runs the experts where the placement plan puts them.
pub struct AllToAllExperts<'a> {
    comm: &'a mut dyn Communicator,
    placement: &'a PlacementPlan,
    local: LocalExperts<'a>,
    d: usize,
    top_k: usize,
    saved: Vec<Option<Exchange>>,
    /// Receive buffer of every exchange, its allocation reused across them.
    received: Vec<f32>,
    /// Totals since construction.
    pub stats: DispatchStats,
}

/// `out[i] = src[order[i]]`, row by row.
fn gather_rows(src: &[f32], d: usize, order: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(order.len() * d);
    for &row in order {
        out.extend_from_slice(&src[row * d..(row + 1) * d]);
    }
    out
}

/// `out[order[i]] = src[i]`, row by row (the inverse of [`gather_rows`]).
fn scatter_rows(src: &[f32], d: usize, order: &[usize]) -> Vec<f32> {
    let mut out = vec![0.0; order.len() * d];
    for (i, &row) in order.iter().enumerate() {
        out[row * d..(row + 1) * d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
    out
}

fn comm_error(e: collectives::CommError) -> ModelError {
    ModelError::Executor(e.to_string())
}

impl<'a> AllToAllExperts<'a> {
    /// `comm` is the expert-parallel group (its ranks are the plan's
    /// owners); `local` runs the experts this rank holds.
    pub fn new(
        cfg: &ModelConfig,
        comm: &'a mut dyn Communicator,
        placement: &'a PlacementPlan,
        local: LocalExperts<'a>,
    ) -> Self {
        Self {
            comm,
            placement,
            local,
            d: cfg.d_model,
            top_k: cfg.top_k,
            saved: vec![None; cfg.n_layers],
            stats: DispatchStats::default(),
            received: Vec::new(),
        }
    }

    /// All-to-all-v of rows into `self.received`; counts are in rows.
    fn exchange_rows(&mut self, rows: &[f32], counts: &[usize]) -> Result<(), ModelError> {
        let started = Instant::now();
        let me = self.comm.rank();
        let value_counts: Vec<usize> = counts.iter().map(|c| c * self.d).collect();
        let received_counts =
            self.comm.all_to_all_v_into(rows, &value_counts, &mut self.received).map_err(comm_error)?;
        let remote = |counts: &[usize]| -> u64 {
            counts.iter().enumerate().filter(|(r, _)| *r != me).map(|(_, c)| *c as u64 * 4).sum()
        };
        self.stats.bytes_sent += remote(&value_counts);
        self.stats.bytes_received += remote(&received_counts);
        self.stats.alltoall_s += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Works out who sends what to whom for one layer's dispatch plan. An
    /// expert with replicas gets each source's rows at the replica the plan
    /// picks for that source, so every rank can tell which of its experts
    /// each source sends to it.
    fn plan_exchange(&mut self, layer: usize, plan: &DispatchPlan) -> Result<Exchange, ModelError> {
        let ranks = self.comm.size();
        let me = self.comm.rank();
        let owner = |e: usize, source: usize| self.placement.owner_for(layer, e, source);
        // Experts in (owner, id) order: rows grouped by destination rank.
        let mut by_owner: Vec<usize> = (0..plan.num_experts).collect();
        by_owner.sort_by_key(|&e| (owner(e, me), e));
        let mut send_order = Vec::with_capacity(plan.num_rows());
        let mut send_counts = vec![0usize; ranks];
        let mut meta = Vec::with_capacity(plan.num_experts);
        let mut meta_counts = vec![0usize; ranks];
        for &e in &by_owner {
            send_order.extend(plan.offsets_e[e]..plan.offsets_e[e + 1]);
            send_counts[owner(e, me)] += plan.counts_e[e];
            meta.push(plan.counts_e[e] as u64);
            meta_counts[owner(e, me)] += 1;
        }
        // Every owner learns, per source, how many rows of each of its experts come.
        let (recv_meta, _) = self.comm.all_to_all_v_u64(&meta, &meta_counts).map_err(comm_error)?;
        // Per source, the experts it sends here (ascending id, as it sent them).
        let from: Vec<Vec<usize>> =
            (0..ranks).map(|s| (0..plan.num_experts).filter(|&e| owner(e, s) == me).collect()).collect();
        debug_assert_eq!(recv_meta.len(), from.iter().map(Vec::len).sum::<usize>());
        let mut counts_e = vec![0usize; plan.num_experts];
        let mut recv_counts = vec![0usize; ranks];
        let mut cursor = 0;
        for (s, experts) in from.iter().enumerate() {
            for &e in experts {
                counts_e[e] += recv_meta[cursor] as usize;
                recv_counts[s] += recv_meta[cursor] as usize;
                cursor += 1;
            }
        }
        // Received rows are source-major; the local experts want expert-major.
        let local_plan = DispatchPlan::grouped(counts_e, self.top_k);
        let mut next_free: Vec<usize> = local_plan.offsets_e[..plan.num_experts].to_vec();
        let mut recv_to_local = Vec::with_capacity(local_plan.num_rows());
        let mut cursor = 0;
        for experts in &from {
            for &e in experts {
                let count = recv_meta[cursor] as usize;
                recv_to_local.extend(next_free[e]..next_free[e] + count);
                next_free[e] += count;
                cursor += 1;
            }
        }
        Ok(Exchange { send_order, send_counts, recv_counts, recv_to_local, local_plan })
    }
}

impl ExpertExecutor for AllToAllExperts<'_> {
    fn forward(&mut self, layer: usize, plan: &DispatchPlan, x_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        let d = self.d;
        let ex = self.plan_exchange(layer, plan)?;
        let sent = gather_rows(x_ad, d, &ex.send_order);
        self.exchange_rows(&sent, &ex.send_counts)?;
        let x_local = scatter_rows(&self.received, d, &ex.recv_to_local);
        let started = Instant::now();
        let y_local = self.local.forward(layer, &ex.local_plan, &x_local)?;
        self.stats.expert_s += started.elapsed().as_secs_f64();
        self.stats.rows_computed += ex.local_plan.num_rows() as u64;
        let y_back = gather_rows(&y_local, d, &ex.recv_to_local);
        self.exchange_rows(&y_back, &ex.recv_counts)?;
        let y_ad = scatter_rows(&self.received, d, &ex.send_order);
        self.saved[layer] = Some(ex);
        Ok(y_ad)
    }

    fn backward(&mut self, layer: usize, _plan: &DispatchPlan, dy_ad: &[f32]) -> Result<Vec<f32>, ModelError> {
        let d = self.d;
        let ex = self.saved[layer]
            .take()
            .ok_or_else(|| ModelError::Executor(format!("layer {layer}: backward without a forward")))?;
        let sent = gather_rows(dy_ad, d, &ex.send_order);
        self.exchange_rows(&sent, &ex.send_counts)?;
        let dy_local = scatter_rows(&self.received, d, &ex.recv_to_local);
        let started = Instant::now();
        let dx_local = self.local.backward(layer, &ex.local_plan, &dy_local)?;
        self.stats.expert_s += started.elapsed().as_secs_f64();
        let dx_back = gather_rows(&dx_local, d, &ex.recv_to_local);
        self.exchange_rows(&dx_back, &ex.recv_counts)?;
        Ok(scatter_rows(&self.received, d, &ex.send_order))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_undoes_gather() {
        let src: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let order = [2, 0, 3, 1, 5, 4];
        let there = gather_rows(&src, 2, &order);
        assert_eq!(&there[..4], &[4.0, 5.0, 0.0, 1.0]);
        assert_eq!(scatter_rows(&there, 2, &order), src);
    }
}
