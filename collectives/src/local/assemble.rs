//! Turning the posts of a complete round into one rank's result: pure
//! functions that run outside the group's lock.

use std::ops::Range;
use std::sync::Arc;

use super::exchange::{Elem, Post};
use crate::stream_copy::{copy_bytes, worth_streaming};
use crate::{CommError, MessageBuffer};

/// `[0, c0, c0 + c1, ...]`: where each rank's block starts in a buffer cut
/// by `counts`, and (last) where the buffer ends.
pub(super) fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(counts.len() + 1);
    let mut at = 0;
    offsets.push(at);
    for &count in counts {
        at += count;
        offsets.push(at);
    }
    offsets
}

/// The number of values every rank posted, or the error naming a rank whose
/// number differs (every rank sees the same posts, so all fail alike).
pub(super) fn common_len<T: Elem>(op: &'static str, posts: &[Arc<Post>]) -> Result<usize, CommError> {
    let n = T::slice(&posts[0].data).len();
    for (r, post) in posts.iter().enumerate().skip(1) {
        let m = T::slice(&post.data).len();
        if m != n {
            return Err(CommError::BadArgument {
                op,
                reason: format!(
                    "rank {r} passed {m} values but rank 0 passed {n}: every rank must pass the same length"
                ),
            });
        }
    }
    Ok(n)
}

/// Checks that every rank posted the same meta (counts, root); else the
/// error naming the first rank that differs, described by `describe`.
pub(super) fn check_same_meta(
    op: &'static str,
    posts: &[Arc<Post>],
    describe: impl Fn(&[usize]) -> String,
) -> Result<(), CommError> {
    let first = &posts[0].meta;
    match posts.iter().enumerate().find(|(_, p)| &p.meta != first) {
        None => Ok(()),
        Some((r, post)) => Err(CommError::BadArgument {
            op,
            reason: format!(
                "rank {r} passed {} but rank 0 passed {}: every rank must pass the same",
                describe(&post.meta),
                describe(first)
            ),
        }),
    }
}

/// Element-wise sum over the ranks of the values at `range`, in rank order
/// starting from rank 0's values, so the bits never depend on timing.
pub(super) fn sum_range<T: Elem>(posts: &[Arc<Post>], range: Range<usize>) -> Vec<T> {
    let (first, rest) = posts.split_first().expect("a group has at least one rank");
    let mut out = T::slice(&first.data)[range.clone()].to_vec();
    for post in rest {
        for (o, &x) in out.iter_mut().zip(&T::slice(&post.data)[range.clone()]) {
            *o = *o + x;
        }
    }
    out
}

/// What every rank sent to `rank` in an all-to-all round (posts carry their
/// block offsets as meta), concatenated in rank order, with the counts.
pub(super) fn segments<T: Elem>(posts: &[Arc<Post>], rank: usize) -> (Vec<T>, Vec<usize>) {
    let blocks: Vec<Range<usize>> = posts.iter().map(|p| p.meta[rank]..p.meta[rank + 1]).collect();
    let counts: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
    let mut values = Vec::with_capacity(counts.iter().sum());
    for (post, block) in posts.iter().zip(blocks) {
        values.extend_from_slice(&T::slice(&post.data)[block]);
    }
    (values, counts)
}

/// [`segments`] of `f32` into `recv` (cleared; its allocation reused),
/// copying each block once, large ones in an exchange larger than the
/// cache with streaming stores (the MPI backend's rule for its own block). With
/// `expect`, the counts must be those; else the error names the first
/// sender that disagrees, and nothing is copied.
pub(super) fn segments_into(
    op: &'static str,
    posts: &[Arc<Post>],
    rank: usize,
    expect: Option<&[usize]>,
    recv: &mut MessageBuffer<f32>,
) -> Result<Vec<usize>, CommError> {
    let blocks: Vec<Range<usize>> = posts.iter().map(|p| p.meta[rank]..p.meta[rank + 1]).collect();
    let counts: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
    if let Some(expect) = expect {
        crate::check_received_counts(op, rank, expect, &counts)?;
    }
    let total: usize = counts.iter().sum();
    recv.clear_for(total);
    // Every sender's whole send buffer: the exchange.
    let exchange_bytes: usize = posts.iter().map(|p| std::mem::size_of_val(f32::slice(&p.data))).sum();
    let mut at = 0;
    for (post, block) in posts.iter().zip(blocks) {
        let values = &f32::slice(&post.data)[block];
        let bytes = std::mem::size_of_val(values);
        // SAFETY: `recv` has room for `total` values, of which these are
        // the next `values.len()`; a sender's buffer never overlaps it.
        unsafe {
            copy_bytes(
                values.as_ptr().cast(),
                recv.as_mut_ptr().add(at).cast(),
                bytes,
                worth_streaming(bytes, exchange_bytes),
            )
        };
        at += values.len();
    }
    // SAFETY: every one of the `total` values was written above.
    unsafe { recv.set_len(total) };
    Ok(counts)
}

/// Every rank's values concatenated in rank order, with the lengths.
pub(super) fn concat<T: Elem>(posts: &[Arc<Post>]) -> (Vec<T>, Vec<usize>) {
    let counts: Vec<usize> = posts.iter().map(|p| T::slice(&p.data).len()).collect();
    let mut values = Vec::with_capacity(counts.iter().sum());
    for post in posts {
        values.extend_from_slice(T::slice(&post.data));
    }
    (values, counts)
}
