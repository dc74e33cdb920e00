//! The `mpi` backend under a real `mpirun`: every collective on 1 to 4
//! processes with uneven and zero counts, 64 MiB messages, sub-groups and
//! non-blocking forms; receive counts known, and a rank whose known counts
//! disagree with its sender's failing (a short message) or ending the job
//! (a long one) with the sender's name; transfers on a communication thread that finish
//! while the caller makes no MPI call; a stalled rank makes the others fail naming it; a
//! killed rank ends the job.
//!
//! One binary plays both parts: started by hand (cargo test) it is the
//! driver and runs `mpirun -n N` on itself per case; started by mpirun it
//! is a rank and runs the case named in SWITCHYARD_MPI_CASE.

use collectives::launch::launched_rank;
use collectives::mpi::MpiWorld;
use collectives::{Communicator, MessageBuffer};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

const CASE_VAR: &str = "SWITCHYARD_MPI_CASE";

fn main() {
    if launched_rank().is_some() {
        let case = std::env::var(CASE_VAR).expect("SWITCHYARD_MPI_CASE is set by the driver");
        run_rank(&case);
    } else {
        std::process::exit(drive());
    }
}

// ---------------------------------------------------------------- driver

struct Outcome {
    success: bool,
    output: String,
    seconds: f64,
}

/// Runs `mpirun -n ranks <this binary>` for `case`; kills it after `guard`.
fn mpirun(ranks: usize, case: &str, guard: Duration) -> Result<Outcome, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-n", &ranks.to_string(), "--oversubscribe", "--bind-to", "none", "-x", CASE_VAR])
        .arg(&exe)
        .env(CASE_VAR, case)
        // Containers and CI run as root; OpenMPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run `mpirun` ({e}): install OpenMPI (apt-get install openmpi-bin libopenmpi-dev; ./ci.sh does)"
            )
        })?;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > guard {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "mpirun -n {ranks} ({case}) still running after {guard:?}: it hung\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(Outcome { success: status.success(), output, seconds: started.elapsed().as_secs_f64() })
}

fn expect_success(ranks: usize, case: &str) -> Result<(), String> {
    let out = mpirun(ranks, case, Duration::from_secs(300))?;
    let done = out.output.matches("case done").count();
    if out.success && done == ranks {
        Ok(())
    } else {
        Err(format!("mpirun -n {ranks} {case}: exit ok {} with {done}/{ranks} ranks done\n{}", out.success, out.output))
    }
}

fn drive() -> i32 {
    type Case = (&'static str, Box<dyn Fn() -> Result<(), String>>);
    let cases: Vec<Case> = vec![
        ("every_collective_on_1_rank", Box::new(|| expect_success(1, "collectives"))),
        ("every_collective_on_2_ranks", Box::new(|| expect_success(2, "collectives"))),
        ("every_collective_on_3_ranks", Box::new(|| expect_success(3, "collectives"))),
        ("every_collective_on_4_ranks", Box::new(|| expect_success(4, "collectives"))),
        ("messages_of_64_mib_per_rank_on_4_ranks", Box::new(|| expect_success(4, "large"))),
        ("a_short_message_fails_naming_its_sender", Box::new(|| expect_success(3, "fewer"))),
        ("a_long_message_ends_the_job_naming_its_sender", Box::new(long_message)),
        ("a_communication_thread_completes_transfers_alone", Box::new(|| expect_success(4, "progress"))),
        ("a_stalled_rank_makes_the_others_abort_naming_it", Box::new(stalled_rank)),
        ("a_killed_rank_ends_the_job", Box::new(killed_rank)),
    ];
    let mut failed = 0;
    println!("\nrunning {} tests", cases.len());
    for (name, case) in &cases {
        match case() {
            Ok(()) => println!("test {name} ... ok"),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED\n{why}");
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n",
        cases.len() - failed
    );
    i32::from(failed > 0)
}

fn stalled_rank() -> Result<(), String> {
    let out = mpirun(4, "stall", Duration::from_secs(120))?;
    let named =
        out.output.contains("all_reduce_sum timed out after 3s") && out.output.contains("rank(s) [2] never arrived");
    if !out.success && named {
        eprintln!("stalled rank: the job ended after {:.1}s", out.seconds);
        Ok(())
    } else {
        Err(format!("expected a non-zero exit naming rank 2 as missing; exit ok {}\n{}", out.success, out.output))
    }
}

fn long_message() -> Result<(), String> {
    let out = mpirun(3, "more", Duration::from_secs(120))?;
    if !out.success && out.output.contains("rank 0 sent more values where rank 1 expected 5") {
        Ok(())
    } else {
        Err(format!("expected a non-zero exit naming rank 0 as the sender; exit ok {}\n{}", out.success, out.output))
    }
}

fn killed_rank() -> Result<(), String> {
    let out = mpirun(4, "kill", Duration::from_secs(120))?;
    if !out.success && out.output.contains("rank 1") {
        Ok(())
    } else {
        Err(format!("expected a non-zero exit naming rank 1; exit ok {}\n{}", out.success, out.output))
    }
}

// ---------------------------------------------------------------- ranks

fn run_rank(case: &str) {
    let world = MpiWorld::init().expect("MPI initialises");
    let timeout = if case == "stall" { Duration::from_secs(3) } else { Duration::from_secs(120) };
    let mut comm = world.world(timeout).expect("world communicator");
    match case {
        "collectives" => every_collective(comm.as_mut()),
        "large" => large_messages(comm.as_mut()),
        "fewer" => fewer_than_expected(comm.as_mut()),
        "more" => more_than_expected(comm.as_mut()),
        "progress" => progress_without_the_caller(comm.as_mut()),
        "stall" => stall(comm.as_mut()),
        "kill" => kill(comm.as_mut()),
        other => panic!("unknown case {other}"),
    }
    println!("rank {} case done", comm.rank());
}

/// Asserts that every rank holds the same bits in `values`.
fn same_bits_everywhere(comm: &mut dyn Communicator, values: &[f32], what: &str) {
    let got = comm.all_gather_v(values).unwrap();
    let n = values.len();
    for r in 0..comm.size() {
        let theirs = &got.values[r * n..(r + 1) * n];
        assert!(theirs.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: rank {r} differs");
    }
}

/// Close to the rank-order sum: MPI may add in another order.
fn close_to_rank_order_sum(size: usize, got: &[f32], first: usize) {
    for (j, v) in got.iter().enumerate() {
        let i = first + j;
        let scale: f32 = (0..size).map(|r| mixed(r, i).abs()).sum();
        assert!((v - mixed_sum(size, i)).abs() <= 1e-6 * scale, "value {i}: {v} vs {}", mixed_sum(size, i));
    }
}

fn every_collective(comm: &mut dyn Communicator) {
    let (rank, size) = (comm.rank(), comm.size());

    let (send, counts) = a2a_send(rank, size);
    let got = comm.all_to_all_v(&send, &counts).unwrap();
    assert_eq!((got.values.into_vec(), got.counts), a2a_expected(rank, size));
    let send_u64: Vec<u64> = send.iter().map(|&v| v as u64).collect();
    let (got, got_counts) = comm.all_to_all_v_u64(&send_u64, &counts).unwrap();
    let (expected, expected_counts) = a2a_expected(rank, size);
    assert_eq!(got, expected.iter().map(|&v| v as u64).collect::<Vec<_>>());
    assert_eq!(got_counts, expected_counts);
    let got = comm.all_to_all_v(&[], &vec![0; size]).unwrap();
    assert!(got.values.is_empty() && got.counts == vec![0; size]);
    // Receive counts known: nothing travels first; the buffer is reused.
    let mut recv = MessageBuffer::from(vec![-1.0; 3]);
    for _ in 0..2 {
        comm.all_to_all_v_known_into(&send, &counts, &expected_counts, &mut recv).unwrap();
        assert_eq!(recv, expected);
    }
    comm.all_to_all_v_known_into(&[], &vec![0; size], &vec![0; size], &mut recv).unwrap();
    assert!(recv.is_empty());

    // Rank 0 sends much (400 KB) to rank 1 only; every other pair moves one
    // value. Ranks 2 and 3 neither send nor receive much, yet must take the
    // same algorithm as ranks 0 and 1 (a rank-local choice deadlocks).
    let count = |src: usize, dst: usize| if src == 0 && dst == 1 { 100_000 } else { 1 };
    let counts: Vec<usize> = (0..size).map(|dst| count(rank, dst)).collect();
    let send: Vec<f32> = (0..counts.iter().sum::<usize>()).map(|i| (rank * 1_000_000 + i) as f32).collect();
    let got = comm.all_to_all_v(&send, &counts).unwrap();
    assert_eq!(got.counts, (0..size).map(|src| count(src, rank)).collect::<Vec<_>>());
    let mut offset = 0;
    for src in 0..size {
        let first_index: usize = (0..rank).map(|dst| count(src, dst)).sum();
        assert_eq!(got.values[offset], (src * 1_000_000 + first_index) as f32, "first value from rank {src}");
        offset += count(src, rank);
    }

    for len in [0, 1, 7, 200_003] {
        let mut buf: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
        comm.all_reduce_sum(&mut buf).unwrap();
        close_to_rank_order_sum(size, &buf, 0);
        same_bits_everywhere(comm, &buf, "all_reduce_sum");
        let started: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
        let got = comm.start_all_reduce_sum(started).unwrap().wait().unwrap();
        assert!(got.values.iter().zip(&buf).all(|(a, b)| a.to_bits() == b.to_bits()), "non-blocking all-reduce");
        let mut buf: Vec<f64> = (0..len).map(|i| mixed(rank, i) as f64).collect();
        comm.all_reduce_sum_f64(&mut buf).unwrap();
        for (i, v) in buf.iter().enumerate() {
            let exact: f64 = (0..size).map(|r| mixed(r, i) as f64).sum();
            assert!((v - exact).abs() <= 1e-12 * exact.abs().max(1.0), "f64 value {i}");
        }
    }

    let send: Vec<f32> = (0..rank % 3).map(|i| (rank * 10 + i) as f32).collect();
    let got = comm.all_gather_v(&send).unwrap();
    let expected: Vec<f32> = (0..size).flat_map(|r| (0..r % 3).map(move |i| (r * 10 + i) as f32)).collect();
    assert_eq!(got.values, expected);
    assert_eq!(got.counts, (0..size).map(|r| r % 3).collect::<Vec<_>>());
    let got = comm.all_gather_u64(&vec![rank as u64; (rank + 1) % 3]).unwrap();
    assert_eq!(got, (0..size).map(|r| vec![r as u64; (r + 1) % 3]).collect::<Vec<_>>());

    let counts: Vec<usize> = (0..size).map(|r| (2 * r + 1) % 3).collect();
    let len: usize = counts.iter().sum();
    let send: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
    let got = comm.reduce_scatter_sum(&send, &counts).unwrap();
    assert_eq!(got.len(), counts[rank]);
    close_to_rank_order_sum(size, &got, counts[..rank].iter().sum());
    assert!(comm.reduce_scatter_sum(&[], &vec![0; size]).unwrap().is_empty());

    for root in 0..size {
        let data: Vec<f32> = (0..5).map(|i| (root * 100 + i) as f32).collect();
        let mut buf = if rank == root { data.clone() } else { vec![-1.0; 5] };
        comm.broadcast(&mut buf, root).unwrap();
        assert_eq!(buf, data);
    }
    comm.broadcast(&mut [], 0).unwrap();
    comm.barrier().unwrap();

    // Even and odd ranks, ordered by descending key: new rank = reversed order.
    let mut sub = comm.split(rank % 2, size - rank).unwrap();
    let members: Vec<usize> = (0..size).filter(|r| r % 2 == rank % 2).collect();
    assert_eq!(sub.size(), members.len());
    assert_eq!(sub.rank(), members.len() - 1 - members.iter().position(|&r| r == rank).unwrap());
    let mut buf = vec![rank as f32];
    sub.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf[0], members.iter().sum::<usize>() as f32);
    let got = sub.all_gather_u64(&[rank as u64]).unwrap();
    assert_eq!(got.len(), members.len());
    assert_eq!(got[sub.rank()], vec![rank as u64]);

    // Two all-to-alls in flight together, waited for in reverse order.
    let (send, counts) = a2a_send(rank, size);
    let doubled: Vec<f32> = send.iter().map(|v| 2.0 * v).collect();
    let first = comm.start_all_to_all_v(send, counts.clone()).unwrap();
    let second = comm.start_all_to_all_v(doubled, counts).unwrap();
    let (expected, expected_counts) = a2a_expected(rank, size);
    let got2 = second.wait().unwrap();
    let got1 = first.wait().unwrap();
    assert_eq!((got1.values.into_vec(), got1.counts), (expected.clone(), expected_counts.clone()));
    assert_eq!(got2.values, expected.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    assert_eq!(got2.counts, expected_counts);
}

fn large_messages(comm: &mut dyn Communicator) {
    let (rank, size) = (comm.rank(), comm.size());
    let block = LARGE / size;
    let send: Vec<f32> = (0..LARGE).map(|j| large_value(size, rank, j / block, j % block)).collect();
    let got = comm.all_to_all_v(&send, &vec![block; size]).unwrap();
    assert_eq!(got.counts, vec![block; size]);
    for (j, v) in got.values.iter().enumerate().step_by(997).chain(got.values.iter().enumerate().rev().take(3)) {
        assert_eq!(v.to_bits(), large_value(size, j / block, rank, j % block).to_bits(), "value {j}");
    }
    let mut known = MessageBuffer::new();
    comm.all_to_all_v_known_into(&send, &vec![block; size], &vec![block; size], &mut known).unwrap();
    assert_eq!(known.len(), LARGE);
    assert!(known.iter().zip(&got.values).all(|(a, b)| a.to_bits() == b.to_bits()), "known counts, same values");
    drop((send, got, known));
    let mut buf: Vec<f32> = (0..LARGE).map(|i| ((i + rank) % 7) as f32).collect();
    comm.all_reduce_sum(&mut buf).unwrap();
    for (i, v) in buf.iter().enumerate().step_by(1009) {
        assert_eq!(*v, (0..size).map(|r| ((i + r) % 7) as f32).sum::<f32>(), "value {i}");
    }
}

/// Values rank 0 sends rank 1 in the miscount cases; rank 1 expects 5,
/// every other pair moves one value.
fn exchange_with_rank_1_expecting_5(comm: &mut dyn Communicator, sent: usize) -> Result<(), collectives::CommError> {
    let (rank, size) = (comm.rank(), comm.size());
    let counts: Vec<usize> = (0..size).map(|dst| if rank == 0 && dst == 1 { sent } else { 1 }).collect();
    let expected: Vec<usize> = (0..size).map(|src| if rank == 1 && src == 0 { 5 } else { 1 }).collect();
    let send = vec![rank as f32; counts.iter().sum()];
    comm.all_to_all_v_known_into(&send, &counts, &expected, &mut MessageBuffer::new())
}

/// Rank 0 sends rank 1 one value fewer than rank 1 expects: rank 1 fails
/// naming rank 0, the others finish, and the group still works afterwards.
fn fewer_than_expected(comm: &mut dyn Communicator) {
    let rank = comm.rank();
    let result = exchange_with_rank_1_expecting_5(comm, 4);
    if rank == 1 {
        let message = result.expect_err("rank 1 expected 5 values").to_string();
        assert!(message.contains("rank 0 sent 4 values where rank 1 expected 5"), "{message}");
    } else {
        result.unwrap();
    }
    let (send, counts) = a2a_send(rank, comm.size());
    let (expected, expected_counts) = a2a_expected(rank, comm.size());
    let mut recv = MessageBuffer::new();
    comm.all_to_all_v_known_into(&send, &counts, &expected_counts, &mut recv).unwrap();
    assert_eq!(recv, expected);
}

/// Rank 0 sends rank 1 one value more than expected: the job ends naming rank 0.
fn more_than_expected(comm: &mut dyn Communicator) {
    let _ = exchange_with_rank_1_expecting_5(comm, 6);
    comm.barrier().unwrap();
}

/// Overlap needs transfers that progress while the rank computes and makes
/// no MPI call: a 16 MiB all-to-all-v and an all-reduce on a communication
/// thread finish while the main thread only sleeps.
fn progress_without_the_caller(comm: &mut dyn Communicator) {
    use collectives::comm_thread::CommThread;
    assert!(collectives::mpi::comm_threads_allowed(), "OpenMPI gives MPI_THREAD_MULTIPLE");
    let (rank, size) = (comm.rank(), comm.size());
    let thread = CommThread::spawn(comm.split(0, rank).unwrap()).unwrap();
    let total = (16 << 20) / 4;
    let block = total / size;
    let send: Vec<f32> = (0..block * size).map(|j| large_value(size, rank, j / block, j % block)).collect();
    let mut a2a = thread.all_to_all_v(send, vec![block; size]);
    let mut sum = thread.all_reduce_sum(vec![rank as f32 + 1.0; 1000]);
    // No MPI call from this thread until both are done (or a minute passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a2a.is_finished() && sum.is_finished()) {
        assert!(Instant::now() < deadline, "rank {rank}: transfers did not finish without the caller");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (got, _) = a2a.wait().unwrap();
    for (j, v) in got.values.iter().enumerate().step_by(991) {
        assert_eq!(v.to_bits(), large_value(size, j / block, rank, j % block).to_bits(), "value {j}");
    }
    let (sum, _) = sum.wait().unwrap();
    assert!(sum.values.iter().all(|&v| v == (size * (size + 1) / 2) as f32));
}

/// Rank 2 stops answering before the second all-reduce; the others must
/// time out there (3 s), name rank 2 and end the job.
fn stall(comm: &mut dyn Communicator) {
    let mut buf = vec![1.0f32; 16];
    comm.all_reduce_sum(&mut buf).unwrap();
    if comm.rank() == 2 {
        std::thread::sleep(Duration::from_secs(600));
    }
    comm.all_reduce_sum(&mut buf).unwrap();
    unreachable!("the all-reduce without rank 2 cannot complete");
}

/// Rank 1 is killed (SIGKILL) in the middle of the job.
fn kill(comm: &mut dyn Communicator) {
    let mut buf = vec![1.0f32; 16];
    comm.all_reduce_sum(&mut buf).unwrap();
    if comm.rank() == 1 {
        let _ = Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::thread::sleep(Duration::from_secs(600));
    }
    comm.all_reduce_sum(&mut buf).unwrap();
    unreachable!("the all-reduce without rank 1 cannot complete");
}
