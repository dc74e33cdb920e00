//! How `switchyard train --backend mpi` starts its ranks: from typed values,
//! never from its own command line.
//!
//! The launcher resolves the job once (config file, `--set`, `--ranks`,
//! `--hosts`, a restart's dropped host), writes that resolved config to
//! `<run dir>/launch.toml`, and starts every rank as
//! `switchyard train --config <run dir>/launch.toml --run-dir ... [--resume...]`.
//! So a flag added to `train` reaches the ranks through the config or a
//! field here, and cannot be forwarded half-parsed. The job's token goes in
//! the environment (`to_toml` leaves it out of files).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use worker::api::Resume;
use worker::JobConfig;

/// What every rank of one attempt is started with.
#[derive(Debug, Clone)]
pub struct RankLaunch<'a> {
    /// The resolved job of this attempt.
    pub job: &'a JobConfig,
    pub run_dir: &'a Path,
    pub resume: &'a Resume,
    pub stop_at: Option<u64>,
    pub quiet: bool,
    /// `--trace FILE`: each rank writes its own file beside it.
    pub trace: Option<&'a Path>,
}

impl RankLaunch<'_> {
    /// Where the resolved config goes.
    pub fn config_path(&self) -> PathBuf {
        self.run_dir.join("launch.toml")
    }

    /// Writes the resolved config the ranks load.
    pub fn write_config(&self) -> Result<PathBuf> {
        let path = self.config_path();
        std::fs::create_dir_all(self.run_dir)
            .with_context(|| format!("cannot create the run folder {}", self.run_dir.display()))?;
        std::fs::write(&path, self.job.to_toml())
            .with_context(|| format!("cannot write the ranks' config {}", path.display()))?;
        Ok(path)
    }

    /// The ranks' command line (after the program name).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["train".to_string(), "--config".into(), self.config_path().display().to_string()];
        args.extend(["--run-dir".to_string(), self.run_dir.display().to_string()]);
        match self.resume {
            Resume::No => {}
            Resume::Latest => args.push("--resume".into()),
            Resume::LatestOrFresh => args.push("--resume-if-any".into()),
            Resume::From(url) => args.extend(["--resume-from".to_string(), url.clone()]),
        }
        if let Some(step) = self.stop_at {
            args.extend(["--stop-at".to_string(), step.to_string()]);
        }
        if self.quiet {
            args.push("--quiet".into());
        }
        if let Some(trace) = self.trace {
            args.extend(["--trace".to_string(), trace.display().to_string()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::Parser;

    #[test]
    fn ranks_start_from_the_resolved_config_whatever_flags_the_launcher_had() {
        let dir = std::env::temp_dir().join(format!("switchyard-launch-plan-{}", std::process::id()));
        // Every flag of `train`, as a user might give them, including ones
        // the ranks must not see again (--max-restarts, --hosts, --ranks).
        let launcher = Cli::try_parse_from([
            "switchyard",
            "train",
            "--set",
            "train.steps=7",
            "--set",
            "model.n_experts=4",
            "--ranks",
            "2",
            "--backend",
            "mpi",
            "--max-restarts",
            "3",
            "--hosts",
            "a:1,b:1",
            "--stop-at",
            "5",
            "--quiet",
            "--resume-if-any",
            "--run-dir",
            dir.to_str().unwrap(),
        ]);
        assert!(launcher.is_ok(), "{:?}", launcher.err());
        let job = JobConfig::load(
            None,
            &[
                "train.steps=7".into(),
                "model.n_experts=4".into(),
                "parallel.ranks=2".into(),
                "parallel.backend=mpi".into(),
            ],
        )
        .unwrap();
        for resume in
            [Resume::No, Resume::Latest, Resume::LatestOrFresh, Resume::From("file:///x/step-00000004".into())]
        {
            let plan =
                RankLaunch { job: &job, run_dir: &dir, resume: &resume, stop_at: Some(5), quiet: true, trace: None };
            let written = plan.write_config().unwrap();
            let args = plan.args();
            // The ranks' line parses as a `train` command ...
            let parsed = Cli::try_parse_from(std::iter::once("switchyard".to_string()).chain(args.clone()));
            assert!(parsed.is_ok(), "{args:?}: {:?}", parsed.err());
            // ... carries none of the launcher-only flags ...
            for flag in ["--max-restarts", "--hosts", "--ranks", "--set", "--backend"] {
                assert!(!args.iter().any(|a| a == flag), "{flag} reached the ranks: {args:?}");
            }
            // ... and loads exactly the launcher's job.
            let loaded = JobConfig::load(Some(&written), &[]).unwrap();
            assert_eq!(loaded, job);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
