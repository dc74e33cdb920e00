//! The control protocol between workers and the coordinator: every message in one enum, and the one
//! codec that frames them.
//!
//! A frame is an 8-byte header — the magic `SY`, the protocol version (u16,
//! big-endian) and the payload length (u32, big-endian) — followed by the
//! payload, one [`Message`] in bincode 2 (standard configuration). The
//! length is checked against [`MAX_FRAME_BYTES`] before anything is
//! allocated, and the version before the payload is decoded, so a peer of
//! another version gets a clear refusal instead of garbage.

use serde::{Deserialize, Serialize};

/// Version of the messages below; bump on any change to them.
pub const PROTOCOL_VERSION: u16 = 6;
/// Largest payload accepted (the resolved config and the placement plan fit easily).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Frame header length: magic (2), version (2), payload length (4).
pub const HEADER_BYTES: usize = 8;
const MAGIC: [u8; 2] = *b"SY";

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The job's auth token.
    pub token: String,
    pub host: String,
    pub pid: u32,
    /// The rank this worker must have (MPI and Slurm decide ranks
    /// themselves); `None`: the coordinator assigns the next free one.
    pub rank: Option<u32>,
    /// Device facts, e.g. "cpu x86_64 2 threads".
    pub device: String,
    /// Where this worker writes its checkpoint shards: it must be where the
    /// coordinator commits them.
    pub checkpoint_url: String,
}

/// The coordinator's answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub rank: u32,
    pub world: u32,
    /// The resolved job config (TOML), so every worker runs the same job.
    pub config_toml: String,
    /// The parallel layout the coordinator computed for the job.
    pub dims: Option<layout::ParallelDims>,
    /// The placement plan workers start from.
    pub plan: Option<layout::PlacementPlan>,
    /// Where MoA's attention experts start, when the job partitions them
    /// (`parallel.attn_expert_placement = "partitioned"`).
    pub attn_plan: Option<layout::PlacementPlan>,
    /// Heartbeats are expected at least this often (milliseconds).
    pub heartbeat_ms: u64,
}

/// One rank's numbers for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub rank: u32,
    pub step: u64,
    /// This rank's cross-entropy sum and token count (the aggregate is their ratio).
    pub ce_sum: f64,
    pub tokens: u64,
    pub step_time_s: f64,
    /// Rows (token, expert) its experts computed, all layers: its expert load.
    pub expert_rows: u64,
    pub dropped: u64,
    pub alltoall_bytes: u64,
    pub alltoall_s: f64,
    /// Communication time, and the part of it no computation hid (overlap).
    pub comm_s: f64,
    pub exposed_comm_s: f64,
    /// Rank 0 sends the step's full metrics (one JSON line: the aggregate
    /// over ranks and every rank's detail), which the coordinator appends
    /// to `<run dir>/metrics.jsonl`.
    pub detail: Option<String>,
}

/// Hidden over total communication time, summed over ranks, from each
/// rank's (communication, exposed communication): 1 when every transfer
/// hid behind computation, 0 when none did (or there was none).
pub fn overlap_efficiency(ranks: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let (total, exposed) = ranks.into_iter().fold((0.0, 0.0), |(t, e), (comm, exp)| (t + comm, e + exp.min(comm)));
    if total > 0.0 {
        (total - exposed) / total
    } else {
        0.0
    }
}

/// One rank's part of a checkpoint: its shard is in the store (or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardWritten {
    pub rank: u32,
    pub step: u64,
    /// The shard's `checkpoint::ShardReport` as JSON; `None` when the rank
    /// had nothing to write; `Err` says why the write failed.
    pub outcome: Result<Option<String>, String>,
    /// Rank 0 sends the step's `checkpoint::Manifest` without shards (JSON):
    /// config, plan, cursor, RNG, schedule; the coordinator adds the shards.
    pub manifest: Option<String>,
    /// Bytes written and seconds the upload took, for the commit line.
    pub bytes: u64,
    pub upload_s: f64,
}

/// Every message of the protocol, both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Worker → coordinator, the first frame on a connection.
    Register(Registration),
    /// Coordinator → worker: registered.
    Welcome(Welcome),
    /// Either way: the request is refused; the connection closes after it.
    Refused { reason: String, retryable: bool },
    /// Worker → coordinator, every `heartbeat_ms` from its own thread.
    Heartbeat { rank: u32, step: u64 },
    /// Worker → coordinator after every step.
    Step(StepReport),
    /// Coordinator → worker: stop now (another rank was lost, or the job ends).
    Stop { reason: String },
    /// Worker → coordinator: this rank is done (`ok`: it finished the job).
    Goodbye { rank: u32, ok: bool },
    /// Worker → coordinator, from the rank's upload thread.
    ShardWritten(ShardWritten),
    /// Coordinator → every worker: this step's manifest and `latest` are written.
    Committed { step: u64 },
    /// Coordinator → every worker: save the current step and stop, as on
    /// SIGTERM (the coordinator itself was told to stop).
    SaveAndStop { reason: String },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a switchyard frame (the peer is not a switchyard worker or coordinator)")]
    BadMagic,
    #[error(
        "the peer speaks protocol version {got}, this side version {want}: run the same switchyard release everywhere"
    )]
    Version { got: u16, want: u16 },
    #[error("a frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("a frame could not be decoded: {0}")]
    Decode(String),
}

impl ProtocolError {
    /// Whether trying again (on a new connection) can succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Io(_))
    }
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Decoding trusts no length inside a payload: without a limit, a string
/// or list that claims 2^58 bytes in a 29-byte frame makes bincode try to
/// allocate them, and the allocation failure aborts the coordinator (found
/// by fuzzing, `fuzz/fuzz_targets/frame.rs`). With it, claims beyond a
/// frame's size are a decode error before anything is allocated.
fn bincode_decode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// One message as a frame (header and payload).
pub fn encode(message: &Message) -> Vec<u8> {
    encode_with_version(message, PROTOCOL_VERSION)
}

/// [`encode`] with another version in the header (tests of version checks).
pub fn encode_with_version(message: &Message, version: u16) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(message, bincode_config()).expect("messages always encode");
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Checks a header; returns the payload length.
pub fn decode_header(header: &[u8; HEADER_BYTES]) -> Result<usize, ProtocolError> {
    if header[..2] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let version = u16::from_be_bytes([header[2], header[3]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: version, want: PROTOCOL_VERSION });
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    Ok(len)
}

/// Decodes a payload; every byte must belong to the message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, ProtocolError> {
    let (message, used) = bincode::serde::decode_from_slice(payload, bincode_decode_config())
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(ProtocolError::Decode(format!("{} trailing bytes", payload.len() - used)));
    }
    Ok(message)
}

/// Reads one frame from a blocking stream (the worker side).
pub fn read_blocking(stream: &mut impl std::io::Read) -> Result<Message, ProtocolError> {
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let mut payload = vec![0u8; decode_header(&header)?];
    stream.read_exact(&mut payload)?;
    decode_payload(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_come_before_the_payload() {
        let frame = encode(&Message::Heartbeat { rank: 3, step: 7 });
        let header: [u8; HEADER_BYTES] = frame[..HEADER_BYTES].try_into().unwrap();
        assert_eq!(decode_header(&header).unwrap(), frame.len() - HEADER_BYTES);
        let mut bad = header;
        bad[0] = b'G';
        assert!(matches!(decode_header(&bad), Err(ProtocolError::BadMagic)));
        let old = encode_with_version(&Message::Heartbeat { rank: 3, step: 7 }, 9);
        let old: [u8; HEADER_BYTES] = old[..HEADER_BYTES].try_into().unwrap();
        assert!(matches!(decode_header(&old), Err(ProtocolError::Version { got: 9, want: PROTOCOL_VERSION })));
        let mut huge = header;
        huge[4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_header(&huge), Err(ProtocolError::TooLarge { .. })));
    }

    /// The fuzzer's first find: a registration whose string claims about
    /// 2^58 bytes. It must be a decode error, not an abort on allocation.
    #[test]
    fn a_length_claim_beyond_the_frame_is_an_error_not_an_allocation() {
        let frame: [u8; 37] = [
            0x53, 0x59, 0x00, 0x06, 0x00, 0x00, 0x00, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xfd, 0xff, 0xff, 0xff,
            0x01, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x1d, 0x00, 0x00, 0x00, 0x6c, 0x6c, 0x6c, 0x6c, 0x6c, 0x6c,
            0x6c,
        ];
        let mut frame = frame.to_vec();
        frame[3] = PROTOCOL_VERSION as u8;
        let err = read_blocking(&mut std::io::Cursor::new(&frame)).unwrap_err();
        assert!(matches!(err, ProtocolError::Decode(_)), "{err}");
    }
}
