//! Per-step metrics: what the progress line shows and `metrics.jsonl` keeps.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One optimizer step, as written to `<run dir>/metrics.jsonl`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based number of the step just completed.
    pub step: u64,
    /// Mean next-token cross-entropy over the global batch (nats).
    pub loss: f64,
    /// Sum over layers of the load-balancing loss, mean over micro-batches.
    pub aux_loss: f64,
    /// Sum over layers of the router z-loss, mean over micro-batches.
    pub z_loss: f64,
    /// Sum over layers of the sequence-wise balance loss, mean over
    /// micro-batches (0 unless `seq_aux_loss_coef > 0`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq_aux_loss: f64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the global batch.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    /// Per layer: tokens kept per expert (summed over micro-batches).
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Per layer: assignments dropped by capacity.
    pub dropped: Vec<usize>,
    /// The share of all expert assignments (tokens x top_k x layers) that
    /// took one of MoE++'s computation-free experts (0 without them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub computation_free_share: f64,
    /// With `expert_bias`: per layer, the global batch's tokens that chose
    /// each expert (before drops), the load the bias update balances ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_load: Vec<Vec<usize>>,
    /// ... and each layer's expert bias after this step's update.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_bias: Vec<Vec<f32>>,
    /// With attention experts (MoA) or routed heads (MoH): per layer, the
    /// global batch's tokens that chose each attention expert / routed head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attn_load: Vec<Vec<usize>>,
    /// All-to-all bytes sent / received between different ranks, all ranks together.
    pub alltoall_bytes_sent: u64,
    pub alltoall_bytes_received: u64,
    /// Slowest rank's time in all-to-all and in expert compute.
    pub alltoall_s: f64,
    pub expert_s: f64,
    /// The slowest rank's all-to-all time split: waiting for the last peer
    /// of its expert-parallel group to arrive, and the rest (transfer).
    /// Each is the largest over ranks, so they need not add to `alltoall_s`.
    #[serde(default)]
    pub alltoall_peer_wait_s: f64,
    #[serde(default)]
    pub alltoall_transfer_s: f64,
    /// Time in gradient all-reduce and norm.
    pub sync_s: f64,
    /// Slowest rank's wall time in its micro-batches (reading their tokens,
    /// forward and backward, all-to-all included; two interleaved lanes once).
    #[serde(default)]
    pub compute_s: f64,
    /// Slowest rank's communication time (all-to-all, gradient buckets and
    /// sync), whether or not computation hid it.
    #[serde(default)]
    pub comm_s: f64,
    /// Slowest rank's exposed communication: time no computation hid.
    #[serde(default)]
    pub exposed_comm_s: f64,
    /// Hidden over total communication time, all ranks together (0 to 1).
    #[serde(default)]
    pub overlap_efficiency: f64,
    /// What saving a checkpoint cost this step (copy to host buffers, or a
    /// wait for the previous upload); uploads themselves run in the background.
    #[serde(default)]
    pub checkpoint_s: f64,
    /// Expert rows dropped because a rank's experts reached their row
    /// budget (`parallel.max_expert_rows` with `expert_overflow = "cap"`),
    /// all ranks together; 0 in every step that was not capped.
    #[serde(default)]
    pub rows_over_budget: u64,
    /// Forward expert rows (token, expert) whose expert is on another
    /// node, all ranks and layers together; the distinct (token, node)
    /// pairs among them (what a dispatch that sends a token once per node
    /// would carry, as DeepSeek-V3's does); and the rows that travelled
    /// between nodes (switchyard sends a token once per rank). 0 on one node.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_rows: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_token_nodes: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_rows_sent: u64,
    /// Forward expert rows that did not travel because their token already
    /// went to that rank for another of its experts (as many again backward).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rows_deduplicated: u64,
    /// Validation loss on `[data] eval_source` after this step's update
    /// (every `[train] eval_every` steps; same windows and semantics as
    /// `switchyard eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The expert placement this step ran on, in the row of an attempt's
    /// first step and of the first step after a re-plan (the dashboard's
    /// placement panel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementReport>,
    /// Per rank detail.
    pub per_rank: Vec<RankMetrics>,
}

impl StepMetrics {
    /// The busiest expert's kept tokens over the mean per expert, in the
    /// most unbalanced layer (1 is perfect balance, `n_experts / top_k`
    /// a collapse onto `top_k` experts).
    pub fn busiest_expert_ratio(&self) -> f64 {
        busiest_over_mean(&self.tokens_per_expert)
    }

    /// [`StepMetrics::busiest_expert_ratio`] of the attention experts or
    /// routed heads (0 without them).
    pub fn busiest_attention_ratio(&self) -> f64 {
        busiest_over_mean(&self.attn_load)
    }
}

/// The busiest entry over the mean, in the most unbalanced layer.
fn busiest_over_mean(layers: &[Vec<usize>]) -> f64 {
    let ratio = |load: &Vec<usize>| {
        let mean = load.iter().sum::<usize>() as f64 / load.len().max(1) as f64;
        if mean > 0.0 {
            *load.iter().max().unwrap_or(&0) as f64 / mean
        } else {
            0.0
        }
    };
    layers.iter().map(ratio).fold(0.0, f64::max)
}

/// Which ranks and nodes hold which experts, and why this plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementReport {
    /// "start" (the attempt's plan) or "rebalanced" (balanced placement
    /// moved experts after the previous step).
    pub reason: String,
    /// `owners[layer][expert]`: the expert-parallel ranks holding a replica.
    pub owners: Vec<Vec<Vec<usize>>>,
    /// For each expert-parallel rank, the world ranks in that place (one
    /// per expert-data-parallel group).
    pub ep_ranks: Vec<Vec<usize>>,
    /// The node (host name) of each world rank.
    pub nodes: Vec<String>,
    /// A re-plan's busiest rank over the mean expert tokens, before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<(f64, f64)>,
    /// Partitioned attention experts: `attn_owners[layer][expert]` as
    /// `owners` (empty when they are replicated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attn_owners: Vec<Vec<Vec<usize>>>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// One rank's share of a step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RankMetrics {
    pub rank: usize,
    /// Tokens of the global batch this rank ran through the model.
    pub tokens: u64,
    /// Expert rows its experts computed (forward).
    pub expert_rows: u64,
    /// Forward+backward time (including all-to-all).
    pub compute_s: f64,
    pub alltoall_s: f64,
    pub expert_s: f64,
    pub alltoall_bytes_sent: u64,
    pub alltoall_bytes_received: u64,
    #[serde(default)]
    pub comm_s: f64,
    #[serde(default)]
    pub exposed_comm_s: f64,
    /// Time this rank's lanes waited for all-to-all (hidden or not).
    #[serde(default)]
    pub alltoall_waited_s: f64,
    /// Of `alltoall_s`: the time from this rank's arrival at each exchange
    /// to the arrival of the last rank of its expert-parallel group
    /// (waiting for a slower peer), and the rest (the transfer itself).
    /// Arrivals are compared from a common start per step (the end of the
    /// previous step's last all-rank collective, or a barrier), so the
    /// split is exact to within that start's skew between ranks.
    #[serde(default)]
    pub alltoall_peer_wait_s: f64,
    #[serde(default)]
    pub alltoall_transfer_s: f64,
    /// Rows its experts dropped at their row budget (`expert_overflow = "cap"`).
    #[serde(default)]
    pub rows_over_budget: u64,
    /// With `expert_bias`: a 32-bit hash of the bias this rank routed with
    /// (the step fails when ranks differ).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub expert_bias_hash: u64,
    /// Forward expert rows it sent to another node, and the distinct
    /// (token, node) pairs among them (0 when the ranks share one node).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_rows: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_token_nodes: u64,
    /// Of its forward rows: those that travelled to another node, and
    /// those that did not travel (token already sent to that rank).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub internode_rows_sent: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rows_deduplicated: u64,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// Appends one JSON object per line to a metrics file.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn append(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Writes one line.
    pub fn write(&mut self, metrics: &StepMetrics) -> std::io::Result<()> {
        let line = serde_json::to_string(metrics).expect("metrics serialise");
        writeln!(self.file, "{line}")
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
