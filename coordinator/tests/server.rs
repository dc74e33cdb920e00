//! The coordinator in-process with virtual workers (real TCP on loopback):
//! registration, aggregation, HTTP, and every way a connection can go
//! wrong — a lost worker, a silent one, a wrong token, a wrong protocol
//! version, garbage bytes, an oversized frame, a duplicate rank — each
//! named clearly while the job goes on.

use coordinator::server::{Coordinator, Event, ServerConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use wire::client::{ClientError, CoordinatorClient};
use wire::protocol::{
    decode_header, decode_payload, encode, encode_with_version, read_blocking, Message, Registration, ShardWritten,
    StepReport, Welcome, HEADER_BYTES,
};

const TOKEN: &str = "s3cret-token";

fn start(world: usize) -> Coordinator {
    Coordinator::start(config(world), "127.0.0.1:0".parse().unwrap(), Some("127.0.0.1:0".parse().unwrap())).unwrap()
}

fn config(world: usize) -> ServerConfig {
    ServerConfig {
        world,
        token: TOKEN.into(),
        config_toml: "name = \"test\"\n".into(),
        dims: None,
        plan: Some(layout::PlacementPlan::contiguous(1, 4, 2)),
        attn_plan: Some(layout::PlacementPlan::contiguous(1, 2, 2)),
        heartbeat: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(800),
        register_timeout: Duration::from_secs(2),
        checkpoint: None,
        metrics_path: None,
        restart: 0,
    }
}

fn registration(host: &str, rank: Option<u32>, token: &str) -> Registration {
    Registration {
        token: token.into(),
        host: host.into(),
        pid: 4242,
        rank,
        device: "cpu test".into(),
        checkpoint_url: String::new(),
    }
}

fn join(coord: &Coordinator, host: &str, rank: Option<u32>) -> Result<CoordinatorClient, ClientError> {
    CoordinatorClient::connect(&coord.addr().to_string(), registration(host, rank, TOKEN), Duration::from_secs(5))
}

/// The first event matching `want` within 10 s; other events are skipped.
fn wait_for(coord: &Coordinator, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(event) = coord.next_event(Duration::from_millis(100)) {
            if want(&event) {
                return event;
            }
        }
    }
    panic!("no {what} event within 10 s; status: {:?}", coord.status());
}

fn report(rank: u32, step: u64, ce_sum: f64, tokens: u64) -> StepReport {
    StepReport {
        rank,
        step,
        ce_sum,
        tokens,
        step_time_s: 0.5,
        expert_rows: rank as u64 + 3,
        dropped: 1,
        alltoall_bytes: 100,
        alltoall_s: 0.1,
        comm_s: 0.2,
        exposed_comm_s: 0.05 * (rank as f64 + 1.0),
        detail: None,
    }
}

fn http_get(coord: &Coordinator, path: &str) -> String {
    let mut stream = TcpStream::connect(coord.http_addr().unwrap()).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// A raw connection that sends `bytes` and returns the coordinator's answer.
fn raw_exchange(coord: &Coordinator, bytes: &[u8]) -> Message {
    let mut stream = TcpStream::connect(coord.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    read_blocking(&mut stream).expect("the coordinator answers with a frame")
}

fn refusal(message: Message) -> String {
    match message {
        Message::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn workers_register_report_and_the_step_is_aggregated() {
    let coord = start(2);
    let a = join(&coord, "host-a", None).unwrap();
    let b = join(&coord, "host-b", None).unwrap();
    assert_eq!((a.welcome().rank, b.welcome().rank, a.welcome().world), (0, 1, 2));
    assert_eq!(a.welcome().config_toml, "name = \"test\"\n");
    assert_eq!(a.welcome().plan, Some(layout::PlacementPlan::contiguous(1, 4, 2)));
    assert_eq!(
        a.welcome().attn_plan,
        Some(layout::PlacementPlan::contiguous(1, 2, 2)),
        "the attention experts' plan too"
    );
    a.report(report(0, 1, 10.0, 5)).unwrap();
    b.report(report(1, 1, 6.0, 3)).unwrap();
    let Event::Step(summary) = wait_for(&coord, "step", |e| matches!(e, Event::Step(_))) else { unreachable!() };
    assert_eq!((summary.step, summary.tokens, summary.dropped), (1, 8, 2));
    assert!((summary.loss - 2.0).abs() < 1e-12);
    assert_eq!(summary.expert_rows_per_rank, vec![3, 4]);
    // Exposed 0.05 and 0.10 of 0.2 each: the slowest rank's, and 0.15 hidden of 0.4.
    assert_eq!((summary.comm_s, summary.exposed_comm_s), (0.2, 0.1));
    assert!((summary.overlap_efficiency - 0.625).abs() < 1e-12, "{}", summary.overlap_efficiency);

    let status = http_get(&coord, "/status");
    assert!(status.starts_with("HTTP/1.1 200 OK"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&status[status.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(json["registered"], 2);
    assert_eq!(json["ranks"][1]["host"], "host-b");
    assert_eq!(json["ranks"][0]["health"], "healthy");
    assert_eq!(json["last_step"]["step"], 1);
    let metrics = http_get(&coord, "/metrics");
    assert!(metrics.contains("switchyard_loss 2\n"), "{metrics}");
    assert!(metrics.contains("switchyard_rank_up{rank=\"1\",host=\"host-b\"} 1"), "{metrics}");
    assert!(http_get(&coord, "/nope").starts_with("HTTP/1.1 404"));

    a.finish(true).unwrap();
    assert_eq!(
        wait_for(&coord, "finish", |e| matches!(e, Event::Finished { .. })),
        Event::Finished { rank: 0, ok: true }
    );
}

#[test]
fn a_worker_whose_connection_drops_is_lost_and_the_others_are_stopped() {
    let coord = start(2);
    let a = join(&coord, "host-a", None).unwrap();
    let b = join(&coord, "host-b", None).unwrap();
    drop(b);
    let lost = wait_for(&coord, "lost", |e| matches!(e, Event::Lost { .. }));
    let Event::Lost { rank, host, reason } = lost else { unreachable!() };
    assert_eq!((rank, host.as_str()), (1, "host-b"));
    assert!(reason.contains("connection closed"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.stop_reason().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = a.stop_reason().expect("rank 0 is told to stop");
    assert!(why.contains("rank 1 on host-b was lost"), "{why}");
    assert!(coord.status().ranks[1].health.starts_with("lost"));
}

#[test]
fn a_silent_worker_is_lost_when_its_heartbeats_stop() {
    let coord = start(1);
    // Registers by hand and then says nothing: no heartbeat thread.
    let mut stream = TcpStream::connect(coord.addr()).unwrap();
    stream.write_all(&encode(&Message::Register(registration("quiet-host", None, TOKEN)))).unwrap();
    assert!(matches!(read_blocking(&mut stream).unwrap(), Message::Welcome(Welcome { rank: 0, .. })));
    let started = Instant::now();
    let Event::Lost { rank, host, reason } = wait_for(&coord, "lost", |e| matches!(e, Event::Lost { .. })) else {
        unreachable!()
    };
    assert_eq!((rank, host.as_str()), (0, "quiet-host"));
    assert!(reason.contains("no heartbeat"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(700), "not long before the heartbeat timeout");
    drop(stream);
}

#[test]
fn a_wrong_token_is_refused_on_both_sides_and_the_job_goes_on() {
    let coord = start(1);
    let bad = registration("intruder", None, "guess");
    let err = CoordinatorClient::connect(&coord.addr().to_string(), bad, Duration::from_secs(5)).err().unwrap();
    assert!(err.to_string().contains("wrong auth token from intruder"), "{err}");
    assert!(!err.retryable());
    let refused = wait_for(&coord, "refused", |e| matches!(e, Event::Refused { .. }));
    assert!(matches!(refused, Event::Refused { reason, .. } if reason.contains("wrong auth token")));
    assert_eq!(join(&coord, "host-a", None).unwrap().welcome().rank, 0);
}

#[test]
fn a_peer_of_another_protocol_version_is_told_which() {
    let coord = start(1);
    let frame = encode_with_version(&Message::Register(registration("old", None, TOKEN)), 99);
    let reason = refusal(raw_exchange(&coord, &frame));
    assert!(reason.contains("protocol version 99"), "{reason}");
    assert!(join(&coord, "host-a", None).is_ok(), "the job goes on");
}

#[test]
fn garbage_bytes_are_refused_and_the_job_goes_on() {
    let coord = start(1);
    let reason = refusal(raw_exchange(&coord, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(reason.contains("not a switchyard frame"), "{reason}");
    // A right header with a payload that is not a message.
    let mut frame = encode(&Message::Heartbeat { rank: 0, step: 0 });
    frame.truncate(HEADER_BYTES);
    frame[4..8].copy_from_slice(&3u32.to_be_bytes());
    frame.extend_from_slice(&[0xff, 0xff, 0xff]);
    let reason = refusal(raw_exchange(&coord, &frame));
    assert!(reason.contains("could not be decoded"), "{reason}");
    assert!(join(&coord, "host-a", None).is_ok());
}

#[test]
fn an_oversized_frame_is_refused_without_reading_it() {
    let coord = start(1);
    let mut header = encode(&Message::Heartbeat { rank: 0, step: 0 });
    header.truncate(HEADER_BYTES);
    header[4..8].copy_from_slice(&(1u32 << 30).to_be_bytes());
    let reason = refusal(raw_exchange(&coord, &header));
    assert!(reason.contains("1073741824 bytes exceeds"), "{reason}");
    assert!(join(&coord, "host-a", None).is_ok());
}

#[test]
fn a_duplicate_rank_is_refused_naming_the_holder() {
    let coord = start(2);
    let _first = join(&coord, "host-a", Some(0)).unwrap();
    let err = join(&coord, "host-b", Some(0)).err().unwrap();
    assert!(err.to_string().contains("rank 0 is already registered by host-a"), "{err}");
    let err = join(&coord, "host-c", Some(7)).err().unwrap();
    assert!(err.to_string().contains("rank 7 does not exist"), "{err}");
    assert_eq!(join(&coord, "host-d", None).unwrap().welcome().rank, 1);
}

/// A small deterministic generator for the round-trip property test.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 0
    }
    fn text(&mut self) -> String {
        let len = (self.next() % 40) as usize;
        (0..len).map(|_| char::from_u32((self.next() % 0x2FF) as u32 + 0x20).unwrap_or('?')).collect()
    }
    fn message(&mut self) -> Message {
        match self.next() % 10 {
            0 => Message::Register(Registration {
                token: self.text(),
                host: self.text(),
                pid: self.next() as u32,
                rank: self.coin().then(|| self.next() as u32),
                device: self.text(),
                checkpoint_url: self.text(),
            }),
            1 => Message::Welcome(Welcome {
                rank: self.next() as u32,
                world: self.next() as u32,
                config_toml: self.text(),
                dims: None,
                plan: self.coin().then(|| layout::PlacementPlan::contiguous(2, 8, 4)),
                attn_plan: self.coin().then(|| layout::PlacementPlan::contiguous(2, 4, 2)),
                heartbeat_ms: self.next(),
            }),
            2 => Message::Refused { reason: self.text(), retryable: self.coin() },
            3 => Message::Heartbeat { rank: self.next() as u32, step: self.next() },
            4 => Message::Step(StepReport {
                rank: self.next() as u32,
                step: self.next(),
                ce_sum: f64::from_bits(self.next() >> 2),
                tokens: self.next(),
                step_time_s: (self.next() % 1000) as f64 / 7.0,
                expert_rows: self.next(),
                dropped: self.next(),
                alltoall_bytes: self.next(),
                alltoall_s: 0.25,
                comm_s: 0.5,
                exposed_comm_s: 0.125,
                detail: self.coin().then(|| self.text()),
            }),
            5 => Message::Stop { reason: self.text() },
            6 => Message::ShardWritten(ShardWritten {
                rank: self.next() as u32,
                step: self.next(),
                outcome: match self.next() % 3 {
                    0 => Ok(None),
                    1 => Ok(Some(self.text())),
                    _ => Err(self.text()),
                },
                manifest: self.coin().then(|| self.text()),
                bytes: self.next(),
                upload_s: (self.next() % 1000) as f64 / 3.0,
            }),
            7 => Message::Committed { step: self.next() },
            8 => Message::SaveAndStop { reason: self.text() },
            _ => Message::Goodbye { rank: self.next() as u32, ok: self.coin() },
        }
    }
}

#[test]
fn every_message_round_trips_and_cut_frames_are_errors() {
    let mut gen = Gen(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2000 {
        let message = gen.message();
        let frame = encode(&message);
        let len = decode_header(frame[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - HEADER_BYTES);
        assert_eq!(decode_payload(&frame[HEADER_BYTES..]).unwrap(), message);
        // Any cut of the payload is an error, never a panic or a wrong message.
        let cut = HEADER_BYTES + (gen.next() as usize % len.max(1));
        if cut < frame.len() {
            assert!(decode_payload(&frame[HEADER_BYTES..cut]).is_err());
        }
    }
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    // The suite's short stand-in for the cargo-fuzz target (fuzz/fuzz_targets/frame.rs).
    let mut gen = Gen(0xD1B5_4A32_D192_ED03);
    for round in 0..20_000 {
        let len = (gen.next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| gen.next() as u8).collect();
        // Half the time, a valid header so the payload decoder is reached.
        if round % 2 == 0 && len >= HEADER_BYTES {
            bytes[..4].copy_from_slice(&[b'S', b'Y', 0, 1]);
            bytes[4..8].copy_from_slice(&((len - HEADER_BYTES) as u32).to_be_bytes());
        }
        let mut cursor = std::io::Cursor::new(&bytes);
        let _ = read_blocking(&mut cursor);
    }
}

/// A coordinator that commits checkpoints to `root`, workers joining with that URL.
fn start_committing(world: usize, root: &std::path::Path) -> (Coordinator, Vec<CoordinatorClient>) {
    let url = root.display().to_string();
    let mut cfg = config(world);
    cfg.checkpoint = Some(coordinator::commit::CommitTarget {
        url: url.clone(),
        options: checkpoint::StoreOptions::default(),
        keep_last: 1,
    });
    let coord = Coordinator::start(cfg, "127.0.0.1:0".parse().unwrap(), None).unwrap();
    let clients = (0..world as u32)
        .map(|rank| {
            let mut reg = registration("host", Some(rank), TOKEN);
            reg.checkpoint_url = url.clone();
            CoordinatorClient::connect(&coord.addr().to_string(), reg, Duration::from_secs(5)).unwrap()
        })
        .collect();
    (coord, clients)
}

/// Rank `rank` writes a one-tensor shard of `step` and reports it.
fn write_and_report(store: &checkpoint::CheckpointStore, client: &CoordinatorClient, rank: u32, step: u64) {
    let data = vec![rank as f32; 4];
    let name = format!("t{rank}");
    let tensor = checkpoint::TensorRef { name: &name, shape: &[4], data: &data };
    let report = store.write_shard(step, &format!("rank-{rank:05}"), &[tensor]).unwrap();
    let manifest = (rank == 0).then(|| serde_json::to_string(&checkpoint::Manifest::new(step, 0, "test")).unwrap());
    let written = ShardWritten {
        rank,
        step,
        outcome: Ok(Some(serde_json::to_string(&report).unwrap())),
        manifest,
        bytes: report.size_bytes,
        upload_s: 0.01,
    };
    client.shard_sender().send(written).unwrap();
}

#[test]
fn the_coordinator_commits_a_step_once_every_rank_wrote_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, clients) = start_committing(2, dir.path());
    let store = checkpoint::CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    for step in [10, 20] {
        write_and_report(&store, &clients[0], 0, step);
        assert_eq!(store.latest_step().unwrap(), if step == 10 { None } else { Some(10) }, "not before rank 1");
        write_and_report(&store, &clients[1], 1, step);
        let Event::Committed(done) = wait_for(&coord, "commit", |e| matches!(e, Event::Committed(_))) else {
            unreachable!()
        };
        assert_eq!(done.step, step);
        // Every rank hears of the commit (the end of a job waits for it).
        for client in &clients {
            client.wait_committed(step).unwrap();
        }
    }
    assert_eq!(store.latest_step().unwrap(), Some(20));
    assert_eq!(store.committed_steps().unwrap(), [20], "keep_last = 1 pruned step 10 after step 20 committed");
    assert_eq!(store.verify(20).unwrap().num_tensors, 2);
    assert_eq!(coord.status().last_checkpoint, Some(20));
}

#[test]
fn a_rank_that_failed_its_upload_stops_the_job_and_nothing_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, clients) = start_committing(2, dir.path());
    let store = checkpoint::CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    write_and_report(&store, &clients[0], 0, 5);
    let failed = ShardWritten {
        rank: 1,
        step: 5,
        outcome: Err("could not write s3://b/x: connection refused".into()),
        manifest: None,
        bytes: 0,
        upload_s: 1.0,
    };
    clients[1].shard_sender().send(failed).unwrap();
    let Event::CheckpointFailed { step, reason } =
        wait_for(&coord, "failed checkpoint", |e| matches!(e, Event::CheckpointFailed { .. }))
    else {
        unreachable!()
    };
    assert_eq!(step, 5);
    assert!(reason.contains("rank 1") && reason.contains("connection refused"), "{reason}");
    let err = clients[0].wait_committed(5).unwrap_err().to_string();
    assert!(err.contains("checkpoint step 5 failed") && err.contains("no step was committed"), "{err}");
    assert_eq!(store.latest_step().unwrap(), None);
}

#[test]
fn a_worker_writing_checkpoints_elsewhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, _clients) = start_committing(1, dir.path());
    let mut reg = registration("host-x", None, TOKEN);
    reg.checkpoint_url = "/somewhere/else".into();
    let err = CoordinatorClient::connect(&coord.addr().to_string(), reg, Duration::from_secs(5)).err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("/somewhere/else") && msg.contains("same [checkpoint] url"), "{msg}");
}

#[test]
fn the_coordinator_writes_rank_0s_metrics_line_once_every_rank_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/metrics.jsonl");
    let mut cfg = config(2);
    cfg.metrics_path = Some(path.clone());
    let coord = Coordinator::start(cfg, "127.0.0.1:0".parse().unwrap(), None).unwrap();
    let a = join(&coord, "host-a", Some(0)).unwrap();
    let b = join(&coord, "host-b", Some(1)).unwrap();
    for step in 1..=2 {
        let mut first = report(0, step, 10.0, 5);
        first.detail = Some(format!("{{\"step\":{step},\"loss\":2.0}}"));
        a.report(first).unwrap();
        assert!(!path.exists() || std::fs::read_to_string(&path).unwrap().lines().count() < step as usize);
        b.report(report(1, step, 6.0, 3)).unwrap();
        wait_for(&coord, "step", |e| matches!(e, Event::Step(s) if s.step == step));
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":2.0}\n");
}
