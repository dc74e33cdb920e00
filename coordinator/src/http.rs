//! `GET /metrics` (Prometheus text format 0.0.4), `GET /status` (JSON), the
//! dashboard `GET /` and its data `GET /api/history` on the coordinator's
//! HTTP port: a minimal HTTP/1.1 responder, enough for Prometheus, curl,
//! browsers and Kubernetes probes (one request per connection).

use crate::server::{lock, status_of, Shared, Status};
use std::fmt::Write as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_REQUEST_BYTES: usize = 8 << 10;

pub(crate) async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Shared::clone(&shared);
        tokio::spawn(async move {
            let _ = respond(stream, shared).await;
        });
    }
}

async fn respond(mut stream: TcpStream, shared: Shared) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // The lock is held in this block only: the guard must not live across an await.
    let (status, history, run_dir) = {
        let state = lock(&shared);
        let status = status_of(&state);
        let run_dir = state.run_dir().map(std::path::Path::to_path_buf);
        let history = (path == "/api/history").then(|| {
            let status = serde_json::to_value(&status).expect("status serialises");
            let trace = crate::dashboard::has_trace(run_dir.as_deref()).then_some(crate::dashboard::TRACE_FILE);
            crate::dashboard::history_json(&state.history, status, &[], trace)
        });
        (status, history, run_dir)
    };
    let text = |code, content_type, body: String| (code, content_type, body.into_bytes());
    let (code, content_type, body) = match (method, path) {
        ("GET", "/") => text("200 OK", "text/html; charset=utf-8", crate::dashboard::PAGE.to_string()),
        ("GET", "/api/history") => text("200 OK", "application/json", history.unwrap_or_default()),
        ("GET", "/trace.json") => match crate::dashboard::trace_to_serve(run_dir.as_deref()) {
            Some(trace) => ("200 OK", "application/json", trace),
            None => text("404 Not Found", "text/plain", "no trace: start the job with --trace\n".to_string()),
        },
        ("GET", "/metrics") => text("200 OK", "text/plain; version=0.0.4", prometheus(&status)),
        ("GET", "/status") => {
            text("200 OK", "application/json", serde_json::to_string_pretty(&status).expect("status serialises"))
        }
        ("GET", "/healthz") => text("200 OK", "text/plain", "ok\n".to_string()),
        _ => text("404 Not Found", "text/plain", "try /, /api/history, /metrics, /status or /healthz\n".to_string()),
    };
    stream.write_all(response_head(code, content_type, body.len()).as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// An HTTP/1.1 response's head for a body of `len` bytes, the connection
/// closed after it (one request per connection; also the run folder's
/// `switchyard dashboard` server's).
pub fn response_head(code: &str, content_type: &str, len: usize) -> String {
    format!("HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
}

/// The status as Prometheus metrics.
pub fn prometheus(status: &Status) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP switchyard_{name} {help}\n# TYPE switchyard_{name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "switchyard_{name}{labels} {value}");
        }
    };
    let plain = |v: f64| vec![(String::new(), v)];
    gauge("world_size", "Ranks of the job.", plain(status.world as f64));
    gauge("ranks_registered", "Ranks registered with the coordinator.", plain(status.registered as f64));
    let up = status
        .ranks
        .iter()
        .map(|r| (format!("{{rank=\"{}\",host=\"{}\"}}", r.rank, r.host), f64::from(u8::from(r.health == "healthy"))))
        .collect();
    gauge("rank_up", "1 while the rank is healthy.", up);
    let beat = status.ranks.iter().map(|r| (format!("{{rank=\"{}\"}}", r.rank), r.seconds_since_heartbeat)).collect();
    gauge("rank_seconds_since_heartbeat", "Seconds since the rank was last heard from.", beat);
    if let Some(step) = &status.last_step {
        gauge("step", "Last step every rank reported.", plain(step.step as f64));
        gauge("loss", "Mean cross-entropy of the last step (nats).", plain(step.loss));
        gauge("tokens_per_second", "Tokens per second of the last step.", plain(step.tokens_per_s));
        gauge("step_seconds", "Slowest rank's time for the last step.", plain(step.step_time_s));
        gauge("dropped_tokens", "Assignments dropped by capacity in the last step.", plain(step.dropped as f64));
        gauge(
            "alltoall_bytes",
            "All-to-all bytes sent in the last step, all ranks.",
            plain(step.alltoall_bytes as f64),
        );
        gauge("comm_seconds", "Slowest rank's communication time in the last step.", plain(step.comm_s));
        gauge(
            "exposed_comm_seconds",
            "Slowest rank's communication time no computation hid, last step.",
            plain(step.exposed_comm_s),
        );
        gauge("overlap_efficiency", "Hidden over total communication time, last step.", plain(step.overlap_efficiency));
        let load = step
            .expert_rows_per_rank
            .iter()
            .enumerate()
            .map(|(rank, &rows)| (format!("{{rank=\"{rank}\"}}"), rows as f64))
            .collect();
        gauge("rank_expert_rows", "Expert rows each rank computed in the last step.", load);
    }
    out
}
