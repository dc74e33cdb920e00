//! Message buffers backed by transparent huge pages.
//!
//! Where the kernel gives huge pages only on request (THP "madvise", the
//! common default), a large buffer in 4 KiB pages costs the MPI transport
//! thousands of page pins per transfer (single-copy CMA) and the CPU TLB
//! misses; numpy asks for huge pages on large arrays, and so must we to
//! move large messages as fast. Small buffers are left alone.
//!
//! A huge page covers an aligned 2 MiB of memory, and `malloc` puts a
//! large block just past a page boundary, so a 4 MiB buffer held only one
//! whole huge page and the rest in small pages. [`HugePageAligned`], the
//! `switchyard` binary's global allocator, starts every large block on a
//! 2 MiB boundary instead: a 4 MiB all-to-all on 2 MPI ranks went from
//! 0.21-0.27 ms to 0.14 ms (`switchyard bench alltoall`, docs/parallel.md).

use std::alloc::{GlobalAlloc, Layout, System};

/// Buffers from this size up are worth a huge-page request.
const HUGE_FROM_BYTES: usize = 4 << 20;

/// The size and alignment of a transparent huge page on x86-64 and most
/// aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with blocks of [`HUGE_FROM_BYTES`] and more
/// aligned to [`HUGE_PAGE`] (glibc's `posix_memalign`); smaller ones are
/// untouched. Install it with `#[global_allocator]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HugePageAligned;

/// The layout a block is really allocated with: the same for allocation
/// and release, since both are computed from the caller's layout.
fn huge_aligned(layout: Layout) -> Layout {
    if layout.size() >= HUGE_FROM_BYTES && layout.align() < HUGE_PAGE {
        Layout::from_size_align(layout.size(), HUGE_PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call forwards to the system allocator with a layout of the
// same size and an alignment at least the caller's, and releases a block
// with the layout it was allocated with (`huge_aligned` of the same input).
unsafe impl GlobalAlloc for HugePageAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(huge_aligned(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(huge_aligned(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, huge_aligned(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size, rounded to the alignment, fits an isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if huge_aligned(layout) == layout && huge_aligned(new_layout) == new_layout {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Crossing the threshold changes the alignment: move the block.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// An empty vector with room for `capacity` elements, its memory advised
/// to use huge pages before anything touches it (so the first faults
/// already bring huge pages).
pub fn with_capacity_huge<T>(capacity: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(capacity);
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
    fn large_blocks_start_on_huge_pages_and_keep_their_contents() {
        let a = HugePageAligned;
        let small = Layout::from_size_align(1000, 4).unwrap();
        let large = Layout::from_size_align(HUGE_FROM_BYTES + 12, 4).unwrap();
        unsafe {
            let p = a.alloc_zeroed(large);
            assert_eq!(p as usize % HUGE_PAGE, 0, "a large block starts on a huge page");
            assert!(std::slice::from_raw_parts(p, large.size()).iter().all(|&b| b == 0));
            a.dealloc(p, large);

            // Growing across the threshold moves the block and keeps the bytes; so does shrinking.
            let p = a.alloc(small);
            for i in 0..small.size() {
                *p.add(i) = i as u8;
            }
            let p = a.realloc(p, small, large.size());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            assert!((0..small.size()).all(|i| *p.add(i) == i as u8));
            let p = a.realloc(p, large, small.size());
            assert!((0..small.size()).all(|i| *p.add(i) == i as u8));
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
