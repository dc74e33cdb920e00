//! Rotary position embedding, "rotate-half" convention (Hugging Face LLaMA).

use rayon::prelude::*;

/// cos/sin tables for positions `0..seq_len` and `head_dim/2` frequencies.
pub struct RopeTable {
    pub head_dim: usize,
    pub seq_len: usize,
    /// `[seq_len, head_dim/2]`: cos(pos * theta^(-2i/hd)).
    pub cos_si: Vec<f32>,
    /// `[seq_len, head_dim/2]`: sin(pos * theta^(-2i/hd)).
    pub sin_si: Vec<f32>,
}

impl RopeTable {
    /// Precomputes the angles (in f64, then rounded) for every position.
    pub fn new(seq_len: usize, head_dim: usize, theta: f32) -> Self {
        assert!(head_dim.is_multiple_of(2), "rope: head_dim {head_dim} must be even");
        let half = head_dim / 2;
        let freqs: Vec<f64> = (0..half).map(|i| (theta as f64).powf(-((2 * i) as f64) / head_dim as f64)).collect();
        let mut cos_si = Vec::with_capacity(seq_len * half);
        let mut sin_si = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for &f in &freqs {
                let angle = pos as f64 * f;
                cos_si.push(angle.cos() as f32);
                sin_si.push(angle.sin() as f32);
            }
        }
        RopeTable { head_dim, seq_len, cos_si, sin_si }
    }

    /// Rotates `x` in place. Layout `[batch, seq, heads, head_dim]`
    /// (i.e. rows of `heads*head_dim` per token, tokens grouped by sequence);
    /// positions restart at 0 in every sequence.
    pub fn apply(&self, x: &mut [f32], batch: usize, seq: usize, heads: usize) {
        self.rotate(x, batch, seq, heads, 1.0);
    }

    /// Backward of [`RopeTable::apply`] in place: the rotation's transpose
    /// (the same rotation with `-sin`).
    pub fn apply_backward(&self, dx: &mut [f32], batch: usize, seq: usize, heads: usize) {
        self.rotate(dx, batch, seq, heads, -1.0);
    }

    /// `x' = x cos + rotate_half(x) * (sign * sin)` for every head vector.
    fn rotate(&self, x: &mut [f32], batch: usize, seq: usize, heads: usize, sign: f32) {
        let hd = self.head_dim;
        let half = hd / 2;
        let row = heads * hd;
        assert!(seq <= self.seq_len, "rope: seq {seq} exceeds the table's {}", self.seq_len);
        assert_eq!(x.len(), batch * seq * row, "rope: x has {} values, need {batch}x{seq}x{heads}x{hd}", x.len());
        if row == 0 {
            return;
        }
        x.par_chunks_mut(row).enumerate().for_each(|(token, xr)| {
            let pos = token % seq;
            let cos = &self.cos_si[pos * half..(pos + 1) * half];
            let sin = &self.sin_si[pos * half..(pos + 1) * half];
            for head in xr.chunks_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for (((av, bv), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                    let s = sign * s;
                    let (x0, x1) = (*av, *bv);
                    *av = x0 * c - x1 * s;
                    *bv = x1 * c + x0 * s;
                }
            }
        });
    }
}
