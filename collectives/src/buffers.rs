//! [`MessageBuffer`]: the buffer collectives receive into, backed by
//! transparent huge pages when it is large.
//!
//! Where the kernel gives huge pages only on request (THP "madvise", the
//! common default), a large buffer in 4 KiB pages costs the MPI transport
//! thousands of page pins per transfer (single-copy CMA) and the CPU TLB
//! misses; numpy asks for huge pages on large arrays, and so must we to
//! move large messages as fast.
//!
//! A huge page covers an aligned 2 MiB of memory, and `malloc` puts a
//! large block just past a page boundary, so a 4 MiB buffer would hold one
//! whole huge page and 2 MiB of small ones. A large message buffer is
//! therefore allocated on a 2 MiB boundary and advised to use huge pages
//! before anything touches it. Only message buffers get this: aligning
//! every large block of the process made each one a fresh mapping per call
//! (the local backend's 4 MiB exchange went from 0.43 to 6.2 ms), so the
//! policy belongs to this type, which callers keep and reuse, not to the
//! allocator.

use std::alloc::{self, Layout};
use std::fmt;
use std::mem::{self, ManuallyDrop};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Buffers from this size up are worth a huge-page request, rounded up to
/// whole huge pages (a 1 MiB buffer takes 2 MiB). With huge pages from
/// 4 MiB only, the 1 MiB exchange on 2 MPI ranks took 0.095-0.096 ms
/// against mpi4py's 0.091-0.101 ms; from 1 MiB, 0.053-0.064 ms (1.48-1.83x
/// of mpi4py in six runs, on an AVX2 AMD EPYC; docs/parallel.md).
const HUGE_FROM_BYTES: usize = 1 << 20;

/// The size and alignment of a transparent huge page (x86-64, and aarch64
/// with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Buffers from this size up start on a page boundary. OpenMPI's shared
/// memory transport moved a 2-rank all-to-all 4-5x slower from buffers
/// inside malloc's heap than from fresh page-aligned mappings (mpi4py with
/// glibc's mmap threshold raised as ours is: 0.204 against 0.037 ms at
/// 256 KiB, 0.452 against 0.110 ms at 1 MiB, on an AVX2 AMD EPYC;
/// docs/parallel.md).
const PAGE_FROM_BYTES: usize = 64 << 10;

/// A small page.
const PAGE: usize = 4 << 10;

/// The alignment a message buffer of `bytes` is allocated with.
fn alignment<T>(bytes: usize) -> usize {
    let page = if bytes >= HUGE_FROM_BYTES {
        HUGE_PAGE
    } else if bytes >= PAGE_FROM_BYTES {
        PAGE
    } else {
        1
    };
    page.max(mem::align_of::<T>())
}

/// A growable array of plain values (`f32`, `u64`) that messages are
/// received into. Large ones start on a huge-page boundary and are advised
/// to use huge pages, mid-sized ones (64 KiB up) start on a page, small
/// ones are ordinary allocations. It dereferences to a slice, and converts
/// from and to `Vec` without copying when it has `T`'s own alignment.
pub struct MessageBuffer<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    capacity: usize,
    /// The alignment the block was allocated with: `T`'s, or a huge page's.
    align: usize,
}

// SAFETY: the buffer owns its values like a Vec does.
unsafe impl<T: Copy + Send> Send for MessageBuffer<T> {}
// SAFETY: shared access only reads, as for a Vec.
unsafe impl<T: Copy + Sync> Sync for MessageBuffer<T> {}

impl<T: Copy> MessageBuffer<T> {
    /// An empty buffer; allocates nothing.
    pub const fn new() -> Self {
        Self { ptr: NonNull::dangling(), len: 0, capacity: 0, align: mem::align_of::<T>() }
    }

    /// An empty buffer with room for `capacity` values, huge-page backed
    /// when that is large.
    pub fn with_capacity(capacity: usize) -> Self {
        let bytes = capacity.checked_mul(mem::size_of::<T>()).expect("message buffer capacity overflows");
        if bytes == 0 {
            return Self::new();
        }
        let align = alignment::<T>(bytes);
        // A huge page backs an aligned 2 MiB only where the whole of it is
        // advised, so a huge-page buffer ends on a huge page too.
        let (bytes, capacity) = if align == HUGE_PAGE {
            let whole_pages = bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            (whole_pages, whole_pages / mem::size_of::<T>())
        } else {
            (bytes, capacity)
        };
        let layout = Layout::from_size_align(bytes, align).expect("message buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else { alloc::handle_alloc_error(layout) };
        if align == HUGE_PAGE {
            advise_huge(raw, bytes);
        }
        Self { ptr, len: 0, capacity, align }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values the allocation has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the allocation starts on a huge-page boundary.
    pub fn is_huge_page_aligned(&self) -> bool {
        self.align >= HUGE_PAGE
    }

    /// Empties the buffer; the allocation stays for the next message.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Empties the buffer and makes room for `len` values: the allocation
    /// is reused when large enough (a fresh buffer of tens of MiB costs
    /// more in page faults than the transfer), else replaced.
    pub fn clear_for(&mut self, len: usize) {
        self.len = 0;
        if self.capacity < len {
            *self = Self::with_capacity(len);
        }
    }

    /// Sets the number of values held.
    ///
    /// # Safety
    /// `len` is at most the capacity and the first `len` values are written.
    pub unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the first `len` values are initialised (and `ptr` is
        // dangling but aligned when nothing is allocated).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in as_slice; `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Appends `values`, growing the allocation when needed.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        self.reserve(values.len());
        // SAFETY: reserve made room for `values.len()` more; the source is
        // a distinct borrow, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.as_ptr().add(self.len), values.len());
        }
        self.len += values.len();
    }

    /// Sets the length to `len`, filling new places with `value`.
    pub fn resize(&mut self, len: usize, value: T) {
        if len <= self.len {
            self.len = len;
            return;
        }
        self.reserve(len - self.len);
        for i in self.len..len {
            // SAFETY: reserve made room for `len` values.
            unsafe { self.ptr.as_ptr().add(i).write(value) };
        }
        self.len = len;
    }

    /// Makes room for `more` values beyond the length, keeping the values.
    fn reserve(&mut self, more: usize) {
        let needed = self.len.checked_add(more).expect("message buffer capacity overflows");
        if needed <= self.capacity {
            return;
        }
        let mut grown = Self::with_capacity(needed.max(2 * self.capacity));
        // SAFETY: `grown` has room for `needed >= len` values; two allocations never overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), grown.ptr.as_ptr(), self.len) };
        grown.len = self.len;
        *self = grown;
    }

    /// The values as a `Vec`: the same allocation when it has `T`'s own
    /// alignment (what `Vec` allocates), else a copy.
    pub fn into_vec(self) -> Vec<T> {
        if self.align != mem::align_of::<T>() || self.capacity == 0 {
            return self.as_slice().to_vec();
        }
        let this = ManuallyDrop::new(self);
        // SAFETY: the block came from the global allocator with the layout
        // of `[T; capacity]`, exactly what Vec allocates, and holds `len`
        // values; ManuallyDrop keeps it from being freed twice.
        unsafe { Vec::from_raw_parts(this.ptr.as_ptr(), this.len, this.capacity) }
    }

    fn layout(&self) -> Option<Layout> {
        let bytes = self.capacity * mem::size_of::<T>();
        (bytes > 0).then(|| Layout::from_size_align(bytes, self.align).expect("the layout it was allocated with"))
    }
}

/// Asks the kernel to back `bytes` at `start` (a fresh, untouched block)
/// with huge pages, so the first faults already bring them. A refusal (no
/// THP support) is harmless and ignored.
fn advise_huge(start: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: the range is one allocation of ours; the advice changes how
    // its pages are backed, never their contents.
    unsafe {
        libc::madvise(start.cast(), bytes, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

impl<T: Copy> Drop for MessageBuffer<T> {
    fn drop(&mut self) {
        if let Some(layout) = self.layout() {
            // SAFETY: allocated by `with_capacity` (or a Vec) with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

impl<T: Copy> Default for MessageBuffer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy> Deref for MessageBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy> DerefMut for MessageBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<T: Copy> Clone for MessageBuffer<T> {
    fn clone(&self) -> Self {
        Self::from(self.as_slice())
    }
}

impl<T: Copy + fmt::Debug> fmt::Debug for MessageBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl<T: Copy + PartialEq> PartialEq for MessageBuffer<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + PartialEq> PartialEq<Vec<T>> for MessageBuffer<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<'a, T: Copy> IntoIterator for &'a MessageBuffer<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<T: Copy> From<Vec<T>> for MessageBuffer<T> {
    /// Takes over the vector's allocation (no copy).
    fn from(values: Vec<T>) -> Self {
        let mut values = ManuallyDrop::new(values);
        let capacity = if mem::size_of::<T>() == 0 { 0 } else { values.capacity() };
        let ptr = NonNull::new(values.as_mut_ptr()).expect("a Vec's pointer is never null");
        Self { ptr, len: values.len(), capacity, align: mem::align_of::<T>() }
    }
}

impl<T: Copy> From<&[T]> for MessageBuffer<T> {
    fn from(values: &[T]) -> Self {
        let mut out = Self::with_capacity(values.len());
        out.extend_from_slice(values);
        out
    }
}

impl<T: Copy> FromIterator<T> for MessageBuffer<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let values: Vec<T> = iter.into_iter().collect();
        if alignment::<T>(values.len() * mem::size_of::<T>()) != mem::align_of::<T>() {
            Self::from(values.as_slice())
        } else {
            Self::from(values)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page_and_small_ones_are_plain() {
        let large: MessageBuffer<f32> = MessageBuffer::with_capacity(HUGE_FROM_BYTES / 4);
        assert_eq!(large.as_ptr() as usize % HUGE_PAGE, 0, "a large message buffer starts on a huge page");
        assert!(large.is_huge_page_aligned());
        // 1.5 huge pages of values get two whole ones: the second is advised too.
        let odd: MessageBuffer<f32> = MessageBuffer::with_capacity(3 * HUGE_PAGE / 8);
        assert!(odd.is_huge_page_aligned() && odd.capacity() == HUGE_PAGE / 2, "{}", odd.capacity());
        let small: MessageBuffer<f32> = MessageBuffer::with_capacity(1000);
        assert!(!small.is_huge_page_aligned() && small.capacity() == 1000);
    }

    #[test]
    fn mid_sized_buffers_start_on_a_page_and_leave_as_vectors_by_copy() {
        for values in [PAGE_FROM_BYTES / 4, (HUGE_FROM_BYTES - 1) / 4] {
            // Collected (as a send buffer is) or allocated (a receive buffer).
            let collected: MessageBuffer<f32> = (0..values).map(|i| i as f32).collect();
            let allocated: MessageBuffer<f32> = MessageBuffer::with_capacity(values);
            for b in [&collected, &allocated] {
                assert_eq!(b.as_ptr() as usize % PAGE, 0, "{values} values start on a page");
                assert!(!b.is_huge_page_aligned());
            }
            // Vec frees with f32's alignment: the values are copied out.
            let ptr = collected.as_ptr();
            let vec = collected.into_vec();
            assert!(vec.as_ptr() != ptr && vec.iter().copied().eq((0..values).map(|i| i as f32)));
        }
        let below: MessageBuffer<f32> = (0..PAGE_FROM_BYTES / 4 - 1).map(|i| i as f32).collect();
        let ptr = below.as_ptr();
        let back = below.into_vec();
        assert_eq!(back.as_ptr(), ptr, "a small buffer leaves as the same allocation");
    }

    #[test]
    fn clear_for_reuses_a_large_enough_allocation_and_grows_otherwise() {
        let mut v: MessageBuffer<f32> = MessageBuffer::with_capacity(8 << 20);
        v.resize(8 << 20, 1.0);
        let ptr = v.as_ptr();
        v.clear_for(1 << 20);
        assert!(v.is_empty() && v.as_ptr() == ptr, "a large enough buffer is reused");
        v.clear_for(16 << 20);
        assert!(v.capacity() >= 16 << 20 && v.is_huge_page_aligned());
    }

    #[test]
    fn values_survive_growth_and_conversions() {
        let mut v: MessageBuffer<u64> = MessageBuffer::new();
        for chunk in (0..1000u64).collect::<Vec<_>>().chunks(7) {
            v.extend_from_slice(chunk);
        }
        assert_eq!(v, (0..1000).collect::<Vec<u64>>());
        // Growing past the huge-page threshold keeps the values.
        v.resize(HUGE_FROM_BYTES / 8 + 1, 7);
        assert!(v.is_huge_page_aligned());
        assert!(v[..1000].iter().copied().eq(0..1000) && v[1000..].iter().all(|&x| x == 7));
        let copied = v.clone().into_vec();
        assert_eq!(v, copied);

        // A Vec moves in and out without a copy.
        let vec = vec![1.5f32; 300];
        let ptr = vec.as_ptr();
        let buffer = MessageBuffer::from(vec);
        assert_eq!(buffer.as_ptr(), ptr);
        let back = buffer.into_vec();
        assert_eq!((back.as_ptr(), back.len()), (ptr, 300));

        let empty: MessageBuffer<f32> = Vec::new().into();
        assert!(empty.is_empty() && empty.into_vec().is_empty());
    }
}
