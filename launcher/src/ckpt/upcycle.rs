//! `switchyard ckpt upcycle`: Sparse Upcycling (Komatsuzaki et al., arXiv
//! 2212.05055) of a one-expert model, the form `ckpt import` gives a dense
//! Hugging Face model, into a run folder with E experts: every expert starts
//! as a copy of the dense FFN (plus seeded noise when asked), the router new
//! and randomly initialised, the gates renormalised over the top-k. With
//! identical experts and gates that sum to 1, the upcycled model computes
//! the dense model's function before any training (docs/interop.md).
//!
//! With `--granularity G` (fine-grained upcycling, He et al., "Upcycling
//! Large Language Models into Mixture of Experts", arXiv 2410.07524) each
//! copy of the FFN is cut into G experts of width F/G along its hidden
//! units; the G pieces of one copy form a virtual group whose router rows
//! are the same, so a token's top-k (a multiple of G) takes whole copies,
//! and each piece's w2 is scaled by G, which the renormalised gates (1/G of
//! a copy's share each) take back: the function is again the dense one.
//!
//! With `--shared-experts N` the layer also gets N always-on experts, the
//! pieces of N/G more copies of the FFN. The layer then adds `N/G + 1`
//! copies of the dense output, so every w2 (shared and routed) is divided
//! by `N/G + 1`: the function stays the dense one (docs/interop.md).
//!
//! With `--attention-experts A` the attention is upcycled too, as BAM does
//! (Zhang et al., arXiv 2408.08274): A attention experts (JetMoE's MoA,
//! docs/model.md) each start as a copy of the dense query and output
//! projections, keys and values stay the dense ones, a new router weighs
//! them (by default softly, every expert, BAM's choice), the output bias
//! starts at zero: gates summing to 1 give the dense attention again.
//!
//! With `--modalities M` the model becomes a Mixture-of-Transformers
//! (docs/model.md): every modality's tower (attention projections, norms,
//! dense FFNs) starts as a copy of the dense one, and `--experts` /
//! `--top-k` count each modality's block of experts, copies of the FFN as
//! above: every modality computes the dense function before training.

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
    /// Cut each copy of the dense FFN into this many experts (fine-grained
    /// upcycling); `--experts` and `--top-k` count the pieces and must be
    /// multiples of it, and it must divide the FFN width.
    #[arg(long, default_value_t = 1)]
    pub granularity: usize,
    /// Shared experts (always on, beside the routed ones): pieces of more
    /// copies of the FFN, so a multiple of --granularity.
    #[arg(long, default_value_t = 0)]
    pub shared_experts: usize,
    /// Attention experts per layer (BAM's attention upcycling into JetMoE's
    /// MoA): each a copy of the dense query and output projections; 0 keeps
    /// dense attention.
    #[arg(long, default_value_t = 0)]
    pub attention_experts: usize,
    /// Attention experts per token (default: all of them, BAM's soft routing).
    #[arg(long)]
    pub attention_top_k: Option<usize>,
    /// Mixture-of-Transformers: modalities, each tower a copy of the dense
    /// model's; `--experts` and `--top-k` are then per modality.
    #[arg(long, default_value_t = 1)]
    pub modalities: usize,
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
    // Their tensors are sized by the number of experts, so no copy of them fits the new model.
    if d.router_mlp || d.gating_residuals {
        bail!("{url} has [model] router_mlp or gating_residuals (MoE++ router parts): upcycling starts from a plain dense model");
    }
    // Modalities alone already make the model sparse: one expert each is an upcycling.
    let fewest = if args.modalities > 1 { 1 } else { 2 };
    if args.experts < fewest || args.top_k == 0 || args.top_k > args.experts {
        bail!(
            "--experts {} --top-k {}: need at least {fewest} experts and 1 <= top-k <= experts",
            args.experts,
            args.top_k
        );
    }
    if args.modalities == 0 {
        bail!("--modalities 0: give at least 1 (1: no Mixture-of-Transformers)");
    }
    let g = args.granularity;
    if g == 0 || ![args.experts, args.top_k, d.ffn_hidden].iter().all(|n| n.is_multiple_of(g)) {
        bail!(
            "--granularity {g}: it must divide --experts ({}), --top-k ({}) and the dense FFN width ({}, \
             ffn_hidden of {url}), so that every copy of the FFN is cut into {g} whole experts and a token takes \
             whole copies",
            args.experts,
            args.top_k,
            d.ffn_hidden
        );
    }
    if !args.shared_experts.is_multiple_of(g) {
        bail!(
            "--shared-experts {}: a multiple of --granularity {g}, so that the shared experts are whole copies of \
             the FFN",
            args.shared_experts
        );
    }
    if !(args.noise >= 0.0 && args.noise.is_finite()) {
        bail!("--noise {}: a standard deviation >= 0", args.noise);
    }
    let attention_top_k = args.attention_top_k.unwrap_or(args.attention_experts);
    if args.attention_experts > 0 && d.attention != model::AttentionKind::Dense {
        bail!("{url} has [model] attention = {:?}: --attention-experts upcycles dense attention", d.attention);
    }
    if args.attention_experts == 0 && args.attention_top_k.is_some() {
        bail!("--attention-top-k without --attention-experts: give the number of attention experts too");
    }
    if args.attention_experts > 0 && (attention_top_k == 0 || attention_top_k > args.attention_experts) {
        bail!("--attention-top-k {attention_top_k}: between 1 and --attention-experts ({})", args.attention_experts);
    }
    if args.run_dir.join("checkpoints").exists() {
        bail!(
            "{} already holds checkpoints: upcycle into a new --run-dir (nothing was written)",
            args.run_dir.display()
        );
    }
    let dense_plan = PlacementPlan::contiguous(d.n_layers, 1, 1);
    let dense = TrainState::load(&store, step, &dense_job, (&dense_plan, None), 0)?;
    let mut job = dense_job.clone();
    job.model.n_experts = args.experts * args.modalities;
    job.model.modalities = args.modalities;
    job.model.top_k = args.top_k;
    job.model.ffn_hidden = d.ffn_hidden / g;
    job.model.n_shared_experts = args.shared_experts;
    if args.attention_experts > 0 {
        job.model.attention = model::AttentionKind::Moa;
        job.model.attn_experts = args.attention_experts;
        job.model.attn_top_k = attention_top_k;
    }
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
    let mut state = TrainState::fresh(&seeded, &plan, None, 0);
    let dense_tensors: std::collections::BTreeMap<String, &Vec<f32>> = dense.weights.tensors().into_iter().collect();
    let dim = job.model.d_model;
    for (i, (name, dst)) in state.weights.dense.tensors_mut().into_iter().enumerate() {
        if let Some(src) = modality_source(&name) {
            // MoT: every modality's tower a copy of the dense one.
            let mut rng = Rng::for_stream(args.seed, &[0x30, i as u64]);
            match dense_tensors.get(&src) {
                Some(src) if src.len() == dst.len() => copy_with_noise(dst, src, args.noise, &mut rng),
                _ => bail!("{url} has no tensor `{src}` of the modality copy's size: cannot upcycle into modalities"),
            }
            continue;
        }
        if name.ends_with(".moe.router.weight") {
            // A virtual group (the G pieces of one copy) shares its first row.
            for e in 0..job.model.n_experts {
                let first = e / g * g;
                dst.copy_within(first * dim..(first + 1) * dim, e * dim);
            }
            continue;
        }
        if name.contains(".moe.shared.") || name.ends_with(".attn.router.weight") || name.ends_with(".attn.bias") {
            continue; // pieces of the FFN, below; the attention router new, its bias zero
        }
        if let Some((layer, expert, part)) = attention_expert_source(&name) {
            // BAM: every attention expert a copy of the dense projection.
            let src = format!("layers.{layer}.attn.{part}.weight");
            let stream = [0xA7, layer as u64, expert as u64, (part == "wo") as u64];
            let mut rng = Rng::for_stream(args.seed, &stream);
            match dense_tensors.get(&src) {
                Some(src) if src.len() == dst.len() => copy_with_noise(dst, src, args.noise, &mut rng),
                _ => bail!("{url} has no tensor `{src}` of the attention experts' size: cannot upcycle its attention"),
            }
            continue;
        }
        match dense_tensors.get(&name) {
            Some(src) if src.len() == dst.len() => dst.copy_from_slice(src),
            _ => bail!("{url} has no tensor `{name}` of the upcycled model's size: cannot upcycle this model"),
        }
    }
    // The layer sums `copies` dense outputs (the routed gates add up to one).
    let copies = (args.shared_experts / g + 1) as f32;
    for (l, layer) in state.weights.experts.layers.iter_mut().enumerate() {
        let Some(source) = dense.weights.experts.layers.get(l).and_then(|m| m.get(&0)) else { continue };
        for (i, shared) in state.weights.dense.layers[l].shared.iter_mut().enumerate() {
            let mut piece = piece_of(source, dim, g, i % g);
            piece.w2.iter_mut().for_each(|v| *v /= g as f32 * copies);
            *shared = piece;
        }
        for (&e, expert) in layer.iter_mut() {
            let mut rng = Rng::for_stream(args.seed, &[0x0C, l as u64, e as u64]);
            let mut piece = piece_of(source, dim, g, e % g);
            piece.w2.iter_mut().for_each(|v| *v /= copies);
            for (dst, src) in [(&mut expert.w1, &piece.w1), (&mut expert.w3, &piece.w3), (&mut expert.w2, &piece.w2)] {
                copy_with_noise(dst, src, args.noise, &mut rng);
            }
        }
    }
    std::fs::create_dir_all(&args.run_dir).with_context(|| format!("cannot create {}", args.run_dir.display()))?;
    let (new_store, config) = write_step_zero(&job, &state, &plan, &args.run_dir)?;
    let mut pieces =
        if g > 1 { format!(" (each FFN copy cut into {g}, width {})", job.model.ffn_hidden) } else { String::new() };
    if args.shared_experts > 0 {
        pieces += &format!(" and {} shared", args.shared_experts);
    }
    let attention = match args.attention_experts {
        0 => String::new(),
        a => format!(", and its attention into {a} experts, top-{attention_top_k}"),
    };
    let modalities = match args.modalities {
        1 => String::new(),
        m => format!(" per modality, {m} modalities (each tower a copy of the dense one)"),
    };
    println!(
        "upcycled {url} into {} experts{pieces}, top-{}{modalities}{attention} ({} parameters, {} active per token){}: \
         step 0 committed at {}",
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

/// `src` into `dst`, plus normal noise of `noise` times `src`'s RMS.
fn copy_with_noise(dst: &mut [f32], src: &[f32], noise: f32, rng: &mut Rng) {
    dst.copy_from_slice(src);
    if noise > 0.0 {
        let std = (src.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / src.len() as f64).sqrt() as f32;
        dst.iter_mut().zip(rng.normal_vec(src.len(), noise * std)).for_each(|(v, n)| *v += n);
    }
}

/// For `layers.{l}.attn.experts.{e}.{wq|wo}.weight`: the layer, the expert
/// and the dense projection (`wq` or `wo`) it starts from.
fn attention_expert_source(name: &str) -> Option<(usize, usize, &str)> {
    match name.split('.').collect::<Vec<_>>().as_slice() {
        ["layers", l, "attn", "experts", e, part @ ("wq" | "wo"), "weight"] => {
            Some((l.parse().ok()?, e.parse().ok()?, part))
        }
        _ => None,
    }
}

/// For `layers.{l}.modality.{m}.{rest}` (a modality's copy): the dense
/// tensor it starts from, `layers.{l}.{rest}`.
fn modality_source(name: &str) -> Option<String> {
    match name.split('.').collect::<Vec<_>>().as_slice() {
        ["layers", l, "modality", _, rest @ ..] => Some(format!("layers.{l}.{}", rest.join("."))),
        _ => None,
    }
}

/// Piece `s` of `g` of a SwiGLU of width F: hidden units `s F/g ..
/// (s+1) F/g` (rows of w1 and w3, columns of w2), w2 times `g`.
fn piece_of(ffn: &model::ExpertWeights, d: usize, g: usize, s: usize) -> model::ExpertWeights {
    let f = ffn.w1.len() / d;
    let (w, rows) = (f / g, s * f / g * d..(s + 1) * f / g * d);
    let w2 = ffn.w2.chunks_exact(f).flat_map(|row| row[s * w..(s + 1) * w].iter().map(|v| v * g as f32)).collect();
    model::ExpertWeights { w1: ffn.w1[rows.clone()].to_vec(), w3: ffn.w3[rows].to_vec(), w2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pieces_of_an_ffn_put_back_together_are_the_ffn() {
        // d 2, F 4: w1 rows are hidden units, w2 rows are outputs.
        let ffn = model::ExpertWeights {
            w1: (0..8).map(|v| v as f32).collect(),
            w3: (10..18).map(|v| v as f32).collect(),
            w2: (20..28).map(|v| v as f32).collect(),
        };
        let pieces = [piece_of(&ffn, 2, 2, 0), piece_of(&ffn, 2, 2, 1)];
        assert_eq!(pieces[1].w1, [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(pieces[1].w2, [44.0, 46.0, 52.0, 54.0], "columns 2-3 of each output row, times 2");
        // Rows of w1 and w3 stacked, columns of w2 side by side (scaled back): the FFN again.
        let stacked = |part: fn(&model::ExpertWeights) -> &Vec<f32>| -> Vec<f32> {
            pieces.iter().flat_map(part).copied().collect()
        };
        assert_eq!(stacked(|p| &p.w1), ffn.w1);
        assert_eq!(stacked(|p| &p.w3), ffn.w3);
        let w2: Vec<f32> = (0..2)
            .flat_map(|row| pieces.iter().flat_map(move |p| p.w2[row * 2..row * 2 + 2].iter().map(|v| v / 2.0)))
            .collect();
        assert_eq!(w2, ffn.w2);
        assert_eq!(piece_of(&ffn, 2, 1, 0), ffn, "granularity 1: the FFN itself");
    }
}
