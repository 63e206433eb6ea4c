//! One trait over the agent's runtimes. The supervisor decides *that* a replica runs; a
//! [`Runtime`] makes one run happen: fetch the artifact, start it, wait for its end. Wasm is
//! adapted here from `wasm-runtime` and `oci-runtime`; containers sit behind the same trait
//! in [`crate::container`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::collections::HashMap;

use oci_runtime::{ImageStore, PulledWasm, Registry};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use proto::manifest::{NetworkMode, ReplicaTemplate, Runtime as RuntimeKind, Volume};
use proto::messages::{EventReason, Termination};
use tokio::sync::{mpsc, watch};
use wasm_runtime::{Exit, HttpOptions, Limits, Preopen, RunOptions, Shutdown, WasmHost};

use crate::handoff::Sockets;
use crate::logs::LogSink;
use crate::probe::Verdict;
use crate::prober::ProbeTarget;
use crate::wasm_usage::WasmUsage;

/// Why a run could not get what it needs before it starts: disk space, its artifact, its
/// volumes. Shown to users as the run's start failure.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot check free disk space on {}: {error}", path.display())]
    DiskSpaceUnknown { path: PathBuf, error: nix::Error },
    #[error(
        "not enough disk space on {}: {} MiB free, {} MiB required (--min-free-disk)",
        path.display(),
        free >> 20,
        required.div_ceil(1 << 20)
    )]
    DiskFull { path: PathBuf, free: u64, required: u64 },
    #[error(transparent)]
    Image(#[from] oci_runtime::ImageError),
    #[error("volume {volume}: host path {} is not a directory on this node", path.display())]
    VolumeNotDirectory { volume: String, path: PathBuf },
    #[error("volume {volume}: cannot create {}: {error}", path.display())]
    VolumeCreate { volume: String, path: PathBuf, error: std::io::Error },
}

/// What the shell learns about a run.
#[derive(Debug)]
pub enum RunEvent {
    /// The workload runs; `target` says how its probes reach it. `adopted` is set when the
    /// run took over a workload an earlier agent process started (it did not start again).
    Started { replica: String, run_id: u64, target: ProbeTarget, adopted: Option<String> },
    Exited {
        replica: String,
        run_id: u64,
        how: RunEnd,
        /// The last lines the run wrote ([`crate::logs::last_output`]); empty when it detached.
        last_output: Vec<String>,
    },
    /// A verdict of the run's health probes.
    Probe { replica: String, run_id: u64, verdict: Verdict },
    /// A step of a start worth an event (a pull, a compile).
    Progress { replica: String, run_id: u64, reason: proto::messages::EventReason, message: String },
}

/// What the agent wants of a run in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunControl {
    /// Keep running.
    Run,
    /// Stop the workload: an update, a removal, a failed probe, or an agent that exits with
    /// `--stop-workloads-on-exit`.
    Stop,
    /// The agent process is exiting and a new one will take over: leave the workload running
    /// where it can outlive this process (a container, with its shim), hand over what can be
    /// handed over (the listening socket of a Wasm HTTP component), and return at once.
    Detach,
}

/// How a run's future ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The workload ended (or could not start).
    Ended(Termination),
    /// The run let go of a workload that goes on without this process (see
    /// [`RunControl::Detach`]); nothing ended.
    Detached,
}

/// Everything one run needs.
pub struct RunContext {
    pub replica: String,
    pub run_id: u64,
    pub template: ReplicaTemplate,
    pub log: Arc<LogSink>,
    /// Leaves [`RunControl::Run`] when the agent wants the run stopped or detached.
    pub stop: watch::Receiver<RunControl>,
    events: mpsc::UnboundedSender<RunEvent>,
}

impl RunContext {
    pub fn new(
        replica: String,
        run_id: u64,
        template: ReplicaTemplate,
        log: Arc<LogSink>,
        stop: watch::Receiver<RunControl>,
        events: mpsc::UnboundedSender<RunEvent>,
    ) -> Self {
        RunContext { replica, run_id, template, log, stop, events }
    }

    /// Tells the supervisor the workload is now running in the agent's own network namespace
    /// (Wasm), where HTTP and TCP probes reach it on 127.0.0.1.
    pub fn started(&self) {
        self.started_at(ProbeTarget::default());
    }

    /// Tells the supervisor the workload is now running, reachable by its probes as `target`
    /// says.
    pub fn started_at(&self, target: ProbeTarget) {
        let started = RunEvent::Started { replica: self.replica.clone(), run_id: self.run_id, target, adopted: None };
        let _ = self.events.send(started);
    }

    /// Tells the supervisor of a step of the start (`Pulling`, `Pulled`, `Compiled`), which
    /// becomes one of the replica's events.
    pub fn progress(&self, reason: proto::messages::EventReason, message: impl Into<String>) {
        let (replica, run_id, message) = (self.replica.clone(), self.run_id, message.into());
        let _ = self.events.send(RunEvent::Progress { replica, run_id, reason, message });
    }

    /// Tells the supervisor the run took over a workload that an earlier agent process
    /// started and that kept running meanwhile (`how` says what was adopted).
    pub fn adopted(&self, target: ProbeTarget, how: String) {
        let started =
            RunEvent::Started { replica: self.replica.clone(), run_id: self.run_id, target, adopted: Some(how) };
        let _ = self.events.send(started);
    }
}

pub type RunFuture = Pin<Box<dyn Future<Output = RunEnd> + Send>>;

pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Runs one run of a replica to its end. Calls `ctx.started()` once the workload runs;
    /// returns how it ended. When `ctx.stop` says [`RunControl::Stop`] it stops the workload
    /// and returns; on [`RunControl::Detach`] it lets go of it and returns
    /// [`RunEnd::Detached`] (a workload that cannot outlive the agent just ends).
    fn run(&self, ctx: RunContext) -> RunFuture;
}

/// The registry client, built on first use (a pull). Building it (TLS roots, HTTP clients)
/// takes a while on a small board, and an agent restarting with its images already local
/// never needs it: its Wasm replicas and HTTP listeners come back that much sooner.
pub type LazyRegistry = std::sync::LazyLock<Registry, Box<dyn FnOnce() -> Registry + Send>>;

/// Wasm modules and components from OCI registries under wasmtime: commands run to their
/// end, `wasi:http` components are served on the workload's port until stopped.
pub struct WasmRuntime {
    pub host: WasmHost,
    pub registry: Arc<LazyRegistry>,
    /// The node's one artifact store, shared with the container runtime.
    pub images: ImageStore,
    pub volumes: VolumeStore,
    /// Images this agent process already pulled: restarts and new replicas of the same
    /// reference start from the verified blob without asking the registry (Kubernetes'
    /// IfNotPresent). A moved tag is picked up by a new tag, a digest reference or an agent
    /// restart.
    pub resolved: Arc<std::sync::Mutex<HashMap<String, PulledWasm>>>,
    /// One pull and one compile per image however many replicas start at once: the first
    /// replica of an image does them, the others wait and then find the results cached.
    preparing: Arc<KeyedLocks>,
    /// Pulls are refused while the disk has less than this free.
    pub min_free_disk: u64,
    /// Listening sockets of HTTP components handed over by the previous agent process, and
    /// those this process hands on when it exits.
    pub sockets: Arc<Sockets>,
    /// Where each run's CPU time and memory are counted, for metrics and `flotilla top`.
    pub usage: WasmUsage,
    /// Where pulls are counted, for metrics.
    pub pulls: crate::metrics::Pulls,
    /// The handlers of the HTTP components serving now, for the node's gateway to call
    /// in-process.
    pub handlers: crate::gateway::Handlers,
}

/// Async locks by key, created on demand and forgotten when nobody holds or waits for them.
#[derive(Default)]
pub struct KeyedLocks {
    // std Mutex: held only to look up or insert an entry, never across an await.
    locks: std::sync::Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            match locks.get(key).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    locks.retain(|_, weak| weak.strong_count() > 0);
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.to_string(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

impl WasmRuntime {
    pub fn new(
        host: WasmHost,
        registry: Arc<LazyRegistry>,
        images: ImageStore,
        volumes: VolumeStore,
        sockets: Arc<Sockets>,
    ) -> Self {
        WasmRuntime {
            host,
            registry,
            images,
            volumes,
            resolved: Default::default(),
            preparing: Default::default(),
            min_free_disk: 0,
            sockets,
            usage: WasmUsage::default(),
            pulls: Default::default(),
            handlers: Default::default(),
        }
    }
}

/// A duration as events and logs show it: milliseconds below ten seconds, else seconds.
pub fn took(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The image's module in the artifact store: from this process's earlier pull when its blob
/// is still there, else pulled (digest-verified) now.
async fn fetch(
    ctx: &RunContext,
    registry: &LazyRegistry,
    images: &ImageStore,
    resolved: &std::sync::Mutex<HashMap<String, PulledWasm>>,
    min_free_disk: u64,
    pulls: &crate::metrics::Pulls,
) -> Result<PulledWasm, PrepareError> {
    let image = ctx.template.image.as_str();
    let known = resolved.lock().unwrap_or_else(|p| p.into_inner()).get(image).cloned();
    if let Some(p) = known
        && p.path.exists()
    {
        return Ok(p);
    }
    // Pulled or imported before, by an earlier agent process too (IfNotPresent across
    // restarts): start from the verified blob at once, with no registry contact. After a
    // reboot with the network down this is the difference between running at once and
    // waiting for connects to time out.
    if let Ok(p) = images.wasm(image) {
        resolved.lock().unwrap_or_else(|p| p.into_inner()).insert(image.to_string(), p.clone());
        return Ok(p);
    }
    check_disk_space(images.blobs().root(), min_free_disk)?;
    ctx.progress(EventReason::Pulling, image);
    let started = std::time::Instant::now();
    let pulled = images.pull_wasm(registry, image).await;
    let elapsed = started.elapsed();
    // A module found in the store because the registry was unreachable fetched nothing.
    let fetched = |p: &PulledWasm| if p.from_cache { 0 } else { std::fs::metadata(&p.path).map_or(0, |m| m.len()) };
    pulls.record(crate::metrics::PullKind::Wasm, elapsed, pulled.as_ref().map(fetched).map_err(|_| ()));
    let pulled = pulled?;
    ctx.progress(EventReason::Pulled, format!("{image} in {}", took(elapsed)));
    resolved.lock().unwrap_or_else(|p| p.into_inner()).insert(image.to_string(), pulled.clone());
    Ok(pulled)
}

/// Refuses work that writes to the node's disk (a pull, an unpack, a container's writable
/// layer) when the file system holding `path` has less than `min_free` bytes left for
/// unprivileged use, so that a full disk is a clear start failure (retried with back-off)
/// rather than a half-written image or a node that cannot log.
pub fn check_disk_space(path: &std::path::Path, min_free: u64) -> Result<(), PrepareError> {
    if min_free == 0 {
        return Ok(());
    }
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|error| PrepareError::DiskSpaceUnknown { path: path.to_path_buf(), error })?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    if free < min_free {
        return Err(PrepareError::DiskFull { path: path.to_path_buf(), free, required: min_free });
    }
    Ok(())
}

/// Per-replica scratch directories: `<dir>/<replica>/<volume>`, removed when the replica
/// leaves the node.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    pub fn new(dir: PathBuf) -> Self {
        VolumeStore { dir }
    }

    /// The host directory of each of a replica's volumes, scratch ones created on the way.
    pub fn host_dirs<'v>(
        &self,
        replica: &str,
        volumes: &'v [Volume],
    ) -> Result<Vec<(PathBuf, &'v Volume)>, PrepareError> {
        volumes
            .iter()
            .map(|v| {
                let host = match &v.host_path {
                    Some(p) => {
                        let p = PathBuf::from(p);
                        if !p.is_dir() {
                            return Err(PrepareError::VolumeNotDirectory { volume: v.name.clone(), path: p });
                        }
                        p
                    }
                    None => {
                        let p = self.dir.join(replica).join(&v.name);
                        if let Err(error) = std::fs::create_dir_all(&p) {
                            return Err(PrepareError::VolumeCreate { volume: v.name.clone(), path: p, error });
                        }
                        p
                    }
                };
                Ok((host, v))
            })
            .collect()
    }

    /// The directories a replica's volumes map to, as Wasm preopens.
    fn preopens(&self, replica: &str, volumes: &[Volume]) -> Result<Vec<Preopen>, PrepareError> {
        Ok(self
            .host_dirs(replica, volumes)?
            .into_iter()
            .map(|(host, v)| Preopen { host, guest: v.mount_path.clone(), read_only: v.read_only })
            .collect())
    }

    /// Deletes a replica's scratch directories.
    pub fn remove(&self, replica: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join(replica));
    }
}

/// Instances one HTTP workload runs at once when the manifest does not say.
const DEFAULT_HTTP_CONCURRENCY: usize = 64;

impl Runtime for WasmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }

    fn run(&self, mut ctx: RunContext) -> RunFuture {
        let host = self.host.clone();
        let registry = self.registry.clone();
        let images = self.images.clone();
        let volumes = self.volumes.clone();
        let resolved = self.resolved.clone();
        let preparing = self.preparing.clone();
        let sockets = self.sockets.clone();
        let min_free_disk = self.min_free_disk;
        let usage = self.usage.clone();
        let pulls = self.pulls.clone();
        let handlers = self.handlers.clone();
        Box::pin(async move {
            let failed = |message: String| RunEnd::Ended(Termination::StartFailed { message });
            let t = &ctx.template;
            // The module stays in the store for as long as this run lasts.
            let _hold = images.hold(&t.image);
            let preparing = preparing.lock(&t.image).await;
            let pulled = match fetch(&ctx, &registry, &images, &resolved, min_free_disk, &pulls).await {
                Ok(p) => p,
                Err(e) => return failed(e.to_string()),
            };
            let (h, digest, path) = (host.clone(), pulled.wasm_digest.clone(), pulled.path.clone());
            let program = match tokio::task::spawn_blocking(move || h.load_from(&digest, &path)).await {
                Ok(Ok((p, how))) => {
                    if let wasm_runtime::Loaded::Compiled { kind, elapsed } = how {
                        ctx.progress(EventReason::Compiled, format!("{kind} in {}", took(elapsed)));
                    }
                    p
                }
                Ok(Err(e)) => return failed(e.to_string()),
                Err(e) => return failed(format!("module compilation did not finish: {e}")),
            };
            drop(preparing);
            let preopens = match volumes.preopens(&ctx.replica, &t.volumes) {
                Ok(p) => p,
                Err(e) => return failed(e.to_string()),
            };
            let limits = Limits {
                memory_bytes: t.memory_bytes,
                cpu_time: t.cpu_time_ms.map(Duration::from_millis),
                fuel: t.fuel,
            };
            let env: Vec<(String, String)> = t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let network = t.network == NetworkMode::Host;
            // Listed from here until this run's future ends (its guests are gone by then).
            let metering = usage.track(&ctx.replica);
            // A guest never outlives the agent's process, so every run here is a new one:
            // the log so far becomes the previous run's (`flotilla logs --previous`).
            ctx.log.begin_run();
            match (t.http, program.is_http()) {
                (Some(http), true) => {
                    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, http.port));
                    let mut o = HttpOptions::new(addr, ctx.log.clone(), ctx.log.clone());
                    o.max_concurrency = http.max_concurrency.map_or(DEFAULT_HTTP_CONCURRENCY, |c| c as usize);
                    o.program_name = ctx.replica.clone();
                    o.args = t.args.clone();
                    (o.env, o.preopens, o.network, o.limits) = (env, preopens, network, limits);
                    o.usage = Some(metering.usage());
                    // The previous agent process's socket, if it handed one over: connections
                    // that arrived during the restart wait in its backlog and are served now.
                    o.listener = sockets.take(addr);
                    let inherited = o.listener.is_some();
                    let server = match host.serve_http(&program, o).await {
                        Ok(s) => s,
                        Err(e) => return failed(e.to_string()),
                    };
                    let how = if inherited { "socket handed over by the previous agent process" } else { "bound" };
                    ctx.log.note(&format!("serving wasi:http on {} ({how})", server.local_addr()));
                    // The gateway's way in, for as long as this run serves.
                    let _in_process = handlers.register(&ctx.replica, server.handler());
                    ctx.started();
                    let mut stop = ctx.stop.clone();
                    let shutdown = async move {
                        match stopping(&mut stop).await {
                            RunControl::Detach => Shutdown::HandOff,
                            _ => Shutdown::Close,
                        }
                    };
                    match server.serve(shutdown).await {
                        Ok(Some(listener)) => {
                            sockets.give(listener);
                            RunEnd::Detached
                        }
                        Ok(None) => RunEnd::Ended(Termination::Exited { code: 0 }),
                        Err(e) => RunEnd::Ended(Termination::Trapped { message: e.to_string() }),
                    }
                }
                (Some(_), false) => failed("spec.http is set but the image is not a wasi:http component".into()),
                (None, true) => failed("the image is a wasi:http component; set spec.http.port to serve it".into()),
                (None, false) => {
                    let mut o = RunOptions::new(ctx.replica.clone(), ctx.log.clone(), ctx.log.clone());
                    o.args = t.args.clone();
                    (o.env, o.preopens, o.network, o.limits) = (env, preopens, network, limits);
                    o.usage = Some(metering.usage());
                    ctx.started();
                    tokio::select! {
                        exit = host.run(&program, o) => RunEnd::Ended(match exit {
                            Ok(Exit::Code(code)) => Termination::Exited { code },
                            Ok(Exit::Trap(message)) => Termination::Trapped { message },
                            Err(e) => Termination::StartFailed { message: e.to_string() },
                        }),
                        // Dropping the run future stops the guest at its next epoch tick. A
                        // guest lives in the agent's process, so a detach ends it too: the next
                        // agent process starts it again from the persisted set.
                        how = stopping(&mut ctx.stop) => match how {
                            RunControl::Detach => RunEnd::Detached,
                            _ => RunEnd::Ended(Termination::Exited { code: 0 }),
                        },
                    }
                }
            }
        })
    }
}

/// Completes when the agent asks the run to stop or detach, with which. A dropped sender
/// (the agent is gone) reads as a stop.
pub(crate) async fn stopping(stop: &mut watch::Receiver<RunControl>) -> RunControl {
    match stop.wait_for(|c| *c != RunControl::Run).await {
        Ok(c) => *c,
        Err(_) => RunControl::Stop,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_guard_refuses_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        for min_free in [0, 1] {
            let r = super::check_disk_space(dir.path(), min_free);
            assert!(r.is_ok(), "{r:?}");
        }
        let err = super::check_disk_space(dir.path(), 1 << 60).unwrap_err();
        assert!(matches!(err, super::PrepareError::DiskFull { required, .. } if required == 1 << 60), "{err:?}");
        let err = err.to_string();
        assert!(err.starts_with("not enough disk space on"), "{err}");
        assert!(err.contains("MiB free, 1099511627776 MiB required"), "{err}");
        let err = super::check_disk_space(&dir.path().join("missing"), 1).unwrap_err();
        assert!(matches!(err, super::PrepareError::DiskSpaceUnknown { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot check free disk space"), "{err}");
    }
}
