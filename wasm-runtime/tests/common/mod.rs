//! Shared helpers of the integration tests: output capture, the test guest components (built
//! from `tests/guests` for wasm32-wasip2 on first use) and a tiny HTTP/1.1 client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use flotilla_wasm_runtime::{HostConfig, OutputSink, RunOptions, WasmHost};
use http_body_util::{BodyExt as _, Empty};
use hyper::StatusCode;
use wasmtime_wasi_http::io::TokioIo;

#[derive(Default)]
pub struct Capture(Mutex<Vec<u8>>);

impl OutputSink for Capture {
    fn write(&self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A host whose compile cache is shared by all tests of this test binary. Compiling a guest
/// component with an unoptimized (test-profile) wasmtime takes seconds, so tests that do not
/// check cache behaviour share compiled artifacts through [`load_guest`].
pub fn shared_host() -> WasmHost {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    host(DIR.get_or_init(|| tempfile::tempdir().unwrap()).path())
}

/// Loads a test guest into `host`, compiling it at most once per test binary when the hosts share
/// a cache directory (concurrent first loads wait for one compilation).
pub fn load_guest(host: &WasmHost, name: &str) -> flotilla_wasm_runtime::Program {
    static COMPILING: Mutex<()> = Mutex::new(());
    let bytes = guest(name);
    let _one_at_a_time = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
    host.load_bytes(&bytes).unwrap()
}

pub fn host(cache_dir: &Path) -> WasmHost {
    WasmHost::new(HostConfig { cache_dir: cache_dir.to_path_buf(), ..HostConfig::default() }).unwrap()
}

/// A host on the pooling allocator with room for exactly `instances` live instances (256 MiB of
/// linear memory between them), so a test can tell if more ever run at once.
pub fn pooled_host(cache_dir: &Path, instances: u32) -> WasmHost {
    WasmHost::new(HostConfig {
        cache_dir: cache_dir.to_path_buf(),
        pooling: Some(flotilla_wasm_runtime::PoolingConfig {
            total_instances: instances,
            total_memory_bytes: 256 << 20,
            memory_guard_bytes: 0,
        }),
        ..HostConfig::default()
    })
    .unwrap()
}

pub fn run_opts(args: &[&str]) -> (RunOptions, Arc<Capture>, Arc<Capture>) {
    let out = Arc::new(Capture::default());
    let err = Arc::new(Capture::default());
    let mut opts = RunOptions::new("guest", out.clone(), err.clone());
    opts.args = args.iter().map(|a| a.to_string()).collect();
    (opts, out, err)
}

/// The test guests, by file name: `guest-cli` (a std `main`, wasi:cli/run), `guest_cli_err`
/// (wasi:cli/run returning `Err`), `guest_http_hello`, `guest_http_misbehave`.
pub fn guest(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match BUILT.get_or_init(build_guests) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read test guest {}: {e}", path.display()))
}

/// Runs `cargo build` on the guest workspace once per test binary (a no-op when up to date), so a
/// fresh checkout needs nothing but the wasm32-wasip2 rustup target.
fn build_guests() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/Cargo.toml");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wasm-guests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--workspace", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target_dir)
        // Host flags (e.g. from a coverage or sanitizer run) must not leak into the guests.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo to build the test guests: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the test guests failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("wasm32-wasip2").join("release"))
}

/// One GET on a fresh connection: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let mut client = Client::connect(addr).await;
    client.get(path).await
}

/// An HTTP/1.1 keep-alive connection.
pub struct Client {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { addr, sender }
    }

    pub async fn get(&mut self, path: &str) -> (StatusCode, String) {
        self.try_get(path).await.unwrap()
    }

    pub async fn try_get(&mut self, path: &str) -> Result<(StatusCode, String), hyper::Error> {
        self.sender.ready().await?;
        let request = hyper::Request::get(path).header("host", self.addr.to_string()).body(Empty::new()).unwrap();
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
