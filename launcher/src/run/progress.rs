//! What a person sees while a job trains: a banner, a live progress bar
//! (when stderr is a terminal), a summary line every `log_every` steps and
//! a closing block with the checkpoint and the commands to use it.
//! Summary lines also go to `<run dir>/train.log`.

use anyhow::Result;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use worker::api::{Observer, StartInfo, TrainSummary};
use worker::metrics::StepMetrics;
use worker::JobConfig;

/// Entropies of the training corpus, to judge the loss against.
#[derive(Debug, Clone, Copy)]
pub struct CorpusEntropy {
    /// A model that learned only token frequencies reaches this.
    pub unigram: f64,
    /// The best achievable loss, when known (the built-in corpus).
    pub floor: Option<f64>,
}

impl CorpusEntropy {
    /// The built-in corpus has both numbers analytically; prepared data
    /// gets its unigram entropy from token counts.
    pub fn of_job(job: &JobConfig) -> Option<Self> {
        if job.data.is_builtin() {
            let corpus = worker::data::BuiltinCorpus::new();
            return Some(Self { unigram: corpus.unigram_entropy_nats(), floor: Some(corpus.entropy_floor_nats()) });
        }
        let data = worker::data::PreparedData::open(Path::new(&job.data.source)).ok()?;
        let mut counts = vec![0u64; data.vocab()];
        data.tokens().iter().for_each(|&t| counts[t as usize] += 1);
        let total = data.tokens().len() as f64;
        let unigram = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / total) * (c as f64 / total).ln()).sum();
        Some(Self { unigram, floor: None })
    }
}

/// Prints progress to stderr and summary lines to the run's log.
pub struct ConsoleProgress {
    log_every: u64,
    total_steps: u64,
    start_step: u64,
    run_dir: PathBuf,
    live: bool,
    log: Option<std::fs::File>,
    started: Instant,
    entropy: Option<CorpusEntropy>,
    backend: worker::Backend,
    /// MoA's attention experts are partitioned over the expert-parallel group.
    attn_experts_partitioned: bool,
}

fn human_count(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2}B", x / 1e9),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// "nodes: 3 | a: ranks 0-1 | b: rank 2 | ..." when ranks span several nodes.
fn nodes_line(nodes: &[String]) -> Option<String> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (rank, node) in nodes.iter().enumerate() {
        match groups.iter_mut().find(|(name, _)| name == node) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((node, vec![rank])),
        }
    }
    if groups.len() < 2 {
        return None;
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(name, ranks)| {
            let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
            let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{name}: {noun} {}", list.join(","))
        })
        .collect();
    Some(format!("nodes: {} | {}", groups.len(), parts.join(" | ")))
}

impl ConsoleProgress {
    /// A progress printer for `job` in `run_dir`; `quiet` turns the live bar off.
    pub fn new(job: &JobConfig, run_dir: &Path, quiet: bool) -> Result<Self> {
        Ok(Self {
            log_every: job.train.log_every,
            backend: job.parallel.backend,
            attn_experts_partitioned: job.parallel.attn_expert_placement == worker::AttnExpertPlacement::Partitioned,
            total_steps: job.train.steps,
            start_step: 0,
            run_dir: run_dir.to_path_buf(),
            live: !quiet && std::io::stderr().is_terminal(),
            log: None,
            started: Instant::now(),
            entropy: CorpusEntropy::of_job(job),
        })
    }

    fn line(&mut self, text: &str) {
        if self.live {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{text}");
        if let Some(log) = self.log.as_mut() {
            let _ = writeln!(log, "{text}");
        }
    }

    fn entropy_note(&self) -> String {
        match self.entropy {
            Some(CorpusEntropy { unigram, floor: Some(floor) }) => {
                format!("corpus unigram entropy {unigram:.3} nats, entropy floor {floor:.3} nats")
            }
            Some(CorpusEntropy { unigram, floor: None }) => format!("corpus unigram entropy {unigram:.3} nats"),
            None => "corpus entropy unknown".into(),
        }
    }

    /// The closing block: losses against the corpus, the checkpoint, and
    /// the commands to evaluate and resume it.
    pub fn finish(&mut self, summary: &TrainSummary, job: &JobConfig, run_dir: &Path) {
        let fmt = |x: Option<f64>| x.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
        let stopped = format!("stopped on {}", worker::preemption::signal_name());
        let ended = if summary.preempted { stopped.as_str() } else { "done" };
        self.line(&format!(
            "{ended}: {} steps in {} | loss {} -> {} nats ({})",
            summary.steps_run,
            human_duration(summary.seconds),
            fmt(summary.first_loss),
            fmt(summary.last_loss),
            self.entropy_note()
        ));
        if let (Some(last), Some(e)) = (summary.last_loss, self.entropy) {
            let verdict = if last < e.unigram { "below" } else { "NOT below" };
            self.line(&format!(
                "final loss {last:.4} is {verdict} the unigram entropy {:.4} by {:.4} nats",
                e.unigram,
                (e.unigram - last).abs()
            ));
        }
        let Some(ckpt) = &summary.checkpoint else {
            return;
        };
        let dir = run_dir.display();
        self.line(&format!("checkpoint: {ckpt}"));
        let data_hint = if job.data.is_builtin() {
            self.line("held-out text: switchyard data sample --out heldout.txt");
            "heldout.txt"
        } else {
            "<text file>"
        };
        self.line(&format!("evaluate:   switchyard eval --checkpoint {ckpt} --data {data_hint}"));
        let more =
            if summary.preempted { String::new() } else { format!(" --set train.steps={}", job.train.steps * 2) };
        self.line(&format!("resume:     {}{more}", resume_command(run_dir)));
        self.line(&format!("dashboard:  switchyard dashboard --run-dir {dir}   (or: switchyard report --run-dir {dir} --out report.html)"));
    }
}

/// The command that resumes the run in `run_dir` from its newest commit,
/// with the configuration the run wrote there.
pub fn resume_command(run_dir: &Path) -> String {
    let dir = run_dir.display();
    format!("switchyard train --run-dir {dir} --config {dir}/config.toml --resume")
}

impl Observer for ConsoleProgress {
    fn on_start(&mut self, info: &StartInfo) {
        self.start_step = info.start_step;
        self.started = Instant::now();
        self.log = std::fs::OpenOptions::new().create(true).append(true).open(self.run_dir.join("train.log")).ok();
        let from = match &info.resumed_from {
            Some(url) => format!("resuming from {url} (step {})", info.start_step),
            None => "fresh start".into(),
        };
        self.line(&format!(
            "switchyard: {} params ({} active per token), {} tokens/step ({} micro-batch(es)/step), {} steps, {from}",
            human_count(info.num_params as f64),
            human_count(info.num_active_params as f64),
            human_count(info.tokens_per_step as f64),
            info.grad_accumulation,
            info.total_steps,
        ));
        if !info.aborted_uploads.is_empty() {
            self.line(&format!(
                "aborted {} unfinished upload(s) of an earlier, interrupted save: {}",
                info.aborted_uploads.len(),
                info.aborted_uploads.join(", ")
            ));
        }
        self.line(&info.precision);
        let d = info.dims;
        if d.world > 1 {
            let attn = if self.attn_experts_partitioned { " | attention experts partitioned like them" } else { "" };
            self.line(&format!(
                "layout: {} ranks ({} backend) | data parallel {} x attention shards {} | experts over {} ranks (ep {}, {} replica(s)){attn}",
                d.world, self.backend, d.dp, d.attn_tp, d.ep, d.ep, d.edp
            ));
            let overlap = info.overlap.describe();
            if overlap == "off" {
                // Say when it would act, so nobody wonders why it does not here.
                self.line(
                    "overlap: off (it acts by default with nccl, or MPI ranks on several nodes; \
                     --set overlap.mode='\"on\"' forces it: docs/overlap.md)",
                );
            } else {
                self.line(&format!("overlap: {overlap} (docs/overlap.md)"));
            }
        }
        if let Some(nodes) = nodes_line(&info.nodes) {
            self.line(&nodes);
        }
        let note = self.entropy_note();
        self.line(&format!("run folder {} | checkpoints {} | {note}", self.run_dir.display(), info.checkpoint_url));
    }

    fn on_step(&mut self, m: &StepMetrics) {
        let done = m.step - self.start_step;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * (self.total_steps - m.step) as f64;
        if m.step.is_multiple_of(self.log_every) || m.step == self.total_steps || m.step == self.start_step + 1 {
            let dropped: usize = m.dropped.iter().sum();
            // Several ranks: how much of the step's communication was hidden.
            let comm = if m.per_rank.len() > 1 && m.comm_s > 0.0 {
                format!(" | comm {:.0} ms, {:.0}% hidden", m.comm_s * 1e3, m.overlap_efficiency * 100.0)
            } else {
                String::new()
            };
            let seq = if m.seq_aux_loss > 0.0 { format!(" | seq {:.4}", m.seq_aux_loss) } else { String::new() };
            let mut free = if m.computation_free_share > 0.0 {
                format!(" | computation-free {:.0}%", m.computation_free_share * 100.0)
            } else {
                String::new()
            };
            if !m.attn_load.is_empty() {
                free += &format!(" | attn load max/mean {:.2}", m.busiest_attention_ratio());
            }
            self.line(&format!(
                "step {:>6}/{} | loss {:.4} | aux {:.4}{seq} | z {:.3} | lr {:.2e} | gnorm {:.3} | {} tok/s | load max/mean {:.2}{free} | dropped {}{comm} | ETA {}",
                m.step,
                self.total_steps,
                m.loss,
                m.aux_loss,
                m.z_loss,
                m.lr,
                m.grad_norm,
                human_count(m.tokens_per_s),
                m.busiest_expert_ratio(),
                dropped,
                human_duration(eta)
            ));
        }
        if let Some(eval) = m.eval_loss {
            self.line(&format!("step {:>6}/{} | eval loss {eval:.4} ([data] eval_source)", m.step, self.total_steps));
        }
        if self.live {
            let width = 30;
            let filled = (m.step as f64 / self.total_steps as f64 * width as f64) as usize;
            eprint!(
                "\r\x1b[2K[{}{}] step {}/{} loss {:.4} | {} tok/s | ETA {}",
                "#".repeat(filled),
                ".".repeat(width - filled.min(width)),
                m.step,
                self.total_steps,
                m.loss,
                human_count(m.tokens_per_s),
                human_duration(eta)
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn on_rebalance(&mut self, step: u64, before: f64, after: f64) {
        self.line(&format!(
            "rebalanced experts at step {step}: busiest rank / mean expert tokens {before:.2} -> {after:.2} (measured loads)"
        ));
    }

    fn on_checkpoint(&mut self, step: u64, url: &str) {
        self.line(&format!("checkpoint step {step} committed: {url}"));
    }
}
