//! One rank's training loop (DESIGN section 4).
//!
//! A step: for each of this rank's micro-batches, forward and backward with
//! gradients accumulated (experts reached through all-to-all when there is
//! more than one rank); all-reduce the dense gradients over the
//! data-parallel ranks and the expert gradients over expert replicas; clip
//! to the global norm across all ranks; AdamW; maybe a checkpoint. Rank 0
//! reports metrics and commits checkpoints.

use crate::attention_shards::{cut_to_shard, joined};
use crate::checkpointing::Checkpointer;
use crate::config::JobConfig;
use crate::coordination::register;
use crate::dispatch::DispatchStats;
use crate::error::WorkerError;
use crate::metrics::{MetricsWriter, RankMetrics, StepMetrics};
use crate::micro_batches::{run_micro_batches, Lane, StepInputs};
use crate::overlap::exposure::Exposure;
use crate::overlap::{dense_layer_values, RankLayout, Techniques};
use crate::preemption;
use crate::state::TrainState;
use crate::sync::{all_reduce_tensors, gather_json, sum_over_ranks};
use crate::train::{checkpoint_url, open_data, starting_state, Observer, Resume, RunOptions, StartInfo, TrainSummary};
use collectives::comm_thread::CommThread;
use collectives::Communicator;
use coordinator::client::CoordinatorClient;
use coordinator::protocol::{overlap_efficiency, StepReport};
use coordinator::{ParallelDims, PlacementPlan};
use model::model::{ForwardStats, LossScales};
use model::ops::rope::RopeTable;
use model::optim::{adamw_update, clip_factor, sum_of_squares, takes_weight_decay};
use model::schedule::learning_rate;
use model::shards::{shard_split, ShardSplit};
use model::ModelWeights;
use std::time::Instant;

/// The groups a rank talks to.
struct Groups {
    /// Every rank (replicated dense gradients).
    world_rank: usize,
    /// The ranks sharing one copy of the experts (all-to-all, norm).
    ep: Box<dyn Communicator>,
    /// The replicas of this rank's experts (expert gradients), when edp > 1.
    edp: Option<Box<dyn Communicator>>,
    /// The attention shards of this rank's micro-batches, when attn_tp > 1.
    tp: Option<Box<dyn Communicator>>,
    /// The ranks holding the same attention shard (its gradients), when attn_tp > 1 and dp > 1.
    dp: Option<Box<dyn Communicator>>,
    /// The expert-parallel group's communication thread (overlap).
    ep_pipe: Option<CommThread>,
    /// The second lane's groups, when micro-batches interleave.
    second: Option<SecondLane>,
    /// Every rank, on a communication thread: gradient buckets.
    grad_pipe: Option<CommThread>,
}

/// The groups of the second lane (see `micro_batches`).
struct SecondLane {
    ep: Box<dyn Communicator>,
    pipe: Option<CommThread>,
    tp: Option<Box<dyn Communicator>>,
}

fn groups(comm: &mut dyn Communicator, dims: &ParallelDims, techniques: &Techniques) -> Result<Groups, WorkerError> {
    let rank = comm.rank();
    let mut ep = comm.split(dims.edp_rank(rank), dims.ep_rank(rank))?;
    let edp = if dims.edp > 1 { Some(comm.split(dims.ep_rank(rank), dims.edp_rank(rank))?) } else { None };
    let sharded = dims.attn_tp > 1;
    let mut tp = if sharded { Some(comm.split(dims.dp_rank(rank), dims.tp_rank(rank))?) } else { None };
    let dp = if sharded && dims.dp > 1 { Some(comm.split(dims.tp_rank(rank), dims.dp_rank(rank))?) } else { None };
    // Copies of a group (same ranks) for communication threads and the
    // second lane: every rank makes them in the same order.
    let copy = |group: &mut dyn Communicator| group.split(0, group.rank());
    let pipe = |group: &mut dyn Communicator| -> Result<CommThread, WorkerError> {
        CommThread::spawn(copy(group)?)
            .map_err(|e| WorkerError::Layout(format!("cannot start a communication thread: {e}")))
    };
    let ep_pipe = if techniques.pipe_chunks.is_some() { Some(pipe(ep.as_mut())?) } else { None };
    let second = if techniques.interleave {
        let mut ep2 = copy(ep.as_mut())?;
        let pipe2 = if techniques.pipe_chunks.is_some() { Some(pipe(ep2.as_mut())?) } else { None };
        let tp2 = match tp.as_mut() {
            Some(tp) => Some(copy(tp.as_mut())?),
            None => None,
        };
        Some(SecondLane { ep: ep2, pipe: pipe2, tp: tp2 })
    } else {
        None
    };
    let grad_pipe = if techniques.bucket_values.is_some() { Some(pipe(comm)?) } else { None };
    Ok(Groups { world_rank: rank, ep, edp, tp, dp, ep_pipe, second, grad_pipe })
}

/// A group borrowed for a step (the trait object's lifetime shortened,
/// which `Option` does not do by itself).
fn shorter(group: &mut Option<Box<dyn Communicator>>) -> Option<&mut dyn Communicator> {
    group.as_mut().map(|g| g.as_mut() as &mut dyn Communicator)
}

/// Whether dense tensor `name` belongs to one layer (`layers.N.*`), which gradient buckets carry.
fn is_layer_tensor(name: &str) -> bool {
    name.starts_with("layers.")
}

/// Whether `name` is cut over attention shards in this layout.
fn is_sharded(dims: &ParallelDims, name: &str, d_model: usize) -> bool {
    dims.attn_tp > 1 && shard_split(name, d_model) != ShardSplit::Replicated
}

/// This machine's host name (per UTS namespace, as `hostname` prints it).
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()))
}

/// Runs this rank to the end of the job, registered with the job's
/// coordinator when there is one (it says goodbye, ok or not, at the end).
pub fn run_rank(
    job: &JobConfig,
    opts: &RunOptions,
    comm: &mut dyn Communicator,
    observer: Option<&mut dyn Observer>,
) -> Result<TrainSummary, WorkerError> {
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

fn train_rank(
    job: &JobConfig,
    opts: &RunOptions,
    comm: &mut dyn Communicator,
    mut observer: Option<&mut dyn Observer>,
    client: Option<&CoordinatorClient>,
) -> Result<TrainSummary, WorkerError> {
    let cfg = &job.model;
    let dims = job.parallel_dims().map_err(|e| WorkerError::Layout(e.to_string()))?;
    // The coordinator serves the layout and the starting plan; without one
    // every rank computes the same contiguous plan itself.
    let welcome = client.map(CoordinatorClient::welcome);
    if let Some(served) = welcome.and_then(|w| w.dims) {
        if served != dims {
            return Err(WorkerError::Coordinator(format!(
                "the coordinator's layout {served:?} differs from this rank's {dims:?}: start every role with the same job"
            )));
        }
    }
    let mut placement = match welcome.and_then(|w| w.plan.clone()) {
        Some(plan) if plan.num_ranks == dims.ep && plan.owners.len() == cfg.n_layers => plan,
        Some(plan) => {
            return Err(WorkerError::Coordinator(format!(
                "the coordinator's placement plan is for {} ranks and {} layers, this job has {} and {}",
                plan.num_ranks,
                plan.owners.len(),
                dims.ep,
                cfg.n_layers
            )))
        }
        None => PlacementPlan::contiguous(cfg.n_layers, cfg.n_experts, dims.ep),
    };
    // Balanced placement: tokens per expert since the last plan.
    let mut expert_loads = vec![vec![0.0f64; cfg.n_experts]; cfg.n_layers];
    // Which node each rank runs on: for the overlap choice, the banner (and
    // proof of a multi-node run) and node-aware placement.
    let nodes: Vec<String> = gather_json(comm, &node_name())?;
    let accumulation = job.grad_accumulation(dims.dp);
    let threads_ok = collectives::mpi::comm_threads_allowed();
    let backend = job.parallel.backend.as_str();
    let techniques = Techniques::choose(
        &job.overlap,
        &RankLayout {
            backend,
            world: dims.world,
            attn_tp: dims.attn_tp,
            micro_batches: accumulation,
            layer_grad_values: dense_layer_values(cfg),
            threads_ok,
            spans_nodes: nodes.iter().any(|n| *n != nodes[0]),
        },
    );
    let mut groups = groups(comm, &dims, &techniques)?;
    let exposure = Exposure::new(1);
    let rank = groups.world_rank;
    let lead = rank == 0;
    let data = open_data(job)?;
    // Every rank makes the same checks, so a refusal stops all of them alike.
    let (store, mut state, resumed_from) = starting_state(job, opts, &placement, dims.ep_rank(rank))?;
    if dims.attn_tp > 1 {
        cut_to_shard(&mut state, cfg.d_model, dims.tp_rank(rank), dims.attn_tp);
    }

    let mut metrics_out = None;
    if lead {
        // Only now, with every input checked, touch the run folder.
        let dir = &opts.run_dir;
        std::fs::create_dir_all(dir).map_err(|e| WorkerError::io("cannot create run folder", dir, e))?;
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, job.to_toml()).map_err(|e| WorkerError::io("cannot write", &config_path, e))?;
        // With a coordinator, it writes metrics.jsonl (it has every rank's report).
        if client.is_none() {
            let path = dir.join("metrics.jsonl");
            metrics_out = Some(MetricsWriter::append(&path).map_err(|e| WorkerError::io("cannot open", &path, e))?);
        }
        store.cleanup_uncommitted()?;
    }
    let mut saver = Checkpointer::new(store, client, job.checkpoint.keep_last);

    let micro = job.train.micro_batch_size;
    let per_rank = job.train.global_batch_size / dims.dp;
    let tokens_per_step = (job.train.global_batch_size * cfg.seq_len) as u64;
    if let Some(obs) = observer.as_deref_mut() {
        obs.on_start(&StartInfo {
            start_step: state.step,
            total_steps: job.train.steps,
            checkpoint_url: saver.store().url().to_string(),
            resumed_from: resumed_from.clone(),
            num_params: cfg.num_params(),
            num_active_params: cfg.num_active_params(),
            tokens_per_step,
            grad_accumulation: accumulation,
            dims,
            nodes: nodes.clone(),
            overlap: techniques,
        });
    }

    let rope = RopeTable::new(cfg.seq_len, cfg.head_dim(), cfg.rope_theta);
    let mut grads = state.weights.zeros_like();
    // The second lane's gradients, added into `grads` after the passes.
    let mut grads_b = groups.second.as_ref().map(|_| state.weights.zeros_like());
    // Every micro-batch of the global batch counts once in the aux and z terms.
    let micro_batches = (dims.dp * accumulation) as f32;
    let scales = LossScales {
        ce: 1.0 / tokens_per_step as f32,
        aux: cfg.aux_loss_coef / micro_batches,
        z: cfg.z_loss_coef / micro_batches,
    };
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut last_checkpoint = resumed_from.filter(|_| matches!(opts.resume, Resume::Latest | Resume::LatestOrFresh));
    let start_step = state.step;
    let end = opts.stop_at.map_or(job.train.steps, |s| s.min(job.train.steps));
    let mut stopped_early = false;
    while state.step < end {
        let step_started = Instant::now();
        for (_, g) in grads.tensors_mut() {
            g.fill(0.0);
        }
        let mut local = LocalStep::default();
        let inputs = StepInputs {
            job,
            dims,
            rope: &rope,
            weights: &state.weights,
            placement: &placement,
            scales,
            data: &data,
            step: state.step,
            first_sequence: dims.dp_rank(rank) * per_rank,
            techniques,
            exposure: &exposure,
        };
        let Groups { ep, ep_pipe, tp, second, grad_pipe, .. } = &mut groups;
        let mut lane_a = Lane { ep: ep.as_mut(), pipe: ep_pipe.as_ref(), tp: shorter(tp), grads: &mut grads };
        let mut lane_b = match (second.as_mut(), grads_b.as_mut()) {
            (Some(second), Some(grads)) => {
                grads.tensors_mut().into_iter().for_each(|(_, g)| g.fill(0.0));
                Some(Lane { ep: second.ep.as_mut(), pipe: second.pipe.as_ref(), tp: shorter(&mut second.tp), grads })
            }
            _ => None,
        };
        let passes = run_micro_batches(&inputs, &mut lane_a, lane_b.as_mut(), accumulation, grad_pipe.as_ref())?;
        let bucket_s = passes.bucket_s;
        local.compute_s = passes.wall_s;
        for r in &passes.results {
            local.dispatch.add(&r.dispatch);
            local.add(&r.stats);
        }

        // Gradient sync: replicated dense tensors over every rank, attention
        // shards over the ranks holding the same shard, experts over replicas.
        // Buckets already summed the layers' dense gradients of both lanes.
        let sync_started = Instant::now();
        if let Some(grads_b) = grads_b.as_ref() {
            let bucketed = bucket_s.is_some();
            let dense = grads.dense.tensors_mut().into_iter().zip(grads_b.dense.tensors());
            let dense = dense.filter(|((name, _), _)| !(bucketed && is_layer_tensor(name)));
            let experts = grads.experts.tensors_mut().into_iter().zip(grads_b.experts.tensors());
            for ((_, g), (_, b)) in dense.chain(experts) {
                g.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
        }
        if dims.world > 1 {
            let (sharded, replicated): (Vec<_>, Vec<_>) =
                grads.dense.tensors_mut().into_iter().partition(|(name, _)| is_sharded(&dims, name, cfg.d_model));
            let replicated = replicated.into_iter().filter(|(name, _)| bucket_s.is_none() || !is_layer_tensor(name));
            all_reduce_tensors(comm, replicated.collect())?;
            if let Some(dp) = groups.dp.as_mut() {
                all_reduce_tensors(dp.as_mut(), sharded)?;
            }
        }
        if let Some(edp) = groups.edp.as_mut() {
            all_reduce_tensors(edp.as_mut(), grads.experts.tensors_mut())?;
        }
        sum_expert_replicas(groups.ep.as_mut(), &placement, &mut grads.experts, cfg)?;
        // Replicated gradients are identical everywhere now; each attention
        // shard counts once per shard group, each expert once per EP group.
        let (mut dense_sq, mut shard_sq) = (0.0f64, [0.0f64]);
        for (name, g) in grads.dense.tensors() {
            if is_sharded(&dims, &name, cfg.d_model) {
                shard_sq[0] += sum_of_squares(g);
            } else {
                dense_sq += sum_of_squares(g);
            }
        }
        if let Some(tp) = groups.tp.as_mut() {
            tp.all_reduce_sum_f64(&mut shard_sq)?;
        }
        let ep_rank = dims.ep_rank(rank);
        let mut expert_sq = [0.0f64];
        for (l, layer) in grads.experts.layers.iter().enumerate() {
            for (_, g) in layer.iter().filter(|(&e, _)| placement.owner(l, e) == ep_rank) {
                for t in [&g.w1, &g.w3, &g.w2] {
                    expert_sq[0] += sum_of_squares(t);
                }
            }
        }
        groups.ep.all_reduce_sum_f64(&mut expert_sq)?;
        let grad_norm = (dense_sq + shard_sq[0] + expert_sq[0]).sqrt();
        let sync_s = sync_started.elapsed().as_secs_f64();
        local.comm_s = local.dispatch.alltoall_s + bucket_s.unwrap_or(0.0) + sync_s;
        local.exposed_comm_s = exposure.take().as_secs_f64() + sync_s;

        let micro_batches_global = (job.train.global_batch_size / micro) as f64;
        let (mut metrics, preempted) =
            local.reduce(comm, dims.world, rank, tokens_per_step, micro_batches_global, cfg.n_experts)?;
        metrics.step = state.step + 1;
        metrics.sync_s = sync_s;
        if !metrics.loss.is_finite() {
            return Err(WorkerError::NonFinite { step: state.step + 1, loss: metrics.loss });
        }
        let lr = learning_rate(&job.optim, state.step, job.train.steps);
        optimizer_step(job, &mut state, &mut grads, lr, grad_norm);
        metrics.lr = lr;
        metrics.grad_norm = grad_norm;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        // SIGTERM on any rank (agreed in the metrics reduction): every rank saves this step and stops.
        // The save's copy (and any wait for the previous upload) is part of the step.
        let every = job.checkpoint.every;
        if state.step == end || preempted || (every > 0 && state.step.is_multiple_of(every)) {
            let stall = match groups.tp.as_mut() {
                // Checkpoints hold full tensors: join the attention shards first.
                Some(tp) => {
                    let full = joined(&state, tp.as_mut(), cfg.d_model)?;
                    saver.save(comm, job, &dims, &placement, &full)?
                }
                None => saver.save(comm, job, &dims, &placement, &state)?,
            };
            metrics.checkpoint_s = stall.waited_s + stall.save_s;
            if state.step == end || preempted {
                // The job is done only when its last checkpoint is committed.
                saver.finish()?;
            }
        }
        metrics.step_time_s = step_started.elapsed().as_secs_f64();
        metrics.tokens_per_s = tokens_per_step as f64 / metrics.step_time_s;
        first_loss.get_or_insert(metrics.loss);
        last_loss = Some(metrics.loss);
        if let Some(out) = metrics_out.as_mut() {
            out.write(&metrics).map_err(|e| WorkerError::io("cannot write", out.path(), e))?;
        }
        if let Some(obs) = observer.as_deref_mut() {
            obs.on_step(&metrics);
        }
        if let Some(client) = client {
            report_step(client, rank, &state, &local, &metrics)?;
        }
        if let Some(step) = saver.newly_committed() {
            let url = saver.store().step_url(step);
            if let Some(obs) = observer.as_deref_mut() {
                obs.on_checkpoint(step, &url);
            }
            last_checkpoint = Some(url);
        }
        if preempted {
            stopped_early = true;
            break;
        }

        for (acc, layer) in expert_loads.iter_mut().zip(&metrics.tokens_per_expert) {
            acc.iter_mut().zip(layer).for_each(|(a, &t)| *a += t as f64);
        }
        let rebalance = job.parallel.rebalance_every;
        if job.parallel.placement == "balanced" && state.step < end && state.step.is_multiple_of(rebalance) {
            let redundant = if job.parallel.redundant_experts == 0 { dims.ep } else { job.parallel.redundant_experts };
            let plan = PlacementPlan::balanced_on_nodes(&expert_loads, &ep_nodes(&dims, &nodes), redundant);
            let (before, after) = (max_over_mean(&placement, &expert_loads), max_over_mean(&plan, &expert_loads));
            // Only a clearly better plan is worth moving experts for.
            if plan != placement && after < before * 0.98 {
                // Expert weights and their optimizer state move to their new
                // ranks through a committed checkpoint of this step, loaded
                // onto the new plan: the same path as a resume on another layout.
                let full = match groups.tp.as_mut() {
                    Some(tp) => joined(&state, tp.as_mut(), cfg.d_model)?,
                    None => state.clone(),
                };
                saver.save(comm, job, &dims, &placement, &full)?;
                saver.finish()?;
                state = TrainState::load(saver.store(), state.step, job, &plan, dims.ep_rank(rank))?;
                if dims.attn_tp > 1 {
                    cut_to_shard(&mut state, cfg.d_model, dims.tp_rank(rank), dims.attn_tp);
                }
                grads = state.weights.zeros_like();
                // The second lane holds gradients of the new placement's experts too.
                grads_b = grads_b.map(|_| state.weights.zeros_like());
                if let Some(obs) = observer.as_deref_mut() {
                    obs.on_rebalance(state.step, before, after);
                }
                placement = plan;
            }
            expert_loads.iter_mut().for_each(|l| l.fill(0.0));
        }
    }
    Ok(TrainSummary {
        first_loss,
        last_loss,
        steps_run: state.step - start_step,
        final_step: state.step,
        checkpoint: last_checkpoint,
        seconds: started.elapsed().as_secs_f64(),
        preempted: stopped_early,
    })
}

/// The node of each expert-parallel position (as node numbers, from the
/// ranks' host names): every EP group holds the same plan, so the first
/// group's machines stand for all of them.
fn ep_nodes(dims: &ParallelDims, hosts: &[String]) -> Vec<usize> {
    let mut names: Vec<&str> = Vec::new();
    let mut nodes = vec![0; dims.ep];
    for (rank, host) in hosts.iter().enumerate().filter(|&(rank, _)| dims.edp_rank(rank) == 0) {
        let id = names.iter().position(|n| n == host).unwrap_or_else(|| {
            names.push(host);
            names.len() - 1
        });
        nodes[dims.ep_rank(rank)] = id;
    }
    nodes
}

/// The busiest rank's expert tokens over the mean, worst layer, under `plan`.
fn max_over_mean(plan: &PlacementPlan, loads: &[Vec<f64>]) -> f64 {
    plan.rank_loads(loads)
        .iter()
        .map(|ranks| {
            let mean = ranks.iter().sum::<f64>() / ranks.len() as f64;
            if mean > 0.0 {
                ranks.iter().cloned().fold(0.0, f64::max) / mean
            } else {
                1.0
            }
        })
        .fold(1.0, f64::max)
}

/// Sums the gradients of experts that have several owners in the plan
/// (replicas of hot experts) over the expert-parallel group, so every
/// replica applies the same update.
fn sum_expert_replicas(
    ep: &mut dyn Communicator,
    plan: &PlacementPlan,
    grads: &mut model::weights::ExpertStore,
    cfg: &model::ModelConfig,
) -> Result<(), WorkerError> {
    let replicated: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| plan.owners[l][e].len() > 1)
        .collect();
    if replicated.is_empty() {
        return Ok(());
    }
    let size = 3 * cfg.ffn_hidden * cfg.d_model;
    let mut flat = vec![0.0f32; replicated.len() * size];
    for (slot, &(l, e)) in flat.chunks_exact_mut(size).zip(&replicated) {
        if let Some(g) = grads.layers[l].get(&e) {
            let n = g.w1.len();
            slot[..n].copy_from_slice(&g.w1);
            slot[n..2 * n].copy_from_slice(&g.w3);
            slot[2 * n..].copy_from_slice(&g.w2);
        }
    }
    ep.all_reduce_sum(&mut flat)?;
    for (slot, &(l, e)) in flat.chunks_exact(size).zip(&replicated) {
        if let Some(g) = grads.layers[l].get_mut(&e) {
            let n = g.w1.len();
            g.w1.copy_from_slice(&slot[..n]);
            g.w3.copy_from_slice(&slot[n..2 * n]);
            g.w2.copy_from_slice(&slot[2 * n..]);
        }
    }
    Ok(())
}

/// Sends this rank's numbers of the step just done; a stop from the
/// coordinator (another rank was lost) ends the run here.
fn report_step(
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
    client.report(report).map_err(|e| WorkerError::Coordinator(e.to_string()))?;
    match client.stop_reason() {
        Some(reason) => Err(WorkerError::Stopped(reason)),
        None => Ok(()),
    }
}

/// What this rank measured during one step, before reduction over ranks.
#[derive(Default)]
struct LocalStep {
    ce_sum: f64,
    aux: f64,
    z: f64,
    tokens_per_expert: Vec<Vec<usize>>,
    dropped: Vec<usize>,
    tokens: usize,
    compute_s: f64,
    dispatch: DispatchStats,
    /// Communication time (all-to-all, gradient buckets, gradient sync)
    /// and the part of it no computation hid.
    comm_s: f64,
    exposed_comm_s: f64,
}

impl LocalStep {
    fn add(&mut self, stats: &ForwardStats) {
        self.ce_sum += stats.ce_sum;
        self.aux += stats.aux_loss.iter().map(|&a| a as f64).sum::<f64>();
        self.z += stats.z_loss.iter().map(|&z| z as f64).sum::<f64>();
        self.tokens += stats.num_tokens;
        if self.tokens_per_expert.is_empty() {
            self.tokens_per_expert = stats.tokens_per_expert.clone();
            self.dropped = stats.dropped.clone();
            return;
        }
        for (acc, layer) in self.tokens_per_expert.iter_mut().zip(&stats.tokens_per_expert) {
            acc.iter_mut().zip(layer).for_each(|(a, b)| *a += b);
        }
        self.dropped.iter_mut().zip(&stats.dropped).for_each(|(a, b)| *a += b);
    }

    /// Sums over ranks into the step's metrics (identical on every rank),
    /// and whether any rank got SIGTERM: the flag rides in the same
    /// all-reduce so pre-emption costs the step no extra collective.
    fn reduce(
        &self,
        comm: &mut dyn Communicator,
        world: usize,
        rank: usize,
        tokens_per_step: u64,
        micro_batches_global: f64,
        n_experts: usize,
    ) -> Result<(StepMetrics, bool), WorkerError> {
        let mut totals = vec![self.ce_sum, self.aux, self.z];
        for layer in &self.tokens_per_expert {
            totals.extend(layer.iter().map(|&c| c as f64));
        }
        totals.extend(self.dropped.iter().map(|&c| c as f64));
        totals.push(if preemption::requested() { 1.0 } else { 0.0 });
        sum_over_ranks(comm, &mut totals)?;
        let preempted = totals.pop().is_some_and(|flag| flag > 0.0);
        let per_rank_values = [
            self.tokens as f64,
            self.dispatch.rows_computed as f64,
            self.compute_s,
            self.dispatch.alltoall_s,
            self.dispatch.expert_s,
            self.dispatch.bytes_sent as f64,
            self.dispatch.bytes_received as f64,
            self.comm_s,
            self.exposed_comm_s,
            self.dispatch.alltoall_exposed_s,
        ];
        let width = per_rank_values.len();
        let mut slots = vec![0.0; world * width];
        slots[rank * width..(rank + 1) * width].copy_from_slice(&per_rank_values);
        sum_over_ranks(comm, &mut slots)?;
        let per_rank: Vec<RankMetrics> = slots
            .chunks_exact(width)
            .enumerate()
            .map(|(r, v)| RankMetrics {
                rank: r,
                tokens: v[0] as u64,
                expert_rows: v[1] as u64,
                compute_s: v[2],
                alltoall_s: v[3],
                expert_s: v[4],
                alltoall_bytes_sent: v[5] as u64,
                alltoall_bytes_received: v[6] as u64,
                comm_s: v[7],
                exposed_comm_s: v[8],
                alltoall_waited_s: v[9],
            })
            .collect();
        let layers = self.tokens_per_expert.len();
        let mut cursor = 3;
        let tokens_per_expert: Vec<Vec<usize>> = (0..layers)
            .map(|_| {
                let layer = totals[cursor..cursor + n_experts].iter().map(|&c| c as usize).collect();
                cursor += n_experts;
                layer
            })
            .collect();
        let dropped = totals[cursor..cursor + layers].iter().map(|&c| c as usize).collect();
        let metrics = StepMetrics {
            loss: totals[0] / tokens_per_step as f64,
            aux_loss: totals[1] / micro_batches_global,
            z_loss: totals[2] / micro_batches_global,
            tokens: tokens_per_step,
            tokens_per_expert,
            dropped,
            alltoall_bytes_sent: per_rank.iter().map(|r| r.alltoall_bytes_sent).sum(),
            alltoall_bytes_received: per_rank.iter().map(|r| r.alltoall_bytes_received).sum(),
            alltoall_s: per_rank.iter().map(|r| r.alltoall_s).fold(0.0, f64::max),
            expert_s: per_rank.iter().map(|r| r.expert_s).fold(0.0, f64::max),
            compute_s: per_rank.iter().map(|r| r.compute_s).fold(0.0, f64::max),
            comm_s: per_rank.iter().map(|r| r.comm_s).fold(0.0, f64::max),
            exposed_comm_s: per_rank.iter().map(|r| r.exposed_comm_s).fold(0.0, f64::max),
            overlap_efficiency: overlap_efficiency(per_rank.iter().map(|r| (r.comm_s, r.exposed_comm_s))),
            per_rank,
            ..Default::default()
        };
        Ok((metrics, preempted))
    }
}

/// Clips to `max_norm` given the global norm and applies AdamW to this
/// rank's tensors (dense replicas update identically everywhere).
fn optimizer_step(job: &JobConfig, state: &mut TrainState, grads: &mut ModelWeights, lr: f32, grad_norm: f64) {
    let factor = clip_factor(grad_norm, job.optim.grad_clip);
    let t = state.step + 1;
    let params = state.weights.tensors_mut();
    let moments = state.exp_avg.tensors_mut().into_iter().zip(state.exp_avg_sq.tensors_mut());
    for (((name, p), (_, g)), ((_, m), (_, v))) in params.into_iter().zip(grads.tensors_mut()).zip(moments) {
        if factor < 1.0 {
            g.iter_mut().for_each(|x| *x *= factor);
        }
        adamw_update(&job.optim, lr, t, takes_weight_decay(&name), p, g, m, v);
    }
}
