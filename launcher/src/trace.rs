//! The process's `tracing` subscriber: the log on stderr (events of any
//! crate, filtered by `RUST_LOG`, default warnings), and with `train
//! --trace FILE` a timeline of every span (step, forward, backward,
//! dispatch, expert compute, combine, gradient all-reduce, optimizer,
//! checkpoint copy and upload, communication-thread operations) written as
//! a Chrome trace (`chrome://tracing`, ui.perfetto.dev): one process track
//! per rank, one thread track per thread.
//!
//! A rank's thread is known by `collectives::trace_rank` (ranks of the
//! local backend are threads of one process). MPI ranks are processes:
//! each writes `FILE` with `.rank-<r>` before its extension, and the
//! launcher that started them merges those into `FILE` when they end.

use anyhow::{Context, Result};
use std::cell::Cell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Spans without a rank (threads no rank started) go on this process track.
const NO_RANK: usize = 100_000;

/// The spans recorded so far, as Chrome "complete" events.
pub struct Timeline {
    epoch: Instant,
    /// `epoch` on the wall clock (µs since 1970): the ranks' processes of
    /// one host share it, so their tracks line up.
    epoch_wall_us: f64,
    events: Mutex<Vec<SpanEvent>>,
    /// A `step` span ended: the dashboard asks this on every poll, which
    /// must not lock (and scan) the events every span appends to.
    step_seen: AtomicBool,
}

struct SpanEvent {
    name: &'static str,
    args: String,
    rank: usize,
    tid: u64,
    thread: String,
    start_us: f64,
    dur_us: f64,
}

/// Installs the subscriber: the log always, the timeline when `record`.
pub fn install(record: bool) -> Option<Arc<Timeline>> {
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let timeline = record.then(|| {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Arc::new(Timeline {
            epoch: Instant::now(),
            epoch_wall_us: wall.as_secs_f64() * 1e6,
            events: Mutex::new(Vec::new()),
            step_seen: AtomicBool::new(false),
        })
    });
    let recorder = timeline.clone().map(|t| Recorder(t).with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    // A second install (tests in one process) keeps the first.
    let _ = tracing_subscriber::registry().with(log).with(recorder).try_init();
    timeline
}

/// `path` with `.rank-<r>` before its extension: an MPI rank's own file.
pub fn rank_file(path: &Path, rank: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank-{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank-{rank}"),
    };
    path.with_file_name(name)
}

impl Timeline {
    /// Writes the timeline to `path` (an MPI rank: to its [`rank_file`]);
    /// a launcher of MPI ranks first takes in the ranks' files.
    pub fn write(&self, path: &Path) -> Result<PathBuf> {
        let launched = collectives::launch::launched_rank();
        let out = match &launched {
            Some(rank) => rank_file(path, rank.rank),
            None => path.to_path_buf(),
        };
        let own_rank = launched.map(|l| l.rank);
        let mut events = self.chrome_events(own_rank, 0.0);
        if own_rank.is_none() {
            events.extend(take_rank_files(path)?);
        }
        std::fs::write(&out, chrome_trace(&events))
            .with_context(|| format!("cannot write the trace {}", out.display()))?;
        Ok(out)
    }

    /// The spans that started at or after `since_us` as Chrome events, with
    /// the names of their process (rank) and thread tracks; spans of no
    /// rank go on `own_rank`'s track (an MPI rank's process).
    fn chrome_events(&self, own_rank: Option<usize>, since_us: f64) -> Vec<String> {
        let mut events = Vec::new();
        let recorded = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut tracks = std::collections::BTreeMap::new();
        for e in recorded.iter().filter(|e| e.start_us >= since_us) {
            let rank = if e.rank == NO_RANK { own_rank.unwrap_or(NO_RANK) } else { e.rank };
            tracks.insert((rank, e.tid), e.thread.clone());
            events.push(format!(
                r#"{{"name":{},"cat":"switchyard","ph":"X","ts":{:.1},"dur":{:.1},"pid":{rank},"tid":{},"args":{{{}}}}}"#,
                json_string(e.name),
                e.start_us,
                e.dur_us,
                e.tid,
                e.args
            ));
        }
        drop(recorded);
        let mut ranks: Vec<usize> = tracks.keys().map(|k| k.0).collect();
        ranks.dedup();
        for rank in ranks {
            let name = if rank == NO_RANK { "no rank".to_string() } else { format!("rank {rank}") };
            events.push(format!(
                r#"{{"name":"process_name","ph":"M","pid":{rank},"args":{{"name":{}}}}}"#,
                json_string(&name)
            ));
        }
        for ((rank, tid), thread) in &tracks {
            events.push(format!(
                r#"{{"name":"thread_name","ph":"M","pid":{rank},"tid":{tid},"args":{{"name":{}}}}}"#,
                json_string(thread)
            ));
        }
        events
    }

    /// Where the last `steps` steps began: the earliest start among each
    /// rank's `steps`-th newest step span; `None` before a step ended.
    fn last_steps_start(&self, steps: usize) -> Option<f64> {
        let recorded = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut starts: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
        for e in recorded.iter().filter(|e| e.name == "step") {
            starts.entry(e.rank).or_default().push(e.start_us);
        }
        starts.values().map(|s| s[s.len().saturating_sub(steps.max(1))]).min_by(f64::total_cmp)
    }
}

/// The timeline of this process's ranks (threads of the local backend),
/// which the running job's dashboard links at `/trace.json`.
impl coordinator::dashboard::LiveTrace for Timeline {
    fn has_steps(&self) -> bool {
        self.step_seen.load(Ordering::Relaxed)
    }

    fn last_steps(&self, steps: usize) -> Option<Vec<u8>> {
        let since = self.last_steps_start(steps)?;
        Some(chrome_trace(&self.chrome_events(None, since)).into_bytes())
    }
}

/// A Chrome trace file's text holding `events`.
fn chrome_trace(events: &[String]) -> String {
    format!("{{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n{}\n]}}\n", events.join(",\n"))
}

/// The events of MPI ranks' files (`FILE.rank-<r>.json`) beside `path`,
/// which are removed once read.
fn take_rank_files(path: &Path) -> Result<Vec<String>> {
    let mut events = Vec::new();
    for rank in 0.. {
        let file = rank_file(path, rank);
        let Ok(text) = std::fs::read_to_string(&file) else { break };
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("rank {rank}'s trace {} is not JSON", file.display()))?;
        for event in value["traceEvents"].as_array().into_iter().flatten() {
            events.push(event.to_string());
        }
        let _ = std::fs::remove_file(&file);
    }
    Ok(events)
}

/// Removes MPI ranks' files an earlier run left beside `path`.
pub fn remove_rank_files(path: &Path) {
    for rank in 0.. {
        if std::fs::remove_file(rank_file(path, rank)).is_err() {
            break;
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The layer that records each span's time between enter and exit.
struct Recorder(Arc<Timeline>);

/// A span's fields as JSON object members, for the event's args.
#[derive(Default)]
struct FieldText(String);

impl Visit for FieldText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        let _ = write!(self.0, "{}:{}", json_string(field.name()), json_string(&format!("{value:?}")));
    }
}

/// When the span was entered last.
struct Entered(Instant);

thread_local! {
    /// This thread's number on its track (assigned on first use).
    static THREAD: Cell<u64> = const { Cell::new(0) };
}
static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

fn thread_number() -> u64 {
    THREAD.with(|t| {
        if t.get() == 0 {
            t.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = FieldText::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(fields);
    }

    fn on_enter(&self, id: &Id, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(Entered(Instant::now()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let extensions = span.extensions();
        let Some(Entered(entered)) = extensions.get::<Entered>() else { return };
        let now = Instant::now();
        let event = SpanEvent {
            name: span.name(),
            args: extensions.get::<FieldText>().map(|f| f.0.clone()).unwrap_or_default(),
            rank: collectives::trace_rank::get().unwrap_or(NO_RANK),
            tid: thread_number(),
            thread: std::thread::current().name().unwrap_or("main").to_string(),
            start_us: self.0.epoch_wall_us + entered.duration_since(self.0.epoch).as_secs_f64() * 1e6,
            dur_us: now.duration_since(*entered).as_secs_f64() * 1e6,
        };
        if event.name == "step" {
            self.0.step_seen.store(true, Ordering::Relaxed);
        }
        self.0.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_files_sit_beside_the_trace() {
        assert_eq!(rank_file(Path::new("/x/run.json"), 3), Path::new("/x/run.rank-3.json"));
        assert_eq!(rank_file(Path::new("trace"), 0), Path::new("trace.rank-0"));
    }
}
