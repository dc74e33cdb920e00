//! Turning a checkpoint URL (or plain path) into an object store and prefix.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::error::{Error, Result};

/// A resolved checkpoint root: where objects go and how to name it to users.
pub(crate) struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub display_url: String,
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
pub(crate) fn resolve(input: &str, create: Create) -> Result<Location> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Error::InvalidUrl { url: String::new(), reason: "it is empty".into() });
    }
    let Some(scheme) = url_scheme(input) else {
        return local_folder(FsPath::new(input), create);
    };
    let shown = redact(input);
    match scheme.as_str() {
        "file" => {
            let url = Url::parse(input).map_err(|e| Error::InvalidUrl { url: shown.clone(), reason: e.to_string() })?;
            let path = url.to_file_path().map_err(|()| Error::InvalidUrl {
                url: shown,
                reason: "a file URL needs an absolute local path and no host".into(),
            })?;
            local_folder(&path, create)
        }
        "memory" => {
            // Everything after "memory://" is a key prefix inside the fresh store.
            let prefix = input["memory://".len().min(input.len())..].trim_matches('/');
            Ok(Location { store: Arc::new(InMemory::new()), prefix: Path::from(prefix), display_url: shown })
        }
        _ => Err(Error::UnsupportedScheme { url: shown, scheme }),
    }
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
fn local_folder(path: &FsPath, create: Create) -> Result<Location> {
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
        .map_err(|e| Error::Storage { op: "open", url: display_url.clone(), source: e })?
        // Deleting a step should remove its folder too, not leave empty dirs.
        .with_automatic_cleanup(true)
        // A committed manifest must survive a power loss together with its
        // shards; checkpoints are rare enough that fsync costs little.
        .with_fsync(true);
    Ok(Location { store: Arc::new(store), prefix: Path::default(), display_url })
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
    fn redact_removes_credentials() {
        let shown = redact("s3://AKIA:secret@bucket/prefix?token=abc");
        assert!(!shown.contains("secret") && !shown.contains("AKIA") && !shown.contains("abc"));
        assert!(shown.contains("bucket/prefix"));
    }
}
