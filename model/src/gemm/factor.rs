//! What a product's factors are stored in: f32 values (rounded to bf16 on
//! the way in when the products are bf16), or bf16 values converted once
//! and read by several products.
//!
//! A SwiGLU expert reads its input rows in two forward products (`W1`,
//! `W3`) and two weight gradients, its output gradient in two products,
//! and `dh1`, `dh3` in two each. Converted per product, the bf16 layer
//! spent about a twentieth of its time converting (a `perf` profile of
//! D512 F1024 E8 top-2 at 4096 tokens); [`prepare`] converts such a
//! factor once, and loops that produce a factor only for products
//! (SwiGLU's activations and their gradients) store it in the element
//! type the products take ([`FactorElement`]).

use super::bf16::Bf16;
use super::{precision, Precision};
use std::borrow::Cow;

/// A product's factor as stored.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in f32: borrowed, or widened from bf16 (exact).
    pub fn to_f32(self) -> Cow<'a, [f32]> {
        self.f32s(self.len())
    }

    /// The first `count` values in f32: borrowed, or widened from bf16 (exact).
    pub(super) fn f32s(self, count: usize) -> Cow<'a, [f32]> {
        match self {
            Values::F32(v) => Cow::Borrowed(&v[..count]),
            Values::Bf16(v) => Cow::Owned(v[..count].iter().map(|h| h.to_f32()).collect()),
        }
    }

    /// The first `count` values as a bf16 product sees them, in f32.
    pub(super) fn bf16_rounded(self, count: usize) -> Cow<'a, [f32]> {
        match self {
            Values::F32(v) => Cow::Owned(v[..count].iter().map(|&x| super::bf16::round(x)).collect()),
            Values::Bf16(_) => self.f32s(count),
        }
    }
}

impl<'a> From<&'a [f32]> for Values<'a> {
    fn from(v: &'a [f32]) -> Self {
        Values::F32(v)
    }
}

impl<'a> From<&'a Vec<f32>> for Values<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        Values::F32(v)
    }
}

impl<'a> From<&'a [Bf16]> for Values<'a> {
    fn from(v: &'a [Bf16]) -> Self {
        Values::Bf16(v)
    }
}

impl<'a> From<&'a Vec<Bf16>> for Values<'a> {
    fn from(v: &'a Vec<Bf16>) -> Self {
        Values::Bf16(v)
    }
}

/// Whether this thread's products take bf16 factors, so that a factor read
/// by several of them is best converted once.
pub fn factors_in_bf16() -> bool {
    precision() == Precision::Bf16
}

/// A factor for several products: f32 values (borrowed, or a loop's own
/// buffer), or bf16 values converted once (the same bits each product
/// would have converted on its own) or written by a loop in bf16.
#[derive(Debug)]
pub enum Prepared<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Vec<Bf16>),
}

/// `values` ready for several products in this thread's precision.
pub fn prepare(values: &[f32]) -> Prepared<'_> {
    if factors_in_bf16() {
        Prepared::Bf16(super::bf16::converted(values))
    } else {
        Prepared::F32(Cow::Borrowed(values))
    }
}

impl<'a> From<&'a Prepared<'_>> for Values<'a> {
    fn from(p: &'a Prepared<'_>) -> Self {
        match p {
            Prepared::F32(v) => Values::F32(v),
            Prepared::Bf16(v) => Values::Bf16(v),
        }
    }
}

/// An element a loop may store a factor in: f32, or bf16 when the products
/// that read it take bf16 (rounded where it is written, as the product's
/// own conversion would round it).
pub trait FactorElement: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn values(v: &[Self]) -> Values<'_>;
}

impl FactorElement for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    fn values(v: &[Self]) -> Values<'_> {
        Values::F32(v)
    }
}

impl FactorElement for Bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16::from_f32(x)
    }

    fn values(v: &[Self]) -> Values<'_> {
        Values::Bf16(v)
    }
}
