//! TensorBoard event files beside `metrics.jsonl`: every step's row as
//! scalars (`train/<key>` for each number in it) and each layer's tokens per
//! expert as a histogram over expert ids (validation as `eval/<key>`), so
//! `tensorboard --logdir runs/`
//! shows a run's curves and expert load with no conversion.
//!
//! The format is TensorFlow's: TFRecord framing (length, masked CRC-32C of
//! the length, an `Event` protocol buffer, masked CRC-32C of it) around the
//! three messages used here (`Event`, `Summary`, `HistogramProto`, from
//! tensorflow/core/util/event.proto and framework/summary.proto). They are
//! written by hand: the Rust crates for this (tensorboard-rs, last released
//! in 2022 and marked inactive by its author) bring a protobuf code
//! generator and megabytes of dependencies for a hundred lines of encoding.
//!
//! Each attempt of a run (a fresh start, or a resume from step `s`) opens a
//! new file whose first events are the file version and a `SessionLog`
//! START at `s + 1`: TensorBoard then drops the points of earlier attempts
//! from that step on, as `metrics.jsonl` drops their rows.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one attempt's events into a new file of a run folder.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<time>.<host>` for an attempt whose
    /// first step is `first_step`.
    pub fn create(dir: &Path, first_step: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        // Seconds first, as TensorFlow names them; the microseconds keep
        // two attempts of one second in order (TensorBoard sorts by name).
        let name = format!(
            "events.out.tfevents.{:010}.{:06}.{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            host.trim(),
            std::process::id()
        );
        let path = dir.join(name);
        let mut writer = Self { file: BufWriter::new(File::create(&path)?), path };
        let wall = now.as_secs_f64();
        let mut version = event_header(wall, 0);
        bytes_field(&mut version, 3, b"brain.Event:2");
        writer.record(&version)?;
        // SessionLog { status: START }: TensorBoard purges later steps of
        // earlier files.
        let mut start = event_header(wall, first_step);
        let mut session_log = Vec::new();
        varint_field(&mut session_log, 1, 1);
        bytes_field(&mut start, 7, &session_log);
        writer.record(&start)?;
        writer.file.flush()?;
        Ok(writer)
    }

    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one `metrics.jsonl` row (a JSON object with its `step`): each
    /// number as the scalar `train/<key>`, the sum of `dropped`, and per
    /// layer of `tokens_per_expert` a histogram over expert ids
    /// (`expert_load/layer_<l>`) and the busiest expert's load over the
    /// mean (`expert_balance/layer_<l>`). Rows without a step are skipped.
    pub fn write_row(&mut self, row: &str) -> std::io::Result<()> {
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(row) else {
            return Ok(());
        };
        let Some(step) = fields.get("step").and_then(|s| s.as_u64()) else { return Ok(()) };
        let mut summary = Vec::new();
        for (key, value) in &fields {
            if let Some(x) = value.as_f64().filter(|_| key != "step") {
                // Validation (`eval_loss`) gets its own section: `eval/loss`.
                let tag = match key.strip_prefix("eval_") {
                    Some(rest) => format!("eval/{rest}"),
                    None => format!("train/{key}"),
                };
                scalar_value(&mut summary, &tag, x as f32);
            }
        }
        let numbers = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
        };
        if let Some(dropped) = fields.get("dropped") {
            scalar_value(&mut summary, "train/dropped", numbers(dropped).iter().sum::<f64>() as f32);
        }
        let layers = fields.get("tokens_per_expert").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        for (l, layer) in layers.iter().enumerate() {
            let counts = numbers(layer);
            let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
            if mean > 0.0 {
                let busiest = counts.iter().copied().fold(0.0, f64::max);
                scalar_value(&mut summary, &format!("expert_balance/layer_{l}"), (busiest / mean) as f32);
            }
            histogram_value(&mut summary, &format!("expert_load/layer_{l}"), &counts);
        }
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut event = event_header(wall, step);
        bytes_field(&mut event, 5, &summary);
        self.record(&event)?;
        self.file.flush()
    }

    /// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }
}

/// `Event { wall_time: 1, step: 2 }`.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    varint_field(&mut event, 2, step);
    event
}

/// `Summary.value += Value { tag: 1, simple_value: 2 }`.
fn scalar_value(summary: &mut Vec<u8>, tag: &str, value: f32) {
    let mut v = Vec::new();
    bytes_field(&mut v, 1, tag.as_bytes());
    key(&mut v, 2, 5);
    v.extend_from_slice(&value.to_le_bytes());
    bytes_field(summary, 1, &v);
}

/// `Summary.value += Value { tag: 1, histo: 5 }`: `counts[e]` observations
/// of the value `e`, one bucket per id (upper limit `e + 0.5`).
fn histogram_value(summary: &mut Vec<u8>, tag: &str, counts: &[f64]) {
    let used: Vec<usize> = (0..counts.len()).filter(|&e| counts[e] > 0.0).collect();
    let (min, max) = (used.first().copied().unwrap_or(0) as f64, used.last().copied().unwrap_or(0) as f64);
    let num: f64 = counts.iter().sum();
    let sum: f64 = counts.iter().enumerate().map(|(e, c)| e as f64 * c).sum();
    let squares: f64 = counts.iter().enumerate().map(|(e, c)| (e * e) as f64 * c).sum();
    let mut h = Vec::new();
    for (field, value) in [(1, min), (2, max), (3, num), (4, sum), (5, squares)] {
        double_field(&mut h, field, value);
    }
    let limits: Vec<f64> = (0..counts.len()).map(|e| e as f64 + 0.5).collect();
    for (field, values) in [(6, &limits), (7, &counts.to_vec())] {
        let packed: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes_field(&mut h, field, &packed);
    }
    let mut v = Vec::new();
    bytes_field(&mut v, 1, tag.as_bytes());
    bytes_field(&mut v, 5, &h);
    bytes_field(summary, 1, &v);
}

/// A field's key: `field << 3 | wire type`.
fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, 0);
    varint(out, value);
}

fn double_field(out: &mut Vec<u8>, field: u32, value: f64) {
    key(out, field, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A length-delimited field: strings, bytes, nested messages, packed repeats.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 and offset (so that a
/// CRC of data holding CRCs is not trivially related to them).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the
/// event records are small and few (one per step).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) appendix B.4 and the usual "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints_use_seven_bits_per_byte() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xAC, 0x02]);
        out.clear();
        varint_field(&mut out, 2, 1);
        assert_eq!(out, [0x10, 0x01]);
    }
}
