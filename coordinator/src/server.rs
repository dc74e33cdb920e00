//! The coordinator service (tokio): registration with the job's token,
//! rank assignment, heartbeats and failure detection, per-step metric
//! aggregation, and `/metrics` + `/status` over HTTP (`http.rs`).
//!
//! It runs on its own runtime threads; the caller (the launcher, or a
//! test) talks to it through [`Coordinator`]: its addresses, a stream of
//! [`Event`]s, the current [`Status`], and `stop_all`.

use crate::commit::{CommitTarget, Committed, Committer, PendingSaves, Progress};
use crate::dashboard::EVENTS_FILE;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use wire::metrics_file::{append_line, truncate_after};
use wire::protocol::{
    decode_header, decode_payload, encode, overlap_efficiency, Message, ProtocolError, Registration, ShardWritten,
    StepReport, Welcome, HEADER_BYTES,
};
use wire::tensorboard::EventWriter;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Ranks of the job.
    pub world: usize,
    /// The job's auth token; a registration without it is refused.
    pub token: String,
    /// The resolved job config (TOML) handed to every worker.
    pub config_toml: String,
    /// The layout and the starting placement plan handed to every worker.
    pub dims: Option<layout::ParallelDims>,
    pub plan: Option<layout::PlacementPlan>,
    /// The attention experts' starting plan, when the job partitions them.
    pub attn_plan: Option<layout::PlacementPlan>,
    /// How often workers send heartbeats.
    pub heartbeat: Duration,
    /// A rank silent for this long is lost.
    pub heartbeat_timeout: Duration,
    /// A connection must register within this time.
    pub register_timeout: Duration,
    /// Where checkpoints are committed; `None`: shard reports are refused.
    pub checkpoint: Option<CommitTarget>,
    /// Where each completed step's metrics line is appended (rank 0's
    /// detail); `None`: rank 0 keeps its own file.
    pub metrics_path: Option<std::path::PathBuf>,
    /// Which restart of the job this coordinator serves (0: the launcher's
    /// first attempt); recorded in the run's events.
    pub restart: u32,
}

/// What happened, in order, for the launcher to print and act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registered {
        rank: u32,
        host: String,
        pid: u32,
    },
    /// A connection that was turned away; the job goes on.
    Refused {
        peer: String,
        reason: String,
    },
    /// A rank that died, hung or disconnected; every other rank was told to stop.
    Lost {
        rank: u32,
        host: String,
        reason: String,
    },
    /// A rank said goodbye.
    Finished {
        rank: u32,
        ok: bool,
    },
    /// Every rank reported this step.
    Step(StepSummary),
    /// A checkpoint step was committed.
    Committed(Committed),
    /// metrics.jsonl or the TensorBoard event file could not be written
    /// (said once each; training goes on).
    MetricsFailed {
        reason: String,
    },
    /// A checkpoint step could not be committed; every rank was told to stop.
    CheckpointFailed {
        step: u64,
        reason: String,
    },
}

/// One step over all ranks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepSummary {
    pub step: u64,
    pub loss: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Slowest rank's step time.
    pub step_time_s: f64,
    /// Expert rows computed by each rank's experts (the load per rank).
    pub expert_rows_per_rank: Vec<u64>,
    pub dropped: u64,
    pub alltoall_bytes: u64,
    /// Slowest rank's communication time and exposed communication time.
    pub comm_s: f64,
    pub exposed_comm_s: f64,
    /// Hidden over total communication, all ranks together (0 to 1).
    pub overlap_efficiency: f64,
}

/// One rank as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RankStatus {
    pub rank: u32,
    pub host: String,
    pub pid: u32,
    pub device: String,
    /// "healthy", "lost: <why>" or "finished".
    pub health: String,
    pub last_step: u64,
    pub seconds_since_heartbeat: f64,
}

/// The job as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub world: usize,
    pub registered: usize,
    pub ranks: Vec<RankStatus>,
    pub last_step: Option<StepSummary>,
    /// The newest checkpoint step this coordinator committed.
    pub last_checkpoint: Option<u64>,
}

struct RankSlot {
    host: String,
    pid: u32,
    device: String,
    last_seen: Instant,
    step: u64,
    lost: Option<String>,
    finished: bool,
    outbox: UnboundedSender<Message>,
}

pub(crate) struct State {
    cfg: ServerConfig,
    ranks: Vec<Option<RankSlot>>,
    /// Reports of steps not yet complete: step → per-rank report.
    pending: BTreeMap<u64, Vec<Option<StepReport>>>,
    last_step: Option<StepSummary>,
    events: mpsc::Sender<Event>,
    saves: PendingSaves,
    committer: Option<Committer>,
    last_checkpoint: Option<u64>,
    metrics_failed: bool,
    /// The step whose row metrics.jsonl expects next; `None` before the first.
    metrics_next_step: Option<u64>,
    /// This attempt's TensorBoard event file beside metrics.jsonl (opened
    /// at its first step), and whether writing it failed (said once).
    tensorboard: Option<EventWriter>,
    tensorboard_failed: bool,
    /// The steps and events the dashboard draws (bounded, downsampled),
    /// starting from the run folder's files when there are some.
    pub(crate) history: crate::dashboard::History,
    /// Whether this attempt's first step was seen (and its `attempt`
    /// event written).
    attempt_seen: bool,
    /// Why every rank was asked to save and stop, once it was.
    save_and_stop: Option<String>,
}

impl State {
    /// The run folder (where metrics.jsonl is written), if the job has one.
    pub(crate) fn run_dir(&self) -> Option<&std::path::Path> {
        self.cfg.metrics_path.as_deref().and_then(std::path::Path::parent)
    }

    /// Sends `message` to every registered rank (a closed connection is
    /// that rank's own failure, reported elsewhere).
    fn send_to_all(&self, message: &Message) {
        for slot in self.ranks.iter().flatten() {
            let _ = slot.outbox.send(message.clone());
        }
    }
}

pub(crate) type Shared = Arc<Mutex<State>>;

pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running coordinator; dropping it stops the service.
pub struct Coordinator {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    events: mpsc::Receiver<Event>,
    shared: Shared,
    _runtime: tokio::runtime::Runtime,
}

impl Coordinator {
    /// Binds the worker port (and the HTTP port, when given) and starts serving.
    pub fn start(cfg: ServerConfig, bind: SocketAddr, http_bind: Option<SocketAddr>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator")
            .enable_all()
            .build()?;
        let (events_tx, events) = mpsc::channel();
        let world = cfg.world;
        let target = cfg.checkpoint.clone();
        let metrics_path = cfg.metrics_path.clone();
        let shared: Shared = Arc::new(Mutex::new(State {
            cfg,
            ranks: (0..world).map(|_| None).collect(),
            pending: BTreeMap::new(),
            last_step: None,
            events: events_tx,
            saves: PendingSaves::default(),
            committer: None,
            last_checkpoint: None,
            metrics_failed: false,
            metrics_next_step: None,
            tensorboard: None,
            tensorboard_failed: false,
            history: earlier_history(metrics_path.as_deref()),
            attempt_seen: false,
            save_and_stop: None,
        }));
        if let Some(target) = target {
            // Weak: the commit thread must not keep the state (and itself) alive.
            let weak = Arc::downgrade(&shared);
            let committer = Committer::start(target, move |outcome| {
                if let Some(shared) = weak.upgrade() {
                    committed(&mut lock(&shared), outcome);
                }
            });
            lock(&shared).committer = Some(committer);
        }
        let listener = runtime.block_on(TcpListener::bind(bind))?;
        let addr = listener.local_addr()?;
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        runtime.spawn(watchdog(Arc::clone(&shared)));
        let http_addr = match http_bind {
            Some(bind) => {
                let http = runtime.block_on(TcpListener::bind(bind))?;
                let http_addr = http.local_addr()?;
                runtime.spawn(crate::http::serve(http, Arc::clone(&shared)));
                Some(http_addr)
            }
            None => None,
        };
        Ok(Self { addr, http_addr, events, shared, _runtime: runtime })
    }

    /// Where workers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` and `/status` are served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The job now.
    pub fn status(&self) -> Status {
        status_of(&lock(&self.shared))
    }

    /// Asks every rank to save a checkpoint of the current step and stop,
    /// as SIGTERM does (ranks that register later are asked too).
    pub fn ask_to_save_and_stop(&self, reason: &str) {
        let mut state = lock(&self.shared);
        state.save_and_stop = Some(reason.to_string());
        state.send_to_all(&Message::SaveAndStop { reason: reason.to_string() });
    }

    /// Tells every connected rank to stop.
    pub fn stop_all(&self, reason: &str) {
        lock(&self.shared).send_to_all(&Message::Stop { reason: reason.to_string() });
    }
}

pub(crate) fn status_of(state: &State) -> Status {
    let now = Instant::now();
    let ranks = state
        .ranks
        .iter()
        .enumerate()
        .filter_map(|(rank, slot)| {
            let slot = slot.as_ref()?;
            let health = match (&slot.lost, slot.finished) {
                (Some(why), _) => format!("lost: {why}"),
                (None, true) => "finished".into(),
                (None, false) => "healthy".into(),
            };
            Some(RankStatus {
                rank: rank as u32,
                host: slot.host.clone(),
                pid: slot.pid,
                device: slot.device.clone(),
                health,
                last_step: slot.step,
                seconds_since_heartbeat: now.duration_since(slot.last_seen).as_secs_f64(),
            })
        })
        .collect::<Vec<_>>();
    Status {
        world: state.cfg.world,
        registered: ranks.len(),
        ranks,
        last_step: state.last_step.clone(),
        last_checkpoint: state.last_checkpoint,
    }
}

async fn accept_loop(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, Arc::clone(&shared)));
    }
}

/// Writes a refusal (best effort) and records it; the job goes on.
async fn refuse(stream: &mut TcpStream, shared: &Shared, peer: SocketAddr, reason: String, retryable: bool) {
    let _ = stream.write_all(&encode(&Message::Refused { reason: reason.clone(), retryable })).await;
    let _ = stream.shutdown().await;
    let _ = lock(shared).events.send(Event::Refused { peer: peer.to_string(), reason });
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, shared: Shared) {
    let register_timeout = lock(&shared).cfg.register_timeout;
    let first = tokio::time::timeout(register_timeout, read_async(&mut stream)).await;
    let registration = match first {
        Err(_) => {
            let reason = format!("no registration within {register_timeout:?}");
            return refuse(&mut stream, &shared, peer, reason, true).await;
        }
        Ok(Err(e)) => {
            let retryable = matches!(e, ProtocolError::Io(_));
            return refuse(&mut stream, &shared, peer, e.to_string(), retryable).await;
        }
        Ok(Ok(Message::Register(registration))) => registration,
        Ok(Ok(other)) => {
            let reason = format!("the first frame must be a registration, got {}", kind(&other));
            return refuse(&mut stream, &shared, peer, reason, false).await;
        }
    };
    let (outbox, mut outgoing) = unbounded_channel::<Message>();
    let welcome = match admit(&shared, &registration, outbox) {
        Ok(welcome) => welcome,
        Err(reason) => return refuse(&mut stream, &shared, peer, reason, false).await,
    };
    let rank = welcome.rank;
    let (mut reader, mut writer) = stream.into_split();
    if writer.write_all(&encode(&Message::Welcome(welcome))).await.is_err() {
        return lost(&shared, rank, "the connection closed during registration".into());
    }
    tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if writer.write_all(&encode(&message)).await.is_err() {
                break;
            }
        }
    });
    loop {
        match read_async(&mut reader).await {
            Ok(Message::Heartbeat { step, .. }) => seen(&shared, rank, Some(step)),
            Ok(Message::Step(report)) => {
                seen(&shared, rank, Some(report.step));
                record_step(&shared, rank, report);
            }
            Ok(Message::ShardWritten(written)) if written.rank == rank => record_shard(&shared, written),
            Ok(Message::Goodbye { ok, .. }) => {
                let mut state = lock(&shared);
                if let Some(slot) = state.ranks[rank as usize].as_mut() {
                    slot.finished = true;
                }
                let _ = state.events.send(Event::Finished { rank, ok });
                return;
            }
            Ok(other) => {
                return lost(&shared, rank, format!("it sent an unexpected {}", kind(&other)));
            }
            Err(e) => {
                let why = match e {
                    ProtocolError::Io(_) => "its connection closed (process killed or exited)".to_string(),
                    other => format!("it sent a bad frame: {other}"),
                };
                return lost(&shared, rank, why);
            }
        }
    }
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Register(_) => "registration",
        Message::Welcome(_) => "welcome",
        Message::Refused { .. } => "refusal",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Step(_) => "step report",
        Message::Stop { .. } => "stop",
        Message::Goodbye { .. } => "goodbye",
        Message::ShardWritten(_) => "shard report",
        Message::Committed { .. } => "commit notice",
        Message::SaveAndStop { .. } => "save-and-stop request",
    }
}

/// Checks the token and picks the rank; `Err` is the refusal's reason.
fn admit(shared: &Shared, reg: &Registration, outbox: UnboundedSender<Message>) -> Result<Welcome, String> {
    let mut state = lock(shared);
    if reg.token != state.cfg.token {
        return Err(format!(
            "wrong auth token from {} (pid {}): start every worker with the job's token \
             ([coordinator] token, SWITCHYARD_TOKEN or the token file)",
            reg.host, reg.pid
        ));
    }
    if let Some(target) = state.cfg.checkpoint.as_ref().filter(|t| t.url != reg.checkpoint_url) {
        return Err(format!(
            "the worker on {} (pid {}) writes checkpoints to {} but this coordinator commits them at {}: \
             give every role the same [checkpoint] url (or the same --run-dir on a shared file system)",
            reg.host, reg.pid, reg.checkpoint_url, target.url
        ));
    }
    let world = state.cfg.world;
    let rank = match reg.rank {
        Some(rank) if rank as usize >= world => {
            return Err(format!("rank {rank} does not exist in a job of {world} ranks"));
        }
        Some(rank) => {
            if let Some(holder) = &state.ranks[rank as usize] {
                return Err(format!(
                    "rank {rank} is already registered by {} (pid {}): two workers were started as the same rank",
                    holder.host, holder.pid
                ));
            }
            rank as usize
        }
        None => match state.ranks.iter().position(Option::is_none) {
            Some(free) => free,
            None => return Err(format!("all {world} ranks are already registered")),
        },
    };
    state.ranks[rank] = Some(RankSlot {
        host: reg.host.clone(),
        pid: reg.pid,
        device: reg.device.clone(),
        last_seen: Instant::now(),
        step: 0,
        lost: None,
        finished: false,
        outbox,
    });
    if let (Some(reason), Some(slot)) = (&state.save_and_stop, &state.ranks[rank]) {
        // A rank that joins after the request (a late or restarted one) gets it too.
        let _ = slot.outbox.send(Message::SaveAndStop { reason: reason.clone() });
    }
    let _ = state.events.send(Event::Registered { rank: rank as u32, host: reg.host.clone(), pid: reg.pid });
    Ok(Welcome {
        rank: rank as u32,
        world: world as u32,
        config_toml: state.cfg.config_toml.clone(),
        dims: state.cfg.dims,
        plan: state.cfg.plan.clone(),
        attn_plan: state.cfg.attn_plan.clone(),
        heartbeat_ms: state.cfg.heartbeat.as_millis() as u64,
    })
}

fn seen(shared: &Shared, rank: u32, step: Option<u64>) {
    if let Some(slot) = lock(shared).ranks[rank as usize].as_mut() {
        slot.last_seen = Instant::now();
        if let Some(step) = step {
            slot.step = slot.step.max(step);
        }
    }
}

/// Marks `rank` lost (once) and tells every other rank to stop.
fn lost(shared: &Shared, rank: u32, reason: String) {
    let mut state = lock(shared);
    let Some(slot) = state.ranks[rank as usize].as_mut() else {
        return;
    };
    if slot.lost.is_some() || slot.finished {
        return;
    }
    slot.lost = Some(reason.clone());
    let (host, step) = (slot.host.clone(), slot.step);
    // After the first loss the others are told to stop: their endings are
    // consequences, not events of the run.
    let first = state.ranks.iter().flatten().filter(|s| s.lost.is_some()).count() == 1;
    let stop = format!("rank {rank} on {host} was lost: {reason}");
    for (other, slot) in state.ranks.iter().enumerate() {
        if let Some(slot) = slot.as_ref().filter(|_| other != rank as usize) {
            let _ = slot.outbox.send(Message::Stop { reason: stop.clone() });
        }
    }
    if first {
        run_event(&mut state, json!({"event": "lost", "rank": rank, "host": host, "reason": reason, "step": step}));
    }
    let _ = state.events.send(Event::Lost { rank, host, reason });
}

/// The history of the run folder `metrics` is in: the steps and events of
/// earlier attempts, which the dashboard keeps showing across a restart.
fn earlier_history(metrics: Option<&std::path::Path>) -> crate::dashboard::History {
    match metrics.filter(|m| m.exists()).and_then(std::path::Path::parent) {
        Some(dir) => crate::dashboard::history_of_folder(dir).0,
        None => crate::dashboard::History::default(),
    }
}

/// Records one of the run's events (with the time) in the dashboard's
/// history and the run folder's events.jsonl.
fn run_event(state: &mut State, mut event: serde_json::Value) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    event["time"] = json!(now.as_secs_f64());
    if let Some(path) = state.run_dir().map(|d| d.join(EVENTS_FILE)) {
        if let Err(e) = append_line(&path, &event.to_string()) {
            if !std::mem::replace(&mut state.metrics_failed, true) {
                let _ = state.events.send(Event::MetricsFailed { reason: format!("{}: {e}", path.display()) });
            }
        }
    }
    state.history.push_event(event);
}

/// The attempt's first step: a fresh run (step 1 of the launcher's first
/// attempt) forgets the folder's old events; then the attempt is recorded.
fn attempt_started(state: &mut State, step: u64) {
    state.attempt_seen = true;
    let restart = state.cfg.restart;
    if step == 1 && restart == 0 {
        state.history.clear_events();
        if let Some(path) = state.run_dir().map(|d| d.join(EVENTS_FILE)) {
            let _ = std::fs::remove_file(path);
        }
    }
    let world = state.cfg.world;
    run_event(state, json!({"event": "attempt", "restart": restart, "world": world, "step": step - 1}));
}

/// The row of `step` into this attempt's TensorBoard file beside `metrics`
/// (a new file when the attempt `restarted` at this step). After a failure,
/// said once, training goes on without the file.
fn write_tensorboard(state: &mut State, metrics: &std::path::Path, step: u64, restarted: bool, row: &str) {
    if state.tensorboard_failed {
        return;
    }
    let dir = metrics.parent().unwrap_or(std::path::Path::new("."));
    let written = match state.tensorboard.as_mut().filter(|_| !restarted) {
        Some(writer) => writer.write_row(row).map_err(|e| format!("{}: {e}", writer.path().display())),
        None => EventWriter::create(dir, step)
            .and_then(|mut writer| writer.write_row(row).map(|_| writer))
            .map(|writer| state.tensorboard = Some(writer))
            .map_err(|e| format!("cannot write a TensorBoard event file in {}: {e}", dir.display())),
    };
    if let Err(reason) = written {
        state.tensorboard_failed = true;
        state.tensorboard = None;
        let _ = state.events.send(Event::MetricsFailed { reason });
    }
}

/// Adds a report; when every rank reported the step, emits its summary.
fn record_step(shared: &Shared, rank: u32, report: StepReport) {
    let mut state = lock(shared);
    let world = state.cfg.world;
    let step = report.step;
    let slots = state.pending.entry(step).or_insert_with(|| vec![None; world]);
    slots[rank as usize] = Some(report);
    if slots.iter().any(Option::is_none) {
        return;
    }
    let reports: Vec<StepReport> = state.pending.remove(&step).into_iter().flatten().flatten().collect();
    if !state.attempt_seen {
        attempt_started(&mut state, step);
    }
    if let Some(line) = reports.iter().find_map(|r| r.detail.as_deref()) {
        state.history.push_row(line);
    }
    if let Some(path) = state.cfg.metrics_path.clone() {
        let line = reports.iter().find_map(|r| r.detail.as_deref());
        if let Some(line) = line {
            // A new coordinator, or ranks that resumed from an earlier
            // commit: rows from this step on are of an attempt that did not
            // last, and go before this one is written (one row per step).
            let restarted = state.metrics_next_step != Some(step);
            state.metrics_next_step = Some(step + 1);
            let written = if restarted {
                truncate_after(&path, step.saturating_sub(1)).and_then(|_| append_line(&path, line))
            } else {
                append_line(&path, line)
            };
            if let Err(e) = written {
                // Said once; training goes on without the file.
                if !std::mem::replace(&mut state.metrics_failed, true) {
                    let _ = state.events.send(Event::MetricsFailed { reason: format!("{}: {e}", path.display()) });
                }
            }
            write_tensorboard(&mut state, &path, step, restarted, line);
        }
    }
    let tokens: u64 = reports.iter().map(|r| r.tokens).sum();
    let ce: f64 = reports.iter().map(|r| r.ce_sum).sum();
    let step_time_s = reports.iter().map(|r| r.step_time_s).fold(0.0, f64::max);
    let summary = StepSummary {
        step,
        loss: if tokens > 0 { ce / tokens as f64 } else { f64::NAN },
        tokens,
        tokens_per_s: if step_time_s > 0.0 { tokens as f64 / step_time_s } else { 0.0 },
        step_time_s,
        expert_rows_per_rank: reports.iter().map(|r| r.expert_rows).collect(),
        dropped: reports.iter().map(|r| r.dropped).sum(),
        alltoall_bytes: reports.iter().map(|r| r.alltoall_bytes).sum(),
        comm_s: reports.iter().map(|r| r.comm_s).fold(0.0, f64::max),
        exposed_comm_s: reports.iter().map(|r| r.exposed_comm_s).fold(0.0, f64::max),
        overlap_efficiency: overlap_efficiency(reports.iter().map(|r| (r.comm_s, r.exposed_comm_s))),
    };
    // Older incomplete steps can no longer complete.
    state.pending.retain(|&s, _| s > step);
    state.last_step = Some(summary.clone());
    let _ = state.events.send(Event::Step(summary));
}

/// Adds a rank's shard report; a complete step goes to the commit thread.
fn record_shard(shared: &Shared, written: ShardWritten) {
    let mut state = lock(shared);
    let world = state.cfg.world;
    let step = written.step;
    if state.committer.is_none() {
        let reason = "this coordinator was started without a checkpoint URL".to_string();
        return committed(&mut state, Err((step, reason)));
    }
    match state.saves.add(world, written) {
        Progress::Waiting => {}
        Progress::Complete { manifest, bytes, upload_s } => {
            state.committer.as_ref().expect("checked above").commit(manifest, bytes, upload_s)
        }
        Progress::Failed { step, reason } => committed(&mut state, Err((step, reason))),
    }
}

/// A commit's outcome: tell every rank (they wait for the final one), or
/// stop the job, since later saves could not be committed either.
fn committed(state: &mut State, outcome: Result<Committed, (u64, String)>) {
    match outcome {
        Ok(done) => {
            state.last_checkpoint = Some(done.step);
            let event = json!({"event": "checkpoint", "step": done.step, "bytes": done.bytes,
                "upload_s": done.upload_s, "commit_s": done.commit_s, "url": done.url});
            run_event(state, event);
            state.send_to_all(&Message::Committed { step: done.step });
            let _ = state.events.send(Event::Committed(done));
        }
        Err((step, reason)) => {
            let kept = match state.last_checkpoint {
                Some(last) => format!("step {last} is the last committed checkpoint"),
                None => "no step was committed by this run".to_string(),
            };
            state.send_to_all(&Message::Stop { reason: format!("checkpoint step {step} failed: {reason}; {kept}") });
            run_event(state, json!({"event": "checkpoint_failed", "step": step, "reason": reason}));
            let _ = state.events.send(Event::CheckpointFailed { step, reason });
        }
    }
}

/// Declares ranks lost when their heartbeats stop.
async fn watchdog(shared: Shared) {
    let timeout = lock(&shared).cfg.heartbeat_timeout;
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let silent: Vec<(u32, f64)> = lock(&shared)
            .ranks
            .iter()
            .enumerate()
            .filter_map(|(rank, slot)| {
                let slot = slot.as_ref()?;
                let quiet = now.duration_since(slot.last_seen);
                (slot.lost.is_none() && !slot.finished && quiet > timeout).then_some((rank as u32, quiet.as_secs_f64()))
            })
            .collect();
        for (rank, quiet) in silent {
            lost(&shared, rank, format!("no heartbeat for {quiet:.1}s (stopped, hung or cut off)"));
        }
    }
}

/// Reads one frame from an async stream (the wire crate has only the
/// blocking reader, so that workers link no async runtime).
async fn read_async(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<Message, ProtocolError> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header).await?;
    let mut payload = vec![0u8; decode_header(&header)?];
    stream.read_exact(&mut payload).await?;
    decode_payload(&payload)
}
