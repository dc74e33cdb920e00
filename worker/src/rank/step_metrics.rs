//! What a step measured on this rank, summed over the ranks into the
//! step's metrics, and sent to the coordinator.
//!
//! The numbers travel in two all-reduces: sums over ranks ([`StepSums`]
//! plus the per-layer expert counts) and one slot per rank
//! ([`RankValues`]). Each is a struct of named f64 fields that converts to
//! and from its flat array in one place, so a new metric is one field, not
//! an offset kept in step in two functions.

use crate::dispatch::DispatchStats;
use crate::error::WorkerError;
use crate::metrics::{RankMetrics, StepMetrics};
use crate::preemption;
use crate::state::TrainState;
use crate::sync::sum_over_ranks;
use collectives::Communicator;
use model::model::ForwardStats;
use std::time::Instant;
use wire::client::CoordinatorClient;
use wire::protocol::{overlap_efficiency, StepReport};

/// A struct of named `f64` fields that travels as one flat array.
macro_rules! packed_f64 {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$field_meta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub(crate) struct $name {
            $($(#[$field_meta])* pub $field: f64,)*
        }

        impl $name {
            /// Number of values in the flat form.
            pub const LEN: usize = [$(stringify!($field)),*].len();

            /// The fields in declaration order.
            pub fn to_values(self) -> [f64; Self::LEN] {
                [$(self.$field),*]
            }

            /// The inverse of [`Self::to_values`]; `values` holds exactly `LEN`.
            pub fn from_values(values: &[f64]) -> Self {
                let mut next = values.iter().copied();
                let packed = Self { $($field: next.next().expect("a full slot"),)* };
                debug_assert!(next.next().is_none(), "a slot of {} values", Self::LEN);
                packed
            }
        }
    };
}

packed_f64! {
    /// Sums over every rank.
    struct StepSums {
        ce_sum,
        aux,
        z,
        seq_aux,
        /// Assignments to computation-free experts (MoE++).
        free_assignments,
        /// 1 on a rank that got SIGTERM: the flag rides in the same
        /// all-reduce so pre-emption costs the step no extra collective.
        preempted,
    }
}

packed_f64! {
    /// One rank's slot: every rank fills its own, the sum gathers them.
    struct RankValues {
        tokens,
        expert_rows,
        compute_s,
        alltoall_s,
        expert_s,
        bytes_sent,
        bytes_received,
        comm_s,
        exposed_comm_s,
        alltoall_waited_s,
        rows_over_budget,
        /// A 32-bit hash of the expert bias this rank routed with (0 without one).
        expert_bias_hash,
        internode_rows,
        internode_token_nodes,
        internode_rows_sent,
        rows_deduplicated,
    }
}

/// What this rank measured during one step, before reduction over ranks.
#[derive(Default)]
pub(crate) struct LocalStep {
    pub ce_sum: f64,
    pub aux: f64,
    pub z: f64,
    pub seq_aux: f64,
    pub free_assignments: usize,
    pub tokens_per_expert: Vec<Vec<usize>>,
    pub dropped: Vec<usize>,
    /// Per layer: assignments per expert before drops, kept only when the
    /// aux-loss-free bias needs the global loads (else empty).
    pub chosen_per_expert: Vec<Vec<usize>>,
    /// Per layer: tokens per attention expert (MoA) or routed head (MoH).
    pub attn_load: Vec<Vec<usize>>,
    pub tokens: usize,
    pub compute_s: f64,
    pub dispatch: DispatchStats,
    /// Communication time (all-to-all, gradient buckets, gradient sync)
    /// and the part of it no computation hid.
    pub comm_s: f64,
    pub exposed_comm_s: f64,
    /// [`RankValues::expert_bias_hash`].
    pub expert_bias_hash: f64,
}

/// The step's sizes the reduction divides by.
pub(crate) struct StepShape {
    pub world: usize,
    pub rank: usize,
    pub tokens_per_step: u64,
    /// Micro-batches of the global batch (each counts once in aux and z).
    pub micro_batches: f64,
    pub n_experts: usize,
    /// Whether the step's global expert loads are summed (`expert_bias`).
    pub loads: bool,
    /// Router outputs per layer (FFN and computation-free experts).
    pub router_outputs: usize,
    /// Expert assignments per token over all layers (`top_k * n_layers`).
    pub assignments_per_token: usize,
    /// Attention experts (MoA) or routed heads (MoH) per layer; 0 for dense attention.
    pub attn_outputs: usize,
    /// Ranks per expert-parallel group (groups are consecutive world ranks).
    pub ep: usize,
}

impl LocalStep {
    /// Adds one micro-batch's forward statistics.
    pub fn add(&mut self, stats: &ForwardStats) {
        self.ce_sum += stats.ce_sum;
        self.aux += stats.aux_loss.iter().map(|&a| a as f64).sum::<f64>();
        self.z += stats.z_loss.iter().map(|&z| z as f64).sum::<f64>();
        self.seq_aux += stats.seq_aux_loss.iter().map(|&s| s as f64).sum::<f64>();
        self.free_assignments += stats.free_assignments.iter().sum::<usize>();
        self.tokens += stats.num_tokens;
        add_counts(&mut self.tokens_per_expert, &stats.tokens_per_expert);
        add_counts(&mut self.chosen_per_expert, &stats.chosen_per_expert);
        add_counts(&mut self.attn_load, &stats.attn_load);
        if self.dropped.is_empty() {
            self.dropped = stats.dropped.clone();
        } else {
            self.dropped.iter_mut().zip(&stats.dropped).for_each(|(a, b)| *a += b);
        }
    }

    fn rank_values(&self) -> RankValues {
        RankValues {
            tokens: self.tokens as f64,
            expert_rows: self.dispatch.rows_computed as f64,
            compute_s: self.compute_s,
            alltoall_s: self.dispatch.alltoall_s,
            expert_s: self.dispatch.expert_s,
            bytes_sent: self.dispatch.bytes_sent as f64,
            bytes_received: self.dispatch.bytes_received as f64,
            comm_s: self.comm_s,
            exposed_comm_s: self.exposed_comm_s,
            alltoall_waited_s: self.dispatch.alltoall_exposed_s,
            rows_over_budget: self.dispatch.rows_over_budget as f64,
            expert_bias_hash: self.expert_bias_hash,
            internode_rows: self.dispatch.internode_rows as f64,
            internode_token_nodes: self.dispatch.internode_token_nodes as f64,
            internode_rows_sent: self.dispatch.internode_rows_sent as f64,
            rows_deduplicated: self.dispatch.rows_deduplicated as f64,
        }
    }

    /// Sums over ranks into the step's metrics (identical on every rank),
    /// and whether any rank got SIGTERM. `epoch` is the step's common start
    /// (see [`RankMetrics::alltoall_peer_wait_s`]).
    pub fn reduce(
        &self,
        comm: &mut dyn Communicator,
        shape: &StepShape,
        epoch: Instant,
    ) -> Result<(StepMetrics, bool), WorkerError> {
        let sums = StepSums {
            ce_sum: self.ce_sum,
            aux: self.aux,
            z: self.z,
            seq_aux: self.seq_aux,
            free_assignments: self.free_assignments as f64,
            preempted: if preemption::requested() { 1.0 } else { 0.0 },
        };
        // [sums | tokens per expert, layer by layer | dropped per layer | loads, layer by layer
        //  | attention loads, layer by layer]
        let mut totals = sums.to_values().to_vec();
        totals.extend(self.tokens_per_expert.iter().flatten().map(|&c| c as f64));
        totals.extend(self.dropped.iter().map(|&c| c as f64));
        if shape.loads {
            totals.extend(self.chosen_per_expert.iter().flatten().map(|&c| c as f64));
        }
        let loads_len = if shape.loads { self.chosen_per_expert.iter().map(Vec::len).sum() } else { 0 };
        totals.extend(self.attn_load.iter().flatten().map(|&c| c as f64));
        sum_over_ranks(comm, &mut totals)?;
        let (sums, counts) = totals.split_at(StepSums::LEN);
        let sums = StepSums::from_values(sums);
        let layer_counts = self.tokens_per_expert.len() * shape.n_experts;
        let (expert_counts, rest) = counts.split_at(layer_counts);
        let (dropped, rest) = rest.split_at(self.dropped.len());
        let (loads, attn_loads) = rest.split_at(loads_len);
        let per_layer = |counts: &[f64], width: usize| -> Vec<Vec<usize>> {
            counts.chunks_exact(width.max(1)).map(|layer| layer.iter().map(|&c| c as usize).collect()).collect()
        };
        let tokens_per_expert = per_layer(expert_counts, shape.n_experts);
        let expert_load = per_layer(loads, shape.router_outputs);
        let attn_load = if shape.attn_outputs > 0 { per_layer(attn_loads, shape.attn_outputs) } else { Vec::new() };
        let dropped = dropped.iter().map(|&c| c as usize).collect();

        let mut slots = vec![0.0; shape.world * RankValues::LEN];
        slots[shape.rank * RankValues::LEN..][..RankValues::LEN].copy_from_slice(&self.rank_values().to_values());
        sum_over_ranks(comm, &mut slots)?;
        // With one rank per expert group nobody waits for a peer: no gather.
        let peer_waits = match shape.ep {
            1 => vec![0.0; shape.world],
            ep => peer_waits(&gather_arrivals(comm, &self.dispatch, epoch)?, ep),
        };
        let per_rank: Vec<RankMetrics> = slots
            .chunks_exact(RankValues::LEN)
            .map(RankValues::from_values)
            .enumerate()
            .map(|(rank, v)| RankMetrics {
                rank,
                tokens: v.tokens as u64,
                expert_rows: v.expert_rows as u64,
                compute_s: v.compute_s,
                alltoall_s: v.alltoall_s,
                expert_s: v.expert_s,
                alltoall_bytes_sent: v.bytes_sent as u64,
                alltoall_bytes_received: v.bytes_received as u64,
                comm_s: v.comm_s,
                exposed_comm_s: v.exposed_comm_s,
                alltoall_waited_s: v.alltoall_waited_s,
                alltoall_peer_wait_s: peer_waits[rank],
                alltoall_transfer_s: (v.alltoall_s - peer_waits[rank]).max(0.0),
                rows_over_budget: v.rows_over_budget as u64,
                expert_bias_hash: v.expert_bias_hash as u64,
                internode_rows: v.internode_rows as u64,
                internode_token_nodes: v.internode_token_nodes as u64,
                internode_rows_sent: v.internode_rows_sent as u64,
                rows_deduplicated: v.rows_deduplicated as u64,
            })
            .collect();
        let other_bias: Vec<usize> =
            per_rank.iter().filter(|r| r.expert_bias_hash != per_rank[0].expert_bias_hash).map(|r| r.rank).collect();
        if !other_bias.is_empty() {
            return Err(WorkerError::BiasMismatch { ranks: other_bias });
        }
        let slowest = |f: fn(&RankMetrics) -> f64| per_rank.iter().map(f).fold(0.0, f64::max);
        let metrics = StepMetrics {
            loss: sums.ce_sum / shape.tokens_per_step as f64,
            aux_loss: sums.aux / shape.micro_batches,
            z_loss: sums.z / shape.micro_batches,
            seq_aux_loss: sums.seq_aux / shape.micro_batches,
            computation_free_share: sums.free_assignments
                / (shape.tokens_per_step as f64 * shape.assignments_per_token.max(1) as f64),
            tokens: shape.tokens_per_step,
            expert_load,
            attn_load,
            tokens_per_expert,
            dropped,
            alltoall_bytes_sent: per_rank.iter().map(|r| r.alltoall_bytes_sent).sum(),
            alltoall_bytes_received: per_rank.iter().map(|r| r.alltoall_bytes_received).sum(),
            alltoall_s: slowest(|r| r.alltoall_s),
            alltoall_peer_wait_s: slowest(|r| r.alltoall_peer_wait_s),
            alltoall_transfer_s: slowest(|r| r.alltoall_transfer_s),
            expert_s: slowest(|r| r.expert_s),
            compute_s: slowest(|r| r.compute_s),
            comm_s: slowest(|r| r.comm_s),
            exposed_comm_s: slowest(|r| r.exposed_comm_s),
            overlap_efficiency: overlap_efficiency(per_rank.iter().map(|r| (r.comm_s, r.exposed_comm_s))),
            rows_over_budget: per_rank.iter().map(|r| r.rows_over_budget).sum(),
            internode_rows: per_rank.iter().map(|r| r.internode_rows).sum(),
            internode_token_nodes: per_rank.iter().map(|r| r.internode_token_nodes).sum(),
            internode_rows_sent: per_rank.iter().map(|r| r.internode_rows_sent).sum(),
            rows_deduplicated: per_rank.iter().map(|r| r.rows_deduplicated).sum(),
            per_rank,
            ..Default::default()
        };
        Ok((metrics, sums.preempted > 0.0))
    }
}

/// Every rank's exchanges of the step, in order: (arrival seconds since
/// `epoch`, seconds the exchange ran). One all-gather of nanoseconds.
fn gather_arrivals(
    comm: &mut dyn Communicator,
    dispatch: &DispatchStats,
    epoch: Instant,
) -> Result<Vec<Vec<(f64, f64)>>, WorkerError> {
    let words: Vec<u64> = dispatch
        .exchanges
        .iter()
        .flat_map(|&(arrived, busy)| [arrived.saturating_duration_since(epoch).as_nanos() as u64, (busy * 1e9) as u64])
        .collect();
    let gathered = comm.all_gather_u64(&words)?;
    let seconds = |ns: u64| ns as f64 * 1e-9;
    Ok(gathered.iter().map(|w| w.chunks_exact(2).map(|p| (seconds(p[0]), seconds(p[1]))).collect()).collect())
}

/// Each rank's time waiting for the last peer of its expert-parallel group
/// (`ep` consecutive ranks) over the step's exchanges: for exchange i, the
/// last arrival in the group less this rank's arrival, at most the time
/// the exchange ran here. `arrivals[rank]` as from [`gather_arrivals`].
fn peer_waits(arrivals: &[Vec<(f64, f64)>], ep: usize) -> Vec<f64> {
    let mut waits = vec![0.0; arrivals.len()];
    for (g, group) in arrivals.chunks(ep.max(1)).enumerate() {
        // Every rank of a group runs the same exchanges; a shorter list
        // (it cannot happen while the collectives match) limits the split.
        let exchanges = group.iter().map(Vec::len).min().unwrap_or(0);
        for i in 0..exchanges {
            let last = group.iter().map(|r| r[i].0).fold(f64::MIN, f64::max);
            for (member, r) in group.iter().enumerate() {
                let (arrived, busy) = r[i];
                waits[g * ep.max(1) + member] += (last - arrived).clamp(0.0, busy);
            }
        }
    }
    waits
}

/// Adds one micro-batch's per-layer expert counts into `acc` (which takes
/// them as they are the first time).
fn add_counts(acc: &mut Vec<Vec<usize>>, counts: &[Vec<usize>]) {
    if acc.is_empty() {
        *acc = counts.to_vec();
        return;
    }
    for (acc, layer) in acc.iter_mut().zip(counts) {
        acc.iter_mut().zip(layer).for_each(|(a, b)| *a += b);
    }
}

/// Sends this rank's numbers of the step just done; a stop from the
/// coordinator (another rank was lost) ends the run here.
pub(crate) fn report_step(
    client: &CoordinatorClient,
    rank: usize,
    state: &TrainState,
    local: &LocalStep,
    metrics: &StepMetrics,
) -> Result<(), WorkerError> {
    let expert_rows = if metrics.per_rank.len() > 1 {
        local.dispatch.rows_computed
    } else {
        local.tokens_per_expert.iter().flatten().sum::<usize>() as u64
    };
    let report = StepReport {
        rank: rank as u32,
        step: state.step,
        ce_sum: local.ce_sum,
        tokens: local.tokens as u64,
        step_time_s: metrics.step_time_s,
        expert_rows,
        dropped: local.dropped.iter().sum::<usize>() as u64,
        alltoall_bytes: local.dispatch.bytes_sent,
        alltoall_s: local.dispatch.alltoall_s,
        comm_s: local.comm_s,
        exposed_comm_s: local.exposed_comm_s,
        // The coordinator writes metrics.jsonl from rank 0's line.
        detail: (rank == 0).then(|| serde_json::to_string(metrics).expect("metrics serialise")),
    };
    client.report(report).map_err(|e| WorkerError::coordinator(rank, e))?;
    match client.stop_reason() {
        Some(reason) => Err(WorkerError::Stopped { reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_waits_count_the_time_to_the_last_arrival_of_each_group() {
        // Two groups of two ranks, two exchanges each: (arrival, busy).
        let arrivals = vec![
            vec![(0.0, 1.0), (2.0, 0.5)],
            vec![(0.25, 0.75), (1.5, 1.0)],
            // The second group: rank 3 arrives late at both, but a wait
            // is never longer than the exchange ran on the waiting rank.
            vec![(0.0, 0.1), (1.0, 2.0)],
            vec![(0.5, 0.05), (1.75, 1.0)],
        ];
        let waits = peer_waits(&arrivals, 2);
        assert_eq!(waits, vec![0.25, 0.5, 0.1 + 0.75, 0.0]);
        // One group of four: the last arrival of the whole world counts.
        let waits = peer_waits(&arrivals, 4);
        assert_eq!(waits, vec![0.5, 0.25 + 0.5, 0.1 + 1.0, 0.0 + 0.25]);
    }

    #[test]
    fn packed_values_round_trip_by_name() {
        let v = RankValues { tokens: 1.0, rows_deduplicated: 10.0, comm_s: 8.0, ..Default::default() };
        let flat = v.to_values();
        assert_eq!(flat.len(), RankValues::LEN);
        assert_eq!((flat[0], flat[RankValues::LEN - 1]), (1.0, 10.0));
        assert_eq!(RankValues::from_values(&flat), v);
        assert_eq!(StepSums::LEN, 6);
    }

    #[test]
    fn one_rank_reduction_keeps_every_count_in_its_place() {
        let local = LocalStep {
            ce_sum: 12.0,
            aux: 0.5,
            z: 0.25,
            tokens_per_expert: vec![vec![1, 2, 3], vec![4, 5, 6]],
            dropped: vec![7, 8],
            tokens: 6,
            attn_load: vec![vec![2, 4], vec![5, 1]],
            ..Default::default()
        };
        let shape = StepShape {
            world: 1,
            rank: 0,
            tokens_per_step: 6,
            micro_batches: 2.0,
            n_experts: 3,
            loads: false,
            router_outputs: 3,
            assignments_per_token: 2,
            attn_outputs: 2,
            ep: 1,
        };
        let (m, preempted) = local.reduce(&mut collectives::SelfComm, &shape, Instant::now()).unwrap();
        assert!(!preempted);
        assert_eq!((m.loss, m.aux_loss, m.z_loss), (2.0, 0.25, 0.125));
        assert_eq!(m.tokens_per_expert, vec![vec![1, 2, 3], vec![4, 5, 6]]);
        assert_eq!(m.dropped, vec![7, 8]);
        assert_eq!(m.attn_load, vec![vec![2, 4], vec![5, 1]], "attention loads after the dropped counts");
        assert_eq!(m.per_rank[0].tokens, 6);
    }
}
