//! Before the first step: the layout agreed with the coordinator, the
//! starting state (fresh or from a checkpoint), the data, and the run
//! folder. Every check that can refuse the job runs before anything is
//! written, on every rank alike, so a refusal stops all of them the same way.

use crate::api::{checkpoint_url, Resume, RunOptions};
use crate::attn_dispatch::attn_expert_plan;
use crate::config::JobConfig;
use crate::data::DataSource;
use crate::error::WorkerError;
use crate::metrics::MetricsWriter;
use crate::state::TrainState;
use checkpoint::CheckpointStore;
use layout::{ParallelDims, PlacementPlan};
use std::path::Path;
use wire::client::CoordinatorClient;

/// The placement plan to start from: the coordinator's when there is one
/// (after checking it serves this job's layout), else the contiguous plan
/// every rank computes alike.
pub(crate) fn agreed_plan(
    job: &JobConfig,
    dims: &ParallelDims,
    rank: usize,
    client: Option<&CoordinatorClient>,
) -> Result<PlacementPlan, WorkerError> {
    let cfg = &job.model;
    let welcome = client.map(CoordinatorClient::welcome);
    if let Some(served) = welcome.and_then(|w| w.dims) {
        if served != *dims {
            let detail = format!("coordinator {served:?}, this rank {dims:?}");
            return Err(WorkerError::NotTheSameJob { rank, what: "parallel layout", detail });
        }
    }
    match welcome.and_then(|w| w.plan.clone()) {
        Some(plan) if plan.num_ranks == dims.ep && plan.owners.len() == cfg.n_layers => Ok(plan),
        Some(plan) => {
            let detail = format!(
                "the plan is for {} ranks and {} layers, this job has {} and {}",
                plan.num_ranks,
                plan.owners.len(),
                dims.ep,
                cfg.n_layers
            );
            Err(WorkerError::NotTheSameJob { rank, what: "placement plan", detail })
        }
        None => Ok(PlacementPlan::contiguous(cfg.n_layers, cfg.n_experts, dims.ep)),
    }
}

/// Where the attention experts start when `job` partitions them: the
/// coordinator's plan when it serves one (checked against the layout),
/// else the contiguous plan every rank computes alike; None when they are
/// replicated.
pub(crate) fn agreed_attn_plan(
    job: &JobConfig,
    dims: &ParallelDims,
    rank: usize,
    client: Option<&CoordinatorClient>,
) -> Result<Option<PlacementPlan>, WorkerError> {
    let Some(own) = attn_expert_plan(job, dims.ep) else {
        return Ok(None);
    };
    let Some(served) = client.and_then(|c| c.welcome().attn_plan.clone()) else {
        return Ok(Some(own));
    };
    let shape = |p: &PlacementPlan| (p.num_ranks, p.owners.iter().map(Vec::len).collect::<Vec<_>>());
    if shape(&served) != shape(&own) {
        let detail =
            format!("the plan is for (ranks, experts per layer) {:?}, this job has {:?}", shape(&served), shape(&own));
        return Err(WorkerError::NotTheSameJob { rank, what: "attention expert plan", detail });
    }
    Ok(Some(served))
}

/// This machine's host name (per UTS namespace, as `hostname` prints it).
pub(crate) fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()))
}

/// Rank 0, once every input is checked: the run folder with the resolved
/// config, uncommitted steps and unfinished uploads of an earlier attempt
/// cleaned up (the aborted uploads' objects are returned),
/// `metrics.jsonl` cut back to `start_step` (whoever writes it next, the
/// rows of re-run steps are not kept twice) and opened unless a
/// coordinator writes it (it has every rank's report).
pub(crate) fn prepare_run_folder(
    job: &JobConfig,
    run_dir: &Path,
    store: &CheckpointStore,
    coordinated: bool,
    start_step: u64,
) -> Result<(Option<MetricsWriter>, Vec<String>), WorkerError> {
    std::fs::create_dir_all(run_dir).map_err(|e| WorkerError::io("cannot create run folder", run_dir, e))?;
    let config_path = run_dir.join("config.toml");
    std::fs::write(&config_path, job.to_toml()).map_err(|e| WorkerError::io("cannot write", &config_path, e))?;
    let path = run_dir.join("metrics.jsonl");
    wire::metrics_file::truncate_after(&path, start_step).map_err(|e| WorkerError::io("cannot rewrite", &path, e))?;
    let metrics = if coordinated {
        None
    } else {
        Some(MetricsWriter::append(&path).map_err(|e| WorkerError::io("cannot open", &path, e))?)
    };
    store.cleanup_uncommitted()?;
    let aborted_uploads = store.abort_abandoned_uploads(None)?;
    Ok((metrics, aborted_uploads))
}

/// Opens the store and finds the starting state; errors before anything is written.
pub(crate) fn starting_state(
    job: &JobConfig,
    opts: &RunOptions,
    plans: (&PlacementPlan, Option<&PlacementPlan>),
    ep_rank: usize,
) -> Result<(CheckpointStore, TrainState, Option<String>), WorkerError> {
    let (root, step) = match &opts.resume {
        Resume::From(url) => {
            let (root, step) = checkpoint::parse_step_url(url)?;
            (root, Some(step))
        }
        _ => (checkpoint_url(job, &opts.run_dir), None),
    };
    let store = CheckpointStore::open_with(&root, &job.checkpoint.store_options())?;
    let step = match (&opts.resume, step) {
        (Resume::From(_), step) => step,
        (Resume::Latest, _) => {
            let latest = store.latest_step()?;
            if latest.is_none() {
                return Err(WorkerError::NothingToResume { url: root.clone() });
            }
            latest
        }
        (Resume::LatestOrFresh, _) => store.latest_step()?,
        (Resume::No, _) => {
            if let Some(existing) = store.latest_step()? {
                return Err(WorkerError::RunFolderInUse { url: root.clone(), step: existing });
            }
            None
        }
    };
    match step {
        Some(step) => {
            let state = TrainState::load(&store, step, job, plans, ep_rank)?;
            let from = store.step_url(step);
            // Checkpoints keep going to the job's own URL.
            let store = if matches!(opts.resume, Resume::From(_)) {
                CheckpointStore::open_with(&checkpoint_url(job, &opts.run_dir), &job.checkpoint.store_options())?
            } else {
                store
            };
            Ok((store, state, Some(from)))
        }
        None => Ok((store, TrainState::fresh(job, plans.0, plans.1, ep_rank), None)),
    }
}

/// Opens the training data and checks it fits the model.
pub(crate) fn open_data(job: &JobConfig) -> Result<DataSource, WorkerError> {
    let data = job.data.open_source()?;
    data.check_len(job.model.seq_len + 1)?;
    data.check_modalities(job.model.modalities)?;
    if data.vocab() > job.model.vocab {
        return Err(WorkerError::DataDoesNotFit {
            source_name: job.data.source.clone(),
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
