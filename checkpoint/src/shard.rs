//! Encoding tensors into a safetensors shard and decoding them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError};

use crate::store::ByteSource;

/// A borrowed fp32 tensor to write into a shard.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Global name, written verbatim (e.g. `layers.0.attn.wq.weight`).
    pub name: &'a str,
    /// Shape; its product must equal `data.len()`.
    pub shape: &'a [usize],
    /// Row-major values.
    pub data: &'a [f32],
}

/// Where one tensor's bytes ended up in an encoded shard.
pub(crate) struct Placed {
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
}

/// Why a tensor cannot be written, if it cannot: names must be unique and
/// non-empty, and the shape must match the data.
pub(crate) fn check_tensors(tensors: &[TensorRef<'_>]) -> Result<(), (String, String)> {
    let mut seen = BTreeSet::new();
    for t in tensors {
        let fail = |reason: String| Err((t.name.to_string(), reason));
        if t.name.is_empty() {
            return fail("the name is empty".into());
        }
        // safetensors reserves this key for free-form metadata.
        if t.name == "__metadata__" {
            return fail("the name is reserved by safetensors".into());
        }
        if !seen.insert(t.name) {
            return fail("the name appears twice in this shard".into());
        }
        let numel = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(t.data.len()) {
            return fail(format!("shape {:?} does not match {} values", t.shape, t.data.len()));
        }
    }
    Ok(())
}

/// safetensors rejects headers larger than this (its own limit, private to
/// the crate), so refuse to write one it could not read back.
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Values converted to bytes per piece of a [`ShardStream`]: big enough that
/// per-piece overhead vanishes, small enough to stay in cache.
const PIECE_VALUES: usize = 64 * 1024;

/// The layout of a shard file, worked out without touching tensor data:
/// the file is `header` followed by the tensors' data in `order`.
pub(crate) struct ShardPlan {
    /// 8-byte little-endian JSON length, then the JSON padded with spaces.
    header: Vec<u8>,
    /// Indices into the tensors as given, in the order their data is written.
    order: Vec<usize>,
    /// Absolute offset of each tensor's data, indexed as given.
    offsets: Vec<u64>,
    /// Size of the whole file in bytes.
    size: u64,
}

/// Plan the safetensors file for `tensors` (already checked), byte for byte
/// what `safetensors::serialize` would write, so shards stay loadable by
/// any safetensors reader while their data is streamed rather than buffered.
pub(crate) fn plan(tensors: &[TensorRef<'_>]) -> Result<ShardPlan, SafeTensorError> {
    // safetensors writes data sorted by dtype alignment, then by name; all
    // tensors here are F32, so by name alone.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(tensors[b].name));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut relative = vec![0u64; tensors.len()];
    let mut data_len = 0usize;
    for &i in &order {
        let t = &tensors[i];
        let len = t.data.len() * 4;
        infos.push((
            t.name.to_string(),
            TensorInfo { dtype: Dtype::F32, shape: t.shape.to_vec(), data_offsets: (data_len, data_len + len) },
        ));
        relative[i] = data_len as u64;
        data_len += len;
    }
    // "format": "pt" is what transformers' loaders expect to find.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // The header JSON comes from safetensors' own types so its layout
    // (key order, number formatting) matches what the crate writes.
    let metadata = Metadata::new(Some(metadata), infos)?;
    let mut json = serde_json::to_string(&metadata)?.into_bytes();
    // Data starts 8-byte aligned, as safetensors requires.
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_HEADER_BYTES {
        return Err(SafeTensorError::HeaderTooLarge);
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    let data_start = header.len() as u64;
    let offsets = relative.into_iter().map(|r| data_start + r).collect();
    Ok(ShardPlan { size: data_start + data_len as u64, header, order, offsets })
}

impl ShardPlan {
    /// Size of the whole file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Produces a planned shard's bytes piece by piece, converting values to
/// little-endian bytes (the format's byte order, whatever the host's) and
/// checksumming each tensor on the way, so memory stays O(piece).
pub(crate) struct ShardStream<'p, 't, 'a> {
    plan: &'p ShardPlan,
    tensors: &'t [TensorRef<'a>],
    header_sent: bool,
    /// Position in `plan.order` and value index within that tensor.
    next_tensor: usize,
    next_value: usize,
    crcs: Vec<crc32fast::Hasher>,
    piece: Vec<u8>,
}

impl<'p, 't, 'a> ShardStream<'p, 't, 'a> {
    /// Stream `tensors`, which must be the ones `plan` was made from.
    pub fn new(plan: &'p ShardPlan, tensors: &'t [TensorRef<'a>]) -> Self {
        debug_assert_eq!(plan.offsets.len(), tensors.len());
        Self {
            plan,
            tensors,
            header_sent: false,
            next_tensor: 0,
            next_value: 0,
            crcs: vec![crc32fast::Hasher::new(); tensors.len()],
            piece: Vec::new(),
        }
    }

    /// Where each tensor's bytes are, with its checksum, in the order given;
    /// call after the whole file was produced.
    pub fn finish(self) -> Vec<Placed> {
        debug_assert!(self.next_tensor == self.plan.order.len(), "shard stream not fully read");
        self.tensors
            .iter()
            .zip(&self.plan.offsets)
            .zip(self.crcs)
            .map(|((t, &offset), crc)| Placed {
                name: t.name.to_string(),
                offset,
                length: t.data.len() as u64 * 4,
                crc32: crc.finalize(),
            })
            .collect()
    }
}

impl ByteSource for ShardStream<'_, '_, '_> {
    fn next_piece(&mut self) -> Option<&[u8]> {
        if !self.header_sent {
            self.header_sent = true;
            return Some(&self.plan.header);
        }
        loop {
            let &i = self.plan.order.get(self.next_tensor)?;
            let data = self.tensors[i].data;
            if self.next_value == data.len() {
                // Done with this tensor (or it is empty): move on.
                self.next_tensor += 1;
                self.next_value = 0;
                continue;
            }
            let end = data.len().min(self.next_value + PIECE_VALUES);
            let values = &data[self.next_value..end];
            self.next_value = end;
            let bytes = le_bytes(values, &mut self.piece);
            self.crcs[i].update(bytes);
            return Some(bytes);
        }
    }
}

/// `values` as little-endian bytes: on little-endian hosts (every machine
/// we run on) their memory as is, with no copy; elsewhere converted into `buf`.
fn le_bytes<'v>(values: &'v [f32], buf: &'v mut Vec<u8>) -> &'v [u8] {
    #[cfg(target_endian = "little")]
    {
        let _ = buf;
        // SAFETY: f32 has no padding and any byte pattern is a valid u8;
        // the slice covers exactly the values' memory and borrows it.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
    }
    #[cfg(not(target_endian = "little"))]
    {
        buf.clear();
        buf.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        buf
    }
}

/// The whole file at once, for shards small enough that one buffer is cheap.
pub(crate) fn collect(source: &mut dyn ByteSource, size: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(piece) = source.next_piece() {
        bytes.extend_from_slice(piece);
    }
    bytes
}

/// One tensor's entry in a shard's safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range within the data that follows the header.
    pub data_offsets: (u64, u64),
}

/// Parses the safetensors header at the start of a shard file from
/// `prefix`, the file's first bytes (the header at least; the tensors'
/// data is not needed): where the data starts, and each tensor's entry.
pub(crate) fn parse_header(prefix: &[u8]) -> Result<(u64, BTreeMap<String, HeaderEntry>), String> {
    let len_bytes: [u8; 8] =
        prefix.get(..8).and_then(|b| b.try_into().ok()).ok_or("the file is shorter than 8 bytes")?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = header_len.checked_add(8).ok_or("its header length is impossible")?;
    let header = usize::try_from(data_start)
        .ok()
        .and_then(|end| prefix.get(8..end))
        .ok_or_else(|| format!("its header length ({header_len} bytes) runs past the header"))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("its header is not valid JSON: {e}"))?;
    entries.remove("__metadata__");
    let entries = entries
        .into_iter()
        .map(|(name, value)| {
            let entry = serde_json::from_value(value).map_err(|e| format!("its header entry of {name}: {e}"))?;
            Ok((name, entry))
        })
        .collect::<Result<_, String>>()?;
    Ok((data_start, entries))
}

/// Little-endian F32 bytes to values (the length is checked by the caller).
pub(crate) fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[cfg(test)]
pub(crate) mod reference {
    //! The encoder this crate used before streaming: `safetensors::serialize`
    //! on the whole shard. Tests compare the streamed bytes against it.

    use std::borrow::Cow;
    use std::collections::HashMap;

    use safetensors::{Dtype, View};

    use super::TensorRef;

    /// safetensors wants a `View`; this one turns f32 into little-endian bytes.
    struct F32View<'a>(TensorRef<'a>);

    impl View for F32View<'_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }

        fn shape(&self) -> &[usize] {
            self.0.shape
        }

        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }

        fn data_len(&self) -> usize {
            self.0.data.len() * 4
        }
    }

    /// `tensors` as `safetensors::serialize` writes them, with our metadata.
    pub(crate) fn serialize(tensors: &[TensorRef<'_>]) -> Vec<u8> {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(tensors.iter().map(|t| (t.name, F32View(*t))), Some(metadata)).unwrap()
    }
}
