//! `switchyard bench alltoall`: all-to-all-v time and bandwidth per message
//! size, for the local (threads) or MPI (processes) backend, against the
//! same exchange through mpi4py's `Alltoallv` run in the same invocation
//! (`bench/mpi4py_alltoallv.py`; `scripts/bench-alltoall.sh` installs mpi4py).
//!
//! Every rank sends `bytes` per call, split evenly over all ranks (its own
//! block included), into a receive buffer kept across calls. The headline
//! column is the same exchange as the peer's: receive counts known
//! (`all_to_all_v_known_into`, the form the step engine uses, since the
//! routing metadata already tells every rank what comes; mpi4py's
//! `Alltoallv` is given the counts too). The last column is
//! `all_to_all_v_into`, which first tells every rank its receive counts.
//!
//! Time is the slowest rank's mean over the timed iterations, fastest of 7
//! repeats. Memory speed on a shared machine moves in spells of seconds,
//! so switchyard's job and the peer's run at the same time and take turns,
//! one repeat each (see `bench::turns`); each keeps its best over `--rounds`
//! rounds. Bandwidth is bytes sent per rank / time.
//!
//! On the MPI backend the ranks also time OpenMPI's own `MPI_Alltoallv`,
//! which mpi4py calls, in turns with switchyard's exchange on the same
//! buffers: that column compares the algorithms with everything else equal.

use crate::bench::turns::{Turns, TURNS_VAR};
use crate::format::human_bytes;
use anyhow::{bail, Context, Result};
use collectives::launch::launched_rank;
use collectives::local::LocalWorld;
use collectives::mpi::MpiWorld;
use collectives::{Communicator, MessageBuffer};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Message sizes per rank: 4 KiB to 64 MiB.
const SIZES: [usize; 9] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 64 << 20];
/// Marks the result line rank 0 prints (ours and the peer's).
const JSON_MARK: &str = "SWITCHYARD_BENCH_JSON ";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    bytes: usize,
    warmup: usize,
    iters: usize,
    /// Timed repeats of `iters` calls; the fastest repeat is reported.
    repeats: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Measured {
    bytes: usize,
    /// The exchange with the receive counts known (as mpi4py's Alltoallv is given them).
    seconds: f64,
    /// Switchyard's exchange that first tells every rank its receive counts.
    #[serde(default)]
    counts_exchanged_seconds: Option<f64>,
    /// The library's own `MPI_Alltoallv`, timed in turns with switchyard's.
    #[serde(default)]
    library_seconds: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Rows {
    rows: Vec<Measured>,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: String,
    ranks: usize,
    rows: Vec<ReportRow>,
    peer_note: String,
}

#[derive(Debug, Serialize)]
struct ReportRow {
    bytes: usize,
    /// Counts known on both sides, like the peer.
    seconds: f64,
    gb_per_s: f64,
    /// Counts sent first (`all_to_all_v_into`), the form a dispatch uses.
    counts_exchanged_seconds: Option<f64>,
    /// OpenMPI's `MPI_Alltoallv` called in switchyard's processes, in turns with it.
    library_seconds: Option<f64>,
    /// Library time / switchyard time.
    speed_vs_library: Option<f64>,
    mpi4py_seconds: Option<f64>,
    mpi4py_gb_per_s: Option<f64>,
    /// mpi4py time / switchyard time: above 1 means switchyard is faster.
    speed_vs_mpi4py: Option<f64>,
}

fn plan(max_mib: usize) -> Vec<Case> {
    SIZES
        .iter()
        .filter(|&&bytes| bytes <= max_mib << 20)
        .map(|&bytes| Case { bytes, warmup: 3, iters: ((256 << 20) / bytes).clamp(10, 300), repeats: 7 })
        .collect()
}

/// A quick plan of a few sizes (KiB): how `simulate validate` measures a
/// shaped link as the ranks of its own mpirun.
fn probe_plan(sizes_kib: &[usize]) -> Vec<Case> {
    sizes_kib.iter().map(|&kib| Case { bytes: kib << 10, warmup: 3, iters: 30, repeats: 5 }).collect()
}

/// Seconds per exchange by bytes per rank (counts known), from the output
/// of `bench alltoall --backend mpi --probe-kib ...` run as MPI ranks.
pub fn parse_probe(output: &[u8]) -> Result<Vec<(usize, f64)>> {
    Ok(parse_rows(output, "the link probe")?.into_iter().map(|m| (m.bytes, m.seconds)).collect())
}

/// The ways of making one exchange that a benchmark rank times.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// `all_to_all_v_known_into`: receive counts known, as mpi4py's peer has them.
    Known,
    /// `all_to_all_v_into`: the counts travel first.
    CountsSentFirst,
    /// OpenMPI's own blocking `MPI_Alltoallv`, what mpi4py's `Alltoallv` calls.
    Library,
}

/// Times every case on this rank, every way in `ways`, taking turns repeat
/// by repeat on the same send and receive buffers, so that a slow spell of
/// the machine hits them alike. Every rank gets the slowest rank's times.
fn measure(
    comm: &mut dyn Communicator,
    library: Option<&MpiWorld>,
    plan: &[Case],
    turns: Option<&Turns>,
) -> Result<Vec<Measured>> {
    let size = comm.size();
    let ways: &[Way] = match library {
        Some(_) => &[Way::Known, Way::CountsSentFirst, Way::Library],
        None => &[Way::Known, Way::CountsSentFirst],
    };
    let mut rows = Vec::new();
    let mut first_turn = 0;
    for case in plan {
        let per_dst = case.bytes / 4 / size;
        // Sent from a message buffer, as mpi4py sends numpy arrays (huge pages).
        let send: MessageBuffer<f32> = (0..per_dst * size).map(|i| i as f32).collect();
        let counts = vec![per_dst; size];
        let mut recv = MessageBuffer::new();
        let mut exchange = |way: Way, comm: &mut dyn Communicator| -> Result<()> {
            match (way, library) {
                (Way::Known, _) => comm.all_to_all_v_known_into(&send, &counts, &counts, &mut recv)?,
                (Way::CountsSentFirst, _) => drop(comm.all_to_all_v_into(&send, &counts, &mut recv)?),
                (Way::Library, Some(world)) => {
                    // The previous exchange left `recv` at its full length.
                    recv.resize(send.len(), 0.0);
                    world.library_all_to_all_v(&send, &counts, &counts, &mut recv)?
                }
                (Way::Library, None) => bail!("the library's all-to-all needs the MPI backend"),
            }
            Ok(())
        };
        let best = time_in_turns(comm, case, ways, &mut exchange, turns, first_turn)?;
        first_turn += case.repeats as u64;
        rows.push(Measured {
            bytes: case.bytes,
            seconds: best[0],
            counts_exchanged_seconds: Some(best[1]),
            library_seconds: best.get(2).copied(),
        });
    }
    Ok(rows)
}

/// Per way, the slowest rank's mean time over the case's iterations,
/// fastest of its repeats; the ways take turns, one repeat each. With
/// `turns`, every repeat (each with its warm-up) waits for its turn
/// with the peer's job, numbered from `first_turn`.
fn time_in_turns(
    comm: &mut dyn Communicator,
    case: &Case,
    ways: &[Way],
    exchange: &mut dyn FnMut(Way, &mut dyn Communicator) -> Result<()>,
    turns: Option<&Turns>,
    first_turn: u64,
) -> Result<Vec<f64>> {
    let mut best = vec![f64::INFINITY; ways.len()];
    for repeat in 0..case.repeats {
        let turn = first_turn + repeat as u64;
        if let Some(turns) = turns {
            turns.wait(turn)?;
        }
        // Every repeat warms up, not only the first: a job that slept
        // through the peer's turn wakes on cold caches and idle cores, and
        // only the first way timed after it paid for that.
        for &way in ways {
            for _ in 0..case.warmup {
                exchange(way, comm)?;
            }
        }
        for (&way, best) in ways.iter().zip(&mut best) {
            comm.barrier()?;
            let started = Instant::now();
            for _ in 0..case.iters {
                exchange(way, comm)?;
            }
            let mine = started.elapsed().as_secs_f64() / case.iters as f64;
            let all = comm.all_gather_v(&[mine as f32])?;
            *best = best.min(all.values.iter().fold(0f32, |a, &b| a.max(b)) as f64);
        }
        // Every rank is past the timing (the gather above met them all).
        if let (Some(turns), 0) = (turns, comm.rank()) {
            turns.pass(turn)?;
        }
    }
    Ok(best)
}

/// The JSON result line in a process's output.
fn parse_rows(output: &[u8], what: &str) -> Result<Vec<Measured>> {
    let text = String::from_utf8_lossy(output);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(JSON_MARK))
        .with_context(|| format!("{what} printed no result line:\n{text}"))?;
    Ok(serde_json::from_str::<Rows>(line)?.rows)
}

/// The benchmark: as one rank of an MPI job, or as the command a user runs.
pub fn run(ranks: usize, backend: &str, max_mib: usize, rounds: usize, json: bool, probe_kib: &[usize]) -> Result<()> {
    let plan = if probe_kib.is_empty() { plan(max_mib) } else { probe_plan(probe_kib) };
    if backend == "mpi" && launched_rank().is_some() {
        let world = MpiWorld::init()?;
        let mut comm = world.world(Duration::from_secs(300))?;
        let rows = measure(comm.as_mut(), Some(&world), &plan, Turns::from_env()?.as_ref())?;
        if comm.rank() == 0 {
            println!("{JSON_MARK}{}", serde_json::to_string(&Rows { rows })?);
        }
        return Ok(());
    }
    if ranks < 2 {
        bail!("--ranks must be 2 or more: an all-to-all on one rank moves nothing");
    }
    // Each round runs both jobs at once, taking turns repeat by repeat
    // (see bench::turns); each side keeps its best per size over the rounds.
    let (mut ours, mut peer): (Option<Vec<Measured>>, Option<Vec<Measured>>) = (None, None);
    let mut peer_note =
        "mpi4py Alltoallv over OpenMPI, same sizes and rank count, in turns with switchyard".to_string();
    let peer_missing = peer_missing();
    if let Some(why) = &peer_missing {
        peer_note = format!("mpi4py not measured: {why}");
    }
    let dir = std::env::temp_dir().join(format!("switchyard-bench-alltoall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let turn_file = dir.join("turn");
    for round in 1..=rounds {
        if peer_missing.is_some() {
            eprintln!("round {round}/{rounds}: switchyard's all_to_all_v ({backend} backend, {ranks} ranks) ...");
            ours = Some(keep_best(ours, measure_ours(backend, ranks, &plan, max_mib, None)?));
            continue;
        }
        eprintln!("round {round}/{rounds}: switchyard's all_to_all_v ({backend} backend, {ranks} ranks) in turns with mpi4py's Alltoallv ...");
        Turns::start(&turn_file)?;
        let peer_job = start_peer(ranks, &plan, &Turns::new(&turn_file, 1))?;
        let mine = measure_ours(backend, ranks, &plan, max_mib, Some(&Turns::new(&turn_file, 0)));
        let theirs = finish_peer(peer_job, mine.is_err());
        ours = Some(keep_best(ours, mine?));
        peer = Some(keep_best(peer, theirs?));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ours = ours.expect("at least one round");
    let rows = ours
        .iter()
        .map(|m| {
            let p = peer.as_ref().and_then(|rows| rows.iter().find(|p| p.bytes == m.bytes));
            ReportRow {
                bytes: m.bytes,
                seconds: m.seconds,
                gb_per_s: m.bytes as f64 / m.seconds / 1e9,
                counts_exchanged_seconds: m.counts_exchanged_seconds,
                library_seconds: m.library_seconds,
                speed_vs_library: m.library_seconds.map(|l| l / m.seconds),
                mpi4py_seconds: p.map(|p| p.seconds),
                mpi4py_gb_per_s: p.map(|p| p.bytes as f64 / p.seconds / 1e9),
                speed_vs_mpi4py: p.map(|p| p.seconds / m.seconds),
            }
        })
        .collect();
    let report = Report { backend: backend.into(), ranks, rows, peer_note };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Switchyard's exchange on `backend`: threads here, or ranks under mpirun.
fn measure_ours(
    backend: &str,
    ranks: usize,
    plan: &[Case],
    max_mib: usize,
    turns: Option<&Turns>,
) -> Result<Vec<Measured>> {
    match backend {
        "local" => {
            let comms = LocalWorld::new(ranks, Duration::from_secs(300));
            let results: Vec<Result<Vec<Measured>>> = std::thread::scope(|scope| {
                let handles: Vec<_> =
                    comms.into_iter().map(|mut c| scope.spawn(move || measure(&mut c, None, plan, turns))).collect();
                handles.into_iter().map(|h| h.join().expect("a benchmark rank panicked")).collect()
            });
            results.into_iter().next().expect("rank 0")
        }
        "mpi" => {
            let args = ["bench", "alltoall", "--backend", "mpi", "--max-mib", &max_mib.to_string()].map(String::from);
            let env: Vec<(&str, String)> = turns.map(|t| (TURNS_VAR, t.env_value())).into_iter().collect();
            let out = crate::run::mpirun::self_command(ranks, &args, &env, None)?
                .output()
                .map_err(crate::run::mpirun::not_started)?;
            parse_rows(&out.stdout, "the MPI benchmark ranks")
        }
        other => bail!("--backend {other}: use local or mpi"),
    }
}

/// Per size, the faster of the best so far and a new measurement.
fn keep_best(best: Option<Vec<Measured>>, new: Vec<Measured>) -> Vec<Measured> {
    match best {
        None => new,
        Some(best) => best
            .into_iter()
            .zip(new)
            .map(|(a, b)| Measured {
                bytes: a.bytes,
                seconds: a.seconds.min(b.seconds),
                counts_exchanged_seconds: faster(a.counts_exchanged_seconds, b.counts_exchanged_seconds),
                library_seconds: faster(a.library_seconds, b.library_seconds),
            })
            .collect(),
    }
}

fn faster(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Why mpi4py cannot be the peer here, if it cannot.
fn peer_missing() -> Option<String> {
    let probe = std::process::Command::new("python3").args(["-c", "import mpi4py, numpy"]).output();
    match probe {
        Err(e) => {
            Some(format!("python3 cannot be run ({e}); scripts/bench-alltoall.sh installs it with mpi4py and numpy"))
        }
        Ok(out) if !out.status.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            let what = err.lines().find_map(|l| l.strip_prefix("ModuleNotFoundError: ")).unwrap_or("import failed");
            Some(format!("{what} (scripts/bench-alltoall.sh installs mpi4py and numpy)"))
        }
        Ok(_) => None,
    }
}

/// Starts the same exchange through mpi4py under mpirun, taking `turns`.
fn start_peer(ranks: usize, plan: &[Case], turns: &Turns) -> Result<std::process::Child> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/mpi4py_alltoallv.py");
    let mut mpirun = crate::run::mpirun::command(ranks);
    // mpirun's environment is its local ranks'.
    super::as_users_run_it(&mut mpirun)
        .args(["-x", TURNS_VAR])
        .env(TURNS_VAR, turns.env_value())
        .args(["python3", script, &serde_json::to_string(plan)?])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(crate::run::mpirun::not_started)
}

/// The peer's rows; `abandon` (switchyard's side failed, so no turn will
/// come) ends the peer first.
fn finish_peer(mut job: std::process::Child, abandon: bool) -> Result<Vec<Measured>> {
    if abandon {
        let _ = job.kill();
    }
    let out = job.wait_with_output().context("waiting for the mpi4py job")?;
    if !out.status.success() {
        bail!("the mpi4py script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_rows(&out.stdout, "the mpi4py script")
}

fn print_table(r: &Report) {
    println!("switchyard bench alltoall: {} backend, {} ranks (bytes sent per rank per call)", r.backend, r.ranks);
    println!("peer: {}", r.peer_note);
    println!();
    println!(
        "| size | switchyard | GB/s | mpi4py | GB/s | speed vs mpi4py | MPI_Alltoallv, in turns | speed vs it | switchyard, counts sent first |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |s: f64| format!("{:.3} ms", s * 1e3);
    for row in &r.rows {
        println!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |",
            human_bytes(row.bytes as f64),
            ms(row.seconds),
            row.gb_per_s,
            row.mpi4py_seconds.map_or("-".into(), ms),
            row.mpi4py_gb_per_s.map_or("-".into(), |g| format!("{g:.2}")),
            row.speed_vs_mpi4py.map_or("-".into(), |x| format!("{x:.2}x")),
            row.library_seconds.map_or("-".into(), ms),
            row.speed_vs_library.map_or("-".into(), |x| format!("{x:.2}x")),
            row.counts_exchanged_seconds.map_or("-".into(), ms),
        );
    }
}
