//! `flotilla-wasm-runtime` hosts WASI preview 1 command modules under wasmtime for the Flotilla
//! edge agent. It owns one shared wasmtime [`Engine`] (epoch interruption, async execution),
//! the background thread that ticks that engine's epoch, an in-memory table of loaded
//! [`Program`]s keyed by content digest, and an on-disk cache of compiled artifacts under a
//! directory it is given. It runs a program's `_start` with WASI args, env and stdout/stderr
//! capture, a per-store linear memory cap, and cooperative time slicing so that dropping the
//! run future cancels even a guest stuck in a loop. It knows nothing of the hub, the agent or
//! the wire protocol. It must never panic or block the async executor for longer than one epoch
//! tick on any guest input (malformed bytes, traps, infinite loops, memory bombs), never give a
//! guest access to host files, sockets, stdin or the host environment, and never load a compiled
//! artifact from anywhere except its own private cache directory.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use wasmtime::{Config, Engine, ExternType, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, WasmBacktrace};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[cfg(test)]
mod tests;

/// Everything that can go wrong while loading or starting a program.
///
/// A guest that traps or calls `proc_exit` is not an error: see [`Exit`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The digest is not of the form `sha256:<64 lowercase hex>`.
    #[error("invalid module digest {digest:?}: expected \"sha256:\" followed by 64 lowercase hex characters")]
    InvalidDigest { digest: String },
    /// The bytes read from `path` do not hash to the digest they were loaded under.
    #[error("module file {path} has digest {actual}, expected {expected}")]
    DigestMismatch { path: PathBuf, expected: String, actual: String },
    /// wasmtime rejected the module bytes.
    #[error("invalid wasm module {digest}: {reason}")]
    InvalidModule { digest: String, reason: String },
    /// The module's imports cannot be satisfied by the WASI preview 1 linker.
    #[error("cannot link wasm module {digest}: {reason}")]
    Link { digest: String, reason: String },
    /// The module has no `_start` export.
    #[error("wasm module {digest} does not export a `_start` function")]
    MissingStart { digest: String },
    /// The module exports `_start`, but not as a function taking and returning nothing.
    #[error("wasm module {digest} exports `_start` as {found}, expected a function with no params and no results")]
    BadStart { digest: String, found: String },
    /// Creating an instance of the module in a fresh store failed.
    #[error("cannot instantiate wasm module {digest}: {reason}")]
    Instantiate { digest: String, reason: String },
    /// The program was loaded by a different [`WasmHost`] (a different engine).
    #[error("program {digest} was loaded by a different wasm host")]
    ForeignProgram { digest: String },
    /// An I/O operation on the cache directory or an input file failed.
    #[error("cannot {op} {path}: {error}")]
    Io { op: &'static str, path: PathBuf, error: std::io::Error },
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

/// Configuration of a [`WasmHost`].
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Root of the on-disk compile cache; created if missing.
    pub cache_dir: PathBuf,
    /// How often the engine epoch advances, i.e. the time slice of a running guest.
    pub epoch_tick: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: std::env::temp_dir().join("flotilla-wasm-cache"),
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// Counters describing how programs were obtained by [`WasmHost::load`] / [`WasmHost::load_bytes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules compiled from wasm bytes (cache misses, including rebuilt corrupt entries).
    pub compiled: u64,
    /// Modules deserialized from the on-disk cache.
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

/// Per-run resource limits.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Cap on the total size of all linear memories of one run; growing past it traps.
    pub memory_bytes: Option<u64>,
}

/// How to run one program instance.
pub struct RunOptions {
    /// The guest's `argv[0]`.
    pub program_name: String,
    /// The guest's `argv[1..]`.
    pub args: Vec<String>,
    /// The guest's entire environment (nothing is inherited from the host).
    pub env: Vec<(String, String)>,
    pub stdout: Arc<dyn OutputSink>,
    pub stderr: Arc<dyn OutputSink>,
    pub limits: Limits,
}

/// How a program run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `_start` returned (0) or the guest called `proc_exit(n)`.
    Code(i32),
    /// The guest trapped or was killed by the host (e.g. memory limit); human-readable reason.
    Trap(String),
}

/// A compiled, linked module ready to be started cheaply. Cloning is cheap.
#[derive(Clone)]
pub struct Program {
    inner: Arc<ProgramInner>,
}

struct ProgramInner {
    digest: String,
    pre: InstancePre<StoreState>,
}

impl Program {
    /// The content digest (`sha256:<hex>`) this program was loaded under.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program").field("digest", &self.inner.digest).finish_non_exhaustive()
    }
}

/// The wasmtime host: one engine, its linker, loaded programs and the compile cache.
/// Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct WasmHost {
    inner: Arc<HostInner>,
}

impl fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmHost")
            .field("artifact_dir", &self.inner.artifact_dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct HostInner {
    engine: Engine,
    linker: Linker<StoreState>,
    /// `<cache_dir>/<engine compatibility hash>`: artifacts here deserialize in `engine`.
    artifact_dir: PathBuf,
    programs: Mutex<HashMap<String, Program>>,
    compiled: AtomicU64,
    loaded_from_disk: AtomicU64,
    memory_hits: AtomicU64,
    ticker: OnceLock<std::thread::Thread>,
    #[cfg(test)]
    ticker_alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        // Wake the ticker so it notices promptly that the host is gone.
        if let Some(thread) = self.ticker.get() {
            thread.unpark();
        }
    }
}

/// Store data of one run.
struct StoreState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

impl WasmHost {
    /// Creates the engine, the cache directory and the epoch ticker thread.
    pub fn new(cfg: HostConfig) -> Result<Self, Error> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| Error::Engine { reason: one_line(&e) })?;

        let mut linker: Linker<StoreState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut StoreState| &mut s.wasi)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi preview 1 to linker: {e:#}") })?;

        let artifact_dir = cfg.cache_dir.join(engine_hash_hex(&engine));
        std::fs::create_dir_all(&artifact_dir).map_err(|e| Error::io("create cache directory", &artifact_dir, e))?;

        let inner = Arc::new(HostInner {
            engine,
            linker,
            artifact_dir,
            programs: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            loaded_from_disk: AtomicU64::new(0),
            memory_hits: AtomicU64::new(0),
            ticker: OnceLock::new(),
            #[cfg(test)]
            ticker_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        });

        let weak = Arc::downgrade(&inner);
        let tick = cfg.epoch_tick.max(Duration::from_micros(100));
        #[cfg(test)]
        let alive = inner.ticker_alive.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                epoch_ticker(weak, tick);
                #[cfg(test)]
                alive.store(false, Ordering::SeqCst);
            })
            .map_err(|error| Error::Ticker { error })?;
        let _ = inner.ticker.set(handle.thread().clone());
        // The thread is detached; it exits once every `WasmHost` clone is gone.
        drop(handle);

        Ok(WasmHost { inner })
    }

    /// Cache counters since this host was created.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.inner.loaded_from_disk.load(Ordering::Relaxed),
            memory_hits: self.inner.memory_hits.load(Ordering::Relaxed),
        }
    }

    /// Directory holding this engine's compiled artifacts (`<cache_dir>/<engine hash>`).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.artifact_dir
    }

    /// Path of the compiled artifact for `digest` (which need not exist).
    pub fn artifact_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let hex = digest_hex(digest)?;
        Ok(self.inner.artifact_dir.join(format!("{hex}.cwasm")))
    }

    /// Drops the in-memory program for `digest` (the disk cache entry stays). Returns whether it
    /// was loaded. Running instances are unaffected.
    pub fn unload(&self, digest: &str) -> bool {
        lock(&self.inner.programs).remove(digest).is_some()
    }

    /// Blocking (use `spawn_blocking`). Loads the module whose content digest is `digest`
    /// (`sha256:<64 hex>`) from `wasm_path`: from memory if already loaded, else from the disk
    /// cache, else by compiling it (after checking that the file matches `digest`) and writing
    /// the cache entry. A corrupt cache entry is deleted and rebuilt.
    pub fn load(&self, digest: &str, wasm_path: &Path) -> Result<Program, Error> {
        digest_hex(digest)?;
        self.load_with(digest, || {
            let bytes = std::fs::read(wasm_path).map_err(|e| Error::io("read wasm module", wasm_path, e))?;
            let actual = sha256_digest(&bytes);
            if actual != digest {
                return Err(Error::DigestMismatch {
                    path: wasm_path.to_path_buf(),
                    expected: digest.to_string(),
                    actual,
                });
            }
            Ok(std::borrow::Cow::Owned(bytes))
        })
    }

    /// Blocking, like [`WasmHost::load`], from bytes; the digest is their sha256.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Program, Error> {
        let digest = sha256_digest(bytes);
        self.load_with(&digest, || Ok(std::borrow::Cow::Borrowed(bytes)))
    }

    fn load_with<'b>(
        &self,
        digest: &str,
        read: impl FnOnce() -> Result<std::borrow::Cow<'b, [u8]>, Error>,
    ) -> Result<Program, Error> {
        if let Some(program) = lock(&self.inner.programs).get(digest) {
            self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(program.clone());
        }

        let cache_path = self.artifact_path(digest)?;
        let module = match self.load_cached(digest, &cache_path) {
            Some(module) => module,
            None => {
                let bytes = read()?;
                let started = Instant::now();
                let module = Module::from_binary(&self.inner.engine, &bytes)
                    .map_err(|e| Error::InvalidModule { digest: digest.to_string(), reason: one_line(&e) })?;
                self.inner.compiled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(digest, elapsed = ?started.elapsed(), "compiled wasm module");
                // Link before caching so that unusable modules do not fill the cache.
                let program = self.link(digest, &module)?;
                self.store_cached(&module, &cache_path);
                return Ok(self.remember(program));
            }
        };
        let program = self.link(digest, &module)?;
        Ok(self.remember(program))
    }

    /// Returns the cached module, or `None` if there is no usable entry (a corrupt one is removed).
    fn load_cached(&self, digest: &str, path: &Path) -> Option<Module> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                tracing::warn!(path = %path.display(), "wasm cache entry is not a regular file; ignoring it");
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot stat wasm cache entry; recompiling");
                return None;
            }
        }
        // SAFETY: `path` lies in this host's private cache directory, under a subdirectory named
        // by this engine's precompile compatibility hash, and files there are only ever written
        // by `store_cached` (from `Module::serialize` of this same engine configuration) via a
        // temp file + rename, so the file is a wasmtime artifact produced for a compatible engine
        // and is never modified in place while mapped (replacement happens by rename, which
        // leaves the mapped inode intact). Wasmtime additionally validates the header and engine
        // compatibility, and any failure is handled below by deleting and rebuilding the entry.
        match unsafe { Module::deserialize_file(&self.inner.engine, path) } {
            Ok(module) => {
                self.inner.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(digest, path = %path.display(), "loaded compiled wasm module from cache");
                Some(module)
            }
            Err(e) => {
                tracing::warn!(digest, path = %path.display(), error = %format!("{e:#}"), "corrupt wasm cache entry; deleting and recompiling");
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt wasm cache entry");
                }
                None
            }
        }
    }

    /// Writes the compiled artifact atomically. Failure only costs a future recompile, so it is
    /// logged rather than returned.
    fn store_cached(&self, module: &Module, path: &Path) {
        let bytes = match module.serialize() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot serialize compiled wasm module");
                return;
            }
        };
        if let Err(e) = write_atomically(path, &bytes) {
            tracing::warn!(error = %e, "cannot write wasm cache entry");
        }
    }

    fn link(&self, digest: &str, module: &Module) -> Result<Program, Error> {
        match module.get_export("_start") {
            None => {
                return Err(Error::MissingStart { digest: digest.to_string() });
            }
            Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
            Some(other) => {
                return Err(Error::BadStart { digest: digest.to_string(), found: describe_extern(&other) });
            }
        }
        let pre = self
            .inner
            .linker
            .instantiate_pre(module)
            .map_err(|e| Error::Link { digest: digest.to_string(), reason: one_line(&e) })?;
        Ok(Program { inner: Arc::new(ProgramInner { digest: digest.to_string(), pre }) })
    }

    /// Inserts `program` unless another thread raced us, in which case theirs wins.
    fn remember(&self, program: Program) -> Program {
        lock(&self.inner.programs).entry(program.inner.digest.clone()).or_insert(program).clone()
    }

    /// Runs the program's `_start` to completion. Cancel by dropping the future: the guest
    /// yields to the executor every epoch tick, even inside an infinite loop.
    pub async fn run(&self, program: &Program, opts: RunOptions) -> Result<Exit, Error> {
        let digest = program.digest();
        if !Engine::same(program.inner.pre.module().engine(), &self.inner.engine) {
            return Err(Error::ForeignProgram { digest: digest.to_string() });
        }

        let mut wasi = WasiCtxBuilder::new();
        wasi.arg(&opts.program_name)
            .args(&opts.args)
            .envs(&opts.env)
            .stdout(SinkStream(opts.stdout))
            .stderr(SinkStream(opts.stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let state = StoreState { wasi: wasi.build_p1(), limiter: MemoryLimiter::new(opts.limits.memory_bytes) };

        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let instance = match program.inner.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            // A trap in the module's start section is the guest's doing.
            Err(e) if e.downcast_ref::<Trap>().is_some() => {
                return Ok(Exit::Trap(describe_guest_failure(&e)));
            }
            Err(e) => {
                return Err(Error::Instantiate { digest: digest.to_string(), reason: one_line(&e) });
            }
        };
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| Error::MissingStart { digest: digest.to_string() })?;
        match start.call_async(&mut store, ()).await {
            Ok(()) => Ok(Exit::Code(0)),
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => Ok(Exit::Code(exit.0)),
                None => {
                    let reason = describe_guest_failure(&e);
                    tracing::debug!(digest, %reason, "wasm guest trapped");
                    Ok(Exit::Trap(reason))
                }
            },
        }
    }
}

fn epoch_ticker(host: Weak<HostInner>, tick: Duration) {
    let mut next = Instant::now() + tick;
    loop {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            // Woken early by `HostInner::drop` (or spuriously): stop if the host is gone.
            if host.strong_count() == 0 {
                return;
            }
            continue;
        }
        next += tick;
        if next < now {
            // We fell far behind (e.g. the machine was suspended); do not burst.
            next = now + tick;
        }
        match host.upgrade() {
            Some(host) => host.engine.increment_epoch(),
            None => return,
        }
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

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn digest_hex(digest: &str) -> Result<&str, Error> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex)
        }
        _ => Err(Error::InvalidDigest { digest: digest.to_string() }),
    }
}

/// Feeds `Hash` output into sha256 so the directory name is stable across Rust releases.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn engine_hash_hex(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..16])
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp =
        dir.join(format!(".{name}.{}.{}.{nanos}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut file = std::fs::File::create_new(&tmp).map_err(|e| Error::io("create cache temp file", &tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io("write cache temp file", &tmp, e))?;
        file.sync_all().map_err(|e| Error::io("sync cache temp file", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename cache temp file to", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn describe_extern(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(f) => format!("a function with {} params and {} results", f.params().len(), f.results().len()),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Memory(_) => "a memory".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}

/// Human-readable reason for an abnormal guest exit: the wasm trap code (or host-side reason,
/// e.g. the memory limit) followed by the innermost few wasm frames.
fn describe_guest_failure(err: &wasmtime::Error) -> String {
    let mut reason = match err.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => err
            .chain()
            .map(|cause| cause.to_string())
            // The backtrace is attached as a context layer; it is summarised below instead.
            .filter(|cause| !cause.starts_with("error while executing at wasm backtrace"))
            .collect::<Vec<_>>()
            .join(": "),
    };
    if let Some(bt) = err.downcast_ref::<WasmBacktrace>() {
        const MAX_FRAMES: usize = 5;
        let frames: Vec<String> = bt
            .frames()
            .iter()
            .take(MAX_FRAMES)
            .map(|frame| match frame.func_name() {
                Some(name) => name.to_string(),
                None => format!("func[{}]", frame.func_index()),
            })
            .collect();
        if !frames.is_empty() {
            reason.push_str(" (in ");
            reason.push_str(&frames.join(" <- "));
            if bt.frames().len() > MAX_FRAMES {
                reason.push_str(" <- ...");
            }
            reason.push(')');
        }
    }
    reason
}

/// Caps the total size of a store's linear memories; exceeding the cap traps.
struct MemoryLimiter {
    limit: Option<usize>,
    total: usize,
    before_last_grow: usize,
}

impl MemoryLimiter {
    fn new(limit: Option<u64>) -> Self {
        MemoryLimiter { limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)), total: 0, before_last_grow: 0 }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false); // the module's own maximum: memory.grow returns -1
        }
        let new_total = self.total.saturating_sub(current).saturating_add(desired);
        if let Some(limit) = self.limit
            && new_total > limit
        {
            wasmtime::bail!(
                "memory limit exceeded: guest needs {new_total} bytes of linear memory, limit is {limit} bytes"
            );
        }
        self.before_last_grow = self.total;
        self.total = new_total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The host could not provide the memory; memory.grow returns -1 to the guest.
        self.total = self.before_last_grow;
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

/// Adapts an [`OutputSink`] to wasmtime-wasi's stdout/stderr stream traits. Writes go straight
/// to the sink, so the stream is always ready and never buffers.
#[derive(Clone)]
struct SinkStream(Arc<dyn OutputSink>);

/// Largest single write the guest is permitted; fd_write loops over larger buffers.
const SINK_WRITE_PERMIT: usize = 64 * 1024;

impl IsTerminal for SinkStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for SinkStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SinkStream {
    async fn ready(&mut self) {}
}

impl OutputStream for SinkStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        if !bytes.is_empty() {
            self.0.write(&bytes);
        }
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(SINK_WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for SinkStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if !buf.is_empty() {
            self.0.write(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
