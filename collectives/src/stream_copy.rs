//! Copies of large message blocks that bypass the cache.
//!
//! In a large all-to-all each rank copies its own block (megabytes, far
//! past its caches) into the receive buffer while its peers' blocks
//! arrive, and the exchange is bound by memory bandwidth. An ordinary store
//! first reads its destination line into the cache (read for ownership),
//! so a copy costs three passes over memory; non-temporal (streaming)
//! stores write whole lines without reading them: two passes. Small blocks
//! are copied as usual: they fit the cache, and whoever reads them next
//! finds them there.

use std::sync::OnceLock;

/// Blocks from this size up are copied with streaming stores. From 2 MiB,
/// although the copy alone is faster streamed there, the 4 MiB exchange
/// on 2 MPI ranks (2 MiB own blocks) came out at 0.63-0.86x of
/// `MPI_Alltoallv` in two runs, against 0.87-0.97x in five runs with this
/// threshold: a block that size is still worth leaving in the cache.
pub const STREAM_FROM_BYTES: usize = 4 << 20;

/// The size of an exchange (a rank's send times the ranks) from which the
/// rank's own block is streamed: the last-level cache's size where Linux
/// reports it, else 128 MiB. An exchange that fits the cache is faster
/// with ordinary stores, one that does not with streaming ones, and where
/// that turns depends on the machine. Measured on 2-core machines
/// (docs/parallel.md): on an Intel Xeon, 2 MPI ranks at 32 MiB each (64
/// MiB in all) took 2.64-2.72 ms copied as usual against 3.08 ms streamed,
/// and 128 MiB in all was faster streamed; on an AMD EPYC with a 32 MiB
/// L3, streaming from 32 MiB in all took 16 MiB on 4 ranks from 4.27-4.46
/// ms to 2.94-3.11 ms and 16 MiB on 2 ranks from 1.29-1.62 to 1.11-1.52 ms.
pub fn stream_exchange_from_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| last_level_cache_bytes().unwrap_or(128 << 20))
}

/// Whether a block of `block_bytes` in an exchange of `exchange_bytes` (all
/// ranks' sends together) is copied with streaming stores: a large block
/// ([`STREAM_FROM_BYTES`]) in an exchange larger than the last-level
/// cache ([`stream_exchange_from_bytes`]). Both backends ask this, the MPI
/// one for a rank's own block, the local one for every block it copies.
pub fn worth_streaming(block_bytes: usize, exchange_bytes: usize) -> bool {
    block_bytes >= STREAM_FROM_BYTES && exchange_bytes >= stream_exchange_from_bytes()
}

/// CPU 0's highest cache level's size, from sysfs.
fn last_level_cache_bytes() -> Option<usize> {
    let caches = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    caches
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
            let level: u32 = read("level")?.trim().parse().ok()?;
            Some((level, parse_cache_size(&read("size")?)?))
        })
        .max_by_key(|&(level, _)| level)
        .map(|(_, bytes)| bytes)
}

/// sysfs's cache size: "32768K", "1M" or bytes.
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok().filter(|&n| n > 0).map(|n| n * scale)
}

/// Copies `len` bytes from `src` to `dst`; with streaming stores (x86-64)
/// when `stream` is set, which callers decide for the whole block
/// ([`worth_streaming`]) so that its pieces are copied alike. The
/// stores are fenced before this returns, so the copy is visible to other
/// threads and processes as an ordinary one would be.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, and the two
/// ranges must not overlap.
pub unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize, stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        // SAFETY: the caller's contract.
        unsafe { streaming_x86_64(src, dst, len) };
        return;
    }
    let _ = stream;
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// SSE2 (every x86-64 has it): unaligned 16-byte loads, aligned 16-byte
/// streaming stores, four per 64-byte line; the unaligned head and the
/// tail are copied normally.
#[cfg(target_arch = "x86_64")]
unsafe fn streaming_x86_64(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = dst.align_offset(16).min(len);
    // SAFETY (every block): offsets stay below `len`, inside both ranges
    // (the caller's contract); stores go to 16-byte aligned addresses.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut at = head;
    while at + 64 <= len {
        unsafe {
            let s = src.add(at).cast::<__m128i>();
            let d = dst.add(at).cast::<__m128i>();
            let (a, b, c, e) =
                (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)), _mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        at += 64;
    }
    while at + 16 <= len {
        unsafe { _mm_stream_si128(dst.add(at).cast(), _mm_loadu_si128(src.add(at).cast())) };
        at += 16;
    }
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at);
        // Streaming stores are weakly ordered: fence them before anyone
        // (this thread's caller or a peer) is told the copy is done.
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_read_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("4096"), Some(4096));
        for bad in ["", "K", "12Q", "-1K", "0K"] {
            assert_eq!(parse_cache_size(bad), None, "{bad:?}");
        }
        // Whatever this machine reports, the threshold is a usable size.
        assert!(stream_exchange_from_bytes() >= 1 << 20);
    }

    #[test]
    fn only_large_blocks_of_exchanges_past_the_cache_are_streamed() {
        let cache = stream_exchange_from_bytes();
        assert!(worth_streaming(STREAM_FROM_BYTES, cache));
        assert!(!worth_streaming(STREAM_FROM_BYTES - 1, 4 * cache), "a small block stays in the cache");
        assert!(!worth_streaming(STREAM_FROM_BYTES, cache - 1), "an exchange that fits the cache is copied as usual");
    }

    /// Every alignment of source and destination and every tail length
    /// copies exactly the bytes asked for, and nothing past them.
    #[test]
    fn copies_exactly_the_range_at_any_alignment() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for stream in [false, true] {
            for src_off in 0..17 {
                for dst_off in 0..17 {
                    for len in [0, 1, 15, 16, 17, 63, 64, 65, 200, 1000, 3000] {
                        let mut dst = vec![0xAAu8; 4096 + 64];
                        // SAFETY: both ranges lie inside their vectors and do not overlap.
                        unsafe { copy_bytes(src.as_ptr().add(src_off), dst.as_mut_ptr().add(dst_off), len, stream) };
                        assert_eq!(
                            &dst[dst_off..dst_off + len],
                            &src[src_off..src_off + len],
                            "stream {stream} offsets {src_off}/{dst_off} len {len}"
                        );
                        assert!(dst[..dst_off].iter().all(|&b| b == 0xAA), "wrote before the range");
                        assert!(dst[dst_off + len..].iter().all(|&b| b == 0xAA), "wrote past the range");
                    }
                }
            }
        }
    }
}
