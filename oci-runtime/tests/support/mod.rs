//! A throwaway OCI registry for integration tests: Debian's `docker-registry` (CNCF
//! distribution) on a free loopback port, storing into a temporary directory.
//!
//! Self-contained (std + tempfile only) so other test crates can include it with
//! `#[path = "../../oci-runtime/tests/support/mod.rs"] mod support;`.
//!
//! If the binary is missing, [`TestRegistry::start`] returns `None` after printing why the test
//! is skipped, unless the `CI` environment variable is set: then it panics, because CI must run
//! these tests. Set `DOCKER_REGISTRY_BIN` to use a binary outside `PATH`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the registry gets to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a fresh port, in case another process grabbed the one we picked.
const START_ATTEMPTS: usize = 3;

/// A running registry; killed when dropped.
pub struct TestRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: Child,
    tempdir: tempfile::TempDir,
}

/// Why one attempt to start the registry failed.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot {what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("exited with {status}; log:\n{log}")]
    Exited { status: std::process::ExitStatus, log: String },
    #[error("no answer to GET /v2/ on {addr} within {READY_TIMEOUT:?}; log:\n{log}")]
    NoAnswer { addr: String, log: String },
}

impl TestRegistry {
    /// Starts a registry, or returns `None` (after saying why) if `docker-registry` is not
    /// installed and `CI` is unset.
    pub fn start() -> Option<TestRegistry> {
        Self::start_inner(None)
    }

    /// Starts a registry that requires HTTP basic authentication against `htpasswd` (the
    /// content of an Apache htpasswd file with bcrypt hashes, as distribution requires), or
    /// returns `None` as [`TestRegistry::start`] does.
    pub fn start_with_htpasswd(htpasswd: &str) -> Option<TestRegistry> {
        Self::start_inner(Some(htpasswd))
    }

    fn start_inner(htpasswd: Option<&str>) -> Option<TestRegistry> {
        let Some(bin) = find_binary() else {
            let why = "docker-registry not found (install Debian's docker-registry package or set \
                       DOCKER_REGISTRY_BIN)";
            if std::env::var_os("CI").is_some() {
                panic!("{why}; CI is set, so registry tests must not be skipped");
            }
            eprintln!("skipping registry test: {why}");
            return None;
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&bin, htpasswd) {
                Ok(registry) => return Some(registry),
                Err(e) => last_error = Some(e),
            }
        }
        let why = last_error.map(|e| e.to_string()).unwrap_or_default();
        panic!("docker-registry ({}) did not start: {why}", bin.display());
    }

    fn try_start(bin: &Path, htpasswd: Option<&str>) -> Result<TestRegistry, StartError> {
        let io = |what: &'static str| move |source| StartError::Io { what, source };
        let tempdir =
            tempfile::Builder::new().prefix("flotilla-test-registry-").tempdir().map_err(io("create a temp dir"))?;
        let port = free_port().map_err(io("find a free port"))?;
        let addr = format!("127.0.0.1:{port}");
        let storage = tempdir.path().join("storage");
        std::fs::create_dir_all(&storage).map_err(io("create storage"))?;
        let config_path = tempdir.path().join("config.yml");
        let auth = match htpasswd {
            Some(content) => {
                let path = tempdir.path().join("htpasswd");
                std::fs::write(&path, content).map_err(io("write htpasswd"))?;
                format!("auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n", path.display())
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{auth}",
            storage.display()
        );
        std::fs::write(&config_path, config).map_err(io("write config"))?;
        let log_path = tempdir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).map_err(io("create log"))?;
        let log_err = log.try_clone().map_err(io("clone log handle"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io("spawn docker-registry"))?;
        let mut registry = TestRegistry { addr, child, tempdir };

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(StartError::Exited { status, log: std::fs::read_to_string(&log_path).unwrap_or_default() });
            }
            if probe(&registry.addr) {
                return Ok(registry);
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                registry.kill();
                return Err(StartError::NoAnswer { addr: registry.addr.clone(), log });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ADDR/name` — a reference into this registry.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }

    /// The registry's storage root (its `rootdirectory`).
    pub fn storage_root(&self) -> PathBuf {
        self.tempdir.path().join("storage")
    }

    /// Where the registry keeps the content of blob `digest` (`sha256:<hex>`).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_root()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// Stops the registry now (it also stops on drop).
    pub fn stop(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("DOCKER_REGISTRY_BIN") {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let from_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("docker-registry")).find(|p| p.is_file()));
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/bin/docker-registry");
        p.is_file().then_some(p)
    })
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Whether `GET /v2/` answers: 200, or 401 from a registry that requires a login.
fn probe(addr: &str) -> bool {
    let Ok(sock) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&sock, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut response);
    let status_line = String::from_utf8_lossy(&response);
    let status_line = status_line.lines().next().unwrap_or_default();
    status_line.starts_with("HTTP/1.") && matches!(status_line.split_whitespace().nth(1), Some("200" | "401"))
}
