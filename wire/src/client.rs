//! The worker's side of the coordinator protocol, blocking and on plain
//! threads (the training loop is synchronous): register, heartbeat on a
//! thread of its own, report steps, and hear a stop.

use crate::protocol::{encode, read_blocking, Message, ProtocolError, Registration, ShardWritten, StepReport, Welcome};
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why a worker could not join or talk to its coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator at {addr}: {source} (is it running, and is the address right?)")]
    Connect { addr: String, source: std::io::Error },
    #[error("the coordinator at {addr} refused this worker: {reason}")]
    Refused { addr: String, reason: String, retryable: bool },
    #[error("talking to the coordinator at {addr}: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("the coordinator at {addr} answered with {what} instead of a welcome")]
    Unexpected { addr: String, what: String },
    #[error("the job is stopping: {reason}")]
    Stopped { reason: String },
}

impl ClientError {
    /// Whether trying again can succeed (the coordinator may not be up yet).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Refused { retryable, .. } => *retryable,
            Self::Protocol { source, .. } => source.retryable(),
            Self::Unexpected { .. } | Self::Stopped { .. } => false,
        }
    }
}

/// A registered worker's connection.
pub struct CoordinatorClient {
    addr: String,
    welcome: Welcome,
    writer: Arc<Mutex<TcpStream>>,
    step: Arc<AtomicU64>,
    stop: Arc<Mutex<Option<String>>>,
    /// Whether the coordinator asked to save the current step and stop.
    save_and_stop: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    /// The newest step the coordinator committed; notified on commits and on stop.
    committed: Arc<(Mutex<Option<u64>>, Condvar)>,
}

/// Sends shard reports from a rank's upload thread over the worker's connection.
#[derive(Clone)]
pub struct ShardSender {
    addr: String,
    writer: Arc<Mutex<TcpStream>>,
}

impl ShardSender {
    /// Tells the coordinator this rank's shard of a step is written (or failed).
    pub fn send(&self, written: ShardWritten) -> Result<(), ClientError> {
        send_on(&self.writer, &self.addr, &Message::ShardWritten(written))
    }
}

fn send_on(writer: &Mutex<TcpStream>, addr: &str, message: &Message) -> Result<(), ClientError> {
    lock(writer)
        .write_all(&encode(message))
        .map_err(|e| ClientError::Protocol { addr: addr.to_string(), source: ProtocolError::Io(e) })
}

impl CoordinatorClient {
    /// Connects, registers and starts the heartbeat and listener threads.
    pub fn connect(addr: &str, registration: Registration, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with_stop(addr, registration, timeout, Box::new(|_| {}))
    }

    /// [`CoordinatorClient::connect`], calling `on_stop` (from the listener
    /// thread) as soon as the job must stop, e.g. to interrupt collectives.
    pub fn connect_with_stop(
        addr: &str,
        registration: Registration,
        timeout: Duration,
        on_stop: Box<dyn Fn(&str) + Send>,
    ) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect { addr: addr.to_string(), source };
        let protocol_error = |source| ClientError::Protocol { addr: addr.to_string(), source };
        let target = addr
            .to_socket_addrs()
            .map_err(connect_error)?
            .next()
            .ok_or_else(|| connect_error(std::io::Error::other("the name resolves to no address")))?;
        let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect_error)?;
        stream.write_all(&encode(&Message::Register(registration))).map_err(connect_error)?;
        let welcome = match read_blocking(&mut stream).map_err(protocol_error)? {
            Message::Welcome(welcome) => welcome,
            Message::Refused { reason, retryable } => {
                return Err(ClientError::Refused { addr: addr.to_string(), reason, retryable })
            }
            other => return Err(ClientError::Unexpected { addr: addr.to_string(), what: format!("{other:?}") }),
        };
        stream.set_read_timeout(None).map_err(connect_error)?;
        let reader = stream.try_clone().map_err(connect_error)?;
        let client = Self {
            addr: addr.to_string(),
            welcome,
            writer: Arc::new(Mutex::new(stream)),
            step: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(Mutex::new(None)),
            save_and_stop: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            committed: Arc::new((Mutex::new(None), Condvar::new())),
        };
        client.spawn_heartbeat();
        client.spawn_listener(reader, on_stop);
        Ok(client)
    }

    fn spawn_heartbeat(&self) {
        let (writer, step, closed) = (Arc::clone(&self.writer), Arc::clone(&self.step), Arc::clone(&self.closed));
        let (rank, every) = (self.welcome.rank, Duration::from_millis(self.welcome.heartbeat_ms.max(1)));
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !closed.load(Ordering::Relaxed) {
                    let beat = encode(&Message::Heartbeat { rank, step: step.load(Ordering::Relaxed) });
                    if lock(&writer).write_all(&beat).is_err() {
                        break;
                    }
                    std::thread::sleep(every);
                }
            })
            .expect("spawn the heartbeat thread");
    }

    fn spawn_listener(&self, mut reader: TcpStream, on_stop: Box<dyn Fn(&str) + Send>) {
        let (stop, closed, addr) = (Arc::clone(&self.stop), Arc::clone(&self.closed), self.addr.clone());
        let committed = Arc::clone(&self.committed);
        let save_and_stop = Arc::clone(&self.save_and_stop);
        std::thread::Builder::new()
            .name("coordinator-listener".into())
            .spawn(move || loop {
                let reason = match read_blocking(&mut reader) {
                    Ok(Message::Stop { reason }) => reason,
                    Ok(Message::SaveAndStop { .. }) => {
                        save_and_stop.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Message::Committed { step }) => {
                        let mut newest = lock(&committed.0);
                        *newest = Some(newest.map_or(step, |s| s.max(step)));
                        committed.1.notify_all();
                        continue;
                    }
                    Ok(_) => continue,
                    Err(_) if closed.load(Ordering::Relaxed) => return,
                    Err(e) => format!("lost the coordinator at {addr}: {e}"),
                };
                on_stop(&reason);
                lock(&stop).get_or_insert(reason);
                // Wake a rank waiting for a commit that will not come.
                let _guard = lock(&committed.0);
                committed.1.notify_all();
                return;
            })
            .expect("spawn the coordinator listener thread");
    }

    /// Whether the coordinator asked this rank to save the current step
    /// and stop (it was told to stop itself); checked once per step.
    pub fn save_and_stop_asked(&self) -> bool {
        self.save_and_stop.load(Ordering::Relaxed)
    }

    /// What the coordinator said at registration.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Heartbeats carry this step from now on.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// Sends one step's report.
    pub fn report(&self, report: StepReport) -> Result<(), ClientError> {
        self.set_step(report.step);
        self.send(&Message::Step(report))
    }

    /// A handle for sending shard reports from another thread.
    pub fn shard_sender(&self) -> ShardSender {
        ShardSender { addr: self.addr.clone(), writer: Arc::clone(&self.writer) }
    }

    /// The newest step the coordinator committed so far.
    pub fn last_committed(&self) -> Option<u64> {
        *lock(&self.committed.0)
    }

    /// Waits until the coordinator committed `step` (or a later one); an
    /// error when the job is stopped first.
    pub fn wait_committed(&self, step: u64) -> Result<(), ClientError> {
        let mut newest = lock(&self.committed.0);
        loop {
            if newest.is_some_and(|s| s >= step) {
                return Ok(());
            }
            if let Some(reason) = self.stop_reason() {
                return Err(ClientError::Stopped { reason });
            }
            newest =
                self.committed.1.wait_timeout(newest, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Why the job must stop, once the coordinator said so (or vanished).
    pub fn stop_reason(&self) -> Option<String> {
        lock(&self.stop).clone()
    }

    /// Says goodbye and closes the connection.
    pub fn finish(self, ok: bool) -> Result<(), ClientError> {
        let rank = self.welcome.rank;
        self.send(&Message::Goodbye { rank, ok })
    }

    fn send(&self, message: &Message) -> Result<(), ClientError> {
        send_on(&self.writer, &self.addr, message)
    }
}

impl Drop for CoordinatorClient {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
