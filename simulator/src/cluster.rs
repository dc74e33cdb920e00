//! `cluster.toml`: the machines a simulated job runs on.
//!
//! ```toml
//! name = "8x H100 SXM per node, NVLink 4 + 400 Gb/s InfiniBand per GPU"
//! topology = "two-level"        # or "flat": every pair of ranks uses [intra_node]
//!
//! [node]
//! count = 128                   # nodes
//! devices = 8                   # devices (GPUs, or a CPU whose cores the ranks share) per node
//!
//! [device]
//! matrix_tflops = 989           # peak dense matrix-product rate
//! matrix_efficiency = 0.55      # share of it sustained by large products
//! memory_gbps = 3350            # memory bandwidth (elementwise, memory-bound kernels)
//! memory_efficiency = 0.8
//! memory_gib = 80
//! kernel_overhead_us = 4        # fixed cost of every kernel launch
//!
//! [intra_node]                  # per device, per direction
//! bandwidth_gbps = 450
//! latency_us = 3
//!
//! [inter_node]
//! bandwidth_gbps = 50
//! latency_us = 6
//!
//! [precision]                   # bytes per value: what the training software stores and sends
//! activation_bytes = 2
//! ```
//! Unknown keys are an error naming the key and the file, as for job configs.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A cluster file that cannot be used, naming the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the cluster file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("in the cluster file {path}: {source}")]
    In { path: String, source: Box<ClusterError> },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, ClusterError>;

/// Returns a [`ClusterError::Invalid`] with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => { return Err(ClusterError::Invalid(format!($($arg)*))) };
}

/// How ranks on different nodes reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// One network: every pair of ranks uses the `[intra_node]` numbers.
    Flat,
    /// A fast link inside a node (NVLink, shared memory) and a slower one between nodes.
    TwoLevel,
}

/// The machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// What the file describes, for tables and plots.
    pub name: String,
    #[serde(default = "two_level")]
    pub topology: Topology,
    pub node: Node,
    pub device: Device,
    pub intra_node: Link,
    /// Needed when `topology = "two-level"` and a job spans nodes.
    #[serde(default)]
    pub inter_node: Option<Link>,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub host: Host,
}

fn two_level() -> Topology {
    Topology::TwoLevel
}

/// Nodes and devices per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Nodes available.
    pub count: usize,
    /// Devices per node; ranks beyond `count x devices` share devices.
    pub devices: usize,
    /// The nodes are network namespaces of one machine (`simulate
    /// validate`): links between them are real, but every rank of every
    /// node shares that machine's one device (its cores).
    #[serde(default)]
    pub one_machine: bool,
}

/// One device: a GPU, or a CPU whose cores the ranks placed on it share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Peak dense matrix-product rate (TFLOP/s) of the whole device.
    pub matrix_tflops: f64,
    /// Share of the peak (or of the curves) that matrix products sustain in a step.
    #[serde(default = "one")]
    pub matrix_efficiency: f64,
    /// Measured products by size, one core (`[flops of one product, TFLOP/s]`,
    /// ascending): small products run far below the peak on a CPU. Absent:
    /// every product runs at `matrix_tflops x matrix_efficiency`.
    #[serde(default)]
    pub matrix_curve_core: Vec<[f64; 2]>,
    /// The same with every core of the device on one product.
    #[serde(default)]
    pub matrix_curve_device: Vec<[f64; 2]>,
    /// Memory bandwidth (GB/s) of the whole device, what elementwise
    /// (memory-bound) kernels stream at.
    pub memory_gbps: f64,
    #[serde(default = "one")]
    pub memory_efficiency: f64,
    /// Elementwise rate (GB/s) of one core, before `memory_efficiency`;
    /// absent: `memory_gbps / cores`.
    #[serde(default)]
    pub memory_gbps_core: Option<f64>,
    /// Memory capacity (GiB); a rank that needs more is flagged.
    pub memory_gib: f64,
    /// Independent cores ranks on this device can run on at once: a GPU
    /// is 1 (its rank owns it), a CPU its core count.
    #[serde(default = "one_usize")]
    pub cores: usize,
    /// Fixed cost of one kernel launch or parallel region (microseconds).
    #[serde(default)]
    pub kernel_overhead_us: f64,
    /// A rank whose kernels run on one thread of a multi-core CPU (an MPI
    /// rank given one core): the share of the one-core curves and rates a
    /// real step sustains, and the cost of one parallel region there. Both
    /// absent: as for a rank on every core.
    #[serde(default)]
    pub one_thread_efficiency: Option<f64>,
    #[serde(default)]
    pub one_thread_kernel_overhead_us: Option<f64>,
}

fn one() -> f64 {
    1.0
}

fn one_usize() -> usize {
    1
}

/// A link level: per device, per direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Bandwidth (GB/s) one device can send at on this level.
    pub bandwidth_gbps: f64,
    /// Time of the smallest message (microseconds).
    pub latency_us: f64,
    /// Bandwidth (GB/s) of all-reduce on this level when it differs from
    /// `bandwidth_gbps` (an all-reduce implementation's own measured rate).
    #[serde(default)]
    pub allreduce_gbps: Option<f64>,
    /// Latency of one all-reduce when it differs from `latency_us`.
    #[serde(default)]
    pub allreduce_latency_us: Option<f64>,
}

/// Bytes per value of what training keeps and sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Precision {
    /// Weights as used in the step.
    pub param_bytes: f64,
    pub grad_bytes: f64,
    /// Optimizer state per parameter (AdamW: two fp32 moments = 8; with
    /// mixed precision add the fp32 master copy: 12).
    pub optimizer_bytes: f64,
    /// Activations saved for backward and rows sent by all-to-all.
    pub activation_bytes: f64,
    /// Optimizer state (and fp32 master weights) sharded over the
    /// data-parallel ranks (ZeRO-1 / Megatron's distributed optimizer).
    pub shard_optimizer: bool,
}

impl Default for Precision {
    /// switchyard today: fp32 everywhere, AdamW moments on every rank.
    fn default() -> Self {
        Self { param_bytes: 4.0, grad_bytes: 4.0, optimizer_bytes: 8.0, activation_bytes: 4.0, shard_optimizer: false }
    }
}

/// Per-step work of the training loop outside the model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Host {
    /// Fixed cost of every step (metrics, data, bookkeeping), microseconds.
    pub step_overhead_us: f64,
    /// Optimizer update rate of one core (parameters per second, millions);
    /// absent (0): from the memory bandwidth (AdamW moves 28 bytes per parameter).
    pub optimizer_mparams_per_s_core: f64,
    /// How much a rank's compute between two all-to-alls varies from rank
    /// to rank and call to call (standard deviation over the mean; 0:
    /// ranks arrive together). Ranks wait for the last peer at every
    /// all-to-all for this besides load imbalance: the scheduler where
    /// ranks share cores, memory and clock differences.
    pub arrival_spread: f64,
}

impl Cluster {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self> {
        let named = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read { path: named(), source })?;
        Self::parse(&text).map_err(|e| ClusterError::In { path: named(), source: Box::new(e) })
    }

    /// Parses and checks the text of a cluster file.
    pub fn parse(text: &str) -> Result<Self> {
        let cluster: Cluster = toml::from_str(text)?;
        cluster.validate()?;
        Ok(cluster)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("node.count", self.node.count as f64),
            ("node.devices", self.node.devices as f64),
            ("device.matrix_tflops", self.device.matrix_tflops),
            ("device.matrix_efficiency", self.device.matrix_efficiency),
            ("device.memory_gbps", self.device.memory_gbps),
            ("device.memory_efficiency", self.device.memory_efficiency),
            ("device.memory_gib", self.device.memory_gib),
            ("device.cores", self.device.cores as f64),
            ("intra_node.bandwidth_gbps", self.intra_node.bandwidth_gbps),
        ];
        for (key, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                invalid!("`{key}` must be a positive number, got {value}");
            }
        }
        for (key, value) in [
            ("device.matrix_efficiency", self.device.matrix_efficiency),
            ("device.memory_efficiency", self.device.memory_efficiency),
        ] {
            if value > 1.0 {
                invalid!("`{key}` is a share of the peak: at most 1, got {value}");
            }
        }
        for (key, curve) in [
            ("device.matrix_curve_core", &self.device.matrix_curve_core),
            ("device.matrix_curve_device", &self.device.matrix_curve_device),
        ] {
            if curve.windows(2).any(|w| w[1][0] <= w[0][0]) || curve.iter().any(|p| !(p[0] > 0.0 && p[1] > 0.0)) {
                invalid!("`{key}` needs [flops, TFLOP/s] pairs with positive values and ascending flops");
            }
        }
        if let Some(e) = self.device.one_thread_efficiency {
            if !(e.is_finite() && e > 0.0 && e <= 1.0) {
                invalid!("`device.one_thread_efficiency` is a share: above 0 and at most 1, got {e}");
            }
        }
        if self.device.one_thread_kernel_overhead_us.is_some_and(|l| !(l.is_finite() && l >= 0.0)) {
            invalid!("`device.one_thread_kernel_overhead_us` must be >= 0");
        }
        if !(self.host.arrival_spread.is_finite() && self.host.arrival_spread >= 0.0) {
            invalid!(
                "`host.arrival_spread` is a standard deviation over a mean: 0 or more, got {}",
                self.host.arrival_spread
            );
        }
        if self.intra_node.latency_us < 0.0 || self.device.kernel_overhead_us < 0.0 {
            invalid!("latencies and overheads must be >= 0");
        }
        if self.topology == Topology::TwoLevel && self.node.count > 1 && self.inter_node.is_none() {
            invalid!("`topology = \"two-level\"` with {} nodes needs an [inter_node] link", self.node.count);
        }
        Ok(())
    }

    /// Devices in the whole cluster.
    pub fn devices(&self) -> usize {
        self.node.count * self.node.devices
    }

    /// The link between ranks on different nodes.
    pub fn between_nodes(&self) -> &Link {
        match (self.topology, &self.inter_node) {
            (Topology::TwoLevel, Some(link)) => link,
            _ => &self.intra_node,
        }
    }
}

/// Where a job's ranks land: ranks fill a node's devices before the next
/// node; with more ranks than devices, ranks share devices evenly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Ranks that share one device (1 on a GPU cluster).
    pub ranks_per_device: usize,
    /// Ranks whose kernels share one device's cores: `ranks_per_device`,
    /// or every rank when the nodes are namespaces of one machine.
    pub ranks_sharing_cores: usize,
    pub ranks_per_node: usize,
    pub nodes: usize,
}

impl Placement {
    /// Places `ranks` on `cluster`.
    pub fn of(cluster: &Cluster, ranks: usize) -> Self {
        let ranks_per_device = ranks.div_ceil(cluster.devices()).max(1);
        let ranks_per_node = (cluster.node.devices * ranks_per_device).min(ranks).max(1);
        let ranks_sharing_cores = if cluster.node.one_machine { ranks.max(1) } else { ranks_per_device };
        Self { ranks_per_device, ranks_sharing_cores, ranks_per_node, nodes: ranks.div_ceil(ranks_per_node) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const H100: &str = include_str!("../../examples/clusters/h100-8x-nvlink-ib400.toml");

    #[test]
    fn example_clusters_load() {
        let h100 = Cluster::parse(H100).unwrap();
        assert_eq!(h100.devices(), 128 * 8);
        assert_eq!(h100.topology, Topology::TwoLevel);
        Cluster::parse(include_str!("../../examples/clusters/a100-8x-nvlink-ib200.toml")).unwrap();
        Cluster::parse(include_str!("../../examples/clusters/h800-8x-nvlink-ib400.toml")).unwrap();
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let bad = H100.replace("memory_gib", "memory_gb");
        let err = format!("{:#}", Cluster::parse(&bad).unwrap_err());
        assert!(err.contains("memory_gb"), "{err}");
        let bad = H100.replace("matrix_tflops = 989", "matrix_tflops = -1");
        let err = format!("{:#}", Cluster::parse(&bad).unwrap_err());
        assert!(err.contains("device.matrix_tflops"), "{err}");
    }

    #[test]
    fn ranks_fill_nodes_then_share_devices() {
        let mut c = Cluster::parse(H100).unwrap();
        assert_eq!(
            Placement::of(&c, 64),
            Placement { ranks_per_device: 1, ranks_sharing_cores: 1, ranks_per_node: 8, nodes: 8 }
        );
        assert_eq!(
            Placement::of(&c, 4),
            Placement { ranks_per_device: 1, ranks_sharing_cores: 1, ranks_per_node: 4, nodes: 1 }
        );
        c.node.count = 1;
        c.node.devices = 1;
        assert_eq!(
            Placement::of(&c, 4),
            Placement { ranks_per_device: 4, ranks_sharing_cores: 4, ranks_per_node: 4, nodes: 1 }
        );
        // Namespace hosts of one machine: a rank per node, all on one CPU.
        c.node.count = 4;
        c.node.one_machine = true;
        assert_eq!(
            Placement::of(&c, 3),
            Placement { ranks_per_device: 1, ranks_sharing_cores: 3, ranks_per_node: 1, nodes: 3 }
        );
    }
}
