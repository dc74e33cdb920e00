//! The crate's one error type: every message says what, where and what to do.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while saving, committing or loading a checkpoint.
///
/// Field names mean the same in every variant: `url` is the user-facing URL
/// (credentials removed) of the root or object concerned, `step` the
/// training step, `reason` what exactly is wrong, `source` the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL names a storage backend this build cannot talk to.
    #[error(
        "checkpoint URL '{url}': scheme '{scheme}://' is not supported; use file:///absolute/path, \
         a local folder path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or memory:// (tests)"
    )]
    UnsupportedScheme { url: String, scheme: String },

    /// The URL could not be understood at all.
    #[error("checkpoint URL '{url}' is not valid: {reason}; set [checkpoint] url to e.g. file:///data/ckpt")]
    InvalidUrl { url: String, reason: String },

    /// A local checkpoint folder could not be created.
    #[error("could not create checkpoint folder {}: {source}; check that the path is writable", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },

    /// The tokio runtime that drives object_store could not start.
    #[error("could not start the I/O runtime for checkpoint store {url}: {source}")]
    Runtime { url: String, source: std::io::Error },

    /// The blocking API was called from an async task, where it would deadlock.
    #[error(
        "checkpoint store {url}: blocking call made from inside an async runtime; \
         call it from a plain thread or tokio::task::spawn_blocking"
    )]
    InsideAsyncRuntime { url: String },

    /// An object store request failed.
    /// (`cause` is shown in the message and deliberately not the error's
    /// `source()`, so that callers printing the chain do not repeat it.)
    #[error("could not {op} {url}: {cause}; {}", storage_hint(cause))]
    Storage { op: &'static str, url: String, cause: object_store::Error },

    /// The requested step has no manifest, so it was never committed.
    #[error(
        "step {step} in {root} is not committed ({url} does not exist); \
         pick a committed step or resume from the latest one"
    )]
    NotCommitted { step: u64, root: String, url: String },

    /// manifest.json could not be parsed.
    #[error(
        "manifest {url} could not be read: {source}; the checkpoint is corrupt or was not \
         written by switchyard, resume from an earlier step"
    )]
    ManifestJson { url: String, source: serde_json::Error },

    /// manifest.json was written by a format this build does not read.
    #[error(
        "manifest {url} has format_version {found}, but this build reads format_version {expected}; \
         use the switchyard version that wrote it (see code_version in the manifest)"
    )]
    FormatVersion { url: String, found: String, expected: u32 },

    /// A manifest's contents contradict themselves or the step asked for.
    #[error("manifest {url} is invalid: {reason}")]
    InvalidManifest { url: String, reason: String },

    /// A shard name would not make a safe object path.
    #[error(
        "shard name '{name}' is not allowed: {reason}; use letters, digits, '.', '_' or '-' \
         (e.g. rank-00003)"
    )]
    InvalidShardName { name: String, reason: String },

    /// A tensor handed to `write_shard` is inconsistent.
    #[error("cannot write tensor '{tensor}' to shard {url}: {reason}")]
    InvalidTensor { url: String, tensor: String, reason: String },

    /// The safetensors encoder refused the shard.
    #[error("could not encode shard {url} as safetensors: {source}")]
    Encode { url: String, source: safetensors::SafeTensorError },

    /// Commit found a shard named in the manifest missing from storage.
    #[error(
        "cannot commit step {step}: shard {url} does not exist; wait until every rank has \
         reported its shard written, or write it again"
    )]
    ShardMissing { step: u64, url: String },

    /// Commit found a shard whose size differs from what its rank reported.
    #[error(
        "cannot commit step {step}: shard {url} has {found} bytes but its rank reported {expected}; \
         the upload is incomplete or was overwritten, write the shard again"
    )]
    ShardSizeMismatch { step: u64, url: String, expected: u64, found: u64 },

    /// A tensor's bytes do not match the manifest (size, checksum, header).
    #[error(
        "checkpoint is corrupt: tensor '{tensor}' in shard {url}: {reason}; \
         resume from an earlier step"
    )]
    CorruptTensor { url: String, tensor: String, reason: String },

    /// A whole shard file is unreadable or of the wrong size.
    #[error("checkpoint is corrupt: shard {url}: {reason}; resume from an earlier step")]
    CorruptShard { url: String, reason: String },

    /// A root opened read-only (inspection, export) is a local folder that does not exist.
    #[error(
        "checkpoint root {url} does not exist; check the path (a run keeps its checkpoints \
         in <run dir>/checkpoints)"
    )]
    RootNotFound { url: String },

    /// An export selected no tensors, so there is nothing to write.
    #[error("step {step} in {root} has no tensors to export with the filter given; check the step and the filter")]
    NothingToExport { step: u64, root: String },

    /// The exported file could not be written (or moved into place).
    // `reason` rather than an io::Error `source`: printed with its cause
    // chain (as the binary does), a source would say the same thing twice.
    #[error(
        "could not {op} {}: {reason}; check that its folder exists and is writable \
         and that the disk has room",
        path.display()
    )]
    ExportFile { op: &'static str, path: PathBuf, reason: String },

    /// A `--resume-from`/`--checkpoint` argument does not name a step folder.
    #[error(
        "'{url}' is not a checkpoint step: {reason}; expected a step folder such as \
         file:///data/ckpt/step-00000020"
    )]
    InvalidStepUrl { url: String, reason: String },
}

impl Error {
    /// Whether trying the same operation again may succeed (network hiccups, throttling).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Storage { cause, .. } => storage_retryable(cause),
            _ => false,
        }
    }
}

/// Errors about the request itself will not go away on retry: the kinds
/// below, and a store's HTTP 4xx answer (a missing or misnamed bucket,
/// refused credentials) other than 408 and 429, which are a timeout and
/// throttling. The rest (Generic covers HTTP 5xx, timeouts, connection
/// resets) may.
fn storage_retryable(source: &object_store::Error) -> bool {
    use object_store::Error as E;
    let request_error = matches!(
        source,
        E::NotFound { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotImplemented { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    );
    let client_error =
        http_status(&source.to_string()).is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429);
    !(request_error || client_error)
}

/// The HTTP status a store's error text reports ("... status code: 404 Not Found").
fn http_status(text: &str) -> Option<u16> {
    let (_, after) = text.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

/// The S3 error code in an error body (`<Code>NoSuchBucket</Code>`).
fn s3_code(text: &str) -> Option<&str> {
    let (_, after) = text.split_once("<Code>")?;
    after.split_once("</Code>").map(|(code, _)| code)
}

fn storage_hint(source: &object_store::Error) -> &'static str {
    let text = source.to_string();
    // object_store falls back to the EC2 instance metadata service when the
    // environment has no AWS credentials; off EC2 that is what fails.
    if text.contains("169.254.169.254") {
        return "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                (and AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for an S3-compatible server)";
    }
    match s3_code(&text) {
        Some("NoSuchBucket") => {
            return "not retryable: the bucket does not exist: create it, or fix the bucket name in the checkpoint URL";
        }
        Some("InvalidBucketName") => {
            return "not retryable: that is not a valid bucket name (S3: 3-63 lowercase letters, digits, dots and \
                    hyphens): fix the checkpoint URL";
        }
        Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            return "not retryable: the store refused these credentials: check AWS_ACCESS_KEY_ID, \
                    AWS_SECRET_ACCESS_KEY and the bucket's permissions";
        }
        _ => {}
    }
    if storage_retryable(source) {
        "this may be transient (retryable): check that the store is reachable and try again"
    } else {
        "not retryable: check the URL, permissions and credentials of the checkpoint store"
    }
}
