//! The job config: one TOML file, one section per part (DESIGN section 7).
//!
//! Each part owns its section's type; this module assembles them, loads a
//! file with errors that name the file and key, applies `--set key=value`
//! overrides and checks the settings against each other.

use crate::data::DataConfig;
use crate::overlap::OverlapConfig;
use model::optim::OptimConfig;
use model::ModelConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The default job (`examples/tiny.toml`), built into the binary so that
/// `switchyard train` needs no files.
pub const DEFAULT_JOB_TOML: &str = include_str!("../../examples/tiny.toml");

/// `[train]`: how long and on what batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps of the whole job (a resumed job stops here too).
    pub steps: u64,
    /// Sequences per optimizer step, over all ranks.
    pub global_batch_size: usize,
    /// Sequences per rank per forward pass; gradient accumulation makes up
    /// the rest: `global / (dp * micro)` passes per step.
    pub micro_batch_size: usize,
    pub seed: u64,
    /// A summary line every this many steps.
    pub log_every: u64,
    /// Validation every this many steps on `[data] eval_source` (0: never).
    pub eval_every: u64,
    /// The element type of the matrix products: "fp32", "bf16" (bf16
    /// factors, fp32 accumulation) or "auto" (bf16 where the CPU has bf16
    /// matrix units and oneDNN is installed).
    pub precision: crate::precision::PrecisionChoice,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            global_batch_size: 32,
            micro_batch_size: 8,
            seed: 1234,
            log_every: 50,
            eval_every: 0,
            precision: Default::default(),
        }
    }
}

/// `[parallel]`: how many ranks and how they talk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    pub ranks: usize,
    /// How the ranks talk.
    pub backend: Backend,
    /// Attention shards (groups of heads) per data-parallel replica.
    pub attn_tp: usize,
    /// Ranks the experts are spread over (expert parallelism); 0 = the
    /// largest divisor of `ranks` that divides `n_experts`.
    pub ep: usize,
    /// Seconds a collective waits for a missing rank before failing.
    pub collective_timeout_s: f64,
    /// How experts are spread over the ranks.
    pub placement: layout::Placement,
    /// Balanced placement: re-plan every this many steps from the expert
    /// loads measured since the last plan.
    pub rebalance_every: u64,
    /// Balanced placement: extra expert slots for replicas of hot experts,
    /// over the expert-parallel group; 0 = one per rank.
    pub redundant_experts: usize,
    /// Most rows one rank's experts take from one layer's exchange of a
    /// micro-batch (dropless routing can send them all of it); 0 = what the
    /// launcher's memory check says this machine can hold, no bound where
    /// it cannot tell.
    pub max_expert_rows: usize,
    /// What a rank does when its experts would get more rows than that.
    pub expert_overflow: ExpertOverflow,
    /// Where MoA's attention experts (`[model] attention = "moa"`) live.
    pub attn_expert_placement: AttnExpertPlacement,
}

/// `[parallel] attn_expert_placement`: where MoA's attention experts live
/// (docs/model.md, "Attention experts"; docs/parallel.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnExpertPlacement {
    /// Every rank holds every attention expert (dense tensors, summed over
    /// all ranks) and computes its own tokens' rows.
    Replicated,
    /// Contiguous blocks of experts over the expert-parallel group: a row's
    /// query and output projections run on its expert's owner (rows travel
    /// there and back with all-to-all), its attention core where its token is.
    Partitioned,
}

/// `[parallel] expert_overflow`: a rank's experts were sent more rows than
/// `max_expert_rows` (a skewed router, usually early in training).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertOverflow {
    /// The step fails with an error naming the layer, rank and expert,
    /// before the rows are received (a clear error, never an OOM kill).
    Fail,
    /// The most loaded experts drop rows (they contribute nothing, like
    /// tokens over capacity) until the rank is within the bound; the step
    /// goes on and metrics count the dropped rows.
    Cap,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            ranks: 1,
            backend: Backend::Local,
            attn_tp: 1,
            ep: 0,
            collective_timeout_s: 60.0,
            placement: layout::Placement::Contiguous,
            rebalance_every: 100,
            redundant_experts: 0,
            max_expert_rows: 0,
            expert_overflow: ExpertOverflow::Fail,
            attn_expert_placement: AttnExpertPlacement::Replicated,
        }
    }
}

/// `[parallel] backend`: the collective library the ranks talk through.
/// An unknown name is refused by the parser, which lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Every rank a thread of one process (shared memory).
    Local,
    /// One process per rank over MPI (one or many nodes).
    Mpi,
    /// One process per GPU over NCCL.
    Nccl,
}

impl Backend {
    /// Every backend, in the order help texts list them.
    pub const ALL: [Backend; 3] = [Backend::Local, Backend::Mpi, Backend::Nccl];

    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }

    /// Whether each rank is its own process, started by a launcher
    /// (mpirun, srun, a pod) that says which rank it is.
    pub fn ranks_are_processes(self) -> bool {
        match self {
            Backend::Local => false,
            Backend::Mpi | Backend::Nccl => true,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|b| b.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|b| b.as_str()).collect();
            format!("`{s}` is not a backend: use one of {}", names.join(", "))
        })
    }
}

/// `[checkpoint]`: where and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Object-store URL; empty means `file://<run dir>/checkpoints`.
    pub url: String,
    /// Save every this many steps (and always at the end); 0 = only at the end.
    pub every: u64,
    /// Committed steps to keep; older ones are deleted after a new commit.
    pub keep_last: usize,
    /// Retries of a failed object-store request (remote stores) before the save fails.
    pub retries: usize,
    /// No retry starts later than this many seconds after the first attempt.
    pub retry_timeout_s: f64,
    /// Shards up to this many MiB go in one put, larger ones as multipart
    /// uploads of parts this size (S3 wants at least 5).
    pub part_mib: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { url: String::new(), every: 250, keep_last: 2, retries: 10, retry_timeout_s: 60.0, part_mib: 32 }
    }
}

impl CheckpointConfig {
    /// How remote stores of this job are retried.
    pub fn store_options(&self) -> checkpoint::StoreOptions {
        checkpoint::StoreOptions {
            retries: self.retries,
            retry_timeout: std::time::Duration::from_secs_f64(self.retry_timeout_s.max(0.0)),
            part_bytes: self.part_mib << 20,
        }
    }
}

/// `[coordinator]`: the control plane every rank registers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// `host:port` workers connect to; empty = a free port on 127.0.0.1 (one-machine runs).
    pub addr: String,
    /// `host:port` of `/metrics` and `/status`; empty = a free port on 127.0.0.1.
    pub http_addr: String,
    /// The job's auth token; empty = SWITCHYARD_TOKEN, then `token_file`, else generated (local runs).
    pub token: String,
    /// A file holding the token (a mounted secret).
    pub token_file: String,
    /// A rank not heard from for this long is lost and the job stops.
    pub heartbeat_timeout_s: f64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            addr: String::new(),
            http_addr: String::new(),
            token: String::new(),
            token_file: String::new(),
            heartbeat_timeout_s: 10.0,
        }
    }
}

/// `[launch]`: how the launcher starts the job (used by the launch issue).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// Extra arguments for `mpirun` / `srun`.
    pub extra_args: Vec<String>,
    /// `host:slots` entries for `--backend mpi` across machines (mpirun's
    /// `--host`); empty = this machine. The launcher runs on the first.
    pub hosts: Vec<String>,
}

/// The whole job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Names the run folder (`runs/<name>`) and the job in logs.
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub overlap: OverlapConfig,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub launch: LaunchConfig,
}

fn default_name() -> String {
    "job".into()
}

/// A config that could not be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path} (check the path given to --config)")]
    Read { path: String, source: std::io::Error },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("--set {assignment}: {reason}")]
    Override { assignment: String, reason: String },
    #[error("config {origin}: [{section}] {key}: {reason}")]
    Invalid { origin: String, section: &'static str, key: String, reason: String },
}

impl JobConfig {
    /// Parses TOML text; `origin` (a file path or "built-in default") names
    /// the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })
    }

    /// Loads `path`, or the built-in default when `None`, then applies
    /// `--set section.key=value` overrides and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                (text, p.display().to_string())
            }
            None => (DEFAULT_JOB_TOML.to_string(), "built-in default (examples/tiny.toml)".to_string()),
        };
        let mut job = Self::from_toml(&text, &origin)?;
        job.apply_overrides(overrides)?;
        job.validate(&origin)?;
        Ok(job)
    }

    /// Applies `section.key=value` assignments; the value is read as TOML
    /// (numbers, booleans, quoted or bare strings).
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<(), ConfigError> {
        if overrides.is_empty() {
            return Ok(());
        }
        let mut tree = toml::Value::try_from(&*self).expect("a config always serialises");
        for assignment in overrides {
            let fail = |reason: String| ConfigError::Override { assignment: assignment.clone(), reason };
            let (key, raw) = assignment
                .split_once('=')
                .ok_or_else(|| fail("expected section.key=value, e.g. --set train.steps=100".into()))?;
            let value = parse_override_value(raw.trim());
            let path: Vec<&str> = key.trim().split('.').collect();
            let mut node = &mut tree;
            for (i, part) in path.iter().enumerate() {
                let table =
                    node.as_table_mut().ok_or_else(|| fail(format!("`{}` is not a section", path[..i].join("."))))?;
                if !table.contains_key(*part) {
                    let known: Vec<&String> = table.keys().collect();
                    return Err(fail(format!("unknown key `{part}`; known keys here: {known:?}")));
                }
                if i + 1 == path.len() {
                    table.insert(part.to_string(), value.clone());
                    break;
                }
                node = table.get_mut(*part).expect("checked above");
            }
        }
        *self = tree.try_into().map_err(|e: toml::de::Error| ConfigError::Override {
            assignment: overrides.join(" "),
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// The checked parallel layout of this job.
    pub fn parallel_dims(&self) -> Result<layout::ParallelDims, layout::LayoutError> {
        let sizes = layout::ModelSizes {
            n_heads: self.model.n_heads,
            n_kv_heads: self.model.n_kv_heads,
            n_experts: self.model.n_experts,
        };
        layout::ParallelDims::new(self.parallel.ranks, self.parallel.attn_tp, self.parallel.ep, sizes)
    }

    /// Number of micro-batches (forward passes) per optimizer step per rank,
    /// given `dp` data-parallel ranks.
    pub fn grad_accumulation(&self, dp: usize) -> usize {
        self.train.global_batch_size / (dp * self.train.micro_batch_size)
    }

    /// Checks each section and the settings against each other.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |section: &'static str, key: &str, reason: String| ConfigError::Invalid {
            origin: origin.into(),
            section,
            key: key.into(),
            reason,
        };
        let from_model = |section: &'static str, e: model::ModelError| match e {
            model::ModelError::InvalidConfig { key, reason } => invalid(section, key, reason),
            other => invalid(section, "?", other.to_string()),
        };
        self.model.validate().map_err(|e| from_model("model", e))?;
        self.optim.validate().map_err(|e| from_model("optim", e))?;
        self.data.validate().map_err(|e| invalid("data", "source", e.to_string()))?;
        let c = &self.checkpoint;
        if !(c.retry_timeout_s.is_finite() && c.retry_timeout_s >= 0.0) {
            return Err(invalid("checkpoint", "retry_timeout_s", "must be a number of seconds >= 0".into()));
        }
        if !(1..=5120).contains(&c.part_mib) {
            return Err(invalid("checkpoint", "part_mib", "must be 1 to 5120 MiB (S3 wants at least 5)".into()));
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(invalid("train", "steps", "must be at least 1".into()));
        }
        if t.micro_batch_size == 0 || t.global_batch_size == 0 {
            return Err(invalid("train", "micro_batch_size", "batch sizes must be at least 1".into()));
        }
        let dp = self.parallel.ranks / self.parallel.attn_tp.max(1);
        if self.parallel.ranks == 0 || dp == 0 {
            return Err(invalid("parallel", "ranks", "must be at least 1 (and at least attn_tp)".into()));
        }
        if !t.global_batch_size.is_multiple_of(dp * t.micro_batch_size) {
            return Err(invalid(
                "train",
                "global_batch_size",
                format!(
                    "{} sequences cannot be split into micro-batches of {} over {} data-parallel rank(s): \
                     global_batch_size must be a multiple of dp x micro_batch_size = {}",
                    t.global_batch_size,
                    t.micro_batch_size,
                    dp,
                    dp * t.micro_batch_size
                ),
            ));
        }
        if t.log_every == 0 {
            return Err(invalid("train", "log_every", "must be at least 1".into()));
        }
        if t.eval_every > 0 && self.data.eval_source.trim().is_empty() {
            let reason = format!(
                "is {}, but [data] eval_source is empty: set it to \"builtin\" (the built-in corpus's held-out \
                 text) or to a text file, or set eval_every = 0",
                t.eval_every
            );
            return Err(invalid("train", "eval_every", reason));
        }
        self.parallel_dims().map_err(|e| invalid("parallel", e.key.trim_start_matches("parallel."), e.reason))?;
        if self.parallel.placement == layout::Placement::Grouped && self.model.n_groups < 2 {
            let reason = "\"grouped\" aligns the routing groups of group-limited routing with nodes: set \
                          [model] n_groups (and topk_groups) first";
            return Err(invalid("parallel", "placement", reason.into()));
        }
        if self.parallel.attn_expert_placement == AttnExpertPlacement::Partitioned {
            if !self.model.is_moa() {
                let reason = "\"partitioned\" places MoA's attention experts: set [model] attention = \"moa\" (with \
                              attn_experts and attn_top_k), or leave attn_expert_placement = \"replicated\"";
                return Err(invalid("parallel", "attn_expert_placement", reason.into()));
            }
            if self.parallel.attn_tp > 1 {
                let reason = "\"partitioned\" with attention shards (attn_tp > 1) is not built: use attn_tp = 1, or \
                              attn_expert_placement = \"replicated\" (shards then split every expert's heads)";
                return Err(invalid("parallel", "attn_expert_placement", reason.into()));
            }
        }
        if self.parallel.collective_timeout_s.is_nan() || self.parallel.collective_timeout_s <= 0.0 {
            return Err(invalid("parallel", "collective_timeout_s", "must be a positive number of seconds".into()));
        }
        if self.coordinator.heartbeat_timeout_s.is_nan() || self.coordinator.heartbeat_timeout_s <= 0.0 {
            return Err(invalid("coordinator", "heartbeat_timeout_s", "must be a positive number of seconds".into()));
        }
        self.overlap.validate().map_err(|(key, reason)| invalid("overlap", key, reason))?;
        if self.checkpoint.keep_last == 0 {
            return Err(invalid("checkpoint", "keep_last", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Settings that are allowed but probably not meant, one line each, for
    /// the launcher to print before the job starts.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.optim.warmup_steps > self.train.steps {
            out.push(format!(
                "[optim] warmup_steps = {} is more than [train] steps = {}: the learning rate never reaches \
                 [optim] lr = {} (lower warmup_steps, or raise steps)",
                self.optim.warmup_steps, self.train.steps, self.optim.lr
            ));
        }
        out
    }

    /// The resolved config as TOML, for the run folder, checkpoints and
    /// workers; the auth token is left out (it is a secret).
    pub fn to_toml(&self) -> String {
        let mut public = self.clone();
        public.coordinator.token.clear();
        toml::to_string(&public).expect("a config always serialises")
    }
}

/// Reads an override value as TOML, falling back to a plain string so that
/// `--set data.source=/data/x` needs no quotes.
fn parse_override_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_job_loads_and_overrides_apply() {
        let job = JobConfig::load(None, &["train.steps=7".into(), "model.block=\"parallel\"".into()]).unwrap();
        assert_eq!(job.train.steps, 7);
        assert_eq!(job.model.block, model::BlockKind::Parallel);
        let bare = JobConfig::load(None, &["data.source=builtin".into()]).unwrap();
        assert_eq!(bare.data.source, "builtin");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let err = JobConfig::from_toml("[train]\nstepz = 3\n", "job.toml").unwrap_err().to_string();
        assert!(err.contains("job.toml") && err.contains("stepz"), "{err}");
        let err = JobConfig::from_toml("[train]\nsteps = \"many\"\n", "job.toml").unwrap_err().to_string();
        assert!(err.contains("job.toml") && err.contains("steps"), "{err}");
        let err = JobConfig::load(None, &["train.nope=1".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown key `nope`"), "{err}");
        let err = JobConfig::load(None, &["train.global_batch_size=12".into(), "train.micro_batch_size=8".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("global_batch_size"), "{err}");
    }

    #[test]
    fn closed_sets_are_enums_and_unknown_values_list_the_valid_ones() {
        let job =
            JobConfig::load(None, &["parallel.backend=mpi".into(), "parallel.placement=balanced".into()]).unwrap();
        assert_eq!(job.parallel.backend, Backend::Mpi);
        assert_eq!(job.parallel.placement, layout::Placement::Balanced);
        for (set, valid) in [
            ("parallel.backend=\"gloo\"", ["local", "mpi", "nccl"].as_slice()),
            ("parallel.placement=\"random\"", &["contiguous", "balanced", "grouped"]),
            ("parallel.attn_expert_placement=\"sharded\"", &["replicated", "partitioned"]),
            ("overlap.mode=\"sometimes\"", &["auto", "on", "off"]),
            ("model.block=\"diagonal\"", &["sequential", "parallel"]),
        ] {
            let err = JobConfig::load(None, &[set.into()]).unwrap_err().to_string();
            assert!(valid.iter().all(|v| err.contains(v)), "{set}: {err}");
        }
        let err = JobConfig::from_toml("[parallel]\nbackend = \"gloo\"\n", "job.toml").unwrap_err().to_string();
        assert!(err.contains("job.toml") && err.contains("backend") && err.contains("nccl"), "{err}");
        assert_eq!("nccl".parse::<Backend>(), Ok(Backend::Nccl));
        assert!("gloo".parse::<Backend>().unwrap_err().contains("local, mpi, nccl"));
    }
}
