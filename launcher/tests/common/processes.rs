//! Processes of the MPI suites: OpenMPI as root, waiting without hanging,
//! and the network-namespace hosts of scripts/netns-hosts.sh.

use super::text;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// OpenMPI refuses root (containers, CI) unless told.
pub fn allow_root(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

/// Waits for `child` at most `guard`; a child still running then is a hang.
pub fn wait_guarded(mut child: Child, guard: Duration, what: &str) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > guard {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} still running after {guard:?}: it hung\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// The pid of the rank process started for `tag` with world rank `rank`.
pub fn find_rank(tag: &str, rank: usize) -> Option<u32> {
    let want_tag = format!("SWITCHYARD_TEST_TAG={tag}");
    let want_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        let has = |want: &str| vars.contains(&want.as_bytes());
        (has(&want_tag) && has(&want_rank)).then_some(pid)
    })
}

/// Removes the namespace hosts when the test ends, passing or not.
pub struct NamespaceHosts {
    script: PathBuf,
}

impl NamespaceHosts {
    pub fn up(repo: &Path) -> Self {
        let script = repo.join("scripts/netns-hosts.sh");
        let out = Command::new(&script).arg("up").output().expect("scripts/netns-hosts.sh runs");
        assert!(
            out.status.success(),
            "cannot make network-namespace hosts (needs root and iproute2; ./ci.sh installs iproute2): {}",
            text(&out)
        );
        Self { script }
    }
}

impl Drop for NamespaceHosts {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("down").status();
    }
}
