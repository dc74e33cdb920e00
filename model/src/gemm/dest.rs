//! A product's destination `C`: values it may add to, or fresh memory it
//! writes once. A new `[rows, f]` buffer zero-filled for a product that
//! overwrites it anyway cost the bf16 MoE layer about 2% of its time in
//! `memset` (D512 F1024 E8 top-2, `perf`, AMD EPYC).

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// `C` of one product: a pointer and length borrowed for `'a`, and whether
/// its values are initialised (only then may an accumulating product read them).
pub(super) struct Dest<'a> {
    ptr: *mut f32,
    len: usize,
    initialised: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> Dest<'a> {
    pub(super) fn init(c: &'a mut [f32]) -> Self {
        Self { ptr: c.as_mut_ptr(), len: c.len(), initialised: true, _borrow: PhantomData }
    }

    /// Memory the product writes in full before anything reads it.
    pub(super) fn uninit(c: &'a mut [MaybeUninit<f32>]) -> Self {
        Self { ptr: c.as_mut_ptr().cast(), len: c.len(), initialised: false, _borrow: PhantomData }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_initialised(&self) -> bool {
        self.initialised
    }

    /// Where the kernels write (and, accumulating, read) `C`.
    pub(super) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr
    }

    /// `C[start..start + out.len()]`, copied out: only from initialised values.
    pub(super) fn read_into(&self, start: usize, out: &mut [f32]) {
        assert!(self.initialised, "read of a product's destination before it was written");
        assert!(start + out.len() <= self.len, "read past the destination");
        // SAFETY: in bounds (checked), initialised (checked), and `out` is
        // another borrow, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), out.as_mut_ptr(), out.len()) };
    }

    /// Writes `values` at `C[start..]`.
    pub(super) fn write(&mut self, start: usize, values: &[f32]) {
        assert!(start + values.len() <= self.len, "write past the destination");
        // SAFETY: in bounds (checked); `values` is another borrow.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(start), values.len()) };
    }

    /// Zeros `C[..len]`.
    pub(super) fn zero(&mut self, len: usize) {
        assert!(len <= self.len, "write past the destination");
        // SAFETY: in bounds (checked); zero bits are 0.0.
        unsafe { std::ptr::write_bytes(self.ptr, 0, len) };
    }
}
