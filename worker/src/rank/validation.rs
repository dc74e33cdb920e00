//! Validation during training (`[train] eval_every`, `[data] eval_source`):
//! after the update of every `eval_every`-th step, every rank runs a
//! forward pass over its share of the held-out windows, through the same
//! expert exchange and attention shards as training, and the world sums the
//! cross-entropy. The windows and the loss are `switchyard eval`'s:
//! non-overlapping windows of `seq_len + 1` tokens from the start, dropless
//! routing, the mean next-token cross-entropy of every predicted position.

use super::groups::shorter;
use super::RankRun;
use crate::attention_shards::ShardGroup;
use crate::data::eval_windows;
use crate::dispatch::AllToAllExperts;
use crate::error::WorkerError;
use crate::JobConfig;
use model::model::{forward_with, MicroBatch};
use model::moe::LocalExperts;
use model::shards::NoShards;
use model::ModelConfig;

/// The held-out windows, read once at the start.
pub(crate) struct EvalSet {
    /// The windows' tokens, `seq_len + 1` each, concatenated.
    tokens: Vec<u32>,
    windows: usize,
}

impl EvalSet {
    /// The windows of `[data] eval_source`, or None when validation is off.
    pub(crate) fn load(job: &JobConfig) -> Result<Option<Self>, WorkerError> {
        if job.train.eval_every == 0 {
            return Ok(None);
        }
        let text = job.data.eval_tokens()?;
        let windows: Vec<&[u32]> = eval_windows(&text, job.model.seq_len).collect();
        if windows.is_empty() {
            return Err(WorkerError::DataDoesNotFit {
                source_name: job.data.eval_source.clone(),
                reason: format!(
                    "[data] eval_source holds {} tokens, fewer than one window of seq_len + 1 = {}: give a longer text",
                    text.len(),
                    job.model.seq_len + 1
                ),
            });
        }
        if let Some(&token) = windows.concat().iter().find(|&&t| t as usize >= job.model.vocab) {
            return Err(WorkerError::DataDoesNotFit {
                source_name: job.data.eval_source.clone(),
                reason: format!("token id {token} is outside [model] vocab = {}", job.model.vocab),
            });
        }
        Ok(Some(Self { windows: windows.len(), tokens: windows.concat() }))
    }
}

impl RankRun<'_> {
    /// The validation loss after this step's update, when it is due.
    pub(super) fn validate_if_due(&mut self) -> Result<Option<f64>, WorkerError> {
        let every = self.job.train.eval_every;
        if every == 0 || !self.state.step.is_multiple_of(every) {
            return Ok(None);
        }
        // Taken for the passes (which borrow the run) and put back after;
        // an error ends the run anyway.
        let Some(set) = self.eval_set.take() else { return Ok(None) };
        // Dropless, as `switchyard eval`.
        let cfg = ModelConfig { capacity_factor: 0.0, ..self.job.model.clone() };
        let len = cfg.seq_len + 1;
        let (dp, micro) = (self.dims.dp, self.job.train.micro_batch_size);
        let dp_rank = self.dims.dp_rank(self.rank);
        // Rounds of `dp x micro` windows; every rank runs every round (the
        // exchange needs all of them), a rank past the end on window 0,
        // whose loss it does not count.
        let rounds = set.windows.div_ceil(dp * micro);
        let mut sums = [0.0f64; 2];
        for round in 0..rounds {
            let first = (round * dp + dp_rank) * micro;
            let count = micro.min(set.windows.saturating_sub(first));
            let (tokens, counted) = match count {
                0 => (&set.tokens[..len], false),
                n => (&set.tokens[first * len..(first + n) * len], true),
            };
            let mb = MicroBatch { tokens, batch: tokens.len() / len, modality: &[] };
            let ce = self.forward_only(&cfg, mb)?;
            if counted {
                sums[0] += ce;
            }
        }
        // Every rank's tokens: a shard group's ranks split theirs.
        self.comm.all_reduce_sum_f64(&mut sums[..1])?;
        sums[1] = (set.windows * cfg.seq_len) as f64;
        self.eval_set = Some(set);
        Ok(Some(sums[0] / sums[1]))
    }

    /// This rank's cross-entropy sum of one micro-batch, forward only.
    fn forward_only(&mut self, cfg: &ModelConfig, mb: MicroBatch) -> Result<f64, WorkerError> {
        let dense = &self.state.weights.dense;
        let mut experts = LocalExperts::new(cfg, &self.state.weights.experts, &mut self.grads.experts);
        let model = (&self.rope, dense);
        let stats = if self.dims.world == 1 {
            forward_with(cfg, model, &mut experts, mb, &mut NoShards)?
        } else {
            let groups = &mut self.groups;
            let mut a2a = AllToAllExperts::new(cfg, groups.ep.as_mut(), &self.placement, experts)
                .on_nodes(self.ep_nodes.clone())
                .with_attention_experts(self.attn_placement.as_ref());
            match shorter(&mut groups.tp) {
                Some(tp) => forward_with(cfg, model, &mut a2a, mb, &mut ShardGroup { comm: tp })?,
                None => forward_with(cfg, model, &mut a2a, mb, &mut NoShards)?,
            }
        };
        Ok(stats.ce_sum)
    }
}
