//! `switchyard dashboard --run-dir DIR` serves a run folder's dashboard
//! (the page the coordinator serves live, drawn from the folder's
//! metrics.jsonl, read again on every request so a running job's folder
//! stays live too), and `switchyard report` writes it as one HTML file.

use anyhow::{Context, Result};
use clap::Args;
use coordinator::dashboard::{
    has_trace, history_json, history_of_folder, report_html, trace_to_serve, PAGE, TRACE_FILE,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

/// `switchyard dashboard`'s arguments.
#[derive(Args)]
pub struct DashboardArgs {
    /// The run folder (holds metrics.jsonl).
    #[arg(long)]
    run_dir: PathBuf,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
}

/// `switchyard report`'s arguments.
#[derive(Args)]
pub struct ReportArgs {
    /// The run folder (holds metrics.jsonl).
    #[arg(long)]
    run_dir: PathBuf,
    /// The HTML file to write (self-contained: it opens with no server).
    #[arg(long)]
    out: PathBuf,
}

/// The folder's history as `/api/history` answers it, and its problems
/// (no metrics.jsonl, lines cut short), which the page shows too.
/// The trace is linked as the server's `/trace.json`, or in a report
/// (a file that may be opened anywhere) by its absolute `file://` URL.
fn folder_history(run_dir: &Path, served: bool) -> (String, Vec<String>) {
    let (history, problems) = history_of_folder(run_dir);
    let trace = has_trace(Some(run_dir)).then(|| {
        let file = run_dir.join(TRACE_FILE);
        if served {
            TRACE_FILE.to_string()
        } else {
            format!("file://{}", std::path::absolute(&file).unwrap_or(file).display())
        }
    });
    (history_json(&history, serde_json::Value::Null, &problems, trace.as_deref()), problems)
}

/// Serves the dashboard of `args.run_dir` until stopped.
pub fn serve(args: DashboardArgs) -> Result<()> {
    let (_, problems) = folder_history(&args.run_dir, true);
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    let listener = TcpListener::bind(&args.addr).with_context(|| format!("cannot listen on --addr {}", args.addr))?;
    let addr = listener.local_addr()?;
    println!("dashboard of {}: http://{addr}/ (Ctrl-C stops it)", args.run_dir.display());
    for stream in listener.incoming().flatten() {
        let _ = respond(stream, &args.run_dir);
    }
    Ok(())
}

fn respond(mut stream: TcpStream, run_dir: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The rest of the head, so a client still sending it is not cut off.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && header.trim_end() != "" {
        header.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (code, content_type, body) = match path {
        "/" => ("200 OK", "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        "/api/history" => ("200 OK", "application/json", folder_history(run_dir, true).0.into_bytes()),
        "/trace.json" => match trace_to_serve(Some(run_dir)) {
            Some(trace) => ("200 OK", "application/json", trace),
            None => ("404 Not Found", "text/plain", b"no trace.json in the run folder (train --trace)\n".to_vec()),
        },
        _ => ("404 Not Found", "text/plain", b"try /, /api/history or /trace.json\n".to_vec()),
    };
    stream.write_all(coordinator::http::response_head(code, content_type, body.len()).as_bytes())?;
    stream.write_all(&body)
}

/// Writes the run's dashboard with its data inside to `args.out`.
pub fn report(args: ReportArgs) -> Result<()> {
    let (data, problems) = folder_history(&args.run_dir, false);
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    std::fs::write(&args.out, report_html(&data))
        .with_context(|| format!("cannot write --out {}", args.out.display()))?;
    println!(
        "wrote the dashboard of {} to {} (opens in a browser, no server needed)",
        args.run_dir.display(),
        args.out.display()
    );
    Ok(())
}
