//! A rank's link to the job's coordinator: where it is (given by the
//! launcher in-process, or in the environment for ranks it starts as
//! processes), registering with retries, and turning a stop from the
//! coordinator into a stop of every waiting collective.

use crate::config::CoordinatorConfig;
use crate::error::WorkerError;
use std::time::{Duration, Instant};
use wire::client::CoordinatorClient;
use wire::protocol::Registration;

/// The variable carrying the coordinator's `host:port` to worker processes.
pub const ADDR_VAR: &str = "SWITCHYARD_COORDINATOR";
/// torchrun's rendezvous host, taken as the coordinator's when [`ADDR_VAR`] is unset.
pub const MASTER_ADDR_VAR: &str = "MASTER_ADDR";
/// torchrun's rendezvous port (default 29500, which is also the coordinator's).
pub const MASTER_PORT_VAR: &str = "MASTER_PORT";
/// The variable carrying the job's auth token.
pub const TOKEN_VAR: &str = "SWITCHYARD_TOKEN";
/// How long a worker keeps trying to reach a coordinator that is starting.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Where a rank finds its coordinator.
#[derive(Clone)]
pub struct CoordinatorLink {
    pub addr: String,
    pub token: String,
}

impl std::fmt::Debug for CoordinatorLink {
    // The token is a secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorLink").field("addr", &self.addr).field("token", &"<hidden>").finish()
    }
}

impl CoordinatorLink {
    /// The link the launcher put in the environment, if any.
    pub fn from_env() -> Option<Self> {
        let addr = coordinator_addr_from_env()?;
        Some(Self { addr, token: std::env::var(TOKEN_VAR).unwrap_or_default() })
    }
}

/// The coordinator's `host:port` from the environment: SWITCHYARD_COORDINATOR,
/// else torchrun's MASTER_ADDR and MASTER_PORT (so PyTorchJob and JobSet
/// setups need no extra variable); `None` when neither is set.
pub fn coordinator_addr_from_env() -> Option<String> {
    coordinator_addr_from(|name| std::env::var(name).ok())
}

/// [`coordinator_addr_from_env`] over any variable lookup (tests pass a map).
pub fn coordinator_addr_from(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if let Some(addr) = set(ADDR_VAR) {
        return Some(addr);
    }
    let host = set(MASTER_ADDR_VAR)?;
    let port = set(MASTER_PORT_VAR).unwrap_or_else(|| "29500".into());
    // An IPv6 literal needs brackets before the port.
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
    Some(format!("{host}:{port}"))
}

/// Whether two resolved configs describe the same job. The collective
/// backend is how ranks talk to each other, not what the job is, so a
/// coordinator started without `--backend` still serves MPI workers.
fn same_job(theirs: &str, ours: &str) -> bool {
    let job = |text: &str| {
        let mut table: toml::Table = toml::from_str(text).ok()?;
        if let Some(toml::Value::Table(parallel)) = table.get_mut("parallel") {
            parallel.remove("backend");
        }
        Some(table)
    };
    matches!((job(theirs), job(ours)), (Some(a), Some(b)) if a == b)
}

/// The job's token as configured: `[coordinator] token`, else
/// SWITCHYARD_TOKEN, else the `token_file`; `None` when none is set.
pub fn configured_token(cfg: &CoordinatorConfig) -> Result<Option<String>, WorkerError> {
    if !cfg.token.is_empty() {
        return Ok(Some(cfg.token.clone()));
    }
    if let Some(token) = std::env::var(TOKEN_VAR).ok().filter(|t| !t.is_empty()) {
        return Ok(Some(token));
    }
    if !cfg.token_file.is_empty() {
        let path = std::path::Path::new(&cfg.token_file);
        let token = std::fs::read_to_string(path)
            .map_err(|e| WorkerError::io("cannot read the token file ([coordinator] token_file)", path, e))?;
        return Ok(Some(token.trim().to_string()));
    }
    Ok(None)
}

/// Registers as `rank`, retrying while the coordinator is not up yet. When
/// the coordinator later says stop, every waiting collective of this
/// process gives up (`collectives::stop`).
/// `config_toml` is this rank's resolved job, which must be the coordinator's;
/// `checkpoint_url` is where it writes shards, which the coordinator commits.
pub fn register(
    link: &CoordinatorLink,
    rank: usize,
    host: &str,
    config_toml: &str,
    checkpoint_url: &str,
) -> Result<CoordinatorClient, WorkerError> {
    let registration = Registration {
        token: link.token.clone(),
        host: host.to_string(),
        pid: std::process::id(),
        rank: Some(rank as u32),
        device: format!("cpu {} {} threads", std::env::consts::ARCH, rayon::current_num_threads()),
        checkpoint_url: checkpoint_url.to_string(),
    };
    let started = Instant::now();
    loop {
        let on_stop = Box::new(|reason: &str| collectives::stop::request(reason));
        match CoordinatorClient::connect_with_stop(&link.addr, registration.clone(), Duration::from_secs(10), on_stop) {
            Ok(client) if !same_job(&client.welcome().config_toml, config_toml) => {
                let _ = client.finish(false);
                return Err(WorkerError::NotTheSameJob {
                    rank,
                    what: "job config",
                    detail: format!("coordinator at {}", link.addr),
                });
            }
            Ok(client) => return Ok(client),
            Err(e) if e.retryable() && started.elapsed() < CONNECT_PATIENCE => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(WorkerError::coordinator(rank, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn addr(vars: &[(&str, &str)]) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        coordinator_addr_from(|name| map.get(name).cloned())
    }

    #[test]
    fn coordinator_address_from_switchyard_or_torchrun_variables() {
        assert_eq!(addr(&[]), None);
        assert_eq!(addr(&[("SWITCHYARD_COORDINATOR", "coord:29500")]).as_deref(), Some("coord:29500"));
        assert_eq!(
            addr(&[("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456")]).as_deref(),
            Some("job-master-0:23456")
        );
        // torchrun's default port is 29500, the coordinator's too.
        assert_eq!(addr(&[("MASTER_ADDR", "10.0.0.7")]).as_deref(), Some("10.0.0.7:29500"));
        assert_eq!(addr(&[("MASTER_ADDR", "fd00::7"), ("MASTER_PORT", "1")]).as_deref(), Some("[fd00::7]:1"));
        // Ours wins when both are set; an empty value counts as unset.
        let both = [("SWITCHYARD_COORDINATOR", "coord:1"), ("MASTER_ADDR", "m"), ("MASTER_PORT", "2")];
        assert_eq!(addr(&both).as_deref(), Some("coord:1"));
        assert_eq!(addr(&[("SWITCHYARD_COORDINATOR", ""), ("MASTER_ADDR", "m")]).as_deref(), Some("m:29500"));
        assert_eq!(addr(&[("MASTER_PORT", "2")]), None);
    }
}
