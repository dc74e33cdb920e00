//! Encoding tensors into a safetensors shard and decoding them back.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

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

/// safetensors wants a `View`; this one turns f32 into little-endian bytes,
/// the byte order the format prescribes whatever the host's.
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

/// Encode `tensors` as one safetensors file and report where each one's
/// bytes are, with its checksum.
pub(crate) fn encode(tensors: &[TensorRef<'_>]) -> Result<(Vec<u8>, Vec<Placed>), SafeTensorError> {
    // "format": "pt" is what transformers' loaders expect to find.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name, F32View(*t))), Some(metadata))?;
    // The encoder chooses the data order, so read the offsets back from the
    // header instead of predicting them.
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes)?;
    let data_start = 8 + header_len;
    let placed = tensors
        .iter()
        .map(|t| {
            let info = metadata.info(t.name).expect("safetensors wrote every tensor it was given");
            let (begin, end) = info.data_offsets;
            let (begin, end) = (data_start + begin, data_start + end);
            Placed {
                name: t.name.to_string(),
                offset: begin as u64,
                length: (end - begin) as u64,
                crc32: crc32fast::hash(&bytes[begin..end]),
            }
        })
        .collect();
    Ok((bytes, placed))
}

/// Parse the header of a whole shard file: header length and tensor index.
pub(crate) fn read_header(bytes: &[u8]) -> Result<(u64, Metadata), SafeTensorError> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)?;
    Ok((8 + header_len as u64, metadata))
}

/// Little-endian F32 bytes to values (the length is checked by the caller).
pub(crate) fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
