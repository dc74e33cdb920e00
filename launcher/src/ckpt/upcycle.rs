//! `switchyard ckpt upcycle`: Sparse Upcycling (Komatsuzaki et al., arXiv
//! 2212.05055) of a one-expert model, the form `ckpt import` gives a dense
//! Hugging Face model, into a run folder with E experts: every expert starts
//! as a copy of the dense FFN (plus seeded noise when asked), the router new
//! and randomly initialised, the gates renormalised over the top-k. With
//! identical experts and gates that sum to 1, the upcycled model computes
//! the dense model's function before any training (docs/interop.md).

use anyhow::{bail, Context, Result};
use layout::PlacementPlan;
use model::rng::Rng;
use worker::state::TrainState;
use worker::JobConfig;

use crate::ckpt::hf_import::write_step_zero;
use crate::ckpt::open_step;

/// `ckpt upcycle`'s arguments.
#[derive(Debug, clap::Args)]
pub struct UpcycleArgs {
    /// The checkpoint (a step or a root) of a one-expert model, e.g. what
    /// `ckpt import` made of a dense Hugging Face model.
    #[arg(long)]
    pub from: String,
    /// The run folder to create.
    #[arg(long)]
    pub run_dir: std::path::PathBuf,
    /// Experts per MoE layer.
    #[arg(long)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long)]
    pub top_k: usize,
    /// Standard deviation of the noise added to each copy, relative to the
    /// standard deviation of the tensor it is added to (0: exact copies).
    #[arg(long, default_value_t = 0.0)]
    pub noise: f32,
    /// Seed of the router's initialisation and of the noise.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

/// Upcycles `args.from` into `args.run_dir`.
pub fn run(args: UpcycleArgs) -> Result<()> {
    let (store, step) = open_step(&args.from)?;
    let url = store.step_url(step);
    let manifest = store.read_manifest(step)?;
    let dense_job: JobConfig = serde_json::from_value(manifest.config.clone())
        .with_context(|| format!("the config saved in {url} cannot be read by this version"))?;
    let d = &dense_job.model;
    if d.n_experts != 1 || d.n_shared_experts > 0 || d.computation_free_experts() > 0 {
        bail!(
            "{url} is not a dense model: it has n_experts = {} (and {} shared): upcycling starts from one expert, \
             as `ckpt import` makes of a dense Hugging Face model",
            d.n_experts,
            d.n_shared_experts
        );
    }
    if args.experts < 2 || args.top_k == 0 || args.top_k > args.experts {
        bail!("--experts {} --top-k {}: need at least 2 experts and 1 <= top-k <= experts", args.experts, args.top_k);
    }
    if !(args.noise >= 0.0 && args.noise.is_finite()) {
        bail!("--noise {}: a standard deviation >= 0", args.noise);
    }
    if args.run_dir.join("checkpoints").exists() {
        bail!(
            "{} already holds checkpoints: upcycle into a new --run-dir (nothing was written)",
            args.run_dir.display()
        );
    }
    let dense_plan = PlacementPlan::contiguous(d.n_layers, 1, 1);
    let dense = TrainState::load(&store, step, &dense_job, &dense_plan, 0)?;
    let mut job = dense_job.clone();
    job.model.n_experts = args.experts;
    job.model.top_k = args.top_k;
    // Renormalised gates sum to 1, so identical experts give the FFN's output.
    job.model.norm_topk_prob = true;
    job.model.aux_loss_coef = model::ModelConfig::default().aux_loss_coef;
    job.model.z_loss_coef = model::ModelConfig::default().z_loss_coef;
    job.model.validate().map_err(|e| anyhow::anyhow!("the upcycled model: {e}"))?;
    let plan = PlacementPlan::contiguous(job.model.n_layers, job.model.n_experts, 1);
    // A fresh state draws the new router; the dense tensors and the experts
    // come from the dense model.
    let mut seeded = job.clone();
    seeded.train.seed = args.seed;
    let mut state = TrainState::fresh(&seeded, &plan, 0);
    let dense_tensors: std::collections::BTreeMap<String, &Vec<f32>> = dense.weights.tensors().into_iter().collect();
    for (name, dst) in state.weights.dense.tensors_mut() {
        if name.ends_with(".moe.router.weight") {
            continue;
        }
        dst.copy_from_slice(dense_tensors[&name]);
    }
    for (l, layer) in state.weights.experts.layers.iter_mut().enumerate() {
        let Some(source) = dense.weights.experts.layers.get(l).and_then(|m| m.get(&0)) else { continue };
        for (&e, expert) in layer.iter_mut() {
            let mut rng = Rng::for_stream(args.seed, &[0x0C, l as u64, e as u64]);
            for (dst, src) in [(&mut expert.w1, &source.w1), (&mut expert.w3, &source.w3), (&mut expert.w2, &source.w2)]
            {
                dst.copy_from_slice(src);
                if args.noise > 0.0 {
                    let std = (src.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / src.len() as f64).sqrt() as f32;
                    dst.iter_mut().zip(rng.normal_vec(src.len(), args.noise * std)).for_each(|(v, n)| *v += n);
                }
            }
        }
    }
    std::fs::create_dir_all(&args.run_dir).with_context(|| format!("cannot create {}", args.run_dir.display()))?;
    let (new_store, config) = write_step_zero(&job, &state, &plan, &args.run_dir)?;
    println!(
        "upcycled {url} into {} experts, top-{} ({} parameters, {} active per token){}: step 0 committed at {}",
        args.experts,
        args.top_k,
        job.model.num_params(),
        job.model.num_active_params(),
        if args.noise > 0.0 { format!(", noise {} x each tensor's std", args.noise) } else { String::new() },
        new_store.url()
    );
    println!("train: switchyard train --run-dir {} --config {} --resume", args.run_dir.display(), config.display());
    Ok(())
}
