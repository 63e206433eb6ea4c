//! Flotilla's edge agent. It owns what happens on one node: its identity (joined once with a
//! token), its link to the hub, its durable copy of the desired state, and the supervision of
//! every replica assigned to it, run through one [`runtime::Runtime`] trait over the Wasm (and
//! later container) runtimes.
//!
//! The agent is autonomous: it persists each assignment set before acknowledging it, and at
//! boot starts from that copy at once, hub or no hub. It never schedules (the hub does) and
//! never accepts work for another node: the hub's certificate check and the node's own
//! certificate bind every assignment set to this node.
//!
//! Structure: [`supervisor`] is the sans-IO core (restart policy, backoff, template changes);
//! this module is the I/O shell that feeds it events and executes its actions; [`link`] holds
//! the QUIC connection; [`state`], [`logs`] and [`identity`] own their files in the data dir.
//!
//! Stopping the agent (SIGTERM, SIGINT) is not stopping its workloads: the agent saves the
//! replicas' statuses, hands the listening sockets of its Wasm HTTP components to the next
//! agent process ([`handoff`]), closes its link and exits, leaving every container to its
//! shim. The next process adopts the containers and starts the Wasm replicas again. Only
//! `--stop-workloads-on-exit` (or the hub taking replicas away, as a drain does) stops them.

pub mod container;
pub mod delivery;
pub mod durable;
pub mod exec;
pub mod facts;
pub mod gateway;
pub mod handoff;
pub mod identity;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod netwatch;
pub mod network;
pub mod objects;
pub mod probe;
pub mod prober;
pub mod runtime;
pub mod services;
pub mod state;
pub mod supervisor;
pub mod upgrade;
pub mod wasm_usage;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use proto::manifest::Runtime as RuntimeKind;
use proto::messages::{AssignmentSet, Termination};
use proto::objects::ObjectRef;
use proto::token::JoinToken;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::logs::LogStore;
use crate::runtime::{RunContext, RunControl, RunEnd, RunEvent, Runtime, WasmRuntime};
use crate::state::{SavedStatuses, StateFile, StatusFile};
use crate::supervisor::{Action, Backoff, Now, PreviousExit, Supervisor};

/// How the agent is started. Built by the binary from flags; the library reads no environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Hub address, `host:port`.
    pub hub: String,
    /// Needed only to join; an agent that joined before reconnects with its certificate.
    pub token: Option<JoinToken>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Reported to the hub; workloads that do not tolerate them are kept off this node.
    pub taints: Vec<proto::manifest::Taint>,
    pub data_dir: PathBuf,
    /// Registries spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Bound on each replica's log file before rotation.
    pub log_max_bytes: u64,
    pub backoff: Backoff,
    /// Largest linear memory one Wasm instance may have; `None` sizes it from the node.
    pub wasm_max_memory: Option<u64>,
    /// Compile Wasm with fuel metering so workloads can set `resources.fuel`.
    pub wasm_fuel: bool,
    /// Whether to run containers (they need root and cgroups).
    pub containers: ContainerSupport,
    /// Container images not in use are removed while the image store exceeds this size.
    pub image_gc_threshold_bytes: u64,
    /// Pulls and container starts are refused (a start failure, retried with back-off) while
    /// the disk holding the data dir has less than this free.
    pub min_free_disk_bytes: u64,
    /// Registry credentials (e.g. from a Docker `config.json`).
    pub registry_credentials: oci_runtime::Credentials,
    /// A Docker `config.json` (typically that of the user the agent runs as) read again at
    /// each pull, after `registry_credentials`: its `auths`, `credsStore` and `credHelpers`.
    pub docker_config: Option<PathBuf>,
    /// Wasm instances that may exist at once on the pooling allocator; `Some(0)` selects the
    /// on-demand allocator; `None` decides from the node (see [`wasm_pooling`]).
    pub wasm_instances: Option<u32>,
    /// How long the hub link may be silent before the agent treats it as dead and
    /// reconnects (its QUIC idle timeout; QUIC uses the smaller of both sides').
    pub link_timeout: std::time::Duration,
    /// Stop every workload when the agent stops. By default a stopping agent leaves its
    /// containers running (the next agent process adopts them) and hands its Wasm HTTP
    /// listeners on.
    pub stop_workloads_on_exit: bool,
    /// The `flotilla` executable: spawned as the container shims and as the holder of the
    /// listening sockets handed to the next agent process.
    pub exe: Option<PathBuf>,
    /// How long the socket holder waits for the next agent process before closing the
    /// listening sockets it holds.
    pub handoff_timeout: std::time::Duration,
    /// How the agent restarts into a new binary on a fleet upgrade (the `flotilla` binary
    /// sets it from its own process); `None`: upgrade orders are refused.
    pub upgrade: Option<upgrade::Invocation>,
    /// The key that seals the configs and secrets this node keeps on disk (made if absent;
    /// default `<data dir>/identity/objects.key`). Keep it apart from the data dir (another
    /// medium, a TPM-unsealed file) and a copy of the data dir reveals no secret.
    pub objects_key_file: Option<PathBuf>,
    /// Where config and secret volumes are written: must be on tmpfs (default
    /// `/dev/shm/flotilla-<hash of the data dir>`).
    pub secrets_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`, see [`metrics`]) on this TCP address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Container networks: the bridge's name and where CNI plugins and configs are (`dir` is
    /// set by the agent to `<data dir>/network`).
    pub network: network::NetworkConfig,
    /// Serve the HTTP gateway (routes, `kind: Route`) on this TCP address; `None`: no gateway.
    pub gateway: Option<std::net::SocketAddr>,
    /// The address site peers reach this node at (where they route its container subnet);
    /// `None`: the address the hub link leaves from.
    pub node_ip: Option<std::net::IpAddr>,
    /// Notified once the local state has started (the persisted desired state handed to the
    /// supervisor, the hub link started), before any hub contact: the binary's sd_notify
    /// readiness.
    pub ready: Option<Arc<tokio::sync::Notify>>,
}

impl AgentConfig {
    pub fn new(hub: String, name: String, data_dir: PathBuf) -> Self {
        AgentConfig {
            hub,
            token: None,
            name,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            data_dir,
            insecure_registries: Vec::new(),
            log_max_bytes: 4 << 20,
            backoff: Backoff::default(),
            wasm_max_memory: None,
            wasm_fuel: false,
            wasm_instances: None,
            containers: ContainerSupport::Auto,
            image_gc_threshold_bytes: 4 << 30,
            min_free_disk_bytes: 256 << 20,
            registry_credentials: oci_runtime::Credentials::default(),
            docker_config: None,
            link_timeout: std::time::Duration::from_secs(8),
            stop_workloads_on_exit: false,
            exe: None,
            handoff_timeout: std::time::Duration::from_secs(30),
            upgrade: None,
            objects_key_file: None,
            secrets_dir: None,
            metrics_listen: None,
            gateway: None,
            network: network::NetworkConfig::new(PathBuf::new()),
            node_ip: None,
            ready: None,
        }
    }

    /// The tmpfs directory config and secret volumes go to.
    pub fn secrets_dir(&self) -> PathBuf {
        self.secrets_dir.clone().unwrap_or_else(|| {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(self.data_dir.as_os_str().as_encoded_bytes());
            PathBuf::from(format!("/dev/shm/flotilla-{}", hex::encode(&digest[..6])))
        })
    }
}

/// Container support of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContainerSupport {
    /// When the node allows it (root, cgroups); otherwise Wasm only, with the reason logged.
    #[default]
    Auto,
    /// Required: the agent refuses to start without it.
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("containers were required but cannot run on this node: {0}")]
    Containers(container::Unsupported),
    #[error("invalid node name {name:?}: {message}")]
    InvalidName { name: String, message: String },
    #[error("cannot prepare {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot start the wasm runtime: {0}")]
    Wasm(#[from] wasm_runtime::Error),
    #[error("cannot open the image store: {0}")]
    Images(String),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Link(#[from] link::Fatal),
    #[error("cannot use the node key for configs and secrets: {0}")]
    ObjectsKey(objects::ObjectsError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot listen for the HTTP gateway on {addr}: {source}")]
    Gateway { addr: std::net::SocketAddr, source: std::io::Error },
}

fn now() -> Now {
    let wall_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Now { mono: Instant::now(), wall_ms }
}

/// A run in flight: how to ask it to stop.
struct RunHandle {
    run_id: u64,
    stop: watch::Sender<RunControl>,
    /// The run's health probes, as its template defines them.
    probes_of: proto::manifest::Probes,
    /// The task probing the run once it started; dropping the handle stops it.
    probes: Option<ProbeTask>,
}

/// A run's probe task, aborted when the run's handle goes.
struct ProbeTask(tokio::task::JoinHandle<()>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_probes(
    replica: &str,
    run_id: u64,
    probes: &proto::manifest::Probes,
    target: prober::ProbeTarget,
    events: &mpsc::UnboundedSender<RunEvent>,
    failures: &metrics::ProbeFailures,
) -> Option<ProbeTask> {
    if probes.is_empty() {
        return None;
    }
    let (events, name) = (events.clone(), replica.to_string());
    let report = move |verdict| {
        let _ = events.send(RunEvent::Probe { replica: name.clone(), run_id, verdict });
    };
    let (failures, name) = (failures.clone(), replica.to_string());
    let failed = move |kind| failures.failed(&name, kind);
    let task = prober::run(probes.clone(), Instant::now(), target, report, failed);
    Some(ProbeTask(tokio::spawn(task)))
}

/// How often, at most, the replicas' statuses are saved while they change (and once more at
/// a clean stop). Few writes on flash; a crash loses at most this much of the history.
const STATUS_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stopping agent waits for its runs to let go (detach) of their workloads.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// How the agent stopped.
#[derive(Debug)]
pub enum Stopped {
    /// Asked to (a signal), or the link ended for good.
    Shutdown,
    /// For a fleet upgrade: the new binary is installed; the caller [`upgrade::exec`]s it.
    Upgrade(upgrade::Invocation),
}

/// An upgrade in flight: the order's reply and the task pulling and installing the binary.
struct Upgrading {
    reply: oneshot::Sender<(proto::messages::UpgradeAnswer, oneshot::Sender<()>)>,
    task: tokio::task::JoinHandle<Result<String, upgrade::UpgradeError>>,
}

/// Pulls the agent artifact `image` for this platform (its digest verified by the blob store)
/// and installs it in place of the running binary. The digest of the new binary, or why not.
async fn take_upgrade(
    images: oci_runtime::ImageStore,
    registry: Arc<runtime::LazyRegistry>,
    call: (String, u64, u64),
    invocation: upgrade::Invocation,
    previous: Option<proto::messages::AgentBinary>,
    state_path: PathBuf,
) -> Result<String, upgrade::UpgradeError> {
    let (image, attempt, deadline_ms) = call;
    let platform = oci_runtime::Platform::host();
    let pulled = match images.pull_agent_binary(&registry, &image, &platform).await {
        Ok(p) => p,
        Err(e) => return Err(upgrade::UpgradeError::Pull { image, source: Box::new(e) }),
    };
    let digest = pulled.binary_digest.clone();
    let install = upgrade::Install {
        attempt,
        image,
        digest: digest.clone(),
        binary: pulled.path.clone(),
        invocation,
        deadline: std::time::Duration::from_millis(deadline_ms),
        previous,
        state_path,
    };
    tokio::task::spawn_blocking(move || {
        // The pulled blob stays held (safe from the collector) until it is copied.
        let _held = pulled;
        upgrade::install(&install, upgrade::spawn_watcher)
    })
    .await??;
    Ok(digest)
}

/// Runs the agent until `shutdown` completes, the hub refuses this node, or a fleet upgrade
/// installed a new binary.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<Stopped, AgentError> {
    proto::manifest::validate_name(&config.name)
        .map_err(|e| AgentError::InvalidName { name: config.name.clone(), message: e.to_string() })?;
    // The data dir holds the node's key, env values of its workloads and their logs.
    std::fs::create_dir_all(&config.data_dir)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
    let dir = |sub: &str| -> Result<PathBuf, AgentError> {
        let p = config.data_dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|source| AgentError::DataDir { path: p.clone(), source })?;
        Ok(p)
    };
    let exe = match &config.exe {
        Some(exe) => exe.clone(),
        None => {
            std::env::current_exe().map_err(|source| AgentError::DataDir { path: "/proc/self/exe".into(), source })?
        }
    };
    // The listening sockets the previous agent process left with a holder, first: until they
    // are served again, clients wait in their backlogs.
    let handoff_socket = handoff::socket_path(&config.data_dir);
    let inherited = {
        let path = handoff_socket.clone();
        match tokio::task::spawn_blocking(move || handoff::receive(&path)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot take over the previous agent's listening sockets");
                Vec::new()
            }
            Err(e) => {
                warn!(error = %e, "taking over the previous agent's listening sockets did not finish");
                Vec::new()
            }
        }
    };
    if !inherited.is_empty() {
        info!(sockets = inherited.len(), "took over listening sockets from the previous agent process");
    }
    let sockets = Arc::new(handoff::Sockets::new(inherited));
    let state = StateFile::new(&dir("state")?);
    let status_file = Arc::new(StatusFile::new(&dir("state")?));
    let logs = LogStore::open(dir("logs")?, config.log_max_bytes)
        .map_err(|source| AgentError::DataDir { path: config.data_dir.join("logs"), source })?;
    // Containers need root and cgroups; without them the node offers Wasm only.
    let containers = match (&config.containers, container::ContainerRuntime::supported()) {
        (ContainerSupport::Off, _) => None,
        (_, Ok(())) => Some(()),
        (ContainerSupport::Auto, Err(why)) => {
            info!(reason = %why, "containers disabled on this node");
            None
        }
        (ContainerSupport::On, Err(why)) => return Err(AgentError::Containers(why)),
    };
    let kinds =
        if containers.is_some() { vec![RuntimeKind::Wasm, RuntimeKind::Container] } else { vec![RuntimeKind::Wasm] };
    let node_facts = facts::collect(&config.labels, kinds);
    raise_open_files_limit();
    let max_memory = wasm_max_memory(config.wasm_max_memory, node_facts.memory_bytes);
    let pooling = wasm_pooling(max_memory, config.wasm_instances);
    if let Some(p) = pooling {
        info!(
            instances = p.total_instances,
            slot_bytes = p.total_memory_bytes / u64::from(p.total_instances),
            "wasm pooling allocator"
        );
    }
    let host = wasm_runtime::WasmHost::new(wasm_runtime::HostConfig {
        cache_dir: dir("wasm-cache")?,
        max_memory_per_instance: max_memory,
        pooling,
        fuel: config.wasm_fuel,
        ..Default::default()
    })?;
    // One artifact store for Wasm and containers: blobs and index in images/, container
    // snapshots in containers/images/, one collector for both.
    let blobs = oci_runtime::BlobStore::open(dir("images")?).map_err(|e| AgentError::Images(e.to_string()))?;
    let images = oci_runtime::ImageStore::open(dir("containers/images")?, blobs)
        .map_err(|e| AgentError::Images(e.to_string()))?;
    images.spawn_collector(config.image_gc_threshold_bytes, std::time::Duration::from_secs(60));
    let upgrade_images = images.clone();
    let registry: Arc<runtime::LazyRegistry> = {
        let (insecure, credentials) = (config.insecure_registries.clone(), config.registry_credentials.clone());
        let docker_config = config.docker_config.clone();
        Arc::new(std::sync::LazyLock::new(Box::new(move || {
            let registry =
                oci_runtime::Registry::new(oci_runtime::RegistryConfig { insecure }).with_credentials(credentials);
            match docker_config {
                Some(path) => registry.with_docker_config(path),
                None => registry,
            }
        })))
    };
    let upgrade_registry = registry.clone();
    let volumes = runtime::VolumeStore::new(dir("volumes")?);
    let objects_key_path =
        config.objects_key_file.clone().unwrap_or_else(|| config.data_dir.join("identity").join("objects.key"));
    let node_key = objects::NodeKey::load_or_create(&objects_key_path).map_err(AgentError::ObjectsKey)?;
    let mut objs = delivery::Objects::open(objects::ObjectCache::new(dir("objects")?, node_key), config.secrets_dir());
    let mut runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>> = HashMap::new();
    let recorders = metrics::Recorders::default();
    let mut containers_rt: Option<Arc<container::ContainerRuntime>> = None;
    let mut networks: Option<Arc<network::Networks>> = None;
    if containers.is_some() {
        let mut net_config = config.network.clone();
        net_config.dir = dir("network")?;
        let nets = network::Networks::new(net_config)
            .map_err(|source| AgentError::DataDir { path: config.data_dir.join("network"), source })?;
        let nets = Arc::new(nets);
        networks = Some(nets.clone());
        let exe =
            std::env::current_exe().map_err(|source| AgentError::DataDir { path: "/proc/self/exe".into(), source })?;
        let rt = container::ContainerRuntime::new(container::ContainerConfig {
            images: images.clone(),
            registry: registry.clone(),
            exe: exe.clone(),
            state_root: dir("containers/state")?,
            bundles: dir("containers/bundles")?,
            log_max_bytes: config.log_max_bytes,
            node: config.name.clone(),
            volumes: volumes.clone(),
            min_free_disk: config.min_free_disk_bytes,
            private: config.secrets_dir(),
            pulls: recorders.pulls.clone(),
            networks: nets,
        });
        let rt = Arc::new(rt);
        containers_rt = Some(rt.clone());
        runtimes.insert(RuntimeKind::Container, rt);
    }
    let mut wasm = WasmRuntime::new(host, registry, images, volumes.clone(), sockets.clone());
    wasm.min_free_disk = config.min_free_disk_bytes;
    wasm.pulls = recorders.pulls.clone();
    let wasm_usage = wasm.usage.clone();
    let wasm_host = wasm.host.clone();
    let handlers = wasm.handlers.clone();
    runtimes.insert(RuntimeKind::Wasm, Arc::new(wasm));

    // Autonomy: start the last persisted desired state before any hub contact.
    let saved = match state.load() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "ignoring unreadable desired state; waiting for the hub");
            AssignmentSet::default()
        }
    };
    if let Some(rt) = &containers_rt {
        let keep: HashSet<String> = saved.assignments.iter().map(|a| a.name.clone()).collect();
        let rt = rt.clone();
        let nets = networks.clone();
        let _ = tokio::task::spawn_blocking(move || {
            rt.remove_orphans(&keep);
            // Then the networks of replicas that left: their containers are gone.
            if let Some(n) = nets {
                n.keep_only(&keep);
            }
        })
        .await;
    }
    let gateway_of = |set: &AssignmentSet| set.network.as_ref().and_then(|n| n.subnet.hosts().next()).map(IpAddr::V4);
    if let Some(n) = &networks {
        n.set_node(saved.network.as_ref());
        if let Some(t) = &saved.services {
            n.set_domain(&t.domain);
        }
        let (n, peers) = (n.clone(), saved.services.as_ref().map(|t| t.peers.clone()).unwrap_or_default());
        let _ = tokio::task::spawn_blocking(move || n.set_peers(&peers)).await;
    }
    // The HTTP gateway, from the same table (and, below, the same local readiness).
    // Its listening socket comes from the previous agent process when that one handed it over
    // (so a restart refuses no connection), else is bound here.
    // It starts serving below, once this node's replicas' readiness is known.
    let gateway_listener = match config.gateway {
        None => None,
        Some(addr) => {
            let gateway_error = |source| AgentError::Gateway { addr, source };
            Some(match sockets.take(addr) {
                Some(l) => {
                    info!(%addr, "HTTP gateway: listening socket handed over by the previous agent process");
                    l.set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpListener::from_std(l))
                        .map_err(gateway_error)?
                }
                None => tokio::net::TcpListener::bind(addr).await.map_err(gateway_error)?,
            })
        }
    };
    let mut generation = saved.generation;
    let mut sup = Supervisor::new(config.backoff);
    if !saved.assignments.is_empty() {
        info!(generation, replicas = saved.assignments.len(), "starting persisted desired state");
    }
    sup.set_assignments(&saved.assignments, now());
    sockets.keep_only(&http_addrs(&saved));
    let mut to_fetch = objs.want(&saved);
    let mut templates = templates_of(&saved);
    let boot_id = state::boot_id();
    match status_file.load() {
        Ok(Some(previous)) => {
            let how = previous_exit(&previous, &boot_id);
            info!(previous = ?how, "the previous agent process's statuses carry over");
            sup.restore(&previous.statuses, how, now());
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "ignoring unreadable saved statuses"),
    }
    // Services (names and load balancing) for containers on the node's network, started from
    // the persisted table with this node's replicas as the previous process left them: an
    // agent restart withdraws no local endpoint (`Supervisor::serving`), from the service
    // rules or the gateway. (Started any earlier, its first apply would be of an empty
    // table: every service's rules gone until the saved one arrived.)
    let services_tx = networks.as_ref().map(|_| {
        services::shell::spawn(services::shell::Wanted {
            table: saved.services.clone().unwrap_or_default(),
            dns: gateway_of(&saved),
            local_ready: local_readiness(&sup),
        })
    });
    // The gateway from the same table and readiness, from its first accept (connections
    // queued during an agent restart are served as soon as it starts).
    let (gateway_tx, mut gateway_task) = match gateway_listener {
        None => (None, None),
        Some(listener) => {
            let view = gateway::View {
                table: Arc::new(saved.services.clone().unwrap_or_default()),
                local_ready: local_readiness(&sup),
            };
            let (tx, rx) = watch::channel(view);
            let task = gateway::shell::spawn(listener, rx, handlers, recorders.gateway.clone(), Default::default());
            (Some(tx), Some(task))
        }
    };
    // From now on the saved statuses say "not a clean stop" until this process stops cleanly.
    let mut status_seq = 0u64;
    // Whether a clean stop of this process stops the workloads (never for an upgrade).
    let stops_workloads = std::cell::Cell::new(config.stop_workloads_on_exit);
    let mut saved_statuses = |sup: &Supervisor, clean: bool| {
        status_seq += 1;
        let saved = SavedStatuses {
            clean,
            workloads_stopped: clean && stops_workloads.get(),
            boot_id: boot_id.clone(),
            saved_at_ms: now().wall_ms,
            statuses: sup.statuses(),
        };
        (status_seq, saved)
    };
    let (seq, first) = saved_statuses(&sup, false);
    if let Err(e) = status_file.save(seq, &first) {
        warn!(error = %e, "cannot save the replicas' statuses");
    }

    let (acked_tx, acked_rx) = watch::channel(generation);
    let (status_tx, status_rx) = watch::channel(sup.statuses());
    let (assign_tx, mut assign_rx) = mpsc::channel::<AssignmentSet>(8);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (runtimes_tx, runtimes_rx) = watch::channel(runtimes_of(&saved));
    let (session_tx, session_rx) = watch::channel::<Option<quinn::Connection>>(None);
    let metrics_task = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::Metrics { addr, source })?;
            let m = metrics::AgentMetrics::new(metrics::Sources {
                statuses: status_rx.clone(),
                runtimes: runtimes_rx.clone(),
                connected: connected_rx,
                node: config.name.clone(),
                wasm: wasm_usage.clone(),
                wasm_host: Some(wasm_host),
                session: session_rx.clone(),
                recorders: recorders.clone(),
            });
            let render: transport::metrics::Render = Arc::new(move || {
                let m = m.clone();
                Box::pin(async move { m.render() })
            });
            Some(tokio::spawn(transport::metrics::serve(listener, render)))
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The last fleet upgrade of this agent's binary, as the hello reports it.
    let upgrade_state_path = upgrade::state_path(&config.data_dir);
    let upgrade_state = match upgrade::load(&upgrade_state_path) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "ignoring an unreadable upgrade state");
            None
        }
    };
    let mut on_trial = upgrade_state.as_ref().is_some_and(|s| s.phase == upgrade::Phase::Trying);
    if on_trial {
        info!("this agent binary is on trial after an upgrade: confirmed once the hub sends a set");
    }
    let (agent_binary, last_upgrade) = upgrade_state.as_ref().map(upgrade::State::facts).unwrap_or_default();
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel::<link::UpgradeCall>(4);
    let (fetched_tx, mut fetched_rx) = mpsc::unbounded_channel::<(ObjectRef, Result<_, delivery::FetchError>)>();
    let spawn_fetch = |r: ObjectRef| {
        let (conn, done) = (session_rx.clone(), fetched_tx.clone());
        tokio::spawn(async move {
            let result = delivery::fetch(conn, r.clone()).await;
            let _ = done.send((r, result));
        });
    };
    let mut upgrading: Option<Upgrading> = None;
    let link = link::Link {
        hub: config.hub.clone(),
        token: config.token.clone(),
        node_name: config.name.clone(),
        identity_dir: config.data_dir.join("identity"),
        facts: proto::messages::NodeFacts {
            runtimes: runtimes.keys().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
            taints: config.taints.clone(),
            agent_binary: agent_binary.clone(),
            last_upgrade,
            node_ip: config.node_ip,
            ..node_facts
        },
        tuning: transport::tls::Tuning::with_idle_timeout(config.link_timeout),
        logs: logs.clone(),
        acked: acked_rx,
        statuses: status_rx,
        assignments: assign_tx,
        connected: connected_tx,
        shutdown: shutdown_rx,
        network: netwatch::spawn(),
        upgrades: upgrade_tx,
        session: session_tx,
        runtimes: runtimes_rx.clone(),
        exec: containers_rt.as_ref().map(|rt| Arc::new(exec::Target::new(rt.oci_argv()))),
        wasm_usage,
    };
    for r in to_fetch.drain(..) {
        spawn_fetch(r);
    }
    let mut link_task = tokio::spawn(link.run().instrument(info_span!("link", node = %config.name)));
    if let Some(ready) = &config.ready {
        ready.notify_one();
    }

    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<RunEvent>();
    let mut runs: HashMap<String, RunHandle> = HashMap::new();
    // Statuses changed since the last save, and when the next save may happen.
    let mut unsaved = false;
    let mut next_save = tokio::time::Instant::now();
    tokio::pin!(shutdown);

    let result = loop {
        for action in sup.poll_actions(now()) {
            execute(action, &mut sup, &mut runs, &runtimes, &logs, &objs, &events_tx);
        }
        let changes = sup.take_status_changes();
        if !changes.is_empty() {
            status_tx.send_replace(sup.statuses());
            if let Some(tx) = &services_tx {
                let local = local_readiness(&sup);
                tx.send_if_modified(|w| {
                    let changed = w.local_ready != local;
                    w.local_ready = local;
                    changed
                });
            }
            if let Some(tx) = &gateway_tx {
                let local = local_readiness(&sup);
                tx.send_if_modified(|v| {
                    let changed = v.local_ready != local;
                    v.local_ready = local;
                    changed
                });
            }
            unsaved = true;
        }
        if unsaved && tokio::time::Instant::now() >= next_save {
            unsaved = false;
            next_save = tokio::time::Instant::now() + STATUS_SAVE_INTERVAL;
            let (seq, saved) = saved_statuses(&sup, false);
            let file = status_file.clone();
            // Off the async workers: an fsync on flash can take a while. Sequence numbers keep
            // an older save from landing after a newer one.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = file.save(seq, &saved) {
                    warn!(error = %e, "cannot save the replicas' statuses");
                }
            });
        }
        let deadline = sup.next_deadline();
        let save_at = unsaved.then_some(next_save);
        tokio::select! {
            _ = &mut shutdown => break Ok(Stopped::Shutdown),
            fatal = &mut link_task => break match fatal {
                Ok(Some(f)) => Err(AgentError::Link(f)),
                Ok(None) => Ok(Stopped::Shutdown),
                Err(e) => { warn!(error = %e, "link task ended"); Ok(Stopped::Shutdown) }
            },
            Some(call) = upgrade_rx.recv() => {
                let answer = |message: String| proto::messages::UpgradeAnswer::Refused { message };
                let current = upgrade::load(&upgrade_state_path).ok().flatten();
                let early = if upgrading.is_some() {
                    Some(answer("an upgrade is already in progress".into()))
                } else if let Some(a) = upgrade::precheck(current.as_ref(), &call.image, call.attempt) {
                    Some(a)
                } else if config.upgrade.is_none() {
                    Some(answer("this agent cannot replace its binary (it was not started as the flotilla binary)".into()))
                } else {
                    None
                };
                if let Some(a) = early {
                    let _ = call.reply.send((a, oneshot::channel().0));
                    continue;
                }
                let Some(invocation) = config.upgrade.clone() else { continue };
                info!(image = %call.image, attempt = call.attempt, "upgrade ordered: pulling the new agent binary");
                let task = tokio::spawn(take_upgrade(
                    upgrade_images.clone(),
                    upgrade_registry.clone(),
                    (call.image, call.attempt, call.deadline_ms),
                    invocation,
                    agent_binary.clone(),
                    upgrade_state_path.clone(),
                ));
                upgrading = Some(Upgrading { reply: call.reply, task });
            }
            done = async { (&mut upgrading.as_mut().expect("guarded").task).await }, if upgrading.is_some() => {
                let Some(Upgrading { reply, .. }) = upgrading.take() else { continue };
                match done.map_err(upgrade::UpgradeError::from).and_then(|r| r) {
                    Ok(digest) => {
                        let (delivered_tx, delivered_rx) = oneshot::channel();
                        let _ = reply.send((proto::messages::UpgradeAnswer::Restarting { digest }, delivered_tx));
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), delivered_rx).await;
                        match config.upgrade.clone() {
                            Some(inv) => break Ok(Stopped::Upgrade(inv)),
                            None => continue,
                        }
                    }
                    Err(e) => {
                        warn!(reason = %e, "upgrade not taken");
                        let refused = proto::messages::UpgradeAnswer::Refused { message: e.to_string() };
                        let _ = reply.send((refused, oneshot::channel().0));
                    }
                }
            }
            Some(set) = assign_rx.recv() => {
                // The first set from the hub confirms a binary on trial: its session is up.
                if on_trial {
                    on_trial = false;
                    let path = upgrade_state_path.clone();
                    match tokio::task::spawn_blocking(move || upgrade::confirm(&path)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(error = %e, "cannot confirm the upgrade"),
                        Err(e) => warn!(error = %e, "confirming the upgrade did not finish"),
                    }
                }
                // Objects the set names that this node does not hold at their version, also
                // on a replay (the hub sends its set at each connect: fetches retry then).
                for r in objs.want(&set) {
                    spawn_fetch(r);
                }
                // The hub's current set wins; the same generation again is a replay.
                if set.generation == generation && generation != 0 {
                    continue;
                }
                if let Err(e) = state.save(&set) {
                    // Not acknowledged: the hub resends at the next connect.
                    warn!(error = %e, "cannot persist the assignment set");
                    continue;
                }
                generation = set.generation;
                gateway_table(&gateway_tx, &set);
                if let Some(tx) = &services_tx {
                    let (table, dns) = (set.services.clone().unwrap_or_default(), gateway_of(&set));
                    tx.send_if_modified(|w| {
                        let changed = w.table != table || w.dns != dns;
                        w.table = table;
                        w.dns = dns;
                        changed
                    });
                }
                if let Some(n) = &networks {
                    n.set_node(set.network.as_ref());
                    if let Some(t) = &set.services {
                        n.set_domain(&t.domain);
                    }
                    let (n, peers) = (n.clone(), set.services.as_ref().map(|t| t.peers.clone()).unwrap_or_default());
                    tokio::task::spawn_blocking(move || n.set_peers(&peers));
                }
                templates = templates_of(&set);
                runtimes_tx.send_replace(runtimes_of(&set));
                info!(generation, replicas = set.assignments.len(), "new assignment set");
                sup.set_assignments(&set.assignments, now());
                sockets.keep_only(&http_addrs(&set));
                acked_tx.send_replace(generation);
                // Logs nothing names any more: replicas removed while not running, Job attempt
                // logs of deleted workloads. Runs still stopping keep theirs until they exit.
                // Inline, like the state save above: a sweep on another thread could race a
                // replica of the next set creating its log.
                let (replicas, workloads) = logs::kept(&set, sup.statuses().into_keys().chain(runs.keys().cloned()));
                logs.sweep(&replicas, &workloads);
                // Networks of replicas removed while not running (a run that ends takes its
                // own down below).
                if let Some(n) = networks.clone() {
                    let keep: HashSet<String> = replicas.iter().cloned().collect();
                    tokio::task::spawn_blocking(move || n.keep_only(&keep));
                }
            }
            Some((r, result)) = fetched_rx.recv() => {
                if objs.fetched(&r, result) {
                    // Running readers see the new files in place; replicas waiting for the
                    // object start now rather than at the end of their back-off.
                    for (replica, t) in &templates {
                        if t.objects().contains(&r) {
                            if runs.contains_key(replica) {
                                objs.refresh(replica, t, &r);
                            }
                            sup.retry_now(replica, now());
                        }
                    }
                }
            }
            Some(ev) = events_rx.recv() => match ev {
                RunEvent::Started { replica, run_id, target, adopted } => {
                    sup.set_address(&replica, target.address);
                    match adopted {
                        Some(how) => sup.on_adopted(&replica, run_id, how, now()),
                        None => sup.on_started(&replica, run_id, now()),
                    }
                    if let Some(h) = runs.get_mut(&replica).filter(|h| h.run_id == run_id) {
                        h.probes = spawn_probes(
                            &replica,
                            run_id,
                            &h.probes_of,
                            target,
                            &events_tx,
                            &recorders.probe_failures,
                        );
                    }
                }
                RunEvent::Progress { replica, run_id, reason, message } => {
                    sup.on_progress(&replica, run_id, reason, message, now());
                }
                RunEvent::Probe { replica, run_id, verdict } => {
                    info!(%replica, run_id, ?verdict, "probe verdict");
                    sup.on_probe(&replica, run_id, verdict, now());
                }
                RunEvent::Exited { replica, run_id, how, last_output } => {
                    if runs.get(&replica).is_some_and(|h| h.run_id == run_id) {
                        runs.remove(&replica);
                    }
                    // Runs detach only when the agent stops, after this loop.
                    let RunEnd::Ended(how) = how else { continue };
                    info!(%replica, run_id, termination = %how, "run ended");
                    sup.on_output(&replica, run_id, last_output);
                    sup.on_exited(&replica, run_id, how, now());
                    if !sup.statuses().contains_key(&replica) && !runs.contains_key(&replica) {
                        logs.remove(&replica);
                        volumes.remove(&replica);
                        objs.remove_replica(&replica);
                        if let Some(n) = networks.clone() {
                            let r = replica.clone();
                            tokio::task::spawn_blocking(move || n.detach(&r));
                        }
                    }
                }
            },
            _ = sleep_until(deadline) => {}
            _ = sleep_until_tokio(save_at) => {}
        }
    };

    // Stopping. The link closes first, while the runs go on (an HTTP component keeps serving
    // what arrives meanwhile); then every run detaches (or stops, when asked to); then the
    // statuses are saved as a clean stop's and the listeners handed on. What the next process
    // has to wait for is only the last two steps.
    let _ = shutdown_tx.send(true);
    if let Some(m) = metrics_task {
        m.abort();
    }
    if !link_task.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut link_task).await;
    }
    link_task.abort();
    if matches!(result, Ok(Stopped::Upgrade(_))) {
        stops_workloads.set(false);
    }
    let control = if stops_workloads.get() { RunControl::Stop } else { RunControl::Detach };
    info!(runs = runs.len(), ?control, "agent stopping");
    // The gateway first, while the components it serves in-process still run: it stops
    // accepting and finishes the requests under way. An agent leaving its workloads running
    // hands its socket on with theirs.
    drop(gateway_tx);
    if let Some(task) = gateway_task.take()
        && let Ok(Ok(Some(listener))) = tokio::time::timeout(DETACH_WAIT, task).await
        && control == RunControl::Detach
    {
        sockets.give(listener);
    }
    for h in runs.values() {
        let _ = h.stop.send(control);
    }
    // A stop waits out each container's grace period; a detach is immediate, except for HTTP
    // servers finishing the requests they accepted.
    let max_grace = sup.max_grace(container::DEFAULT_GRACE);
    let wait = if control == RunControl::Stop { max_grace + DETACH_WAIT } else { DETACH_WAIT };
    let waited = tokio::time::timeout(wait, async {
        while !runs.is_empty() {
            match events_rx.recv().await {
                Some(RunEvent::Exited { replica, run_id, .. }) => {
                    if runs.get(&replica).is_some_and(|h| h.run_id == run_id) {
                        runs.remove(&replica);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    if waited.is_err() {
        warn!(runs = ?runs.keys().collect::<Vec<_>>(), "runs still letting go at exit");
    }
    // Workloads stopped with the agent (--stop-workloads-on-exit) leave nothing on the node:
    // their networks go with their containers, and the next start attaches them anew.
    if control == RunControl::Stop
        && let Some(n) = networks.clone()
    {
        let _ = tokio::task::spawn_blocking(move || n.keep_only(&HashSet::new())).await;
    }
    let (seq, last) = saved_statuses(&sup, true);
    {
        let file = status_file.clone();
        match tokio::task::spawn_blocking(move || file.save(seq, &last)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot save the replicas' statuses"),
            Err(e) => warn!(error = %e, "saving the replicas' statuses did not finish"),
        }
    }
    let listeners = sockets.take_outgoing();
    if !listeners.is_empty() {
        // After an upgrade the path holds the new binary; the holder is the one running now.
        let exe = if matches!(result, Ok(Stopped::Upgrade(_))) { PathBuf::from("/proc/self/exe") } else { exe.clone() };
        let (path, timeout) = (handoff_socket.clone(), config.handoff_timeout);
        match tokio::task::spawn_blocking(move || handoff::pass_on(&exe, &path, listeners, timeout)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot hand the listening sockets on; they close with this process"),
            Err(e) => warn!(error = %e, "handing the listening sockets on did not finish"),
        }
    }
    info!("agent stopped");
    result
}

/// How the process that saved `previous` ended, judged from this boot's id.
fn previous_exit(previous: &SavedStatuses, boot_id: &str) -> PreviousExit {
    if !previous.boot_id.is_empty() && !boot_id.is_empty() && previous.boot_id != boot_id {
        PreviousExit::Reboot
    } else if !previous.clean {
        PreviousExit::Unclean
    } else if previous.workloads_stopped {
        PreviousExit::CleanStoppingWorkloads
    } else {
        PreviousExit::Clean
    }
}

/// How long a replica waiting for a config or secret waits before looking again, should the
/// arrival that wakes it at once be missed.
const OBJECT_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Each replica's runtime in `set`.
fn runtimes_of(set: &AssignmentSet) -> HashMap<String, RuntimeKind> {
    set.assignments.iter().map(|a| (a.name.clone(), a.template.runtime)).collect()
}

/// Each replica's template in `set`.
fn templates_of(set: &AssignmentSet) -> HashMap<String, proto::manifest::ReplicaTemplate> {
    set.assignments.iter().map(|a| (a.name.clone(), a.template.clone())).collect()
}

/// The addresses the set's Wasm HTTP components serve on.
fn http_addrs(set: &AssignmentSet) -> Vec<std::net::SocketAddr> {
    set.assignments
        .iter()
        .filter(|a| a.template.runtime == RuntimeKind::Wasm)
        .filter_map(|a| a.template.http)
        .map(|h| std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, h.port)))
        .collect()
}

/// The largest linear memory an instance may reserve and use. A 32-bit Wasm memory can reach
/// 4 GiB, which wasmtime reserves up front on 64-bit hosts so bounds checks vanish. A board with
/// less RAM than that caps each instance at its RAM (rounded to 64 KiB pages), so no instance
/// reserves or grows beyond what the device has; larger machines keep wasmtime's default.
fn wasm_max_memory(configured: Option<u64>, node_memory: u64) -> Option<u64> {
    const PAGE: u64 = 64 << 10;
    configured.or((node_memory > 0 && node_memory < (4 << 30)).then(|| (node_memory / PAGE).max(1) * PAGE))
}

/// Instances the pooling allocator holds by default on a node with 4 GiB or more: room for
/// density (a thousand idle long-running replicas) plus the HTTP workloads' concurrent requests.
const DEFAULT_POOL_INSTANCES: u32 = 2048;
/// Guard after each 4 GiB slot, wasmtime's own default: with it compiled code elides bounds checks.
const POOL_GUARD_BYTES: u64 = 32 << 20;

/// Chooses the instance allocator. The pooling allocator reuses preallocated instance slots, so
/// an HTTP request costs a few `madvise` calls instead of mapping and unmapping a 4 GiB
/// reservation (whose TLB shootdowns made per-request instantiation the bottleneck); but its
/// slots are fixed address space, `instances * (slot + guard)`, and cap how many instances
/// live at once. So:
/// - on 64-bit nodes with 4 GiB or more (no memory cap), 2048 slots of 4 GiB + 32 MiB guard:
///   about 8 TiB of the 128 TiB address space, no RAM;
/// - on smaller boards (memory capped to the board's RAM), the on-demand allocator by default,
///   because hundreds of RAM-sized slots may not fit a 39-bit address space; the operator can
///   ask for a pool of N slots of the capped size (no guard, explicit bounds checks);
/// - `Some(0)` always selects the on-demand allocator.
fn wasm_pooling(max_memory: Option<u64>, instances: Option<u32>) -> Option<wasm_runtime::PoolingConfig> {
    const FOUR_GIB: u64 = 4 << 30;
    if cfg!(not(target_pointer_width = "64")) && instances.is_none() {
        return None;
    }
    let (slot, guard, n) = match (max_memory, instances) {
        (_, Some(0)) => return None,
        (None, n) => (FOUR_GIB, POOL_GUARD_BYTES, n.unwrap_or(DEFAULT_POOL_INSTANCES)),
        (Some(_), None) => return None,
        (Some(max), Some(n)) => (max, 0, n),
    };
    Some(wasm_runtime::PoolingConfig {
        total_instances: n,
        total_memory_bytes: slot.saturating_mul(u64::from(n)),
        memory_guard_bytes: guard,
    })
}

/// Lets the agent hold a file per replica log, volume and connection for thousands of replicas:
/// raises the soft `RLIMIT_NOFILE` to the hard limit (systemd gives services 1024 soft, 512 Ki
/// hard).
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => debug!(limit = n, "open files limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    sleep_until_tokio(deadline.map(Into::into)).await
}

async fn sleep_until_tokio(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn execute(
    action: Action,
    sup: &mut Supervisor,
    runs: &mut HashMap<String, RunHandle>,
    runtimes: &HashMap<RuntimeKind, Arc<dyn Runtime>>,
    logs: &LogStore,
    objs: &delivery::Objects,
    events: &mpsc::UnboundedSender<RunEvent>,
) {
    match action {
        Action::Start { replica, run_id, assignment } => {
            let kind = assignment.template.runtime;
            let fail = |sup: &mut Supervisor, message: String| {
                sup.on_exited(&replica, run_id, Termination::StartFailed { message }, now());
            };
            let Some(runtime) = runtimes.get(&kind) else {
                fail(sup, format!("this node has no {kind} runtime"));
                return;
            };
            if let Err(msg) = proto::manifest::validate_name(&replica) {
                fail(sup, format!("invalid replica name: {msg}"));
                return;
            }
            // A Job attempt's log lives under its workload's name.
            if assignment.attempt.is_some()
                && let Err(msg) = proto::manifest::validate_name(&assignment.workload)
            {
                fail(sup, format!("invalid workload name: {msg}"));
                return;
            }
            let log = match assignment.attempt {
                Some(n) => logs.attempt_sink(&assignment.workload, &replica, n),
                None => logs.sink(&replica),
            };
            let log = match log {
                Ok(l) => l,
                Err(e) => {
                    fail(sup, format!("cannot open the log file: {e}"));
                    return;
                }
            };
            // Configs and secrets filled in; a missing one is a start failure that says which
            // (retried at once when it arrives).
            let template = match objs.resolve(&replica, &assignment.template) {
                Ok(t) => t,
                Err(delivery::Unresolved::Waiting(why)) => {
                    sup.on_waiting(&replica, run_id, why, OBJECT_RECHECK, now());
                    return;
                }
                Err(delivery::Unresolved::Failed(message)) => {
                    fail(sup, message);
                    return;
                }
            };
            let (stop_tx, stop_rx) = watch::channel(RunControl::Run);
            let probes_of = assignment.template.probes.clone();
            let log_path = log.path().to_path_buf();
            runs.insert(replica.clone(), RunHandle { run_id, stop: stop_tx, probes_of, probes: None });
            let ctx = RunContext::new(replica.clone(), run_id, template, log, stop_rx, events.clone());
            let fut = runtime.run(ctx);
            let events = events.clone();
            let span = info_span!("replica", %replica, run_id);
            tokio::spawn(
                async move {
                    debug!("run starting");
                    let how = fut.await;
                    // What the run wrote last, for `describe` (read off the event loop).
                    let last_output = match how {
                        RunEnd::Ended(_) => {
                            tokio::task::spawn_blocking(move || logs::last_output(&log_path)).await.unwrap_or_default()
                        }
                        RunEnd::Detached => Vec::new(),
                    };
                    let _ = events.send(RunEvent::Exited { replica, run_id, how, last_output });
                }
                .instrument(span),
            );
        }
        Action::Stop { replica, run_id } => match runs.get(&replica) {
            Some(h) if h.run_id == run_id => {
                let _ = h.stop.send(RunControl::Stop);
            }
            // Nothing in flight: the stop is already complete.
            _ => sup.on_stopped(&replica, run_id, now()),
        },
    }
}

/// Gives the gateway (if any) the set's table.
fn gateway_table(tx: &Option<watch::Sender<gateway::View>>, set: &AssignmentSet) {
    if let Some(tx) = tx {
        let table = set.services.clone().unwrap_or_default();
        tx.send_if_modified(|v| {
            let changed = *v.table != table;
            v.table = Arc::new(table);
            changed
        });
    }
}

/// This node's replicas and whether each is running and ready: what its service rules and
/// its gateway use for its own endpoints, ahead of the hub.
fn local_readiness(sup: &Supervisor) -> BTreeMap<String, bool> {
    sup.serving()
}

#[cfg(test)]
mod tests {
    #[test]
    fn wasm_memory_is_sized_to_the_device() {
        // A 512 MB gateway: instances never reserve more than the board has.
        assert_eq!(super::wasm_max_memory(None, 512_000_000), Some(7812 * 65536));
        // A server keeps wasmtime's 4 GiB reservation and its elided bounds checks.
        assert_eq!(super::wasm_max_memory(None, 24 << 30), None);
        // Unknown memory: no guess.
        assert_eq!(super::wasm_max_memory(None, 0), None);
        // The operator's setting wins.
        assert_eq!(super::wasm_max_memory(Some(64 << 20), 512_000_000), Some(64 << 20));
    }

    #[test]
    fn pooling_is_chosen_where_the_address_space_allows() {
        use super::wasm_pooling;
        // A server: 2048 slots of 4 GiB with a 32 MiB guard.
        let p = wasm_pooling(None, None).unwrap();
        assert_eq!(p.total_instances, 2048);
        assert_eq!(p.total_memory_bytes / 2048, 4 << 30);
        assert_eq!(p.memory_guard_bytes, 32 << 20);
        // A small board keeps the on-demand allocator unless asked.
        assert_eq!(wasm_pooling(Some(512 << 20), None), None);
        let p = wasm_pooling(Some(512 << 20), Some(16)).unwrap();
        assert_eq!((p.total_instances, p.total_memory_bytes, p.memory_guard_bytes), (16, 16 * (512 << 20), 0));
        // Zero instances: on-demand everywhere.
        assert_eq!(wasm_pooling(None, Some(0)), None);
        assert_eq!(wasm_pooling(None, Some(100)).unwrap().total_instances, 100);
    }
}
