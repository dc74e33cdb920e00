//! Collective helpers of the step engine: gradient all-reduce, metric sums,
//! and gathering small serialisable values (checkpoint shard reports).

use crate::error::WorkerError;
use collectives::Communicator;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Sums named tensors over the group in one all-reduce (one round trip
/// instead of one per tensor), in place.
pub fn all_reduce_tensors(
    comm: &mut dyn Communicator,
    tensors: Vec<(String, &mut Vec<f32>)>,
) -> Result<(), WorkerError> {
    let total: usize = tensors.iter().map(|(_, t)| t.len()).sum();
    let mut flat = Vec::with_capacity(total);
    for (_, t) in &tensors {
        flat.extend_from_slice(t);
    }
    comm.all_reduce_sum(&mut flat)?;
    let mut offset = 0;
    for (_, t) in tensors {
        let len = t.len();
        t.copy_from_slice(&flat[offset..offset + len]);
        offset += len;
    }
    Ok(())
}

/// Element-wise f64 sum over the group, in place.
pub fn sum_over_ranks(comm: &mut dyn Communicator, values: &mut [f64]) -> Result<(), WorkerError> {
    Ok(comm.all_reduce_sum_f64(values)?)
}

/// Every rank's `value`, in rank order (sent as JSON packed into u64 words).
pub fn gather_json<T: Serialize + DeserializeOwned>(
    comm: &mut dyn Communicator,
    value: &T,
) -> Result<Vec<T>, WorkerError> {
    let bytes = serde_json::to_vec(value).expect("plain data serialises");
    let mut words = vec![bytes.len() as u64];
    words.extend(bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    }));
    comm.all_gather_u64(&words)?
        .into_iter()
        .enumerate()
        .map(|(rank, words)| {
            let len = words.first().copied().unwrap_or(0) as usize;
            let bytes: Vec<u8> = words.iter().skip(1).flat_map(|w| w.to_le_bytes()).take(len).collect();
            serde_json::from_slice(&bytes).map_err(|source| WorkerError::Garbled { rank, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_words() {
        let mut comm = collectives::SelfComm;
        let got: Vec<Option<String>> = gather_json(&mut comm, &Some("shard rank-00003 ✓".to_string())).unwrap();
        assert_eq!(got, vec![Some("shard rank-00003 ✓".to_string())]);
    }
}
