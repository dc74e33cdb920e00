//! Bucketed gradient all-reduce started during the backward pass.
//!
//! The last backward pass of a step finishes the dense gradients of layer
//! L-1 first and layer 0 last. As each layer is done (on every lane that
//! holds a share of it: one, or two when micro-batches interleave) its
//! gradients join the open bucket; a full bucket is all-reduced at once on
//! the communication thread while the backward pass goes on. Every rank
//! fills buckets in the same order with the same sizes, so the all-reduces
//! meet. Each value's sum over ranks is the same whatever the bucket, and
//! two lanes' shares are added as `a + b`, which rounds the same in either
//! order, so bucketing changes no bits of the all-reduced gradients.

use crate::overlap::exposure::Exposure;
use collectives::comm_thread::{CommThread, Ticket};
use collectives::CommError;
use model::weights::DenseLayerWeights;
use std::collections::BTreeMap;
use std::time::Duration;

/// A layer's gradients in a fixed order (the same on every rank).
fn layer_tensors(g: &DenseLayerWeights) -> Vec<&Vec<f32>> {
    g.params().into_iter().map(|(_, t)| t).collect()
}

fn layer_tensors_mut(g: &mut DenseLayerWeights) -> Vec<&mut Vec<f32>> {
    g.params_mut().into_iter().map(|(_, t)| t).collect()
}

fn flatten(g: &DenseLayerWeights) -> Vec<f32> {
    layer_tensors(g).into_iter().flat_map(|t| t.iter().copied()).collect()
}

/// Gradient buckets of one step.
pub struct GradBuckets<'p> {
    pipe: &'p CommThread,
    bucket_values: usize,
    /// Lanes that contribute a share of every layer.
    lanes: usize,
    /// Layers with some lanes' shares in: (shares, their sum).
    partial: BTreeMap<usize, (usize, Vec<f32>)>,
    open: Vec<f32>,
    open_layers: Vec<usize>,
    in_flight: Vec<(Vec<usize>, Ticket)>,
    busy: Duration,
}

impl<'p> GradBuckets<'p> {
    /// Buckets of about `bucket_values` values, all-reduced on `pipe` (a
    /// group of every rank); each layer is done once `lanes` lanes gave it.
    pub fn new(pipe: &'p CommThread, bucket_values: usize, lanes: usize) -> Self {
        Self {
            pipe,
            bucket_values,
            lanes,
            partial: BTreeMap::new(),
            open: Vec::new(),
            open_layers: Vec::new(),
            in_flight: Vec::new(),
            busy: Duration::ZERO,
        }
    }

    /// A lane finished `layer`'s gradients (its share of them).
    pub fn layer_done(&mut self, layer: usize, grads: &DenseLayerWeights) {
        let share = flatten(grads);
        let entry = self.partial.entry(layer).or_insert_with(|| (0, Vec::new()));
        if entry.0 == 0 {
            entry.1 = share;
        } else {
            entry.1.iter_mut().zip(&share).for_each(|(a, b)| *a += b);
        }
        entry.0 += 1;
        if entry.0 < self.lanes {
            return;
        }
        let (_, sum) = self.partial.remove(&layer).expect("entry just seen");
        self.open.extend_from_slice(&sum);
        self.open_layers.push(layer);
        if self.open.len() >= self.bucket_values {
            self.send_open();
        }
    }

    fn send_open(&mut self) {
        if self.open_layers.is_empty() {
            return;
        }
        let ticket = self.pipe.all_reduce_sum(std::mem::take(&mut self.open));
        self.in_flight.push((std::mem::take(&mut self.open_layers), ticket));
    }

    /// Sends the last bucket, waits for every bucket and writes the sums
    /// into `layers` (every lane's share summed over every rank). Returns
    /// the time the all-reduces ran on the communication thread.
    pub fn finish(mut self, layers: &mut [DenseLayerWeights], exposure: &Exposure) -> Result<Duration, CommError> {
        if !self.partial.is_empty() {
            let missing: Vec<usize> = self.partial.keys().copied().collect();
            panic!("gradient buckets: layers {missing:?} were not finished by every lane");
        }
        self.send_open();
        for (bucket_layers, ticket) in std::mem::take(&mut self.in_flight) {
            let (received, times) = exposure.waiting(|| ticket.wait())?;
            self.busy += times.busy;
            let mut rest = received.values.as_slice();
            for layer in bucket_layers {
                for t in layer_tensors_mut(&mut layers[layer]) {
                    let (head, tail) = rest.split_at(t.len());
                    t.copy_from_slice(head);
                    rest = tail;
                }
            }
        }
        Ok(self.busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use collectives::local::LocalWorld;
    use collectives::Communicator;
    use model::rng::Rng;
    use model::weights::DenseWeights;
    use model::ModelConfig;

    /// Two ranks, two lanes each, small buckets: the result is the plain
    /// all-reduce of every lane's gradients, bit for bit.
    #[test]
    fn buckets_give_the_plain_sum() {
        let cfg = ModelConfig { n_layers: 3, ..ModelConfig::default() };
        let share = |seed: u64| DenseWeights::init(&cfg, &mut Rng::new(seed)).layers;
        let comms = LocalWorld::new(2, Duration::from_secs(10));
        let results: Vec<Vec<DenseLayerWeights>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let share = &share;
                    s.spawn(move || {
                        let r = comm.rank() as u64;
                        let pipe = CommThread::spawn(Box::new(comm)).unwrap();
                        let (a, b) = (share(10 + r), share(20 + r));
                        let mut buckets = GradBuckets::new(&pipe, 1000, 2);
                        for layer in (0..3).rev() {
                            buckets.layer_done(layer, &b[layer]);
                            buckets.layer_done(layer, &a[layer]);
                        }
                        let mut out = a.clone();
                        buckets.finish(&mut out, &Exposure::new(1)).unwrap();
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for layer in 0..3 {
            let expected: Vec<f32> = {
                let parts: Vec<Vec<f32>> = [10, 20, 11, 21].iter().map(|&s| flatten(&share(s)[layer])).collect();
                // Each rank adds its lanes, then the ranks are summed in rank order.
                let rank0: Vec<f32> = parts[0].iter().zip(&parts[1]).map(|(a, b)| a + b).collect();
                let rank1: Vec<f32> = parts[2].iter().zip(&parts[3]).map(|(a, b)| a + b).collect();
                rank0.iter().zip(&rank1).map(|(a, b)| a + b).collect()
            };
            for got in &results {
                assert_eq!(flatten(&got[layer]), expected, "layer {layer}");
            }
        }
    }
}
