//! One rank's training loop (DESIGN section 4), as named parts:
//!
//! - `start`: the layout agreed with the coordinator, the starting state,
//!   the data and the run folder, checked before anything is written;
//! - `groups`: the communicators split from the world once;
//! - `passes`: the step's micro-batches, forward and backward, with
//!   experts reached through all-to-all when there is more than one rank;
//! - `grad_sync`: gradients summed over the groups the layout asks for,
//!   and the global norm;
//! - `update`: clipping and AdamW;
//! - `step_metrics`: the step's numbers summed over ranks, and the report
//!   to the coordinator;
//! - checkpoints through `crate::checkpointing` (rank 0's coordinator
//!   commits them), and `rebalance` for balanced placement.
//!
//! [`RankRun`] holds what lives from one step to the next; each part is an
//! `impl` block or function in its own file, and `train_rank` below is the
//! loop that calls them in order.

mod grad_sync;
mod groups;
mod nodes;
mod passes;
mod rebalance;
pub(crate) mod start;
mod step_metrics;
pub mod straggler;
mod update;
mod validation;

use crate::api::{checkpoint_url, Observer, Resume, RunOptions, StartInfo, TrainSummary};
use crate::attention_shards::{cut_to_shard, joined};
use crate::checkpointing::{Checkpointer, SaveAt, SaveKind, SaveStall};
use crate::config::{Backend, JobConfig};
use crate::coordination::register;
use crate::data::DataSource;
use crate::dispatch::RowBudget;
use crate::error::WorkerError;
use crate::metrics::MetricsWriter;
use crate::overlap::exposure::Exposure;
use crate::overlap::{dense_layer_values, RankLayout, Techniques};
use crate::state::TrainState;
use crate::sync::gather_json;
use collectives::Communicator;
use groups::Groups;
use layout::{ParallelDims, Placement, PlacementPlan};
use model::model::LossScales;
use model::ops::rope::RopeTable;
use model::schedule::learning_rate;
use model::ModelWeights;
use start::{agreed_attn_plan, agreed_plan, node_name, open_data, prepare_run_folder, starting_state};
use std::time::Instant;
use step_metrics::{report_step, StepShape};
use wire::client::CoordinatorClient;

/// Runs this rank to the end of the job, registered with the job's
/// coordinator when there is one (it says goodbye, ok or not, at the end).
pub fn run_rank(
    job: &JobConfig,
    opts: &RunOptions,
    comm: &mut dyn Communicator,
    observer: Option<&mut dyn Observer>,
) -> Result<TrainSummary, WorkerError> {
    // The timeline's track (`train --trace`): this thread and those it starts.
    collectives::trace_rank::set(comm.rank());
    let client = match &opts.coordinator {
        Some(link) => {
            let checkpoints = checkpoint_url(job, &opts.run_dir);
            Some(register(link, comm.rank(), &node_name(), &job.to_toml(), &checkpoints)?)
        }
        None => None,
    };
    let result = train_rank(job, opts, comm, observer, client.as_ref());
    if let Some(client) = client {
        let _ = client.finish(result.is_ok());
    }
    result
}

/// The steps from the starting state to the end (or a SIGTERM).
fn train_rank(
    job: &JobConfig,
    opts: &RunOptions,
    comm: &mut dyn Communicator,
    mut observer: Option<&mut dyn Observer>,
    client: Option<&CoordinatorClient>,
) -> Result<TrainSummary, WorkerError> {
    let (mut run, start) = RankRun::start(job, opts, comm, client)?;
    if let Some(obs) = observer.as_deref_mut() {
        obs.on_start(&start);
    }
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let resumed = matches!(opts.resume, Resume::Latest | Resume::LatestOrFresh);
    let mut last_checkpoint = start.resumed_from.filter(|_| resumed);
    let mut preempted = false;
    // The common start the ranks' all-to-all arrivals are measured from:
    // a barrier now, then the end of each step's metrics reduction (an
    // all-rank collective), so every rank takes it within one message's
    // latency of the others.
    run.comm.barrier()?;
    let mut epoch = Instant::now();
    let slow_rank = straggler::delay_of(run.comm.rank());
    while run.state.step < run.end {
        let _step = tracing::info_span!("step", step = run.state.step + 1).entered();
        let step_started = Instant::now();
        if let Some(delay) = slow_rank {
            std::thread::sleep(delay);
        }
        let mut local = run.passes()?;
        local.step.expert_bias_hash = update::expert_bias_hash(&run.state.weights.dense);
        let sync_started = Instant::now();
        let syncing = tracing::info_span!("gradient all-reduce").entered();
        let grad_norm = run.sync_gradients(local.bucket_s.is_some())?;
        drop(syncing);
        let sync_s = sync_started.elapsed().as_secs_f64();
        local.step.comm_s = local.step.dispatch.alltoall_s + local.bucket_s.unwrap_or(0.0) + sync_s;
        local.step.exposed_comm_s = run.exposure.take().as_secs_f64() + sync_s;
        if client.is_some_and(CoordinatorClient::save_and_stop_asked) {
            crate::preemption::request_by_coordinator();
        }
        let (mut metrics, stop) = local.step.reduce(run.comm, &run.shape, epoch)?;
        epoch = Instant::now();
        preempted = stop;
        metrics.step = run.state.step + 1;
        metrics.sync_s = sync_s;
        metrics.placement = run.placement_news.take();
        if !metrics.loss.is_finite() {
            return Err(WorkerError::NonFinite { step: run.state.step + 1, loss: metrics.loss });
        }
        metrics.lr = learning_rate(&job.optim, run.state.step, job.train.steps);
        metrics.grad_norm = grad_norm;
        let optimizing = tracing::info_span!("optimizer").entered();
        update::optimizer_step(job, &mut run.state, &mut run.grads, metrics.lr, grad_norm);
        drop(optimizing);
        metrics.expert_bias = update::expert_bias_step(job, &mut run.state, &metrics.expert_load);
        run.state.step += 1;
        run.state.tokens_seen += run.tokens_per_step;
        // The save's copy (and any wait for the previous upload) is part of the step.
        metrics.checkpoint_s = run.checkpoint_if_due(preempted)?;
        metrics.step_time_s = step_started.elapsed().as_secs_f64();
        metrics.tokens_per_s = run.tokens_per_step as f64 / metrics.step_time_s;
        // After the update, outside the step's time.
        metrics.eval_loss = run.validate_if_due()?;
        first_loss.get_or_insert(metrics.loss);
        last_loss = Some(metrics.loss);
        if let Some(out) = run.metrics_out.as_mut() {
            out.write(&metrics).map_err(|e| WorkerError::io("cannot write", out.path(), e))?;
        }
        if let Some(obs) = observer.as_deref_mut() {
            obs.on_step(&metrics);
        }
        if let Some(client) = client {
            report_step(client, run.rank, &run.state, &local.step, &metrics)?;
        }
        if let Some(step) = run.saver.newly_committed() {
            let url = run.saver.store().step_url(step);
            if let Some(obs) = observer.as_deref_mut() {
                obs.on_checkpoint(step, &url);
            }
            last_checkpoint = Some(url);
        }
        if preempted {
            break;
        }
        if let Some((before, after)) = run.maybe_rebalance(&metrics.tokens_per_expert, &metrics.attn_load)? {
            if let Some(obs) = observer.as_deref_mut() {
                obs.on_rebalance(run.state.step, before, after);
            }
        }
    }
    Ok(TrainSummary {
        first_loss,
        last_loss,
        steps_run: run.state.step - start.start_step,
        final_step: run.state.step,
        checkpoint: last_checkpoint,
        seconds: started.elapsed().as_secs_f64(),
        preempted,
    })
}

/// What one rank holds from one step to the next.
pub(crate) struct RankRun<'a> {
    job: &'a JobConfig,
    /// Every rank of the job.
    comm: &'a mut dyn Communicator,
    groups: Groups,
    dims: ParallelDims,
    /// This rank in the world.
    rank: usize,
    /// The node (host name) of every rank, in rank order.
    nodes: Vec<String>,
    /// The node number of each rank of this rank's expert-parallel group.
    ep_nodes: Vec<usize>,
    techniques: Techniques,
    exposure: Exposure,
    data: DataSource,
    rope: RopeTable,
    scales: LossScales,
    /// Micro-batches per rank per step.
    accumulation: usize,
    tokens_per_step: u64,
    /// The sizes the step's metrics are reduced with.
    shape: StepShape,
    /// The step the run stops at (`train.steps`, or `--stop-at`).
    end: u64,
    placement: PlacementPlan,
    /// Where MoA's attention experts live when partitioned (fixed for the run).
    attn_placement: Option<PlacementPlan>,
    /// The plan to report in the next step's metrics row: the attempt's
    /// first plan, then each re-plan.
    placement_news: Option<crate::metrics::PlacementReport>,
    /// The bound on rows this rank's experts take per exchange.
    row_budget: Option<RowBudget>,
    /// Balanced placement: tokens per expert since the last plan, and per
    /// attention expert (when partitioned).
    expert_loads: Vec<Vec<f64>>,
    attn_loads: Vec<Vec<f64>>,
    state: TrainState,
    grads: ModelWeights,
    /// The second lane's gradients, added into `grads` after the passes.
    grads_b: Option<ModelWeights>,
    saver: Checkpointer<'a>,
    metrics_out: Option<MetricsWriter>,
    /// `[data] eval_source`'s windows, when `[train] eval_every` is on.
    eval_set: Option<validation::EvalSet>,
}

/// The configured bound on rows per exchange, else what fits this machine.
fn row_budget(job: &JobConfig, opts: &RunOptions) -> Option<RowBudget> {
    let rows = match job.parallel.max_expert_rows {
        0 => opts.expert_rows_that_fit?,
        rows => rows,
    };
    Some(RowBudget { rows, overflow: job.parallel.expert_overflow })
}

impl<'a> RankRun<'a> {
    /// Everything before the first step; nothing is written until every
    /// input is checked.
    fn start(
        job: &'a JobConfig,
        opts: &RunOptions,
        comm: &'a mut dyn Communicator,
        client: Option<&'a CoordinatorClient>,
    ) -> Result<(Self, StartInfo), WorkerError> {
        let cfg = &job.model;
        let dims = job.parallel_dims()?;
        let rank = comm.rank();
        let placement = agreed_plan(job, &dims, rank, client)?;
        // Which node each rank runs on: for the overlap choice, the banner
        // (and proof of a multi-node run) and node-aware placement.
        let nodes: Vec<String> = gather_json(comm, &node_name())?;
        let placement = match job.parallel.placement {
            Placement::Grouped => {
                PlacementPlan::grouped(cfg.n_layers, cfg.n_experts, cfg.n_groups, &nodes::ep_nodes(&dims, &nodes, 0))?
            }
            _ => placement,
        };
        let accumulation = job.grad_accumulation(dims.dp);
        let mut techniques = Techniques::choose(
            &job.overlap,
            &RankLayout {
                backend: job.parallel.backend,
                world: dims.world,
                attn_tp: dims.attn_tp,
                micro_batches: accumulation,
                layer_grad_values: dense_layer_values(cfg),
                // MPI's thread level binds MPI ranks only: threads of the
                // local backend may always talk at once.
                threads_ok: job.parallel.backend != Backend::Mpi || collectives::mpi::comm_threads_allowed(),
                spans_nodes: nodes.iter().any(|n| *n != nodes[0]),
            },
        );
        let attn_placement = agreed_attn_plan(job, &dims, rank, client)?;
        if attn_placement.is_some() {
            // Buckets sum every layer's dense gradients over all ranks; a
            // partitioned attention expert's go over its replicas only.
            techniques.bucket_values = None;
        }
        let groups = Groups::split(comm, &dims, &techniques)?;
        let data = open_data(job)?;
        let eval_set = validation::EvalSet::load(job)?;
        let plans = (&placement, attn_placement.as_ref());
        let (store, mut state, resumed_from) = starting_state(job, opts, plans, dims.ep_rank(rank))?;
        cut_to_rank_shard(&mut state, cfg.d_model, &dims, rank);
        let (metrics_out, aborted_uploads) = if rank == 0 {
            prepare_run_folder(job, &opts.run_dir, &store, client.is_some(), state.step)?
        } else {
            (None, Vec::new())
        };
        let saver = Checkpointer::new(store, client, job.checkpoint.keep_last);
        let tokens_per_step = (job.train.global_batch_size * cfg.seq_len) as u64;
        // Every micro-batch of the global batch counts once in the aux and z terms.
        let micro_batches = dims.dp * accumulation;
        let info = StartInfo {
            start_step: state.step,
            total_steps: job.train.steps,
            checkpoint_url: saver.store().url().to_string(),
            resumed_from,
            num_params: cfg.num_params(),
            num_active_params: cfg.num_active_params(),
            tokens_per_step,
            grad_accumulation: accumulation,
            dims,
            nodes: nodes.clone(),
            overlap: techniques,
            aborted_uploads,
            precision: crate::precision::resolve(job).line,
        };
        let grads = state.weights.zeros_like();
        let mut run = RankRun {
            job,
            comm,
            grads_b: groups.second.as_ref().map(|_| state.weights.zeros_like()),
            groups,
            dims,
            rank,
            ep_nodes: nodes::ep_nodes(&dims, &nodes, dims.edp_rank(rank)),
            nodes,
            techniques,
            exposure: Exposure::new(1),
            data,
            rope: RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta),
            scales: LossScales {
                ce: 1.0 / tokens_per_step as f32,
                aux: cfg.aux_loss_coef / micro_batches as f32,
                z: cfg.z_loss_coef / micro_batches as f32,
                seq: cfg.seq_aux_loss_coef / micro_batches as f32,
                attn_aux: cfg.attn_aux_loss_coef / micro_batches as f32,
            },
            accumulation,
            tokens_per_step,
            shape: StepShape {
                world: dims.world,
                rank,
                tokens_per_step,
                micro_batches: micro_batches as f64,
                n_experts: cfg.n_experts,
                loads: cfg.expert_bias,
                router_outputs: cfg.n_router_outputs(),
                assignments_per_token: cfg.top_k * cfg.n_layers,
                attn_outputs: cfg.attention_choices(),
                ep: dims.ep,
            },
            end: opts.stop_at.map_or(job.train.steps, |s| s.min(job.train.steps)),
            expert_loads: vec![vec![0.0f64; cfg.n_experts]; cfg.n_layers],
            attn_loads: vec![vec![0.0f64; cfg.attn_experts]; cfg.n_layers],
            placement,
            attn_placement,
            placement_news: None,
            row_budget: row_budget(job, opts),
            state,
            grads,
            saver,
            metrics_out,
            eval_set,
        };
        run.placement_news = Some(run.placement_report("start", None));
        Ok((run, info))
    }

    /// Keeps this rank's attention shard of a state loaded whole (a rebalance).
    fn cut_to_this_shard(&mut self) {
        cut_to_rank_shard(&mut self.state, self.job.model.d_model, &self.dims, self.rank);
    }

    /// Gradient sync over the layout's groups; returns the global norm.
    fn sync_gradients(&mut self, bucketed: bool) -> Result<f64, WorkerError> {
        let inputs = grad_sync::SyncInputs {
            cfg: &self.job.model,
            dims: self.dims,
            ep_rank: self.dims.ep_rank(self.rank),
            placement: &self.placement,
            attn_placement: self.attn_placement.as_ref(),
            bucketed,
        };
        grad_sync::sync_gradients(self.comm, &mut self.groups, &mut self.grads, self.grads_b.as_ref(), &inputs)
    }

    /// Saves this step when it is a checkpoint step, the last one, or the
    /// ranks agreed to stop on SIGTERM (`preempted`); returns the seconds
    /// the step spent on it. The job is done only when its last checkpoint
    /// is committed, so the last save is waited for.
    fn checkpoint_if_due(&mut self, preempted: bool) -> Result<f64, WorkerError> {
        let (step, every) = (self.state.step, self.job.checkpoint.every);
        let last = step == self.end || preempted;
        let periodic = every > 0 && step.is_multiple_of(every);
        if !(last || periodic) {
            return Ok(0.0);
        }
        let kind = if last { SaveKind::InPlace } else { SaveKind::Background };
        let stall = self.save_checkpoint(kind)?;
        if last {
            self.saver.finish()?;
        }
        Ok(stall.waited_s + stall.save_s)
    }

    /// Starts saving this step (every rank at once). Checkpoints hold full
    /// tensors, so attention shards are joined first.
    fn save_checkpoint(&mut self, kind: SaveKind) -> Result<SaveStall, WorkerError> {
        let at = SaveAt { job: self.job, dims: &self.dims, placement: &self.placement };
        match self.groups.tp.as_mut() {
            Some(tp) => {
                let full = joined(&self.state, tp.as_mut(), at.job.model.d_model)?;
                self.saver.save(self.comm, at, &full, kind)
            }
            None => self.saver.save(self.comm, at, &self.state, kind),
        }
    }
}

/// With attention shards, keeps only `rank`'s part of the dense attention
/// tensors (checkpoints and fresh starts hold full tensors).
fn cut_to_rank_shard(state: &mut TrainState, d_model: usize, dims: &ParallelDims, rank: usize) {
    if dims.attn_tp > 1 {
        cut_to_shard(state, d_model, dims.tp_rank(rank), dims.attn_tp);
    }
}
