//! The dispatch plan: which rows go to which expert, and the gather and
//! combine steps that move token vectors into and out of those rows.
//!
//! Legend: `t` tokens, `d` d_model, `e` experts, `k` top-k slots, `a` kept
//! assignments (rows of the dispatch buffer).

use super::router::Routing;

/// The kept assignments grouped by expert: rows of expert 0 first (in
/// token order), then expert 1, and so on. This order is the contract
/// between the MoE layer and every [`ExpertExecutor`](super::ExpertExecutor).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchPlan {
    pub num_experts: usize,
    pub top_k: usize,
    /// Rows per expert (len E).
    pub counts_e: Vec<usize>,
    /// Start row of each expert's block (len E + 1).
    pub offsets_e: Vec<usize>,
    /// Per row: the flat `[t, k]` index `token * top_k + slot` it came from.
    pub source_a: Vec<u32>,
}

impl DispatchPlan {
    /// Groups the kept assignments of `routing` to the `num_experts` FFN
    /// experts by expert (router outputs past them are MoE++'s
    /// computation-free experts, which the layer computes in place).
    pub fn from_routing(routing: &Routing, num_experts: usize, top_k: usize) -> Self {
        let k = top_k;
        let mut counts_e = vec![0usize; num_experts];
        for (&e, &kept) in routing.expert_tk.iter().zip(&routing.kept_tk) {
            if kept && (e as usize) < num_experts {
                counts_e[e as usize] += 1;
            }
        }
        let mut offsets_e = Vec::with_capacity(num_experts + 1);
        offsets_e.push(0);
        for &c in &counts_e {
            offsets_e.push(offsets_e.last().copied().unwrap_or(0) + c);
        }
        let total = offsets_e[num_experts];
        let mut cursor = offsets_e.clone();
        let mut source_a = vec![0u32; total];
        for (i, (&e, &kept)) in routing.expert_tk.iter().zip(&routing.kept_tk).enumerate().take(routing.num_tokens * k)
        {
            if kept && (e as usize) < num_experts {
                let c = &mut cursor[e as usize];
                source_a[*c] = i as u32;
                *c += 1;
            }
        }
        Self { num_experts, top_k, counts_e, offsets_e, source_a }
    }

    /// A grouping of rows that arrived from other ranks: `counts_e[e]` rows
    /// of expert e, expert by expert. It has no token sources, so only an
    /// [`ExpertExecutor`](super::ExpertExecutor) may use it (not gather or combine).
    pub fn grouped(counts_e: Vec<usize>, top_k: usize) -> Self {
        let mut offsets_e = Vec::with_capacity(counts_e.len() + 1);
        offsets_e.push(0);
        for &c in &counts_e {
            offsets_e.push(offsets_e.last().copied().unwrap_or(0) + c);
        }
        let rows = offsets_e[counts_e.len()];
        Self { num_experts: counts_e.len(), top_k, counts_e, offsets_e, source_a: vec![u32::MAX; rows] }
    }

    /// Number of rows (kept assignments).
    pub fn num_rows(&self) -> usize {
        self.source_a.len()
    }

    /// One past the highest token id with a row: the size of a per-token
    /// table over this plan (0 for a plan without sources).
    pub fn token_bound(&self) -> usize {
        self.source_a
            .iter()
            .filter(|&&src| src != u32::MAX)
            .map(|&src| src as usize / self.top_k + 1)
            .max()
            .unwrap_or(0)
    }

    /// Copies each row's token vector: `x_ad[a] = x_td[source_a[a] / k]`.
    pub fn gather(&self, x_td: &[f32], d: usize) -> Vec<f32> {
        let k = self.top_k;
        let mut x_ad = vec![0.0f32; self.num_rows() * d];
        for (row, &src) in x_ad.chunks_exact_mut(d).zip(&self.source_a) {
            let t = src as usize / k;
            row.copy_from_slice(&x_td[t * d..(t + 1) * d]);
        }
        x_ad
    }

    /// Backward of [`DispatchPlan::gather`]: adds each row's gradient into its token.
    pub fn gather_backward(&self, dx_ad: &[f32], d: usize, dx_td: &mut [f32]) {
        let k = self.top_k;
        for (row, &src) in dx_ad.chunks_exact(d).zip(&self.source_a) {
            let t = src as usize / k;
            for (o, &v) in dx_td[t * d..(t + 1) * d].iter_mut().zip(row) {
                *o += v;
            }
        }
    }

    /// Combine: `out_td[t] += gate[t,k] * y_ad[a]` for every row `a` from `(t, k)`.
    pub fn combine(&self, routing: &Routing, y_ad: &[f32], d: usize, out_td: &mut [f32]) {
        let k = self.top_k;
        for (row, &src) in y_ad.chunks_exact(d).zip(&self.source_a) {
            let t = src as usize / k;
            let g = routing.gate_tk[src as usize];
            for (o, &v) in out_td[t * d..(t + 1) * d].iter_mut().zip(row) {
                *o += g * v;
            }
        }
    }

    /// Backward of [`DispatchPlan::combine`]: returns `dy_ad`
    /// (`gate * dout[t]`) and adds `dot(dout[t], y_ad[a])` into `dgate_tk`.
    pub fn combine_backward(
        &self,
        routing: &Routing,
        y_ad: &[f32],
        dout_td: &[f32],
        d: usize,
        dgate_tk: &mut [f32],
    ) -> Vec<f32> {
        let mut y_dy_ad = y_ad.to_vec();
        self.combine_backward_in_place(routing, &mut y_dy_ad, dout_td, d, dgate_tk);
        y_dy_ad
    }

    /// [`DispatchPlan::combine_backward`] in the outputs' own buffer: each
    /// row of `y_dy_ad` is read for the gate's gradient, then takes `dy`
    /// (the MoE backward spends the forward's outputs so: one `[rows, d]`
    /// less at the pass's peak).
    pub fn combine_backward_in_place(
        &self,
        routing: &Routing,
        y_dy_ad: &mut [f32],
        dout_td: &[f32],
        d: usize,
        dgate_tk: &mut [f32],
    ) {
        let k = self.top_k;
        assert_eq!(y_dy_ad.len(), self.num_rows() * d, "combine_backward: y has the wrong number of values");
        for (y_dy, &src) in y_dy_ad.chunks_exact_mut(d).zip(&self.source_a) {
            let t = src as usize / k;
            let g = routing.gate_tk[src as usize];
            let dout = &dout_td[t * d..(t + 1) * d];
            let mut dot = 0.0f32;
            for (y_dy_j, &oj) in y_dy.iter_mut().zip(dout) {
                dot += oj * *y_dy_j;
                *y_dy_j = g * oj;
            }
            dgate_tk[src as usize] += dot;
        }
    }
}
