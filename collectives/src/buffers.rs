//! Message buffers backed by transparent huge pages.
//!
//! Where the kernel gives huge pages only on request (THP "madvise", the
//! common default), a large buffer in 4 KiB pages costs the MPI transport
//! thousands of page pins per transfer (single-copy CMA) and the CPU TLB
//! misses; numpy asks for huge pages on large arrays, and so must we to
//! move large messages as fast. Small buffers are left alone.
//!
//! A huge page covers an aligned 2 MiB of memory, and `malloc` puts a
//! large block just past a page boundary, so a 4 MiB buffer held one whole
//! huge page and 2 MiB of small ones. Under [`HugePageAligned`], the
//! `switchyard` binary's global allocator, the buffers made here start on a
//! 2 MiB boundary instead, and are all huge pages. Every other allocation
//! is plain `malloc`: aligning all large blocks made each one allocated per
//! call a fresh mapping (the local backend's 4 MiB exchange went from 0.43
//! to 6.2 ms).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

/// Buffers from this size up are worth a huge-page request.
const HUGE_FROM_BYTES: usize = 4 << 20;

/// The size and alignment of a transparent huge page (x86-64, and aarch64
/// with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// The alignment glibc's `malloc` gives every block on 64-bit systems.
const MALLOC_ALIGN: usize = 16;

thread_local! {
    /// Set while [`with_capacity_huge`] allocates: the allocation is a message buffer.
    static MESSAGE_BUFFER: Cell<bool> = const { Cell::new(false) };
}

/// The C library's allocator (as Rust's `System` on Unix), except that a
/// message buffer from [`with_capacity_huge`] starts on a huge-page
/// boundary. Every block comes from the `malloc` family and goes back
/// through `free`, whatever its alignment. Install it with `#[global_allocator]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HugePageAligned;

/// A block of `size` bytes aligned to `align` (a power of two), or null.
fn aligned_block(align: usize, size: usize) -> *mut u8 {
    let mut out = std::ptr::null_mut();
    // SAFETY: align is a power of two and a multiple of the pointer size.
    let failed = unsafe { libc::posix_memalign(&mut out, align.max(std::mem::size_of::<usize>()), size) };
    if failed == 0 {
        out.cast()
    } else {
        std::ptr::null_mut()
    }
}

/// Whether plain `malloc` gives what `layout` asks for.
fn malloc_suffices(layout: Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every block is allocated by the malloc family with at least the
// alignment and size asked for, and released by `free`, which takes any
// block of that family; realloc keeps the contents up to the smaller size.
unsafe impl GlobalAlloc for HugePageAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE_FROM_BYTES && MESSAGE_BUFFER.get() {
            aligned_block(HUGE_PAGE.max(layout.align()), layout.size())
        } else if malloc_suffices(layout) {
            unsafe { libc::malloc(layout.size()).cast() }
        } else {
            aligned_block(layout.align(), layout.size())
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if malloc_suffices(layout) && !MESSAGE_BUFFER.get() {
            // calloc skips the zeroing where the memory is fresh from the kernel.
            return unsafe { libc::calloc(layout.size(), 1).cast() };
        }
        let block = unsafe { self.alloc(layout) };
        if !block.is_null() {
            unsafe { std::ptr::write_bytes(block, 0, layout.size()) };
        }
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { libc::free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size, rounded to the alignment, fits an isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if malloc_suffices(new_layout) {
            return unsafe { libc::realloc(ptr.cast(), new_size).cast() };
        }
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                libc::free(ptr.cast());
            }
        }
        new
    }
}

/// An empty vector with room for `capacity` elements, its memory advised
/// to use huge pages before anything touches it (so the first faults
/// already bring huge pages).
pub fn with_capacity_huge<T>(capacity: usize) -> Vec<T> {
    // Under HugePageAligned a large one starts on a huge-page boundary.
    MESSAGE_BUFFER.set(true);
    let mut v = Vec::with_capacity(capacity);
    MESSAGE_BUFFER.set(false);
    advise_huge(&mut v);
    v
}

/// Makes room for `len` elements in `v` (cleared); a new allocation is
/// advised to use huge pages, an existing one is reused.
pub fn reserve_huge<T>(v: &mut Vec<T>, len: usize) {
    v.clear();
    if v.capacity() < len {
        *v = with_capacity_huge(len);
    }
}

fn advise_huge<T>(v: &mut Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_FROM_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = v.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let end = (start + bytes) / PAGE * PAGE;
        if end > aligned {
            // SAFETY: the range lies inside this vector's allocation; the
            // advice changes how pages are backed, never their contents.
            // A refusal (no THP support) is harmless, so it is ignored.
            unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_buffers_start_on_huge_pages_and_other_blocks_keep_their_contents() {
        let a = HugePageAligned;
        let large = Layout::from_size_align(HUGE_FROM_BYTES + 12, 4).unwrap();
        let small = Layout::from_size_align(1000, 4).unwrap();
        unsafe {
            MESSAGE_BUFFER.set(true);
            let buffer = a.alloc(large);
            MESSAGE_BUFFER.set(false);
            assert_eq!(buffer as usize % HUGE_PAGE, 0, "a message buffer starts on a huge page");
            a.dealloc(buffer, large);

            let zeroed = a.alloc_zeroed(large);
            assert!(std::slice::from_raw_parts(zeroed, large.size()).iter().all(|&b| b == 0));
            a.dealloc(zeroed, large);

            let over = Layout::from_size_align(64, 4096).unwrap();
            let p = a.alloc(over);
            assert_eq!(p as usize % 4096, 0, "alignments above malloc's are honoured");
            a.dealloc(p, over);

            let p = a.alloc(small);
            for i in 0..small.size() {
                *p.add(i) = i as u8;
            }
            let p = a.realloc(p, small, large.size());
            assert!((0..small.size()).all(|i| *p.add(i) == i as u8), "growing keeps the bytes");
            let p = a.realloc(p, large, small.size());
            assert!((0..small.size()).all(|i| *p.add(i) == i as u8), "shrinking keeps the bytes");
            a.dealloc(p, small);
        }
    }

    #[test]
    fn reserve_reuses_and_grows() {
        let mut v: Vec<f32> = with_capacity_huge(8 << 20);
        v.resize(8 << 20, 1.0);
        let ptr = v.as_ptr();
        reserve_huge(&mut v, 1 << 20);
        assert!(v.is_empty() && v.as_ptr() == ptr, "a large enough buffer is reused");
        reserve_huge(&mut v, 16 << 20);
        assert!(v.capacity() >= 16 << 20);
    }
}
