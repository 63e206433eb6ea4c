//! `flotilla-wasm-runtime` hosts WebAssembly programs under wasmtime for the Flotilla edge agent:
//! WASI preview 1 command modules, WASI 0.2 `wasi:cli/run` components (both started with
//! [`WasmHost::run`]) and `wasi:http/proxy` components (served with [`WasmHost::serve_http`],
//! one fresh instance per request).
//!
//! It owns one shared wasmtime [`Engine`] (epoch interruption, async execution, optionally fuel
//! and a pooling allocator sized for small devices), the background thread that ticks that
//! engine's epoch, an in-memory table of loaded [`Program`]s keyed by content digest, and an
//! on-disk cache of compiled artifacts under a directory it is given. It runs programs with WASI
//! args, env, stdout/stderr capture, optional preopened directories and network access, a
//! per-store linear memory cap, a CPU-time budget and optional fuel, and cooperative time slicing
//! so that dropping the run future cancels even a guest stuck in a loop, and counts what each run
//! or server uses (CPU time, linear memory) into a [`GuestUsage`] when given one. It knows nothing of the
//! hub, the agent or the wire protocol. It must never panic or block the async executor for longer
//! than one epoch tick on any guest input (malformed bytes, traps, infinite loops, memory bombs),
//! never give a guest access to host files, sockets, stdin or the host environment beyond what
//! [`RunOptions`] / [`HttpOptions`] grant (the host process's own stdio only with
//! [`Stdio::Inherit`]), and never load a compiled artifact from anywhere except
//! its own private cache directory.
//!
//! Module map: [`WasmHost`] and its creation live in `host`; the engine's configuration, pooling
//! sizing and epoch ticker in `engine`; loading and the on-disk compile cache in `cache`; linking
//! and pre-instantiation ([`Program`]) in `program`; per-store limits in `limits`; what guests
//! use ([`GuestUsage`]: CPU time per poll, linear memory per store) in `usage`; WASI contexts
//! and stdio capture in `wasi`; running a command in `run`; serving `wasi:http` in `http`. This
//! file holds the public option and result types and the re-exports.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod cache;
mod engine;
mod host;
mod http;
mod limits;
mod program;
mod run;
mod usage;
mod wasi;

pub use cache::{Loaded, sha256_digest};
pub use engine::{HostConfig, PoolingConfig, PoolingPlan};
pub use host::WasmHost;
pub use http::{DRAIN_LINGER, HandlerBody, HttpHandler, HttpOptions, HttpServer, Shutdown};
pub use program::Program;
pub use usage::GuestUsage;

#[cfg(test)]
mod tests;

/// Everything that can go wrong while loading or starting a program.
///
/// A guest that traps, runs out of CPU time or fuel, or calls `proc_exit` is not an error: see
/// [`Exit`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The digest is not of the form `sha256:<64 lowercase hex>`.
    #[error("invalid module digest {digest:?}: expected \"sha256:\" followed by 64 lowercase hex characters")]
    InvalidDigest { digest: String },
    /// The bytes read from `path` do not hash to the digest they were loaded under.
    #[error("module file {path} has digest {actual}, expected {expected}")]
    DigestMismatch { path: PathBuf, expected: String, actual: String },
    /// wasmtime rejected the module or component bytes.
    #[error("invalid wasm {kind} {digest}: {reason}")]
    InvalidModule { kind: ProgramKind, digest: String, reason: String },
    /// The program's imports cannot be satisfied by the WASI (and wasi:http) linker.
    #[error("cannot link wasm {kind} {digest}: {reason}")]
    Link { kind: ProgramKind, digest: String, reason: String },
    /// The module has no `_start` export: a library or reactor module, not a command.
    #[error(
        "wasm module {digest} has no _start export: it is a library or reactor module, not a command; \
         build it as a WASI command (a binary crate for wasm32-wasip1, or clang/wasi-sdk without -mexec-model=reactor)"
    )]
    MissingStart { digest: String },
    /// The module exports `_start`, but not as a function taking and returning nothing.
    #[error("wasm module {digest} exports `_start` as {found}, expected a function with no params and no results")]
    BadStart { digest: String, found: String },
    /// The component exports neither `wasi:cli/run` nor `wasi:http/incoming-handler`.
    #[error(
        "wasm component {digest} exports neither wasi:cli/run nor wasi:http/incoming-handler (it exports: {exports})"
    )]
    NotRunnable { digest: String, exports: String },
    /// [`WasmHost::run`] was called on a `wasi:http/proxy` component.
    #[error("wasm component {digest} serves HTTP; use serve_http")]
    ServesHttp { digest: String },
    /// [`WasmHost::serve_http`] was called on a program that does not export
    /// `wasi:http/incoming-handler`.
    #[error("wasm {kind} {digest} does not export wasi:http/incoming-handler; use run")]
    NotHttp { kind: ProgramKind, digest: String },
    /// Creating an instance of the program in a fresh store failed.
    #[error("cannot instantiate wasm {kind} {digest}: {reason}")]
    Instantiate { kind: ProgramKind, digest: String, reason: String },
    /// The program was loaded by a different [`WasmHost`] (a different engine).
    #[error("program {digest} was loaded by a different wasm host")]
    ForeignProgram { digest: String },
    /// A [`Preopen`] could not be opened.
    #[error("cannot preopen host directory {host} as guest directory {guest:?}: {reason}")]
    Preopen { host: PathBuf, guest: String, reason: String },
    /// [`Limits::fuel`] was set but the host was created without [`HostConfig::fuel`].
    #[error("fuel limit of {fuel} requested, but the wasm host was created without fuel metering (HostConfig::fuel)")]
    FuelDisabled { fuel: u64 },
    /// The HTTP listener could not be bound.
    #[error("cannot listen for http on {addr}: {error}")]
    Bind { addr: std::net::SocketAddr, error: std::io::Error },
    /// An I/O operation on the cache directory or an input file failed.
    #[error("cannot {op} {path}: {error}")]
    Io { op: &'static str, path: PathBuf, error: std::io::Error },
    /// The [`HostConfig`] or [`HttpOptions`] are inconsistent.
    #[error("invalid wasm host configuration: {reason}")]
    Config { reason: String },
    /// The wasmtime engine could not be created.
    #[error("cannot create wasmtime engine: {reason}")]
    Engine { reason: String },
    /// The epoch ticker thread could not be spawned.
    #[error("cannot spawn wasm epoch ticker thread: {error}")]
    Ticker { error: std::io::Error },
}

impl Error {
    fn io(op: &'static str, path: &Path, error: std::io::Error) -> Self {
        Error::Io { op, path: path.to_path_buf(), error }
    }
}

/// Size of a WebAssembly page; memory sizes are rounded to it.
pub const WASM_PAGE_SIZE: u64 = 64 * 1024;

/// Counters describing how programs were obtained by [`WasmHost::load`] / [`WasmHost::load_bytes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Programs compiled from wasm bytes (cache misses, including rebuilt corrupt entries).
    pub compiled: u64,
    /// Programs deserialized from the on-disk cache.
    pub loaded_from_disk: u64,
    /// Loads answered from the in-memory program table.
    pub memory_hits: u64,
}

/// Receives a guest's stdout or stderr bytes.
///
/// `write` is called synchronously from inside the guest's `fd_write`, on the async executor, so
/// it must return quickly; it cannot fail from the guest's point of view (drop what you cannot
/// keep).
pub trait OutputSink: Send + Sync + 'static {
    fn write(&self, bytes: &[u8]);
}

/// Where a run's stdin, stdout and stderr go.
#[derive(Clone)]
pub enum Stdio {
    /// stdout and stderr to sinks that cannot fail; no stdin (a read sees end-of-file). What the
    /// agent's replicas get: nothing of the host process's own stdio reaches them.
    Sinks { stdout: Arc<dyn OutputSink>, stderr: Arc<dyn OutputSink> },
    /// This process's own stdin, stdout and stderr, through wasmtime-wasi's stdio streams, as
    /// `wasmtime run` gives them: reads block on the terminal or pipe, a failed write (EPIPE when
    /// the reader has gone) is returned to the guest as an error, and a terminal is reported as a
    /// character device. For `flotilla run`.
    Inherit,
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stdio::Sinks { .. } => "Sinks",
            Stdio::Inherit => "Inherit",
        })
    }
}

/// Per-run (for HTTP: per-request) resource limits. All are optional; `Limits::default()` has
/// none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the total size of all linear memories of one run; growing past it traps.
    pub memory_bytes: Option<u64>,
    /// CPU time the guest may spend executing wasm in one run (for HTTP: one request) before it
    /// is stopped with [`Exit::Trap`] ("cpu time limit of 2s exceeded"). Measured in epoch ticks
    /// ([`HostConfig::epoch_tick`]) that pass while wasm code runs: time a guest spends blocked
    /// in a host call (sleeping, waiting for I/O) is not charged, except that the first tick
    /// noticed after such a wait is; time the OS runs other threads while the guest is in wasm
    /// is charged, so on an overloaded host guests use up their budget early.
    pub cpu_time: Option<Duration>,
    /// Fuel (roughly: wasm instructions) the guest may consume; running out traps with "fuel
    /// exhausted". Requires [`HostConfig::fuel`], else [`Error::FuelDisabled`].
    pub fuel: Option<u64>,
}

/// A host directory made visible to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preopen {
    /// Directory on the host; must exist.
    pub host: PathBuf,
    /// Path under which the guest sees it (e.g. `/data`).
    pub guest: String,
    /// Read-only: the guest may list and read but not create, write, rename or delete.
    pub read_only: bool,
}

/// How to run one program instance. Build with [`RunOptions::new`] and set the public fields.
pub struct RunOptions {
    /// The guest's `argv[0]`.
    pub program_name: String,
    /// The guest's `argv[1..]`.
    pub args: Vec<String>,
    /// The guest's entire environment (nothing is inherited from the host).
    pub env: Vec<(String, String)>,
    /// Stdin, stdout and stderr: sinks (and no stdin), or this process's own.
    pub stdio: Stdio,
    pub limits: Limits,
    /// Host directories visible to the guest. Default: none.
    pub preopens: Vec<Preopen>,
    /// Whether the guest may use sockets (TCP, UDP, to any address the host can reach), resolve
    /// names and, for components, make outgoing `wasi:http` requests. Default `false`.
    pub network: bool,
    /// Counts the run's CPU time and linear memory (see [`GuestUsage`]). Default `None`: not
    /// counted, and no clock is read.
    pub usage: Option<Arc<GuestUsage>>,
}

impl RunOptions {
    /// Options with stdout and stderr to sinks, no stdin, and no args, env, preopens, network or
    /// limits.
    pub fn new(program_name: impl Into<String>, stdout: Arc<dyn OutputSink>, stderr: Arc<dyn OutputSink>) -> Self {
        RunOptions::with_stdio(program_name, Stdio::Sinks { stdout, stderr })
    }

    /// Options with the given stdio, and no args, env, preopens, network or limits.
    pub fn with_stdio(program_name: impl Into<String>, stdio: Stdio) -> Self {
        RunOptions {
            program_name: program_name.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdio,
            limits: Limits::default(),
            preopens: Vec::new(),
            network: false,
            usage: None,
        }
    }
}

/// How a program run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `_start` returned (0) or the guest called `proc_exit(n)` with n in 0..=255 (wider than
    /// the 0..126 wasmtime-wasi allows, so a shell sees the code it expects); for components, `wasi:cli/run`
    /// returned `Ok` (0) or `Err` (1), or the guest called `wasi:cli/exit` with a code.
    Code(i32),
    /// The guest trapped or was killed by the host (memory, CPU-time or fuel limit);
    /// human-readable reason.
    Trap(String),
}

/// Whether a [`Program`] is a core wasm module or a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgramKind {
    /// A core WebAssembly module using WASI preview 1.
    Module,
    /// A WebAssembly component (WASI 0.2).
    Component,
}

impl ProgramKind {
    /// Detects the kind from the binary header: components have layer 1 in the version field
    /// (`\0asm` followed by version `0x0d 0x00` and layer `0x01 0x00`). Anything else, including
    /// garbage, is treated as a module (whose compilation then reports what is wrong).
    pub fn detect(bytes: &[u8]) -> ProgramKind {
        match bytes {
            [0, b'a', b's', b'm', _, _, 1, 0, ..] => ProgramKind::Component,
            _ => ProgramKind::Module,
        }
    }

    fn file_suffix(self) -> &'static str {
        match self {
            ProgramKind::Module => "module.cwasm",
            ProgramKind::Component => "component.cwasm",
        }
    }
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProgramKind::Module => "module",
            ProgramKind::Component => "component",
        })
    }
}

/// wasmtime's full error chain on one line (some parser errors embed pretty-printed `Debug`).
fn one_line(err: &wasmtime::Error) -> String {
    let text = format!("{err:#}");
    if !text.contains('\n') {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() && !out.ends_with('[') && !line.starts_with(']') {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no invariants a panicking holder could break.
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}
