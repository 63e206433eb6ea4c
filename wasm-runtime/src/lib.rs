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
//! so that dropping the run future cancels even a guest stuck in a loop. It knows nothing of the
//! hub, the agent or the wire protocol. It must never panic or block the async executor for longer
//! than one epoch tick on any guest input (malformed bytes, traps, infinite loops, memory bombs),
//! never give a guest access to host files, sockets, stdin or the host environment beyond what
//! [`RunOptions`] / [`HttpOptions`] grant, and never load a compiled artifact from anywhere except
//! its own private cache directory.

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
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

mod http;

pub use http::{HttpOptions, HttpServer, Shutdown};

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
    /// The module has no `_start` export.
    #[error("wasm module {digest} does not export a `_start` function")]
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

/// Configuration of a [`WasmHost`].
///
/// Address-space defaults (when every memory field is `None`) are wasmtime's: each linear memory
/// reserves 4 GiB plus a 32 MiB guard region of virtual address space on 64-bit hosts (so bounds
/// checks are elided), and 10 MiB plus a 64 KiB guard on 32-bit hosts. Reservations are virtual
/// address space, not RAM; on small or 32-bit boards set `max_memory_per_instance` or `pooling`.
/// Changing any of these fields changes the engine's compatibility hash and therefore uses a
/// fresh subdirectory of the compile cache.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Root of the on-disk compile cache; created if missing.
    pub cache_dir: PathBuf,
    /// How often the engine epoch advances, i.e. the time slice of a running guest and the
    /// granularity of [`Limits::cpu_time`].
    pub epoch_tick: Duration,
    /// Upper bound on the linear memory of any one instance (all its memories together), on top
    /// of the per-run [`Limits::memory_bytes`]. When set and `memory_reservation` is `None`, each
    /// linear memory reserves only this much address space (rounded up to 64 KiB pages) instead
    /// of wasmtime's 4 GiB. Default `None`.
    pub max_memory_per_instance: Option<u64>,
    /// Address space reserved up front for each linear memory ([`Config::memory_reservation`]).
    /// Smaller values cost explicit bounds checks in compiled code. Default `None` (wasmtime's
    /// default, see above; or `max_memory_per_instance` when that is set).
    pub memory_reservation: Option<u64>,
    /// Guard region after each linear memory ([`Config::memory_guard_size`]). Default `None`
    /// (wasmtime's default: 32 MiB on 64-bit, 64 KiB on 32-bit hosts).
    pub memory_guard_size: Option<u64>,
    /// Use wasmtime's pooling allocator with everything preallocated for a fixed number of
    /// concurrent instances within a memory budget; see [`PoolingConfig`]. Default `None`: the
    /// on-demand allocator, which reserves memory per instance at instantiation time.
    pub pooling: Option<PoolingConfig>,
    /// Compile with fuel metering so that [`Limits::fuel`] can be used. Off by default because
    /// metering instruments every compiled function and slows down all guests of this host.
    pub fuel: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: std::env::temp_dir().join("flotilla-wasm-cache"),
            epoch_tick: Duration::from_millis(10),
            max_memory_per_instance: None,
            memory_reservation: None,
            memory_guard_size: None,
            pooling: None,
            fuel: false,
        }
    }
}

/// Pooling allocator sizing: at most `total_instances` instances (module runs, component runs
/// and HTTP requests together) exist at once, and their linear memories together never reserve
/// more than `total_memory_bytes` of address space.
///
/// Each instance gets one linear-memory slot of `total_memory_bytes / total_instances` bytes,
/// rounded down to whole 64 KiB pages, followed by `memory_guard_bytes` of inaccessible guard
/// region. With 4 GiB slots and a guard (as `wasmtime serve` uses) compiled code elides bounds
/// checks; with smaller slots or no guard it checks bounds explicitly, which costs a little
/// speed and saves address space on small boards. Programs with more than one linear memory (rare: Rust, C and Go guests have one)
/// cannot be instantiated. Instantiating beyond `total_instances` fails with
/// [`Error::Instantiate`]. Tables and async stacks are pooled too and reserve a few MiB more; see
/// [`PoolingPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingConfig {
    pub total_instances: u32,
    pub total_memory_bytes: u64,
    /// Guard region after each slot (address space only); 0 for none.
    pub memory_guard_bytes: u64,
}

/// What a [`PoolingConfig`] preallocates, as computed by [`PoolingConfig::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingPlan {
    pub total_instances: u32,
    /// Largest linear memory one instance may have (also its address-space reservation).
    pub max_memory_per_instance: u64,
    /// Guard region after each slot.
    pub memory_guard_bytes: u64,
    /// Address space reserved for all linear memories and their guards:
    /// `total_instances * (max_memory_per_instance + memory_guard_bytes)`.
    pub reserved_memory_bytes: u64,
    /// Address space reserved for wasm tables (pointer-sized elements).
    pub reserved_table_bytes: u64,
    /// Address space reserved for async execution stacks.
    pub reserved_stack_bytes: u64,
}

impl PoolingPlan {
    /// Memories, tables and stacks together.
    pub fn total_reserved_bytes(&self) -> u64 {
        self.reserved_memory_bytes.saturating_add(self.reserved_table_bytes).saturating_add(self.reserved_stack_bytes)
    }
}

/// Core wasm instances one component instance may contain (main module, the preview 1 adapter
/// and wit-component's shim and fixup modules: 4 or 5 for typical Rust guests).
const POOL_CORE_INSTANCES_PER_INSTANCE: u32 = 16;
/// Tables one component instance may contain (one per core module that defines one).
const POOL_TABLES_PER_INSTANCE: u32 = 8;
/// Largest table (e.g. a Rust guest's indirect function table) under pooling.
const POOL_TABLE_ELEMENTS: usize = 20_000;
/// wasmtime's default async (fiber) stack size, used for every running instance.
const ASYNC_STACK_BYTES: u64 = 2 << 20;

impl PoolingConfig {
    /// Computes the per-instance memory and the address space the pool will reserve.
    pub fn plan(&self) -> Result<PoolingPlan, Error> {
        if self.total_instances == 0 {
            return Err(Error::Config { reason: "pooling total_instances must be at least 1".into() });
        }
        let instances = u64::from(self.total_instances);
        let per_instance = self.total_memory_bytes / instances / WASM_PAGE_SIZE * WASM_PAGE_SIZE;
        if per_instance == 0 {
            return Err(Error::Config {
                reason: format!(
                    "pooling memory budget of {} bytes for {} instances leaves less than one 64 KiB page per instance",
                    self.total_memory_bytes, self.total_instances
                ),
            });
        }
        if usize::try_from(per_instance).is_err() {
            return Err(Error::Config {
                reason: format!(
                    "pooling memory of {per_instance} bytes per instance does not fit this host's address space"
                ),
            });
        }
        let pointer = std::mem::size_of::<usize>() as u64;
        let page = 4096;
        let guard = self.memory_guard_bytes.next_multiple_of(page);
        Ok(PoolingPlan {
            total_instances: self.total_instances,
            max_memory_per_instance: per_instance,
            memory_guard_bytes: guard,
            reserved_memory_bytes: per_instance.saturating_add(guard).saturating_mul(instances),
            reserved_table_bytes: instances
                * u64::from(POOL_TABLES_PER_INSTANCE)
                * (POOL_TABLE_ELEMENTS as u64 * pointer).next_multiple_of(page),
            // Each stack has a guard page below it.
            reserved_stack_bytes: instances * (ASYNC_STACK_BYTES + page),
        })
    }
}

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
    pub stdout: Arc<dyn OutputSink>,
    pub stderr: Arc<dyn OutputSink>,
    pub limits: Limits,
    /// Host directories visible to the guest. Default: none.
    pub preopens: Vec<Preopen>,
    /// Whether the guest may use sockets (TCP, UDP, to any address the host can reach), resolve
    /// names and, for components, make outgoing `wasi:http` requests. Default `false`.
    pub network: bool,
}

impl RunOptions {
    /// Options with no args, env, preopens, network or limits.
    pub fn new(program_name: impl Into<String>, stdout: Arc<dyn OutputSink>, stderr: Arc<dyn OutputSink>) -> Self {
        RunOptions {
            program_name: program_name.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdout,
            stderr,
            limits: Limits::default(),
            preopens: Vec::new(),
            network: false,
        }
    }
}

/// How a program run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `_start` returned (0) or the guest called `proc_exit(n)`; for components, `wasi:cli/run`
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

/// A compiled, linked, pre-instantiated program ready to be started cheaply. Cloning is cheap.
#[derive(Clone)]
pub struct Program {
    inner: Arc<ProgramInner>,
}

struct ProgramInner {
    digest: String,
    engine: Engine,
    pre: Pre,
}

enum Pre {
    Module(InstancePre<StoreState>),
    Command(CommandPre<ComponentState>),
    Http(ProxyPre<ComponentState>),
}

impl Program {
    /// The content digest (`sha256:<hex>`) this program was loaded under.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Module or component.
    pub fn kind(&self) -> ProgramKind {
        match self.inner.pre {
            Pre::Module(_) => ProgramKind::Module,
            Pre::Command(_) | Pre::Http(_) => ProgramKind::Component,
        }
    }

    /// Whether this is a component exporting `wasi:http/incoming-handler` (serve it with
    /// [`WasmHost::serve_http`]; [`WasmHost::run`] refuses it).
    pub fn is_http(&self) -> bool {
        matches!(self.inner.pre, Pre::Http(_))
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("digest", &self.inner.digest)
            .field("kind", &self.kind())
            .field("is_http", &self.is_http())
            .finish_non_exhaustive()
    }
}

/// The wasmtime host: one engine, its linkers, loaded programs and the compile cache.
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
    component_linker: wasmtime::component::Linker<ComponentState>,
    /// `<cache_dir>/<engine compatibility hash>`: artifacts here deserialize in `engine`.
    artifact_dir: PathBuf,
    /// The (clamped) epoch tick: the unit of CPU-time accounting.
    epoch_tick: Duration,
    /// Engine-wide cap on one instance's linear memory (config or pooling slot size).
    max_memory_per_instance: Option<u64>,
    fuel: bool,
    pooling: Option<PoolingPlan>,
    programs: Mutex<HashMap<String, Program>>,
    /// Digests being loaded right now: the lock their loaders queue on and how many loaders
    /// hold or wait for it.
    loading: Mutex<HashMap<String, InFlight>>,
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

/// Store data of one core-module run.
struct StoreState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// Store data of one component run or one HTTP request.
struct ComponentState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    limiter: MemoryLimiter,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Outgoing `wasi:http` requests are only allowed with network access.
struct HttpHooks {
    network: bool,
}

type SendRequestFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                hyper::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendRequestFuture {
        if !self.network {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}

trait HasLimiter {
    fn limiter(&mut self) -> &mut MemoryLimiter;
}

impl HasLimiter for StoreState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl HasLimiter for ComponentState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

/// What a guest gets to see, shared by [`RunOptions`] and [`HttpOptions`].
struct GuestEnv<'a> {
    program_name: &'a str,
    args: &'a [String],
    env: &'a [(String, String)],
    stdout: &'a Arc<dyn OutputSink>,
    stderr: &'a Arc<dyn OutputSink>,
    preopens: &'a [Preopen],
    network: bool,
}

impl GuestEnv<'_> {
    fn wasi_builder(&self) -> Result<WasiCtxBuilder, Error> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg(self.program_name)
            .args(self.args)
            .envs(self.env)
            .stdout(SinkStream(self.stdout.clone()))
            .stderr(SinkStream(self.stderr.clone()))
            .allow_tcp(self.network)
            .allow_udp(self.network)
            .allow_ip_name_lookup(self.network);
        if self.network {
            wasi.inherit_network();
        }
        for preopen in self.preopens {
            let perms = if preopen.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            wasi.preopened_dir(&preopen.host, &preopen.guest, perms).map_err(|e| Error::Preopen {
                host: preopen.host.clone(),
                guest: preopen.guest.clone(),
                reason: one_line(&e),
            })?;
        }
        Ok(wasi)
    }

    fn component_state(&self, limiter: MemoryLimiter) -> Result<ComponentState, Error> {
        Ok(ComponentState {
            wasi: self.wasi_builder()?.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: HttpHooks { network: self.network },
            limiter,
        })
    }
}

/// A load in progress: the lock its loaders queue on, and how many loaders hold or wait for it.
type InFlight = (Arc<Mutex<()>>, usize);

/// Translates the host configuration into wasmtime's.
fn engine_config(cfg: &HostConfig) -> Result<(Config, Option<PoolingPlan>), Error> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(cfg.fuel);

    let plan = cfg.pooling.map(|p| p.plan()).transpose()?;
    match plan {
        Some(plan) => {
            let n = plan.total_instances;
            let slot = cfg.max_memory_per_instance.map_or(plan.max_memory_per_instance, |max| {
                (max.next_multiple_of(WASM_PAGE_SIZE)).min(plan.max_memory_per_instance)
            });
            let slot_usize = usize::try_from(slot).unwrap_or(usize::MAX);
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(POOL_CORE_INSTANCES_PER_INSTANCE))
                .max_core_instances_per_component(POOL_CORE_INSTANCES_PER_INSTANCE)
                .total_memories(n)
                .max_memories_per_module(1)
                .max_memories_per_component(1)
                .max_memory_size(slot_usize)
                .total_tables(n.saturating_mul(POOL_TABLES_PER_INSTANCE))
                .max_tables_per_component(POOL_TABLES_PER_INSTANCE)
                .table_elements(POOL_TABLE_ELEMENTS)
                .total_stacks(n)
                .total_gc_heaps(n);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            // Each memory slot is exactly its maximum size plus the planned guard, never more.
            config.memory_reservation(slot);
            config.memory_guard_size(plan.memory_guard_bytes);
            config.memory_reservation_for_growth(0);
            config.guard_before_linear_memory(false);
        }
        None => {
            let reservation =
                cfg.memory_reservation.or(cfg.max_memory_per_instance.map(|m| m.next_multiple_of(WASM_PAGE_SIZE)));
            if let Some(bytes) = reservation {
                config.memory_reservation(bytes);
                if cfg.max_memory_per_instance.is_some() {
                    // Memories never grow past the cap, so relocation headroom is useless.
                    config.memory_reservation_for_growth(0);
                }
            }
            if let Some(bytes) = cfg.memory_guard_size {
                config.memory_guard_size(bytes);
            }
        }
    }
    Ok((config, plan))
}

impl WasmHost {
    /// Creates the engine (and, with [`HostConfig::pooling`], its preallocated pools), the cache
    /// directory and the epoch ticker thread.
    pub fn new(cfg: HostConfig) -> Result<Self, Error> {
        let (config, pooling) = engine_config(&cfg)?;
        let engine = Engine::new(&config).map_err(|e| Error::Engine { reason: one_line(&e) })?;

        let mut linker: Linker<StoreState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut StoreState| &mut s.wasi)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi preview 1 to linker: {e:#}") })?;

        let mut component_linker = wasmtime::component::Linker::<ComponentState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi 0.2 to component linker: {e:#}") })?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi:http to component linker: {e:#}") })?;

        let artifact_dir = cfg.cache_dir.join(engine_hash_hex(&engine));
        std::fs::create_dir_all(&artifact_dir).map_err(|e| Error::io("create cache directory", &artifact_dir, e))?;

        let tick = cfg.epoch_tick.max(Duration::from_micros(100));
        let max_memory_per_instance = match (cfg.max_memory_per_instance, pooling) {
            (Some(max), Some(plan)) => Some(max.min(plan.max_memory_per_instance)),
            (max, plan) => max.or(plan.map(|p| p.max_memory_per_instance)),
        };
        let inner = Arc::new(HostInner {
            engine,
            linker,
            component_linker,
            artifact_dir,
            epoch_tick: tick,
            max_memory_per_instance,
            fuel: cfg.fuel,
            pooling,
            programs: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            loaded_from_disk: AtomicU64::new(0),
            memory_hits: AtomicU64::new(0),
            ticker: OnceLock::new(),
            #[cfg(test)]
            ticker_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        });

        let weak = Arc::downgrade(&inner);
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

    /// The pooling allocator's sizing, if [`HostConfig::pooling`] was set.
    pub fn pooling_plan(&self) -> Option<PoolingPlan> {
        self.inner.pooling
    }

    /// Directory holding this engine's compiled artifacts (`<cache_dir>/<engine hash>`).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.artifact_dir
    }

    /// Path of the compiled artifact of `digest` as a program of `kind`
    /// (`<artifact_dir>/<hex>.module.cwasm` or `<hex>.component.cwasm`; it need not exist).
    pub fn artifact_path_for(&self, digest: &str, kind: ProgramKind) -> Result<PathBuf, Error> {
        let hex = digest_hex(digest)?;
        Ok(self.inner.artifact_dir.join(format!("{hex}.{}", kind.file_suffix())))
    }

    /// Path of the compiled artifact for `digest`: the component artifact if one exists, else
    /// the module artifact path (which need not exist).
    pub fn artifact_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let component = self.artifact_path_for(digest, ProgramKind::Component)?;
        if component.is_file() {
            return Ok(component);
        }
        self.artifact_path_for(digest, ProgramKind::Module)
    }

    /// Drops the in-memory program for `digest` (the disk cache entry stays). Returns whether it
    /// was loaded. Running instances are unaffected.
    pub fn unload(&self, digest: &str) -> bool {
        lock(&self.inner.programs).remove(digest).is_some()
    }

    /// Blocking (use `spawn_blocking`). Loads the module or component whose content digest is
    /// `digest` (`sha256:<64 hex>`) from `wasm_path`: from memory if already loaded, else from
    /// the disk cache, else by compiling it (after checking that the file matches `digest`) and
    /// writing the cache entry. A corrupt cache entry is deleted and rebuilt.
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
        if let Some(program) = self.memory_hit(digest) {
            return Ok(program);
        }
        // Single flight: a thousand replicas of a new image compile it once. Loads of one
        // digest queue behind a per-digest lock; the first fills the in-memory map and the rest
        // find it there. Different digests compile in parallel.
        let flight = {
            let mut loading = lock(&self.inner.loading);
            let entry = loading.entry(digest.to_string()).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        let result = {
            let _turn = lock(&flight);
            self.load_uncached(digest, read)
        };
        let mut loading = lock(&self.inner.loading);
        // The last loader out removes the entry.
        if let Some(entry) = loading.get_mut(digest) {
            entry.1 -= 1;
            if entry.1 == 0 {
                loading.remove(digest);
            }
        }
        result
    }

    /// The program already in memory, counted as a hit.
    fn memory_hit(&self, digest: &str) -> Option<Program> {
        let program = lock(&self.inner.programs).get(digest).cloned()?;
        self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(program)
    }

    fn load_uncached<'b>(
        &self,
        digest: &str,
        read: impl FnOnce() -> Result<std::borrow::Cow<'b, [u8]>, Error>,
    ) -> Result<Program, Error> {
        // A loader that waited its turn finds what the one before it compiled.
        if let Some(program) = self.memory_hit(digest) {
            return Ok(program);
        }
        if let Some(artifact) = self.load_cached(digest)? {
            let program = self.link(digest, &artifact)?;
            return Ok(self.remember(program));
        }

        let bytes = read()?;
        let kind = ProgramKind::detect(&bytes);
        let started = Instant::now();
        let invalid =
            |e: wasmtime::Error| Error::InvalidModule { kind, digest: digest.to_string(), reason: one_line(&e) };
        let artifact = match kind {
            ProgramKind::Module => Artifact::Module(Module::from_binary(&self.inner.engine, &bytes).map_err(invalid)?),
            ProgramKind::Component => {
                Artifact::Component(Component::from_binary(&self.inner.engine, &bytes).map_err(invalid)?)
            }
        };
        self.inner.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(digest, %kind, elapsed = ?started.elapsed(), "compiled wasm program");
        // Link before caching so that unusable programs do not fill the cache.
        let program = self.link(digest, &artifact)?;
        self.store_cached(digest, &artifact);
        Ok(self.remember(program))
    }

    /// Returns the cached module or component, or `None` if there is no usable entry (a corrupt
    /// one is removed).
    fn load_cached(&self, digest: &str) -> Result<Option<Artifact>, Error> {
        for kind in [ProgramKind::Module, ProgramKind::Component] {
            let path = self.artifact_path_for(digest, kind)?;
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "wasm cache entry is not a regular file; ignoring it");
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot stat wasm cache entry; recompiling");
                    continue;
                }
            }
            let engine = &self.inner.engine;
            let loaded = match kind {
                // SAFETY: `path` lies in this host's private cache directory, under a
                // subdirectory named by this engine's precompile compatibility hash, and files
                // there are only ever written by `store_cached` (from `Module::serialize` of this
                // same engine configuration, under the `.module.cwasm` name) via a temp file +
                // rename, so the file is a wasmtime module artifact produced for a compatible
                // engine and is never modified in place while mapped (replacement happens by
                // rename, which leaves the mapped inode intact). Wasmtime additionally validates
                // the header, the artifact kind and engine compatibility, and any failure is
                // handled below by deleting and rebuilding the entry.
                ProgramKind::Module => unsafe { Module::deserialize_file(engine, &path) }.map(Artifact::Module),
                // SAFETY: as for modules above: the `.component.cwasm` file was written only by
                // `store_cached` from `Component::serialize` of this same engine configuration,
                // atomically via temp file + rename into this host's private, engine-specific
                // cache directory, and is never modified in place; wasmtime validates the header,
                // kind and compatibility, and failures delete and rebuild the entry.
                ProgramKind::Component => {
                    unsafe { Component::deserialize_file(engine, &path) }.map(Artifact::Component)
                }
            };
            match loaded {
                Ok(artifact) => {
                    self.inner.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(digest, %kind, path = %path.display(), "loaded compiled wasm program from cache");
                    return Ok(Some(artifact));
                }
                Err(e) => {
                    tracing::warn!(digest, path = %path.display(), error = %format!("{e:#}"), "corrupt wasm cache entry; deleting and recompiling");
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt wasm cache entry");
                    }
                }
            }
        }
        Ok(None)
    }

    /// Writes the compiled artifact atomically. Failure only costs a future recompile, so it is
    /// logged rather than returned.
    fn store_cached(&self, digest: &str, artifact: &Artifact) {
        let Ok(path) = self.artifact_path_for(digest, artifact.kind()) else { return };
        let serialized = match artifact {
            Artifact::Module(module) => module.serialize(),
            Artifact::Component(component) => component.serialize(),
        };
        let bytes = match serialized {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot serialize compiled wasm program");
                return;
            }
        };
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::warn!(error = %e, "cannot write wasm cache entry");
        }
        // Entries written by earlier versions were named `<hex>.cwasm`; they are never read.
        if let Ok(hex) = digest_hex(digest) {
            let _ = std::fs::remove_file(self.inner.artifact_dir.join(format!("{hex}.cwasm")));
        }
    }

    fn link(&self, digest: &str, artifact: &Artifact) -> Result<Program, Error> {
        let pre = match artifact {
            Artifact::Module(module) => Pre::Module(self.link_module(digest, module)?),
            Artifact::Component(component) => self.link_component(digest, component)?,
        };
        Ok(Program {
            inner: Arc::new(ProgramInner { digest: digest.to_string(), engine: self.inner.engine.clone(), pre }),
        })
    }

    fn link_module(&self, digest: &str, module: &Module) -> Result<InstancePre<StoreState>, Error> {
        match module.get_export("_start") {
            None => {
                return Err(Error::MissingStart { digest: digest.to_string() });
            }
            Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
            Some(other) => {
                return Err(Error::BadStart { digest: digest.to_string(), found: describe_extern(&other) });
            }
        }
        self.inner.linker.instantiate_pre(module).map_err(|e| Error::Link {
            kind: ProgramKind::Module,
            digest: digest.to_string(),
            reason: one_line(&e),
        })
    }

    fn link_component(&self, digest: &str, component: &Component) -> Result<Pre, Error> {
        let engine = &self.inner.engine;
        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
        let exports_interface = |iface: &str| {
            exports.iter().any(|name| name.split_once('@').map_or(*name, |(unversioned, _)| unversioned) == iface)
        };
        let http = exports_interface("wasi:http/incoming-handler");
        let cli = exports_interface("wasi:cli/run");
        if !http && !cli {
            let exports = if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") };
            return Err(Error::NotRunnable { digest: digest.to_string(), exports });
        }
        let link_error = |e: wasmtime::Error| Error::Link {
            kind: ProgramKind::Component,
            digest: digest.to_string(),
            reason: one_line(&e),
        };
        let pre = self.inner.component_linker.instantiate_pre(component).map_err(link_error)?;
        if http {
            Ok(Pre::Http(ProxyPre::new(pre).map_err(link_error)?))
        } else {
            Ok(Pre::Command(CommandPre::new(pre).map_err(link_error)?))
        }
    }

    /// Inserts `program` unless another thread raced us, in which case theirs wins.
    fn remember(&self, program: Program) -> Program {
        lock(&self.inner.programs).entry(program.inner.digest.clone()).or_insert(program).clone()
    }

    fn check_program(&self, program: &Program) -> Result<(), Error> {
        if !Engine::same(&program.inner.engine, &self.inner.engine) {
            return Err(Error::ForeignProgram { digest: program.digest().to_string() });
        }
        Ok(())
    }

    fn check_limits(&self, limits: &Limits) -> Result<(), Error> {
        match limits.fuel {
            Some(fuel) if !self.inner.fuel => Err(Error::FuelDisabled { fuel }),
            _ => Ok(()),
        }
    }

    fn memory_limiter(&self, limits: &Limits) -> MemoryLimiter {
        let limit = match (limits.memory_bytes, self.inner.max_memory_per_instance) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        MemoryLimiter::new(limit)
    }

    /// Applies memory, CPU-time and fuel limits and time slicing to a fresh store.
    fn configure_store<T: HasLimiter + 'static>(&self, store: &mut Store<T>, limits: &Limits) -> Result<(), Error> {
        store.limiter(|s| s.limiter());
        if self.inner.fuel {
            store
                .set_fuel(limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| Error::Engine { reason: format!("cannot set fuel: {}", one_line(&e)) })?;
        }
        store.set_epoch_deadline(1);
        match limits.cpu_time {
            None => store.epoch_deadline_async_yield_and_update(1),
            Some(budget) => {
                // The callback only runs when the deadline passes while wasm code executes, so
                // each call is (at most) one tick of guest CPU time.
                let tick_nanos = self.inner.epoch_tick.as_nanos().max(1);
                let budget_nanos = budget.as_nanos();
                let mut ticks: u128 = 0;
                store.epoch_deadline_callback(move |_| {
                    ticks += 1;
                    if ticks * tick_nanos > budget_nanos {
                        return Err(wasmtime::Error::new(CpuTimeExceeded { limit: budget }));
                    }
                    Ok(UpdateDeadline::Yield(1))
                });
            }
        }
        Ok(())
    }

    /// Runs a program to completion: a module's `_start`, or a component's `wasi:cli/run`.
    /// Cancel by dropping the future: the guest yields to the executor every epoch tick, even
    /// inside an infinite loop. HTTP components are refused ([`Error::ServesHttp`]).
    pub async fn run(&self, program: &Program, opts: RunOptions) -> Result<Exit, Error> {
        self.check_program(program)?;
        self.check_limits(&opts.limits)?;
        let digest = program.digest();
        let env = GuestEnv {
            program_name: &opts.program_name,
            args: &opts.args,
            env: &opts.env,
            stdout: &opts.stdout,
            stderr: &opts.stderr,
            preopens: &opts.preopens,
            network: opts.network,
        };
        match &program.inner.pre {
            Pre::Module(pre) => self.run_module(digest, pre, &env, &opts.limits).await,
            Pre::Command(pre) => self.run_command(digest, pre, &env, &opts.limits).await,
            Pre::Http(_) => Err(Error::ServesHttp { digest: digest.to_string() }),
        }
    }

    async fn run_module(
        &self,
        digest: &str,
        pre: &InstancePre<StoreState>,
        env: &GuestEnv<'_>,
        limits: &Limits,
    ) -> Result<Exit, Error> {
        let state = StoreState { wasi: env.wasi_builder()?.build_p1(), limiter: self.memory_limiter(limits) };
        let mut store = Store::new(&self.inner.engine, state);
        self.configure_store(&mut store, limits)?;

        let instance = match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            // A trap in the module's start section is the guest's doing.
            Err(e) if e.downcast_ref::<Trap>().is_some() => {
                return Ok(Exit::Trap(describe_guest_failure(&e)));
            }
            Err(e) => {
                return Err(Error::Instantiate {
                    kind: ProgramKind::Module,
                    digest: digest.to_string(),
                    reason: one_line(&e),
                });
            }
        };
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| Error::MissingStart { digest: digest.to_string() })?;
        Ok(guest_exit(digest, start.call_async(&mut store, ()).await.map(|()| 0)))
    }

    async fn run_command(
        &self,
        digest: &str,
        pre: &CommandPre<ComponentState>,
        env: &GuestEnv<'_>,
        limits: &Limits,
    ) -> Result<Exit, Error> {
        let mut store = Store::new(&self.inner.engine, env.component_state(self.memory_limiter(limits))?);
        self.configure_store(&mut store, limits)?;
        let command = match pre.instantiate_async(&mut store).await {
            Ok(command) => command,
            Err(e) if is_guest_failure(&e) => return Ok(Exit::Trap(describe_guest_failure(&e))),
            Err(e) => {
                return Err(Error::Instantiate {
                    kind: ProgramKind::Component,
                    digest: digest.to_string(),
                    reason: one_line(&e),
                });
            }
        };
        let result = command.wasi_cli_run().call_run(&mut store).await;
        Ok(guest_exit(digest, result.map(|r| if r.is_ok() { 0 } else { 1 })))
    }
}

/// Maps the outcome of a guest's entry point to an [`Exit`].
fn guest_exit(digest: &str, result: wasmtime::Result<i32>) -> Exit {
    match result {
        Ok(code) => Exit::Code(code),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Exit::Code(exit.0),
            None => {
                let reason = describe_guest_failure(&e);
                tracing::debug!(digest, %reason, "wasm guest trapped");
                Exit::Trap(reason)
            }
        },
    }
}

/// Whether an instantiation error is the guest's doing (a trap in a start function or a limit
/// hit while running it) rather than the host's.
fn is_guest_failure(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<Trap>().is_some() || e.downcast_ref::<CpuTimeExceeded>().is_some()
}

/// The error an epoch-deadline callback raises when [`Limits::cpu_time`] is used up.
#[derive(Debug)]
struct CpuTimeExceeded {
    limit: Duration,
}

impl fmt::Display for CpuTimeExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu time limit of {:?} exceeded", self.limit)
    }
}

impl std::error::Error for CpuTimeExceeded {}

/// A freshly compiled or deserialized program, before linking.
enum Artifact {
    Module(Module),
    Component(Component),
}

impl Artifact {
    fn kind(&self) -> ProgramKind {
        match self {
            Artifact::Module(_) => ProgramKind::Module,
            Artifact::Component(_) => ProgramKind::Component,
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
        Some(Trap::OutOfFuel) => "fuel exhausted".to_string(),
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
