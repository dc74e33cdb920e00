//! The training loop of a single-process job (one rank, all experts local).
//!
//! One optimizer step: for each micro-batch of the global batch, forward and
//! backward with gradients accumulated; global-norm clip; AdamW; maybe a
//! checkpoint. The expert-parallel issue replaces the expert executor and
//! adds gradient all-reduce between accumulation and clipping.

use crate::config::JobConfig;
use crate::data::DataSource;
use crate::error::WorkerError;
use crate::metrics::{MetricsWriter, StepMetrics};
use crate::state::TrainState;
use checkpoint::CheckpointStore;
use coordinator::placement::PlacementPlan;
use model::model::{forward_backward, LossScales, MicroBatch};
use model::moe::LocalExperts;
use model::ops::rope::RopeTable;
use model::optim::{adamw_update, clip_factor, sum_of_squares, takes_weight_decay};
use model::schedule::learning_rate;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Fresh weights (refuses a run folder that already has checkpoints).
    No,
    /// The newest committed checkpoint of the configured URL.
    Latest,
    /// A specific step: `<root URL>/step-XXXXXXXX`.
    From(String),
}

/// Where the run keeps its files and how it starts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub resume: Resume,
    /// Stop (with a checkpoint) once the job reaches this step, although
    /// `train.steps` is further: the schedule still spans `train.steps`, so
    /// a later `--resume` continues exactly as if never stopped.
    pub stop_at: Option<u64>,
}

/// Facts about the run, given to the observer before the first step.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub start_step: u64,
    pub total_steps: u64,
    pub checkpoint_url: String,
    pub resumed_from: Option<String>,
    pub num_params: usize,
    pub num_active_params: usize,
    pub tokens_per_step: u64,
    pub grad_accumulation: usize,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub steps_run: u64,
    pub final_step: u64,
    /// URL of the last committed checkpoint.
    pub checkpoint: Option<String>,
    pub seconds: f64,
}

/// Receives progress; the launcher prints it.
pub trait Observer {
    fn on_start(&mut self, info: &StartInfo);
    fn on_step(&mut self, metrics: &StepMetrics);
    fn on_checkpoint(&mut self, step: u64, url: &str);
}

/// The checkpoint URL of a job: `[checkpoint] url`, or the run folder's.
pub fn checkpoint_url(job: &JobConfig, run_dir: &Path) -> String {
    if job.checkpoint.url.is_empty() {
        let dir = std::path::absolute(run_dir.join("checkpoints")).unwrap_or_else(|_| run_dir.join("checkpoints"));
        format!("file://{}", dir.display())
    } else {
        job.checkpoint.url.clone()
    }
}

/// Opens the store and finds the starting state; errors before anything is written.
fn starting_state(
    job: &JobConfig,
    opts: &RunOptions,
    plan: &PlacementPlan,
) -> Result<(CheckpointStore, TrainState, Option<String>), WorkerError> {
    let (root, step) = match &opts.resume {
        Resume::From(url) => {
            let (root, step) = checkpoint::parse_step_url(url)?;
            (root, Some(step))
        }
        _ => (checkpoint_url(job, &opts.run_dir), None),
    };
    let store = CheckpointStore::open(&root)?;
    let step = match (&opts.resume, step) {
        (Resume::From(_), step) => step,
        (Resume::Latest, _) => {
            let latest = store.latest_step()?;
            if latest.is_none() {
                return Err(WorkerError::Incompatible {
                    url: root.clone(),
                    reason: "there is no committed checkpoint there. Start without --resume, or point \
                             --run-dir / [checkpoint] url at the run to continue"
                        .into(),
                });
            }
            latest
        }
        (Resume::No, _) => {
            if let Some(existing) = store.latest_step()? {
                return Err(WorkerError::Incompatible {
                    url: root.clone(),
                    reason: format!(
                        "the run folder already holds a checkpoint (step {existing}). Add --resume to continue it, \
                         or pick another --run-dir so nothing saved is overwritten"
                    ),
                });
            }
            None
        }
    };
    match step {
        Some(step) => {
            let state = TrainState::load(&store, step, job, plan, 0)?;
            let from = store.step_url(step);
            // Checkpoints keep going to the job's own URL.
            let store = if matches!(opts.resume, Resume::From(_)) {
                CheckpointStore::open(&checkpoint_url(job, &opts.run_dir))?
            } else {
                store
            };
            Ok((store, state, Some(from)))
        }
        None => Ok((store, TrainState::fresh(job, plan, 0), None)),
    }
}

/// Opens the training data and checks it fits the model.
fn open_data(job: &JobConfig) -> Result<DataSource, WorkerError> {
    let data = job.data.open_source()?;
    data.check_len(job.model.seq_len + 1)?;
    if data.vocab() > job.model.vocab {
        return Err(WorkerError::Incompatible {
            url: job.data.source.clone(),
            reason: format!(
                "the data's vocabulary has {} tokens but [model] vocab is {}: set model.vocab to at least {}",
                data.vocab(),
                job.model.vocab,
                data.vocab()
            ),
        });
    }
    Ok(data)
}

/// Runs the job to `train.steps`, checkpointing every `checkpoint.every`
/// steps and at the end.
pub fn train(job: &JobConfig, opts: &RunOptions, observer: &mut dyn Observer) -> Result<TrainSummary, WorkerError> {
    let cfg = &job.model;
    let plan = PlacementPlan::contiguous(cfg.n_layers, cfg.n_experts, 1);
    let data = open_data(job)?;
    let (store, mut state, resumed_from) = starting_state(job, opts, &plan)?;

    // Only now, with every input checked, touch the run folder.
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|e| WorkerError::io("cannot create run folder", &opts.run_dir, e))?;
    let config_path = opts.run_dir.join("config.toml");
    std::fs::write(&config_path, job.to_toml()).map_err(|e| WorkerError::io("cannot write", &config_path, e))?;
    let metrics_path = opts.run_dir.join("metrics.jsonl");
    let mut metrics_out =
        MetricsWriter::append(&metrics_path).map_err(|e| WorkerError::io("cannot open", &metrics_path, e))?;
    store.cleanup_uncommitted()?;

    let accumulation = job.grad_accumulation(1);
    let micro = job.train.micro_batch_size;
    let seq_tokens = cfg.seq_len + 1;
    let tokens_per_step = (job.train.global_batch_size * cfg.seq_len) as u64;
    observer.on_start(&StartInfo {
        start_step: state.step,
        total_steps: job.train.steps,
        checkpoint_url: store.url().to_string(),
        resumed_from: resumed_from.clone(),
        num_params: cfg.num_params(),
        num_active_params: cfg.num_active_params(),
        tokens_per_step,
        grad_accumulation: accumulation,
    });

    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let mut grads = state.weights.zeros_like();
    let scales = LossScales {
        ce: 1.0 / tokens_per_step as f32,
        aux: cfg.aux_loss_coef / accumulation as f32,
        z: cfg.z_loss_coef / accumulation as f32,
    };
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut last_checkpoint = resumed_from.filter(|_| opts.resume == Resume::Latest);
    let start_step = state.step;
    let end = opts.stop_at.map_or(job.train.steps, |s| s.min(job.train.steps));
    while state.step < end {
        let step_started = Instant::now();
        for (_, g) in grads.tensors_mut() {
            g.fill(0.0);
        }
        let mut metrics = StepMetrics { step: state.step + 1, tokens: tokens_per_step, ..Default::default() };
        for m in 0..accumulation {
            let tokens = data.batch_for_step(
                job.train.seed,
                state.step,
                job.train.global_batch_size,
                m * micro,
                micro,
                seq_tokens,
            )?;
            let mut experts = LocalExperts::new(cfg, &state.weights.experts, &mut grads.experts);
            let stats = forward_backward(
                cfg,
                &rope,
                &state.weights.dense,
                &mut grads.dense,
                &mut experts,
                MicroBatch { tokens: &tokens, batch: micro },
                scales,
            )?;
            metrics.loss += stats.ce_sum;
            metrics.aux_loss += stats.aux_loss.iter().map(|&a| a as f64).sum::<f64>() / accumulation as f64;
            metrics.z_loss += stats.z_loss.iter().map(|&z| z as f64).sum::<f64>() / accumulation as f64;
            accumulate_routing(&mut metrics, &stats.tokens_per_expert, &stats.dropped);
        }
        metrics.loss /= tokens_per_step as f64;
        if !metrics.loss.is_finite() {
            return Err(WorkerError::NonFinite { step: state.step + 1, loss: metrics.loss });
        }

        let lr = learning_rate(&job.optim, state.step, job.train.steps);
        metrics.grad_norm = optimizer_step(job, &mut state, &mut grads, lr);
        metrics.lr = lr;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        metrics.step_time_s = step_started.elapsed().as_secs_f64();
        metrics.tokens_per_s = tokens_per_step as f64 / metrics.step_time_s;
        first_loss.get_or_insert(metrics.loss);
        last_loss = Some(metrics.loss);
        metrics_out.write(&metrics).map_err(|e| WorkerError::io("cannot write", metrics_out.path(), e))?;
        observer.on_step(&metrics);

        let every = job.checkpoint.every;
        if state.step == end || (every > 0 && state.step.is_multiple_of(every)) {
            let manifest = state.save(&store, job, &plan)?;
            store.commit(&manifest)?;
            store.prune(job.checkpoint.keep_last)?;
            let url = store.step_url(state.step);
            observer.on_checkpoint(state.step, &url);
            last_checkpoint = Some(url);
        }
    }
    Ok(TrainSummary {
        first_loss,
        last_loss,
        steps_run: state.step - start_step,
        final_step: state.step,
        checkpoint: last_checkpoint,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn accumulate_routing(metrics: &mut StepMetrics, tokens_per_expert: &[Vec<usize>], dropped: &[usize]) {
    if metrics.tokens_per_expert.is_empty() {
        metrics.tokens_per_expert = tokens_per_expert.to_vec();
        metrics.dropped = dropped.to_vec();
        return;
    }
    for (acc, layer) in metrics.tokens_per_expert.iter_mut().zip(tokens_per_expert) {
        acc.iter_mut().zip(layer).for_each(|(a, b)| *a += b);
    }
    metrics.dropped.iter_mut().zip(dropped).for_each(|(a, b)| *a += b);
}

/// Clips the gradients to `grad_clip` global norm and applies AdamW.
/// Returns the norm before clipping.
fn optimizer_step(job: &JobConfig, state: &mut TrainState, grads: &mut model::ModelWeights, lr: f32) -> f64 {
    let grad_list = grads.tensors_mut();
    let norm = grad_list.iter().map(|(_, g)| sum_of_squares(g)).sum::<f64>().sqrt();
    let factor = clip_factor(norm, job.optim.grad_clip);
    let t = state.step + 1;
    let params = state.weights.tensors_mut();
    let moments = state.exp_avg.tensors_mut().into_iter().zip(state.exp_avg_sq.tensors_mut());
    for (((name, p), (_, g)), ((_, m), (_, v))) in params.into_iter().zip(grad_list).zip(moments) {
        if factor < 1.0 {
            g.iter_mut().for_each(|x| *x *= factor);
        }
        adamw_update(&job.optim, lr, t, takes_weight_decay(&name), p, g, m, v);
    }
    norm
}
