//! Scratch folders for tests, shared by the worker's and the binary's
//! suites (the launcher's `tests/common` includes this file by path).

use std::path::{Path, PathBuf};

/// A scratch folder removed when the test is done with it; kept when the
/// test panicked, so what it left can be looked at.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Empties (or creates) `dir` and takes charge of it.
    pub fn fresh(dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
