//! manifest.json: the commit record of one step and the index of its tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::layout;

/// Manifest format this build writes and reads; bump on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// The only dtype written so far (safetensors spelling).
pub const DTYPE_F32: &str = "F32";

/// Prefix of optimizer-state tensor names: `optim.<tensor name>.exp_avg` / `.exp_avg_sq`.
pub const OPTIM_PREFIX: &str = "optim.";

/// Whether `name` is optimizer state rather than a model tensor (DESIGN section 6).
pub fn is_optimizer_state(name: &str) -> bool {
    name.starts_with(OPTIM_PREFIX)
}

/// One tensor of a checkpoint and where its bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Global tensor name, e.g. `layers.0.attn.wq.weight` or `optim.<name>.exp_avg`.
    pub name: String,
    /// safetensors dtype, e.g. `F32`.
    pub dtype: String,
    /// Shape of the tensor as stored.
    pub shape: Vec<usize>,
    /// Shard file relative to the step folder, e.g. `shards/rank-00000.safetensors`.
    pub shard: String,
    /// Byte offset of the tensor's data from the start of the shard file.
    pub offset: u64,
    /// Length of the tensor's data in bytes.
    pub length: u64,
    /// CRC-32 (IEEE) of the tensor's data bytes.
    pub crc32: u32,
}

/// What a rank reports after writing one shard; the coordinator folds the
/// reports of all ranks into the manifest with [`Manifest::add_shard`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReport {
    /// Shard file relative to the step folder.
    pub file: String,
    /// Size of the whole shard file in bytes, checked again at commit.
    pub size_bytes: u64,
    /// The tensors in the shard.
    pub tensors: Vec<TensorEntry>,
}

/// A shard file of a committed step and its expected size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Shard file relative to the step folder.
    pub file: String,
    /// Size of the shard file in bytes.
    pub size_bytes: u64,
}

/// Everything needed to resume a run at one step (DESIGN section 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// Optimizer step the checkpoint was taken after.
    pub step: u64,
    /// Training tokens consumed up to this step.
    pub tokens_seen: u64,
    /// The resolved job config (owned by the launcher).
    pub config: Value,
    /// The placement plan the tensors were written under (owned by the coordinator).
    pub plan: Value,
    /// Parallel dims at save time (ranks, EP degree, attention shards).
    pub parallel: Value,
    /// Every shard file with its size, so commit and load can check completeness.
    pub shards: Vec<ShardEntry>,
    /// Every tensor of the checkpoint.
    pub tensors: Vec<TensorEntry>,
    /// Data loader cursor per data shard.
    pub data_cursor: Value,
    /// RNG state.
    pub rng: Value,
    /// Loss-scale / LR-schedule state.
    pub schedule: Value,
    /// Version of the code that wrote the checkpoint (caller's `CARGO_PKG_VERSION`).
    pub code_version: String,
    /// Wall-clock time the manifest was created, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// CRC-32 of this manifest's pretty JSON without this field, written
    /// at commit and checked by every reader, so an edited or damaged
    /// manifest (its config included) is refused. Absent in manifests
    /// written before it existed, which are read unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

impl Manifest {
    /// An empty manifest for `step`, stamped with the current time; fill the
    /// `Value` fields and add shards before committing.
    pub fn new(step: u64, tokens_seen: u64, code_version: impl Into<String>) -> Self {
        let created_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            format_version: FORMAT_VERSION,
            step,
            tokens_seen,
            config: Value::Null,
            plan: Value::Null,
            parallel: Value::Null,
            shards: Vec::new(),
            tensors: Vec::new(),
            data_cursor: Value::Null,
            rng: Value::Null,
            schedule: Value::Null,
            code_version: code_version.into(),
            created_unix_s,
            crc32: None,
        }
    }

    /// Record a written shard and its tensors.
    pub fn add_shard(&mut self, report: ShardReport) {
        self.shards.push(ShardEntry { file: report.file, size_bytes: report.size_bytes });
        self.tensors.extend(report.tensors);
    }

    /// The entry of the tensor called `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Parse manifest.json, checking the format version before anything else
    /// so an old or future file gets a version error, not a field error.
    pub fn from_json(bytes: &[u8], url: &str) -> Result<Self> {
        let json_err = |source| Error::ManifestJson { url: url.to_string(), source };
        let value: Value = serde_json::from_slice(bytes).map_err(json_err)?;
        let version = value.get("format_version");
        if version.and_then(Value::as_u64) != Some(u64::from(FORMAT_VERSION)) {
            return Err(Error::FormatVersion {
                url: url.to_string(),
                found: version.map_or_else(|| "(missing)".to_string(), Value::to_string),
                expected: FORMAT_VERSION,
            });
        }
        let manifest: Self = serde_json::from_value(value).map_err(json_err)?;
        if let Some(written) = manifest.crc32 {
            let now = manifest.contents_crc32();
            if now != written {
                return Err(Error::InvalidManifest {
                    url: url.to_string(),
                    reason: format!(
                        "its contents no longer match its CRC-32 (written {written:08x}, now {now:08x}): it was \
                         edited or damaged after the commit. Restore it, or resume from another step"
                    ),
                });
            }
        }
        Ok(manifest)
    }

    /// CRC-32 of the pretty JSON of everything but the `crc32` field.
    fn contents_crc32(&self) -> u32 {
        let contents = Self { crc32: None, ..self.clone() };
        crc32fast::hash(&serde_json::to_vec_pretty(&contents).expect("a Manifest always serializes to JSON"))
    }

    /// Pretty JSON, since people read manifests when debugging runs, with
    /// the CRC-32 of its contents.
    pub fn to_json(&self) -> Vec<u8> {
        let sealed = Self { crc32: Some(self.contents_crc32()), ..self.clone() };
        let mut bytes = serde_json::to_vec_pretty(&sealed).expect("a Manifest always serializes to JSON");
        bytes.push(b'\n');
        bytes
    }

    /// Internal consistency: one entry per tensor name and per shard, every
    /// tensor inside a listed shard, sizes that add up.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!("format_version is {}, this build writes {FORMAT_VERSION}", self.format_version));
        }
        let mut shard_sizes = BTreeMap::new();
        for shard in &self.shards {
            if !layout::is_shard_file(&shard.file) {
                return Err(format!("shard file '{}' is not under shards/", shard.file));
            }
            if shard_sizes.insert(shard.file.as_str(), shard.size_bytes).is_some() {
                return Err(format!("shard '{}' is listed twice", shard.file));
            }
        }
        let mut names = BTreeSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor '{}' is listed twice", t.name));
            }
            let Some(&size) = shard_sizes.get(t.shard.as_str()) else {
                return Err(format!("tensor '{}' is in shard '{}', which is not in the shard list", t.name, t.shard));
            };
            if t.offset.checked_add(t.length).is_none_or(|end| end > size) {
                return Err(format!("tensor '{}' ends past the end of shard '{}' ({size} bytes)", t.name, t.shard));
            }
            if expected_length(t) != Some(t.length) {
                return Err(format!(
                    "tensor '{}' has {} bytes, which does not fit dtype {} and shape {:?}",
                    t.name, t.length, t.dtype, t.shape
                ));
            }
        }
        Ok(())
    }
}

/// Byte length implied by dtype and shape; `None` for dtypes this build
/// cannot read or a shape whose size overflows.
pub(crate) fn expected_length(t: &TensorEntry) -> Option<u64> {
    let elem_bytes: u64 = match t.dtype.as_str() {
        DTYPE_F32 => 4,
        _ => return None,
    };
    t.shape.iter().try_fold(elem_bytes, |acc, &d| acc.checked_mul(d as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_sealed_with_its_crc_and_an_edit_breaks_the_seal() {
        let mut m = Manifest::new(7, 100, "test");
        m.config = serde_json::json!({"model": {"top_k": 2, "lr": 3e-3}});
        let json = m.to_json();
        let read = Manifest::from_json(&json, "memory://m").unwrap();
        assert!(read.crc32.is_some());
        assert_eq!(Manifest { crc32: None, ..read }, m);

        let edited = String::from_utf8(json.clone()).unwrap().replace("\"top_k\": 2", "\"top_k\": 3");
        let err = Manifest::from_json(edited.as_bytes(), "memory://m").unwrap_err().to_string();
        assert!(err.contains("memory://m") && err.contains("CRC-32"), "{err}");

        // Written before the seal existed: read as it is.
        let mut old: Value = serde_json::from_slice(&json).unwrap();
        old.as_object_mut().unwrap().remove("crc32");
        let unsealed = Manifest::from_json(&serde_json::to_vec(&old).unwrap(), "memory://m").unwrap();
        assert_eq!(unsealed, m);
    }

    /// Found by fuzzing: a float the default JSON parser did not read back made
    /// a manifest fail its own seal once written and read again. Every
    /// number must read back as the number written.
    #[test]
    fn a_written_manifest_reads_back_sealed_whatever_its_floats() {
        let mut m = Manifest::new(7, 100, "test");
        m.config = serde_json::json!({"optim": {"eps": 9.99999993922539e-9, "lr": 0.003000000026077032}});
        let mut read = Manifest::from_json(&m.to_json(), "memory://m").unwrap();
        for value in [9.99999993922539e-9_f64, 1e-300, 5e-324, 1.7976931348623157e308, 0.1 + 0.2] {
            read.config["optim"]["eps"] = serde_json::json!(value);
            let again = Manifest::from_json(&read.to_json(), "memory://m").unwrap();
            assert_eq!(again.config["optim"]["eps"].as_f64().unwrap().to_bits(), value.to_bits(), "{value:e}");
        }
    }
}
