//! Message buffers backed by transparent huge pages.
//!
//! Where the kernel gives huge pages only on request (THP "madvise", the
//! common default), a large buffer in 4 KiB pages costs the MPI transport
//! thousands of page pins per transfer (single-copy CMA) and the CPU TLB
//! misses; numpy asks for huge pages on large arrays, and so must we to
//! move large messages as fast. Small buffers are left alone.

/// Buffers from this size up are worth a huge-page request.
const HUGE_FROM_BYTES: usize = 4 << 20;

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
