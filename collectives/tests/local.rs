//! The `local` backend: every collective on 1 to 4 thread ranks with uneven
//! and zero counts, large messages, sub-groups, non-blocking forms, and the
//! failure paths (a rank that never arrives, an abort, a panic, bad arguments).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use collectives::local::{LocalComm, LocalWorld};
use collectives::{CommError, Communicator, MessageBuffer, Pending, SelfComm};

mod common;
use common::*;

/// Long enough never to fire in a passing test on a loaded 2-core machine.
const LONG: Duration = Duration::from_secs(60);

/// Runs `body` on every rank of a new world of `size` threads; results in rank order.
fn on_ranks<R: Send>(size: usize, timeout: Duration, body: impl Fn(LocalComm) -> R + Sync) -> Vec<R> {
    let comms = LocalWorld::new(size, timeout);
    let body = &body;
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms.into_iter().map(|comm| scope.spawn(move || body(comm))).collect();
        handles.into_iter().map(|h| h.join().expect("a rank thread panicked")).collect()
    })
}

#[test]
fn all_to_all_v_with_uneven_and_zero_counts() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let (send, counts) = a2a_send(rank, size);
            let (expected, expected_counts) = a2a_expected(rank, size);
            let got = comm.all_to_all_v(&send, &counts).unwrap();
            assert_eq!((got.values.into_vec(), got.counts), (expected.clone(), expected_counts.clone()), "size {size}");

            let send_u64: Vec<u64> = send.iter().map(|&v| v as u64).collect();
            let (got, got_counts) = comm.all_to_all_v_u64(&send_u64, &counts).unwrap();
            assert_eq!(got, expected.iter().map(|&v| v as u64).collect::<Vec<_>>());
            assert_eq!(got_counts, expected_counts);

            // Nothing at all to send anywhere.
            let got = comm.all_to_all_v(&[], &vec![0; size]).unwrap();
            assert!(got.values.is_empty());
            assert_eq!(got.counts, vec![0; size]);
        });
    }
}

#[test]
fn all_to_all_v_with_known_receive_counts() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let (send, counts) = a2a_send(rank, size);
            let (expected, expected_counts) = a2a_expected(rank, size);
            let mut recv = MessageBuffer::from(vec![-1.0; 2]);
            comm.all_to_all_v_known_into(&send, &counts, &expected_counts, &mut recv).unwrap();
            assert_eq!(recv, expected, "size {size}");
            // A rank that expects other counts than its peers send is told so.
            let mut wrong = expected_counts.clone();
            wrong[0] += 1;
            let err = comm.all_to_all_v_known_into(&send, &counts, &wrong, &mut recv).unwrap_err();
            assert!(matches!(err, CommError::BadArgument { op: "all_to_all_v", .. }), "{err:?}");
            // So is one that passes a count too many.
            let mut longer = expected_counts.clone();
            longer.push(0);
            let err = comm.all_to_all_v_known_into(&send, &counts, &longer, &mut recv).unwrap_err();
            assert!(err.to_string().contains("receive counts for a group of"), "{err}");
        });
    }
}

/// The blocking exchanges lend their send buffers to the round instead of
/// copying them: a rank may overwrite its buffer as soon as the call
/// returns, and every peer still gets the values that were sent, over
/// many back-to-back exchanges of both forms.
#[test]
fn a_lent_send_buffer_may_be_overwritten_as_soon_as_the_call_returns() {
    // 4 B to 360 KB per block: ranks lend from 256 KiB and copy below
    // that, so rounds are all lent, all copied, or mixed.
    let count = |src: usize, dst: usize, round: usize| 1 + (src + 2 * dst + round) % 4 * 30_000;
    let value = |src: usize, dst: usize, i: usize, round: usize| (src * 7 + dst * 3 + i + round * 11) as f32;
    for size in [2, 4] {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let mut recv = MessageBuffer::new();
            for round in 0..200 {
                let counts: Vec<usize> = (0..size).map(|dst| count(rank, dst, round)).collect();
                let mut send: Vec<f32> = (0..size)
                    .flat_map(|dst| (0..count(rank, dst, round)).map(move |i| value(rank, dst, i, round)))
                    .collect();
                let recv_counts: Vec<usize> = (0..size).map(|src| count(src, rank, round)).collect();
                if round % 2 == 0 {
                    comm.all_to_all_v_known_into(&send, &counts, &recv_counts, &mut recv).unwrap();
                } else {
                    assert_eq!(comm.all_to_all_v_into(&send, &counts, &mut recv).unwrap(), recv_counts);
                }
                send.fill(f32::NAN);
                drop(send);
                let expected: Vec<f32> = (0..size)
                    .flat_map(|src| (0..count(src, rank, round)).map(move |i| value(src, rank, i, round)))
                    .collect();
                assert_eq!(recv, expected, "size {size} round {round} rank {rank}");
            }
        });
    }
}

/// A rank that starts the exchange non-blocking and runs another
/// collective before waiting must not hold up the ranks that block (as
/// MPI allows): they leave it a copy of what they lent, and it still gets
/// the values they sent, although they overwrote their buffers.
#[test]
fn a_non_blocking_rank_among_blocking_ones_reads_after_other_collectives() {
    let size = 3;
    // 280 KB and more per rank: large enough to be lent.
    let count = |src: usize, dst: usize| 35_000 + src + 2 * dst;
    let value = |src: usize, dst: usize, i: usize| (src * 1000 + dst * 100 + i) as f32;
    on_ranks(size, Duration::from_secs(20), |mut comm| {
        let rank = comm.rank();
        let counts: Vec<usize> = (0..size).map(|dst| count(rank, dst)).collect();
        let mut send: Vec<f32> =
            (0..size).flat_map(|dst| (0..count(rank, dst)).map(move |i| value(rank, dst, i))).collect();
        let expected_counts: Vec<usize> = (0..size).map(|src| count(src, rank)).collect();
        let expected: Vec<f32> =
            (0..size).flat_map(|src| (0..count(src, rank)).map(move |i| value(src, rank, i))).collect();
        let mut one = vec![1.0f32];
        if rank == 0 {
            let pending = comm.start_all_to_all_v(send, counts).unwrap();
            comm.all_reduce_sum(&mut one).unwrap();
            assert_eq!(pending.wait().unwrap().values, expected);
        } else {
            let mut recv = MessageBuffer::new();
            comm.all_to_all_v_known_into(&send, &counts, &expected_counts, &mut recv).unwrap();
            send.fill(f32::NAN);
            assert_eq!(recv, expected);
            comm.all_reduce_sum(&mut one).unwrap();
        }
        assert_eq!(one, [size as f32]);
    });
}

#[test]
fn all_reduce_is_the_rank_order_sum_bit_for_bit_on_every_rank() {
    // 200_003 values take the shared, chunked path; the others the small one.
    for size in 1..=4 {
        for len in [0, 1, 7, 200_003] {
            let expected: Vec<u32> = (0..len).map(|i| mixed_sum(size, i).to_bits()).collect();
            let expected_f64: Vec<u64> = (0..len)
                .map(|i| (1..size).fold(mixed(0, i) as f64 / 3.0, |acc, r| acc + mixed(r, i) as f64 / 3.0).to_bits())
                .collect();
            on_ranks(size, LONG, |mut comm| {
                let rank = comm.rank();
                let mut buf: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
                comm.all_reduce_sum(&mut buf).unwrap();
                assert!(buf.iter().map(|v| v.to_bits()).eq(expected.iter().copied()), "size {size} len {len}");

                let mut buf: Vec<f64> = (0..len).map(|i| mixed(rank, i) as f64 / 3.0).collect();
                comm.all_reduce_sum_f64(&mut buf).unwrap();
                assert!(buf.iter().map(|v| v.to_bits()).eq(expected_f64.iter().copied()), "size {size} len {len}");

                let buf: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
                let got = comm.start_all_reduce_sum(buf).unwrap().wait().unwrap();
                assert!(got.values.iter().map(|v| v.to_bits()).eq(expected.iter().copied()));
            });
        }
    }
}

#[test]
fn all_gather_with_uneven_and_empty_contributions() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            // Rank 0 (and 3) send nothing.
            let send: Vec<f32> = (0..rank % 3).map(|i| (rank * 10 + i) as f32).collect();
            let got = comm.all_gather_v(&send).unwrap();
            let expected: Vec<f32> = (0..size).flat_map(|r| (0..r % 3).map(move |i| (r * 10 + i) as f32)).collect();
            assert_eq!(got.values, expected);
            assert_eq!(got.counts, (0..size).map(|r| r % 3).collect::<Vec<_>>());

            let send: Vec<u64> = vec![rank as u64; (rank + 1) % 3];
            let got = comm.all_gather_u64(&send).unwrap();
            assert_eq!(got, (0..size).map(|r| vec![r as u64; (r + 1) % 3]).collect::<Vec<_>>());
        });
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_block_of_the_rank_order_sum() {
    for size in 1..=4 {
        // Blocks of 1, 0, 2, 1 values: uneven, one empty.
        let counts: Vec<usize> = (0..size).map(|r| (2 * r + 1) % 3).collect();
        let len: usize = counts.iter().sum();
        let sum: Vec<f32> = (0..len).map(|i| mixed_sum(size, i)).collect();
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let send: Vec<f32> = (0..len).map(|i| mixed(rank, i)).collect();
            let got = comm.reduce_scatter_sum(&send, &counts).unwrap();
            let start: usize = counts[..rank].iter().sum();
            let expected = &sum[start..start + counts[rank]];
            assert!(got.iter().map(|v| v.to_bits()).eq(expected.iter().map(|v| v.to_bits())), "size {size}");

            assert!(comm.reduce_scatter_sum(&[], &vec![0; size]).unwrap().is_empty());
        });
    }
}

#[test]
fn broadcast_from_every_root_and_of_nothing() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            for root in 0..size {
                let data: Vec<f32> = (0..5).map(|i| (root * 100 + i) as f32).collect();
                let mut buf = if rank == root { data.clone() } else { vec![-1.0; 5] };
                comm.broadcast(&mut buf, root).unwrap();
                assert_eq!(buf, data);
            }
            comm.broadcast(&mut [], 0).unwrap();
        });
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    for size in 1..=4 {
        let arrived = AtomicUsize::new(0);
        on_ranks(size, LONG, |mut comm| {
            if comm.rank() == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            arrived.fetch_add(1, Ordering::SeqCst);
            comm.barrier().unwrap();
            assert_eq!(arrived.load(Ordering::SeqCst), size);
        });
    }
}

#[test]
fn one_rank_world_agrees_with_self_comm() {
    let mut local = LocalWorld::new(1, LONG).pop().unwrap();
    let mut own = SelfComm;
    let comms: [&mut dyn Communicator; 2] = [&mut local, &mut own];
    for comm in comms {
        assert_eq!((comm.rank(), comm.size()), (0, 1));
        let mut buf = vec![1.5, -2.0];
        comm.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.5, -2.0]);
        let got = comm.all_to_all_v(&[1.0, 2.0, 3.0], &[3]).unwrap();
        assert_eq!((got.values.into_vec(), got.counts), (vec![1.0, 2.0, 3.0], vec![3]));
        assert_eq!(comm.all_gather_u64(&[4, 5]).unwrap(), vec![vec![4, 5]]);
        assert_eq!(comm.reduce_scatter_sum(&[1.0, 2.0], &[2]).unwrap(), vec![1.0, 2.0]);
        let mut sub = comm.split(7, 0).unwrap();
        assert_eq!((sub.rank(), sub.size()), (0, 1));
        sub.barrier().unwrap();
    }
}

#[test]
fn large_all_to_all_v_of_64_mib_per_rank() {
    const SIZE: usize = 4;
    const PER_RANK: usize = LARGE;
    const BLOCK: usize = PER_RANK / SIZE;
    let value = |src: usize, dst: usize, i: usize| large_value(SIZE, src, dst, i);
    let times = on_ranks(SIZE, LONG, |mut comm| {
        let rank = comm.rank();
        let send: Vec<f32> = (0..PER_RANK).map(|j| value(rank, j / BLOCK, j % BLOCK)).collect();
        comm.barrier().unwrap();
        let started = Instant::now();
        let got = comm.all_to_all_v(&send, &[BLOCK; SIZE]).unwrap();
        let elapsed = started.elapsed();
        drop(send);
        assert_eq!(got.counts, [BLOCK; SIZE]);
        assert_eq!(got.values.len(), PER_RANK);
        for (j, v) in got.values.iter().enumerate().step_by(997).chain(got.values.iter().enumerate().rev().take(3)) {
            assert_eq!(v.to_bits(), value(j / BLOCK, rank, j % BLOCK).to_bits(), "value {j}");
        }
        elapsed
    });
    let slowest = times.iter().max().unwrap();
    eprintln!("all_to_all_v of 64 MiB per rank on {SIZE} ranks: {slowest:?} (slowest rank)");
}

#[test]
fn large_all_reduce_of_64_mib_per_rank() {
    const SIZE: usize = 4;
    const LEN: usize = LARGE;
    let times = on_ranks(SIZE, LONG, |mut comm| {
        let rank = comm.rank();
        // Small integers: exact in any order, so the check is simple.
        let mut buf: Vec<f32> = (0..LEN).map(|i| ((i + rank) % 7) as f32).collect();
        comm.barrier().unwrap();
        let started = Instant::now();
        comm.all_reduce_sum(&mut buf).unwrap();
        let elapsed = started.elapsed();
        for (i, v) in buf.iter().enumerate().step_by(1009) {
            assert_eq!(*v, (0..SIZE).map(|r| ((i + r) % 7) as f32).sum::<f32>(), "value {i}");
        }
        elapsed
    });
    let slowest = times.iter().max().unwrap();
    eprintln!("all_reduce_sum of 64 MiB per rank on {SIZE} ranks: {slowest:?} (slowest rank)");
}

#[test]
fn split_into_even_and_odd_groups() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let mut sub = comm.split(rank % 2, rank).unwrap();
            let members: Vec<usize> = (0..size).filter(|r| r % 2 == rank % 2).collect();
            assert_eq!((sub.rank(), sub.size()), (rank / 2, members.len()));

            let mut buf = vec![rank as f32, 1.0];
            sub.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(buf, [members.iter().sum::<usize>() as f32, members.len() as f32]);

            // The sub-group's ranks are its own: blocks go by sub-rank.
            let sub_size = sub.size();
            let send: Vec<f32> = (0..sub_size).map(|dst| (rank * 10 + dst) as f32).collect();
            let got = sub.all_to_all_v(&send, &vec![1; sub_size]).unwrap();
            let expected: Vec<f32> = members.iter().map(|&src| (src * 10 + sub.rank()) as f32).collect();
            assert_eq!(got.values, expected);

            // The parent still works after (and interleaved with) the split.
            comm.barrier().unwrap();
            let mut one = sub.split(0, 0).unwrap();
            let mut total = [1.0f32];
            one.all_reduce_sum(&mut total).unwrap();
            assert_eq!(total, [members.len() as f32]);
            let mut total = [1.0f32];
            comm.all_reduce_sum(&mut total).unwrap();
            assert_eq!(total, [size as f32]);
        });
    }
}

#[test]
fn split_orders_ranks_by_key_then_parent_rank() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let mut reversed = comm.split(0, size - 1 - rank).unwrap();
            assert_eq!(reversed.rank(), size - 1 - rank);
            let order = reversed.all_gather_u64(&[rank as u64]).unwrap();
            assert_eq!(order, (0..size).rev().map(|r| vec![r as u64]).collect::<Vec<_>>());

            // Equal keys keep the parent's order.
            let same = comm.split(0, 5).unwrap();
            assert_eq!(same.rank(), rank);
        });
    }
}

#[test]
fn non_blocking_all_to_alls_in_flight_together_waited_in_reverse() {
    for size in 1..=4 {
        on_ranks(size, LONG, |mut comm| {
            let rank = comm.rank();
            let tagged = |tag: usize| {
                let (send, counts) = a2a_send(rank, size);
                (send.into_iter().map(|v| v + (tag * 1_000_000) as f32).collect::<Vec<_>>(), counts)
            };
            let mut pending: Vec<Pending> = (0..3)
                .map(|tag| {
                    let (send, counts) = tagged(tag);
                    comm.start_all_to_all_v(send, counts).unwrap()
                })
                .collect();
            // A blocking collective while they are in flight.
            let mut one = [1.0f32];
            comm.all_reduce_sum(&mut one).unwrap();
            assert_eq!(one, [size as f32]);
            let reduce = comm.start_all_reduce_sum(vec![rank as f32; 3]).unwrap();

            let (expected, expected_counts) = a2a_expected(rank, size);
            for tag in (0..3).rev() {
                let got = pending.pop().unwrap().wait().unwrap();
                let expected: Vec<f32> = expected.iter().map(|v| v + (tag * 1_000_000) as f32).collect();
                assert_eq!((got.values.into_vec(), &got.counts), (expected, &expected_counts), "tag {tag}");
            }
            let sum = (0..size).sum::<usize>() as f32;
            assert_eq!(reduce.wait().unwrap().values[..], [sum; 3]);
        });
    }
}

#[test]
fn a_rank_that_never_arrives_makes_the_others_time_out_naming_it() {
    // Both ways: a small exchange copies the send buffer, a large one lends
    // it (and its lender must not leave while others may read it).
    for lend in [false, true] {
        let started = Instant::now();
        let results = on_ranks(3, Duration::from_millis(300), |mut comm| {
            comm.barrier().unwrap();
            if comm.rank() == 2 {
                return None; // "killed": its communicator is dropped without a word
            }
            // 560 KB is lent (256 KiB and more), 8 bytes copied.
            let n = if lend { 70_000 } else { 1 };
            Some(comm.all_to_all_v(&vec![1.0; 2 * n], &[n, n, 0]).map(drop))
        });
        for (rank, result) in results.into_iter().enumerate().take(2) {
            let err = result.unwrap().unwrap_err();
            let message = err.to_string();
            match err {
                CommError::Timeout { op, rank: r, missing, .. } => {
                    assert_eq!((op, r, missing), ("all_to_all_v", rank, vec![2]));
                }
                other => panic!("rank {rank}: expected a timeout, got {other:?}"),
            }
            assert!(message.contains("all_to_all_v") && message.contains("[2]"), "{message}");
        }
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }
}

#[test]
fn a_stalled_rank_makes_the_others_time_out_and_fails_itself_when_late() {
    let started = Instant::now();
    let results = on_ranks(3, Duration::from_millis(300), |mut comm| {
        comm.barrier().unwrap();
        match comm.rank() {
            // Stalled past the others' deadline, then arrives after all.
            2 => {
                std::thread::sleep(Duration::from_millis(700));
                let mut buf = [1.0];
                comm.all_reduce_sum(&mut buf).map(|_| vec![])
            }
            1 => comm.start_all_reduce_sum(vec![1.0]).unwrap().wait().map(|r| r.values.into_vec()),
            _ => {
                let mut buf = [1.0];
                comm.all_reduce_sum(&mut buf).map(|_| vec![])
            }
        }
    });
    for (rank, result) in results.iter().enumerate().take(2) {
        match result {
            Err(CommError::Timeout { op: "all_reduce_sum", missing, .. }) if missing == &[2] => {}
            other => panic!("rank {rank}: expected a timeout missing rank 2, got {other:?}"),
        }
    }
    // The late rank must not succeed where the others failed.
    assert!(matches!(&results[2], Err(CommError::Aborted { .. })), "{:?}", results[2]);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[test]
fn abort_stops_waiting_ranks_at_once() {
    let started = Instant::now();
    let results = on_ranks(3, LONG, |mut comm| {
        if comm.rank() == 2 {
            std::thread::sleep(Duration::from_millis(50));
            comm.abort("rank 2 failed: out of memory");
            // Later collectives fail at once too.
            return comm.barrier();
        }
        comm.barrier()
    });
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Err(CommError::Aborted { op: "barrier", rank: r, reason }) => {
                assert_eq!(r, rank);
                assert!(reason.contains("rank 2 failed"), "{reason}");
            }
            other => panic!("rank {rank}: expected an abort, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn abort_reaches_sub_groups_and_the_world_handle() {
    let comms = LocalWorld::new(4, LONG);
    let world = comms[0].world();
    let started = Instant::now();
    let results: Vec<Result<(), CommError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut comm| {
                scope.spawn(move || {
                    let rank = comm.rank();
                    let mut sub = comm.split(rank % 2, rank)?;
                    if rank == 3 {
                        std::thread::sleep(Duration::from_millis(50));
                        comm.abort("rank 3 failed");
                        return Ok(());
                    }
                    // Rank 1 waits for rank 3 in the odd group; 0 and 2 get past
                    // the even group and wait for the odd ranks in the parent.
                    sub.barrier()?;
                    comm.barrier()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results[3].is_ok());
    for result in &results[..3] {
        assert!(matches!(result, Err(CommError::Aborted { reason, .. }) if reason == "rank 3 failed"), "{result:?}");
    }
    assert_eq!(world.abort_reason().as_deref(), Some("rank 3 failed"));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn a_panicking_rank_aborts_the_others() {
    let started = Instant::now();
    let comms = LocalWorld::new(3, LONG);
    let results: Vec<std::thread::Result<Result<(), CommError>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut comm| {
                scope.spawn(move || {
                    if comm.rank() == 2 {
                        panic!("rank 2 hits a bug (this panic is expected by the test)");
                    }
                    comm.barrier()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    assert!(results[2].is_err());
    for result in &results[..2] {
        match result {
            Ok(Err(CommError::Aborted { reason, .. })) => assert!(reason.contains("panicked"), "{reason}"),
            other => panic!("expected an abort, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn bad_arguments_fail_every_rank_at_once() {
    let started = Instant::now();
    let results = on_ranks(3, LONG, |mut comm| {
        let rank = comm.rank();
        // Rank 1 passes two counts for three ranks.
        let counts: &[usize] = if rank == 1 { &[1, 1] } else { &[1, 1, 0] };
        let a2a = comm.all_to_all_v(&[1.0, 2.0], counts).unwrap_err();
        // Lengths differ between ranks.
        let mut buf = vec![0.0; rank + 1];
        let reduce = comm.all_reduce_sum(&mut buf).unwrap_err();
        // Rank 0 calls another collective than the others.
        let mismatch = if rank == 0 { comm.barrier().unwrap_err() } else { comm.all_gather_v(&[]).unwrap_err() };
        // A root outside the group.
        let root = comm.broadcast(&mut [1.0], 3).unwrap_err();
        [a2a, reduce, mismatch, root]
    });
    for (rank, errors) in results.iter().enumerate() {
        let [a2a, reduce, mismatch, root] = errors;
        assert!(matches!(a2a, CommError::BadArgument { op: "all_to_all_v", .. }), "{a2a:?}");
        let expected = if rank == 1 { "2 counts for a group of 3 ranks" } else { "rank 1 rejected its arguments" };
        assert!(a2a.to_string().contains(expected), "rank {rank}: {a2a}");
        assert!(matches!(reduce, CommError::BadArgument { op: "all_reduce_sum", .. }), "{reduce:?}");
        assert!(reduce.to_string().contains("values but rank 0 passed 1"), "{reduce}");
        assert!(matches!(mismatch, CommError::BadArgument { .. }), "{mismatch:?}");
        let message = mismatch.to_string();
        assert!(message.contains("barrier") && message.contains("all_gather_v"), "{message}");
        assert!(root.to_string().contains("root 3 is not a rank of this group of 3"), "{root}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}
