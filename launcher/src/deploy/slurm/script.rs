//! The sbatch script `switchyard slurm render` writes.
//!
//! One job: the coordinator as a one-task step on the first node, the
//! workers as one srun step with a task per rank (`--mpi=pmix` over
//! OpenMPI, or one task per GPU for NCCL). The job's token is made per job
//! and reaches every task through the environment, as does the
//! coordinator's address. Workers start with `--resume-if-any`, so a job
//! that Slurm requeues, or that is submitted again after a cancel,
//! continues from its newest committed checkpoint. SIGTERM (scancel, a
//! pre-emption, the time limit announced by `--signal`) makes the workers
//! save a checkpoint and stop; the coordinator waits for that commit.

use std::fmt::Write;
use std::path::Path;

/// What goes into one sbatch script.
pub struct SlurmJob<'a> {
    pub name: &'a str,
    pub nodes: usize,
    pub tasks_per_node: usize,
    /// One GPU per task and the NCCL backend, else CPU ranks over MPI.
    pub gpu: bool,
    /// Memory per node for CPU ranks (`--mem`), MiB; `None`: the partition's default.
    pub mem_per_node_mib: Option<u64>,
    pub partition: Option<&'a str>,
    pub time: Option<&'a str>,
    /// The switchyard binary on the compute nodes.
    pub exe: &'a Path,
    /// The resolved job config the script runs (written next to it).
    pub config: &'a Path,
    pub run_dir: &'a Path,
    /// Worker port; the HTTP port is the next one.
    pub port: u16,
    /// Seconds before the time limit at which Slurm sends SIGTERM.
    pub signal_before_s: u32,
    /// The command line that rendered the script, for its header.
    pub rendered_by: &'a str,
}

/// The sbatch script for `job`.
pub fn render(job: &SlurmJob) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::new();
    let ranks = job.nodes * job.tasks_per_node;
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(s, "# switchyard training job: {ranks} rank(s) on {} node(s).", job.nodes);
    let _ = writeln!(s, "# Rendered by: {}", job.rendered_by);
    let _ = writeln!(s, "#SBATCH --job-name={}", job.name);
    let _ = writeln!(s, "#SBATCH --nodes={}", job.nodes);
    let _ = writeln!(s, "#SBATCH --ntasks-per-node={}", job.tasks_per_node);
    if job.gpu {
        let _ = writeln!(s, "#SBATCH --gpus-per-node={}", job.tasks_per_node);
    }
    if let Some(mib) = job.mem_per_node_mib {
        let _ = writeln!(s, "# Memory per node: the ranks' memory by the model, plus headroom (docs/slurm.md).");
        let _ = writeln!(s, "#SBATCH --mem={mib}M");
    }
    if let Some(partition) = job.partition {
        let _ = writeln!(s, "#SBATCH --partition={partition}");
    }
    if let Some(time) = job.time {
        let _ = writeln!(s, "#SBATCH --time={time}");
    }
    let _ = writeln!(s, "# Requeued jobs (node failure, pre-emption) resume from their newest checkpoint.");
    let _ = writeln!(s, "#SBATCH --requeue");
    let _ = writeln!(
        s,
        "# SIGTERM to every task {}s before the time limit: they checkpoint and stop.",
        job.signal_before_s
    );
    let _ = writeln!(s, "#SBATCH --signal=TERM@{}", job.signal_before_s);
    let _ = writeln!(s, "#SBATCH --open-mode=append");
    let _ = writeln!(s, "#SBATCH --output={}/slurm-%j.out", job.run_dir.display());
    s.push_str(&format!(
        r#"
set -uo pipefail
SWITCHYARD={exe}
CONFIG={config}
RUN_DIR={run_dir}

# A token per job: only this job's tasks can register with its coordinator.
SWITCHYARD_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export SWITCHYARD_TOKEN
coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port={port}
export SWITCHYARD_COORDINATOR="$coordinator_host:$port"
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}): coordinator $SWITCHYARD_COORDINATOR, status http://$coordinator_host:$((port + 1))/status"

# The coordinator: one task on the first node, beside the workers there.
srun --overlap --nodes=1 --ntasks=1 --nodelist="$coordinator_host" \
  "$SWITCHYARD" coordinator --config "$CONFIG" --run-dir "$RUN_DIR" \
  --addr "0.0.0.0:$port" --http-addr "0.0.0.0:$((port + 1))" &
coordinator=$!

# The workers, one task per rank{worker_note}.
srun --overlap {srun_flags}--kill-on-bad-exit=1 \
  "$SWITCHYARD" worker {backend}--config "$CONFIG" --run-dir "$RUN_DIR" --resume-if-any --quiet
workers=$?
wait "$coordinator"
coordinator_status=$?
echo "workers exited $workers, coordinator $coordinator_status"
[ "$workers" -eq 0 ] && exit "$coordinator_status"
exit "$workers"
"#,
        exe = q(job.exe),
        config = q(job.config),
        run_dir = q(job.run_dir),
        port = job.port,
        worker_note = if job.gpu { " and GPU (NCCL)" } else { " over MPI (PMIx)" },
        srun_flags = if job.gpu { "--gpus-per-task=1 " } else { "--mpi=pmix " },
        backend = if job.gpu { "--backend nccl " } else { "--backend mpi " },
    ));
    s
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c)) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_plain_paths_and_protects_the_rest() {
        assert_eq!(shell_quote("/a/b-c_d.toml"), "/a/b-c_d.toml");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
