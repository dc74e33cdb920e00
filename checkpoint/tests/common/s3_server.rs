//! A real S3-compatible server for tests: `s3s-fs` (DESIGN section 10)
//! serving a temporary folder with SigV4 credentials. `.ci/run` installs it;
//! a test that cannot find it fails saying how to install it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials the server accepts.
pub const ACCESS_KEY: &str = "switchyard-test";
pub const SECRET_KEY: &str = "switchyard-test-secret-0123456789";

/// A running s3s-fs; killed when dropped.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub root: PathBuf,
}

/// The s3s-fs binary: $S3S_FS, else on PATH, else in ~/.cargo/bin.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("S3S_FS") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join("s3s-fs")).find(|p| p.is_file()));
    if let Some(path) = on_path.flatten() {
        return path;
    }
    let cargo_bin = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/s3s-fs");
    assert!(
        cargo_bin.is_file(),
        "s3s-fs (the S3-compatible server these tests run against) is not installed: run ./ci.sh, \
         which installs it, or `cargo install s3s-fs@0.14.1 --locked --features binary`, or set S3S_FS"
    );
    cargo_bin
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl S3Server {
    /// Serve `root` (each subfolder is a bucket; `buckets` are created) on a free port.
    pub fn start(root: &Path, buckets: &[&str]) -> Self {
        Self::start_on(root, buckets, free_port())
    }

    /// Serve `root` on `port` (e.g. the port of a server that was stopped).
    pub fn start_on(root: &Path, buckets: &[&str], port: u16) -> Self {
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket)).unwrap();
        }
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let server = Self { child, port, root: root.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The endpoint for AWS_ENDPOINT_URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Point object_store's S3 client at this server with `secret`
    /// (the process environment is what a user would set).
    pub fn use_in_env(&self, secret: &str) {
        set_s3_env(&self.endpoint(), secret);
    }
}

/// The usual AWS variables for an S3-compatible server at `endpoint`.
pub fn set_s3_env(endpoint: &str, secret: &str) {
    // Tests that call this run alone in their binary, so changing the
    // environment races with no other thread.
    std::env::set_var("AWS_ENDPOINT_URL", endpoint);
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
