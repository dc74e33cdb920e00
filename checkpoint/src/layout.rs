//! Object names inside a checkpoint root, and parsing of step URLs.

use crate::error::{Error, Result};

/// Text object naming the newest committed step.
pub(crate) const LATEST: &str = "latest";
/// Name of the commit marker inside a step folder.
pub(crate) const MANIFEST: &str = "manifest.json";
/// Folder inside a step folder that holds the shards.
pub(crate) const SHARDS_DIR: &str = "shards";
const STEP_PREFIX: &str = "step-";
const SHARD_SUFFIX: &str = ".safetensors";

/// Folder name of a step: `step-00001200` (zero-padded so names sort like numbers).
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// Step number of a folder name like `step-00001200`; `None` for anything else.
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Path of `rel` inside the folder of `step`, relative to the root.
pub(crate) fn in_step(step: u64, rel: &str) -> String {
    format!("{}/{rel}", step_dir_name(step))
}

/// Shard file path relative to its step folder, as recorded in the manifest.
pub(crate) fn shard_file(shard: &str) -> String {
    format!("{SHARDS_DIR}/{shard}{SHARD_SUFFIX}")
}

/// Whether `file` (from a manifest) is a shard path this crate would write;
/// guards against a manifest pointing outside its step folder.
pub(crate) fn is_shard_file(file: &str) -> bool {
    file.strip_prefix(SHARDS_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_suffix(SHARD_SUFFIX))
        .is_some_and(|name| check_shard_name(name).is_ok())
}

/// Shard names become object names, so they must not contain separators or
/// start with '.', which could escape the step folder or hide the file.
pub(crate) fn check_shard_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.starts_with('.') {
        return Err("it starts with '.'".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("it contains '{c}'"));
    }
    Ok(())
}

/// Split a step folder URL or path into its checkpoint root and step number.
///
/// Accepts `file:///x/ckpt/step-00000020`, `/x/ckpt/step-00000020`,
/// `ckpt/step-00000020/`, and the same with `/manifest.json` appended. The
/// root keeps the caller's form (URL or path) so it can go to
/// [`CheckpointStore::open`](crate::CheckpointStore::open) unchanged.
pub fn parse_step_url(url: &str) -> Result<(String, u64)> {
    let invalid = |reason: String| Error::InvalidStepUrl { url: url.to_string(), reason };
    let mut rest = url.trim().trim_end_matches('/');
    if let Some(dir) = rest.strip_suffix(MANIFEST) {
        rest = dir.trim_end_matches('/');
    }
    if rest.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    let (root, last) = match rest.rsplit_once('/') {
        Some((root, last)) => (root, last),
        None => ("", rest),
    };
    let step = parse_step_dir(last).ok_or_else(|| invalid(format!("its last part '{last}' is not a step folder")))?;
    let root = if root.is_empty() {
        // "step-00000020" alone, or "/step-00000020": the root is the folder around it.
        if rest.starts_with('/') { "/" } else { "." }.to_string()
    } else if root.ends_with(":/") {
        // "memory://step-1" splits as "memory:/"; "file:///step-1" as "file://".
        format!("{root}/")
    } else if root.ends_with("://") && root.starts_with("file") {
        format!("{root}/")
    } else {
        root.to_string()
    };
    Ok((root, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip() {
        assert_eq!(step_dir_name(1200), "step-00001200");
        assert_eq!(step_dir_name(123_456_789), "step-123456789");
        assert_eq!(parse_step_dir("step-00001200"), Some(1200));
        assert_eq!(parse_step_dir("step-"), None);
        assert_eq!(parse_step_dir("step-12a"), None);
        assert_eq!(parse_step_dir("latest"), None);
    }

    #[test]
    fn shard_names_are_checked() {
        assert!(check_shard_name("rank-00003").is_ok());
        assert!(check_shard_name("").is_err());
        assert!(check_shard_name("../x").is_err());
        assert!(check_shard_name(".hidden").is_err());
        assert!(is_shard_file("shards/rank-0.safetensors"));
        assert!(!is_shard_file("shards/../x.safetensors"));
        assert!(!is_shard_file("other/rank-0.safetensors"));
    }
}
