//! Turning a checkpoint URL (or plain path) into an object store and prefix.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use url::Url;

use crate::error::{Error, Result};

/// A resolved checkpoint root: where objects go and how to name it to users.
pub(crate) struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The same store's upload-by-id interface where abandoned uploads keep
    /// their parts (buckets, and memory:// so tests can watch them).
    pub multipart: Option<Arc<dyn MultipartStore>>,
    pub prefix: Path,
    pub display_url: String,
    /// The upload part size for this store (see [`StoreOptions::part_bytes`]).
    pub part_bytes: usize,
}

/// Upload parts to a local folder are at most this size. A local write has
/// no per-request cost and no minimum part size, so small parts only save
/// memory: a shard is streamed to disk holding a few of them, instead of
/// being collected into one buffer the size of the shard.
const LOCAL_PART_BYTES: usize = 4 << 20;

/// How a remote store is talked to: transient failures (connection refused
/// or reset, timeouts, HTTP 5xx, throttling) are retried with exponential
/// backoff before an operation fails.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Retries of one request after its first attempt.
    pub retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Shards up to this size are written with one plain put, larger ones
    /// as multipart uploads of parts this size, holding about three parts
    /// in memory. S3 wants at least 5 MiB per part (all but the last) and
    /// at most 10,000 parts: 32 MiB parts cover shards up to ~312 GiB.
    /// Measured with `bench checkpoint` on an S3 server: a 20 MiB shard as
    /// 8 MiB parts reached 0.64x the speed of one plain put, in one put 0.91x.
    /// Local folders use at most 4 MiB parts: there, parts cost nothing.
    pub part_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { retries: 10, retry_timeout: Duration::from_secs(60), part_bytes: 32 << 20 }
    }
}

impl StoreOptions {
    fn retry_config(&self) -> RetryConfig {
        // object_store draws each wait at random between the first wait and
        // twice the last one, so waits grow by about half the first wait per
        // retry: from 1 s, ten retries wait about half a minute in all (a
        // store restarting, a short network outage), never past
        // `retry_timeout`. From 200 ms, five retries had given up within
        // 1.2-2.2 s of an S3 server's restart (scripts/chaos.sh, s3-restart).
        let backoff =
            BackoffConfig { init_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(10), base: 2.0 };
        RetryConfig { backoff, max_retries: self.retries, retry_timeout: self.retry_timeout }
    }
}

/// Whether opening a local root may create its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Create {
    /// Create it: a run about to save wants its root to exist.
    IfMissing,
    /// Refuse a missing folder: a reader (inspection, export) given a
    /// mistyped path should hear so, not find an empty root it just made.
    Never,
}

/// Resolve `input` (a URL with a scheme, or a local path) to a [`Location`].
pub(crate) fn resolve(input: &str, create: Create, options: &StoreOptions) -> Result<Location> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Error::InvalidUrl { url: String::new(), reason: "it is empty".into() });
    }
    let Some(scheme) = url_scheme(input) else {
        return local_folder(FsPath::new(input), create, options);
    };
    let shown = redact(input);
    match scheme.as_str() {
        "file" => {
            let url = Url::parse(input).map_err(|e| Error::InvalidUrl { url: shown.clone(), reason: e.to_string() })?;
            let path = url.to_file_path().map_err(|()| Error::InvalidUrl {
                url: shown,
                reason: "a file URL needs an absolute local path and no host".into(),
            })?;
            local_folder(&path, create, options)
        }
        "memory" => {
            // Everything after "memory://" is a key prefix inside the fresh store.
            let prefix = input["memory://".len().min(input.len())..].trim_matches('/');
            let store = Arc::new(InMemory::new());
            Ok(Location {
                store: store.clone(),
                multipart: Some(store),
                prefix: Path::from(prefix),
                display_url: shown,
                part_bytes: options.part_bytes,
            })
        }
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => cloud(input, &scheme, shown, options),
        _ => Err(Error::UnsupportedScheme { url: shown, scheme }),
    }
}

/// A bucket (or container) on S3, Google Cloud Storage or Azure. Credentials,
/// region and endpoint come from the provider's usual environment variables
/// (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, GOOGLE_SERVICE_ACCOUNT,
/// AZURE_STORAGE_ACCOUNT_NAME, ...), never from the URL shown in logs.
fn cloud(input: &str, scheme: &str, shown: String, options: &StoreOptions) -> Result<Location> {
    let url = Url::parse(input).map_err(|e| Error::InvalidUrl { url: shown.clone(), reason: e.to_string() })?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::InvalidUrl {
            url: shown,
            reason: "it names no bucket (expected s3://bucket/prefix)".into(),
        });
    }
    if matches!(scheme, "s3" | "s3a") {
        check_s3_credentials(&shown, |name| std::env::var(name).ok())?;
    }
    let retry = options.retry_config();
    // Each client serves as both interfaces: objects, and uploads by id.
    fn both<S: ObjectStore + MultipartStore>(store: S) -> (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) {
        let store = Arc::new(store);
        (store.clone(), store)
    }
    let built = match scheme {
        "s3" | "s3a" => {
            // S3-compatible servers (MinIO, s3s, Ceph) want path-style requests,
            // which is the builder's default unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST says otherwise.
            AmazonS3Builder::from_env().with_url(input).with_retry(retry).build().map(both)
        }
        "gs" => GoogleCloudStorageBuilder::from_env().with_url(input).with_retry(retry).build().map(both),
        _ => MicrosoftAzureBuilder::from_env().with_url(input).with_retry(retry).build().map(both),
    };
    let (store, multipart) =
        built.map_err(|source| Error::Storage { op: "open", url: shown.clone(), cause: source })?;
    let prefix = Path::from_url_path(url.path()).map_err(|e| Error::InvalidUrl {
        url: shown.clone(),
        reason: format!("its path is not a valid object prefix: {e}"),
    })?;
    Ok(Location {
        store,
        multipart: Some(multipart),
        prefix,
        display_url: shown.trim_end_matches('/').to_string(),
        part_bytes: options.part_bytes,
    })
}

/// Refuses, before any request, an S3 store whose client would next ask
/// the cloud's instance-metadata address (169.254.169.254) for credentials
/// where that cannot be meant:
/// - an S3-compatible server named by AWS_ENDPOINT_URL (not AWS itself)
///   with no credentials in the environment: off a cloud machine the lookup
///   only times out, and it sends traffic where none should go;
/// - no credentials with AWS_EC2_METADATA_DISABLED=true, the AWS tools'
///   standard opt-out of that lookup (the object_store client ignores it).
///
/// On AWS otherwise (no endpoint), instance and container credentials stay available.
fn check_s3_credentials(shown: &str, var: impl Fn(&str) -> Option<String>) -> Result<()> {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let endpoint = var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT")).filter(|v| !v.trim().is_empty());
    let is_true = |name: &str| var(name).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let has_credentials = set("AWS_ACCESS_KEY_ID")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    if has_credentials || is_true("AWS_SKIP_SIGNATURE") {
        return Ok(());
    }
    let what = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SKIP_SIGNATURE=true for a public bucket)";
    let reason = match endpoint {
        Some(endpoint) => format!("no AWS credentials are set for the S3-compatible server at {endpoint}: {what}"),
        None if is_true("AWS_EC2_METADATA_DISABLED") => format!(
            "no AWS credentials are set, and AWS_EC2_METADATA_DISABLED=true rules out the instance's own: {what}"
        ),
        None => return Ok(()),
    };
    Err(Error::InvalidUrl { url: shown.to_string(), reason })
}

/// The scheme of `input` when it looks like `scheme://...`, lower-cased; a
/// plain path (even one containing ':') has none.
fn url_scheme(input: &str) -> Option<String> {
    let (scheme, _) = input.split_once("://")?;
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then(|| scheme.to_ascii_lowercase())
}

/// A local folder, created if `create` allows; named to users as file:// of
/// its canonical absolute path so logs and manifests show one stable form.
fn local_folder(path: &FsPath, create: Create, options: &StoreOptions) -> Result<Location> {
    let create_err = |source| Error::CreateDir { path: path.to_path_buf(), source };
    match create {
        Create::IfMissing => std::fs::create_dir_all(path).map_err(create_err)?,
        Create::Never if !path.is_dir() => {
            let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            let url = Url::from_file_path(&shown)
                .map(|u| u.to_string())
                .unwrap_or_else(|()| format!("file://{}", shown.display()));
            return Err(Error::RootNotFound { url });
        }
        Create::Never => {}
    }
    let abs: PathBuf = std::fs::canonicalize(path).map_err(create_err)?;
    let display_url =
        Url::from_file_path(&abs).map(|u| u.to_string()).unwrap_or_else(|()| format!("file://{}", abs.display()));
    let store = LocalFileSystem::new_with_prefix(&abs)
        .map_err(|e| Error::Storage { op: "open", url: display_url.clone(), cause: e })?
        // Deleting a step should remove its folder too, not leave empty dirs.
        .with_automatic_cleanup(true)
        // A committed manifest must survive a power loss together with its
        // shards; checkpoints are rare enough that fsync costs little.
        .with_fsync(true);
    Ok(Location {
        store: Arc::new(store),
        multipart: None,
        prefix: Path::default(),
        display_url,
        part_bytes: options.part_bytes.min(LOCAL_PART_BYTES),
    })
}

/// A URL fit for messages: user, password, query and fragment removed, since
/// those are where credentials and signed tokens hide.
pub(crate) fn redact(input: &str) -> String {
    match Url::parse(input) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        // Unparseable: keep only the scheme and host-ish part before any '@'/'?'.
        Err(_) => match input.split_once('@') {
            Some((head, tail)) => {
                let scheme = head.split_once("://").map_or("", |(s, _)| s);
                let tail = tail.split(['?', '#']).next().unwrap_or("");
                format!("{scheme}://{tail}")
            }
            None => input.split(['?', '#']).next().unwrap_or("").to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_paths() {
        assert_eq!(url_scheme("s3://b/p").as_deref(), Some("s3"));
        assert_eq!(url_scheme("FILE:///x").as_deref(), Some("file"));
        assert_eq!(url_scheme("/abs/path"), None);
        assert_eq!(url_scheme("rel/a:b"), None);
        assert_eq!(url_scheme("./x://y"), None);
    }

    #[test]
    fn an_s3_compatible_server_without_credentials_is_refused_before_any_request() {
        let check = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            check_s3_credentials("s3://b/p", |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let err = check(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")]).unwrap_err().to_string();
        assert!(
            err.contains("s3://b/p") && err.contains("AWS_ACCESS_KEY_ID") && err.contains("127.0.0.1:9000"),
            "{err}"
        );
        assert!(check(&[("AWS_ENDPOINT_URL", "http://x"), ("AWS_ACCESS_KEY_ID", "k")]).is_ok());
        assert!(check(&[("AWS_ENDPOINT_URL", "http://x"), ("AWS_SKIP_SIGNATURE", "true")]).is_ok(), "public bucket");
        assert!(check(&[]).is_ok(), "on AWS itself, instance credentials may serve");
        let err = check(&[("AWS_EC2_METADATA_DISABLED", "true")]).unwrap_err().to_string();
        assert!(err.contains("AWS_EC2_METADATA_DISABLED") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        assert!(check(&[("AWS_EC2_METADATA_DISABLED", "false")]).is_ok());
        assert!(check(&[("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_ACCESS_KEY_ID", "k")]).is_ok());
    }

    #[test]
    fn redact_removes_credentials() {
        let shown = redact("s3://AKIA:secret@bucket/prefix?token=abc");
        assert!(!shown.contains("secret") && !shown.contains("AKIA") && !shown.contains("abc"));
        assert!(shown.contains("bucket/prefix"));
    }
}
