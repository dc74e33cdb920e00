//! A rank's link to the job's coordinator: where it is (given by the
//! launcher in-process, or in the environment for ranks it starts as
//! processes), registering with retries, and turning a stop from the
//! coordinator into a stop of every waiting collective.

use crate::error::WorkerError;
use coordinator::client::CoordinatorClient;
use coordinator::protocol::Registration;
use std::time::{Duration, Instant};

/// The variable carrying the coordinator's `host:port` to worker processes.
pub const ADDR_VAR: &str = "SWITCHYARD_COORDINATOR";
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
        let addr = std::env::var(ADDR_VAR).ok().filter(|a| !a.is_empty())?;
        Some(Self { addr, token: std::env::var(TOKEN_VAR).unwrap_or_default() })
    }
}

/// Registers as `rank`, retrying while the coordinator is not up yet. When
/// the coordinator later says stop, every waiting collective of this
/// process gives up (`collectives::stop`).
pub fn register(link: &CoordinatorLink, rank: usize, host: &str) -> Result<CoordinatorClient, WorkerError> {
    let registration = Registration {
        token: link.token.clone(),
        host: host.to_string(),
        pid: std::process::id(),
        rank: Some(rank as u32),
        device: format!("cpu {} {} threads", std::env::consts::ARCH, rayon::current_num_threads()),
    };
    let started = Instant::now();
    loop {
        let on_stop = Box::new(|reason: &str| collectives::stop::request(reason));
        match CoordinatorClient::connect_with_stop(&link.addr, registration.clone(), Duration::from_secs(10), on_stop) {
            Ok(client) => return Ok(client),
            Err(e) if e.retryable() && started.elapsed() < CONNECT_PATIENCE => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(WorkerError::Coordinator(format!("rank {rank}: {e}"))),
        }
    }
}
