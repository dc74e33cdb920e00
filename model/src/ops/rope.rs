//! Rotary position embedding, "rotate-half" convention (Hugging Face LLaMA).

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
        todo!()
    }

    /// Rotates `x` in place. Layout `[batch, seq, heads, head_dim]`
    /// (i.e. rows of `heads*head_dim` per token, tokens grouped by sequence);
    /// positions restart at 0 in every sequence.
    pub fn apply(&self, x: &mut [f32], batch: usize, seq: usize, heads: usize) {
        todo!()
    }

    /// Backward of [`RopeTable::apply`] in place: the rotation's transpose
    /// (the same rotation with `-sin`).
    pub fn apply_backward(&self, dx: &mut [f32], batch: usize, seq: usize, heads: usize) {
        todo!()
    }
}
