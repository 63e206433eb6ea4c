//! The agent's Prometheus metrics (`agent --metrics-listen ADDR`, `GET /metrics`; off by
//! default), and the usage report of `flotilla top` ([`measure`]). Read at scrape time from
//! what the event loop publishes (replica statuses and runtimes, the link's state), from the
//! containers' cgroups and from what the Wasm runtime counts for each Wasm replica
//! ([`crate::wasm_usage`]: CPU time spent running its guest code, linear memory of its live
//! instances); nothing is computed unless something scrapes. Per-replica series exist only
//! while the replica is on the node (a Wasm replica's, while it runs).
//!
//! A few things are counted as they happen, by the shells that do them, into the handles of
//! [`Recorders`]: artifact pulls (the runtimes' starts), failed probe checks (the prober;
//! the pure [`crate::probe`] core knows nothing of metrics) and the HTTP gateway's requests. The link's traffic is quinn's
//! byte count of each hub connection, added up over the sessions ([`LinkTraffic`]).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `flotilla_agent_replicas` | gauge | `phase`, `runtime` |
//! | `flotilla_agent_replica_restarts_total` | counter | `replica` |
//! | `flotilla_agent_hub_connected` | gauge | (1 while the link to the hub is up) |
//! | `flotilla_agent_hub_connects_total` | counter | (sessions made with the hub) |
//! | `flotilla_agent_container_cpu_seconds_total` | counter | `replica` (cgroup CPU time) |
//! | `flotilla_agent_container_memory_bytes` | gauge | `replica` (cgroup memory in use) |
//! | `flotilla_agent_wasm_cpu_seconds_total` | counter | `replica` (CPU time running its guests) |
//! | `flotilla_agent_wasm_memory_bytes` | gauge | `replica` (linear memory of its instances) |
//! | `flotilla_agent_wasm_instances` | gauge | (live Wasm guest runs; an HTTP component's server counts once) |
//! | `flotilla_agent_wasm_programs_loaded_total` | counter | `source`: `compiled`, `disk`, `memory` |
//! | `flotilla_agent_probe_failures_total` | counter | `replica`, `probe`: `liveness`, `readiness`, `startup` |
//! | `flotilla_agent_pulls_total` | counter | `kind`: `image`, `wasm`; `result`: `ok`, `error` |
//! | `flotilla_agent_pull_duration_seconds` | histogram | `kind` |
//! | `flotilla_agent_pulled_bytes_total` | counter | `kind` (an image's layer sizes, a module's size) |
//! | `flotilla_agent_link_bytes_total` | counter | `direction`: `sent`, `received` (UDP bytes of the hub link) |
//! | `flotilla_agent_gateway_requests_total` | counter | `route`; `outcome`: `in_process`, `proxied`, `no_route`, `no_endpoint`, `unreachable`, `timeout` |
//! | `flotilla_agent_gateway_refused_connections_total` | counter | (connections over the gateway's limit) |

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proto::manifest::Runtime;
use proto::messages::ReplicaStatus;
use tokio::sync::watch;
use transport::metrics::{LinkTraffic, Traffic};

use crate::gateway::core::Outcome;
use crate::probe::ProbeKind;
use crate::wasm_usage::WasmUsage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
    runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    replica: String,
    probe: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PullLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// What a pull fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullKind {
    /// A container image.
    Image,
    /// A Wasm module or component.
    Wasm,
}

impl PullKind {
    fn label(self) -> &'static str {
        match self {
            PullKind::Image => "image",
            PullKind::Wasm => "wasm",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Artifact pulls, recorded by the runtimes as they pull; clones share the counts.
#[derive(Clone)]
pub struct Pulls {
    pulls: Family<PullLabels, Counter>,
    duration: HistogramFamily<KindLabel>,
    bytes: Family<KindLabel, Counter>,
}

impl Default for Pulls {
    fn default() -> Self {
        let pulls = Pulls {
            pulls: Family::default(),
            // 50 ms to about 14 min: a small module on a LAN to a large image over a slow link.
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.05, 2.0, 15))),
            bytes: Family::default(),
        };
        // Every series from the start, so a first pull shows as an increase from zero.
        for kind in [PullKind::Image, PullKind::Wasm] {
            for result in ["ok", "error"] {
                let _ = pulls.pulls.get_or_create(&PullLabels { kind: kind.label(), result });
            }
            let _ = pulls.bytes.get_or_create(&KindLabel { kind: kind.label() });
        }
        pulls
    }
}

impl Pulls {
    /// One pull that took `took`: `Ok` with the bytes it fetched, or `Err` if it failed.
    pub fn record(&self, kind: PullKind, took: std::time::Duration, fetched: Result<u64, ()>) {
        let kind = kind.label();
        let result = if fetched.is_ok() { "ok" } else { "error" };
        self.pulls.get_or_create(&PullLabels { kind, result }).inc();
        self.duration.get_or_create(&KindLabel { kind }).observe(took.as_secs_f64());
        if let Ok(bytes) = fetched {
            self.bytes.get_or_create(&KindLabel { kind }).inc_by(bytes);
        }
    }
}

/// Failed probe checks per replica and probe, recorded by the prober; clones share the counts.
/// Exported only for replicas on the node (a replica that left takes its counts with it).
#[derive(Clone, Default)]
pub struct ProbeFailures {
    // std Mutex: held only to add one or copy out, never across an await.
    counts: Arc<Mutex<HashMap<(String, ProbeKind), u64>>>,
}

impl ProbeFailures {
    /// One failed check of `replica`'s `kind` probe.
    pub fn failed(&self, replica: &str, kind: ProbeKind) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry((replica.to_string(), kind)).or_default() += 1;
    }

    /// The counts of the replicas `on_node` says are here; the others are forgotten.
    fn keep(&self, on_node: impl Fn(&str) -> bool) -> Vec<(String, ProbeKind, u64)> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.retain(|(replica, _), _| on_node(replica));
        counts.iter().map(|((replica, kind), n)| (replica.clone(), *kind, *n)).collect()
    }
}

/// What the HTTP gateway did with each request, by route (admins name routes, clients do not:
/// a request that matched none counts under `route=""`), and the connections it refused for
/// being over its limit; clones share the counts.
#[derive(Clone, Default)]
pub struct GatewayCounts {
    requests: Family<GatewayLabels, Counter>,
    refused: Counter,
}

impl GatewayCounts {
    pub fn request(&self, route: &str, outcome: Outcome) {
        self.requests.get_or_create(&GatewayLabels { route: route.to_string(), outcome: outcome.as_str() }).inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    /// Requests counted for `route` with `outcome` (for tests).
    pub fn count(&self, route: &str, outcome: Outcome) -> u64 {
        self.requests.get_or_create(&GatewayLabels { route: route.to_string(), outcome: outcome.as_str() }).get()
    }

    /// Connections refused so far (for tests).
    pub fn refused_count(&self) -> u64 {
        self.refused.get()
    }
}

/// What the shells count as things happen, handed to them when the agent starts (whether or
/// not metrics are served: counting costs an atomic add).
#[derive(Clone, Default)]
pub struct Recorders {
    pub pulls: Pulls,
    pub probe_failures: ProbeFailures,
    pub gateway: GatewayCounts,
}

/// What the metrics read, published by the event loop and the link.
pub struct Sources {
    pub statuses: watch::Receiver<BTreeMap<String, ReplicaStatus>>,
    pub runtimes: watch::Receiver<HashMap<String, Runtime>>,
    pub connected: watch::Receiver<bool>,
    /// The node's name: its containers' cgroups are `flotilla/<node>/<replica>`.
    pub node: String,
    /// What the Wasm replicas use.
    pub wasm: WasmUsage,
    /// The Wasm engine, for its compile cache counters (`None`: no Wasm runtime).
    pub wasm_host: Option<wasm_runtime::WasmHost>,
    /// The hub connection while a session is up (published by the link).
    pub session: watch::Receiver<Option<quinn::Connection>>,
    /// What the shells count.
    pub recorders: Recorders,
}

pub struct AgentMetrics {
    registry: Registry,
    replicas: Family<PhaseLabels, Gauge>,
    restarts: Family<ReplicaLabel, Counter>,
    connected: Gauge,
    connects: Counter,
    cpu: Family<ReplicaLabel, Counter<f64, AtomicU64>>,
    memory: Family<ReplicaLabel, Gauge>,
    wasm_cpu: Family<ReplicaLabel, Counter<f64, AtomicU64>>,
    wasm_memory: Family<ReplicaLabel, Gauge>,
    wasm_instances: Gauge,
    programs: Family<SourceLabel, Counter>,
    probe_failures: Family<ProbeLabels, Counter>,
    link_bytes: Family<DirectionLabel, Counter>,
    /// The hub connections' totals already counted into `link_bytes`.
    link: Mutex<LinkTraffic<()>>,
    sources: Sources,
    /// Values last exported per counter, so each grows by the difference (a smaller value
    /// means the replica or its container started over: a new series).
    seen: Mutex<Seen>,
}

/// Per counter, the value last exported for each replica.
#[derive(Default)]
struct Seen {
    restarts: HashMap<String, u64>,
    cpu: HashMap<String, f64>,
    wasm_cpu: HashMap<String, f64>,
    /// The Wasm host's cache counters last exported.
    programs: wasm_runtime::CacheStats,
}

impl AgentMetrics {
    pub fn new(sources: Sources) -> Arc<AgentMetrics> {
        let mut registry = Registry::default();
        let m = AgentMetrics {
            registry: Registry::default(),
            replicas: Family::default(),
            restarts: Family::default(),
            connected: Gauge::default(),
            connects: Counter::default(),
            cpu: Family::default(),
            memory: Family::default(),
            wasm_cpu: Family::default(),
            wasm_memory: Family::default(),
            wasm_instances: Gauge::default(),
            programs: Family::default(),
            probe_failures: Family::default(),
            link_bytes: Family::default(),
            link: Mutex::new(LinkTraffic::default()),
            sources,
            seen: Mutex::new(Seen::default()),
        };
        registry.register("flotilla_agent_replicas", "Replicas on this node by phase and runtime", m.replicas.clone());
        registry.register(
            "flotilla_agent_replica_restarts",
            "Restarts of each replica on this node",
            m.restarts.clone(),
        );
        registry.register("flotilla_agent_hub_connected", "1 while the link to the hub is up", m.connected.clone());
        registry.register("flotilla_agent_hub_connects", "Sessions made with the hub", m.connects.clone());
        registry.register(
            "flotilla_agent_container_cpu_seconds",
            "CPU time of each container (its cgroup)",
            m.cpu.clone(),
        );
        registry.register(
            "flotilla_agent_container_memory_bytes",
            "Memory in use by each container (its cgroup)",
            m.memory.clone(),
        );
        registry.register(
            "flotilla_agent_wasm_cpu_seconds",
            "CPU time spent running each Wasm replica's guest code",
            m.wasm_cpu.clone(),
        );
        registry.register(
            "flotilla_agent_wasm_memory_bytes",
            "Linear memory held by each Wasm replica's live instances",
            m.wasm_memory.clone(),
        );
        registry.register(
            "flotilla_agent_wasm_instances",
            "Wasm guest runs live on this node (an HTTP component's server counts once)",
            m.wasm_instances.clone(),
        );
        registry.register(
            "flotilla_agent_wasm_programs_loaded",
            "Wasm programs loaded: compiled, deserialized from the disk cache, or found in memory",
            m.programs.clone(),
        );
        registry.register(
            "flotilla_agent_probe_failures",
            "Failed health probe checks of each replica on this node",
            m.probe_failures.clone(),
        );
        let pulls = &m.sources.recorders.pulls;
        registry.register("flotilla_agent_pulls", "Artifact pulls from registries, by result", pulls.pulls.clone());
        registry.register(
            "flotilla_agent_pull_duration_seconds",
            "Duration of artifact pulls from registries",
            pulls.duration.clone(),
        );
        registry.register(
            "flotilla_agent_pulled_bytes",
            "Bytes of artifacts pulled (an image's layer sizes, a module's size)",
            pulls.bytes.clone(),
        );
        let gateway = &m.sources.recorders.gateway;
        registry.register(
            "flotilla_agent_gateway_requests",
            "Requests to the node's HTTP gateway, by route and what became of them",
            gateway.requests.clone(),
        );
        registry.register(
            "flotilla_agent_gateway_refused_connections",
            "Connections the node's HTTP gateway closed for being over its limit",
            gateway.refused.clone(),
        );
        registry.register(
            "flotilla_agent_link_bytes",
            "UDP bytes of this node's links to the hub, over all sessions",
            m.link_bytes.clone(),
        );
        for source in ["compiled", "disk", "memory"] {
            let _ = m.programs.get_or_create(&SourceLabel { source });
        }
        for direction in ["sent", "received"] {
            let _ = m.link_bytes.get_or_create(&DirectionLabel { direction });
        }
        let m = Arc::new(AgentMetrics { registry, ..m });
        // A session's last bytes count when it ends (a scrape sees only the current one).
        let (watcher, mut session) = (Arc::downgrade(&m), m.sources.session.clone());
        tokio::spawn(async move {
            let mut current = session.borrow_and_update().clone();
            while session.changed().await.is_ok() {
                let next = session.borrow_and_update().clone();
                let Some(m) = watcher.upgrade() else { return };
                if let Some(ended) =
                    current.take().filter(|c| next.as_ref().is_none_or(|n| n.stable_id() != c.stable_id()))
                {
                    let (id, total) = Traffic::of(&ended);
                    let grown = m.link.lock().unwrap_or_else(|e| e.into_inner()).end((), id, total);
                    m.count_link(grown);
                }
                current = next;
            }
        });
        // Count sessions as the link comes up.
        let (watcher, mut connected) = (Arc::downgrade(&m), m.sources.connected.clone());
        tokio::spawn(async move {
            while connected.changed().await.is_ok() {
                let up = *connected.borrow_and_update();
                let Some(m) = watcher.upgrade() else { return };
                if up {
                    m.connects.inc();
                }
            }
        });
        m
    }

    fn count_link(&self, grown: Traffic) {
        self.link_bytes.get_or_create(&DirectionLabel { direction: "sent" }).inc_by(grown.sent);
        self.link_bytes.get_or_create(&DirectionLabel { direction: "received" }).inc_by(grown.received);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let statuses = self.sources.statuses.borrow().clone();
        let runtimes = self.sources.runtimes.borrow().clone();
        let wasm = self.sources.wasm.sample();
        self.connected.set(i64::from(*self.sources.connected.borrow()));
        self.wasm_instances.set(i64::try_from(self.sources.wasm.runs()).unwrap_or(i64::MAX));
        {
            // The session is read under the link's lock: a session's end is counted after the
            // link unlisted it, so no byte counts twice (see `LinkTraffic`).
            let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
            let current = self.sources.session.borrow().as_ref().map(Traffic::of);
            let grown = link.tally(current.map(|(id, t)| ((), id, t)));
            self.count_link(grown.get(&()).copied().unwrap_or_default());
        }
        self.probe_failures.clear();
        for (replica, kind, n) in self.sources.recorders.probe_failures.keep(|r| statuses.contains_key(r)) {
            self.probe_failures.get_or_create(&ProbeLabels { replica, probe: kind.as_str() }).inc_by(n);
        }
        self.replicas.clear();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = Seen::default();
        self.memory.clear();
        self.wasm_memory.clear();
        for (name, st) in &statuses {
            let runtime = runtimes.get(name).map(ToString::to_string).unwrap_or_default();
            self.replicas.get_or_create(&PhaseLabels { phase: format!("{:?}", st.phase), runtime }).inc();
            let label = ReplicaLabel { replica: name.clone() };
            grow(&self.restarts, &label, seen.restarts.get(name).copied(), u64::from(st.restarts));
            now.restarts.insert(name.clone(), u64::from(st.restarts));
            let (usage, cpu, memory, seen_cpu, cpu_now) = match runtimes.get(name) {
                Some(Runtime::Container) => {
                    (cgroup_usage(&self.sources.node, name), &self.cpu, &self.memory, &seen.cpu, &mut now.cpu)
                }
                Some(Runtime::Wasm) => {
                    (wasm.get(name).copied(), &self.wasm_cpu, &self.wasm_memory, &seen.wasm_cpu, &mut now.wasm_cpu)
                }
                None => continue,
            };
            if let Some(usage) = usage {
                grow(cpu, &label, seen_cpu.get(name).copied(), usage.cpu_seconds);
                cpu_now.insert(name.clone(), usage.cpu_seconds);
                memory.get_or_create(&label).set(i64::try_from(usage.memory_bytes).unwrap_or(i64::MAX));
            }
        }
        for (family, before, after) in
            [(&self.cpu, &seen.cpu, &now.cpu), (&self.wasm_cpu, &seen.wasm_cpu, &now.wasm_cpu)]
        {
            for gone in before.keys().filter(|n| !after.contains_key(*n)) {
                family.remove(&ReplicaLabel { replica: gone.clone() });
            }
        }
        for gone in seen.restarts.keys().filter(|n| !now.restarts.contains_key(*n)) {
            self.restarts.remove(&ReplicaLabel { replica: gone.clone() });
        }
        if let Some(host) = &self.sources.wasm_host {
            let (before, stats) = (seen.programs, host.stats());
            for (source, b, n) in [
                ("compiled", before.compiled, stats.compiled),
                ("disk", before.loaded_from_disk, stats.loaded_from_disk),
                ("memory", before.memory_hits, stats.memory_hits),
            ] {
                // The host's counters only grow while this process lives, as a counter does.
                self.programs.get_or_create(&SourceLabel { source }).inc_by(n.saturating_sub(b));
            }
            now.programs = stats;
        }
        *seen = now;
        drop(seen);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Raises `family[label]` to `value` (from `before`, what it was last set to); a smaller
/// value starts the series over. For counters of whole numbers (restarts) and of seconds.
fn grow<N, A>(family: &Family<ReplicaLabel, Counter<N, A>>, label: &ReplicaLabel, before: Option<N>, value: N)
where
    N: Copy + PartialOrd + std::ops::Sub<Output = N>,
    A: prometheus_client::metrics::counter::Atomic<N> + Default,
{
    match before {
        Some(b) if value >= b => {
            family.get_or_create(label).inc_by(value - b);
        }
        _ => {
            family.remove(label);
            family.get_or_create(label).inc_by(value);
        }
    }
}

/// A replica's CPU time so far and memory in use now: a container's from its cgroup (v1 or
/// v2), a Wasm replica's from [`WasmUsage`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

/// Reads `flotilla/<node>/<replica>` under `/sys/fs/cgroup`.
pub fn cgroup_usage(node: &str, replica: &str) -> Option<Usage> {
    usage_under(Path::new("/sys/fs/cgroup"), node, replica)
}

fn usage_under(root: &Path, node: &str, replica: &str) -> Option<Usage> {
    let rel = PathBuf::from("flotilla").join(node).join(replica);
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let number = |s: String| s.trim().parse::<u64>().ok();
    // cgroup v2: one hierarchy.
    let unified = root.join(&rel);
    if let Some(stat) = read(unified.join("cpu.stat")) {
        let usec =
            stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse::<u64>().ok())?;
        let memory = read(unified.join("memory.current")).and_then(number)?;
        return Some(Usage { cpu_seconds: usec as f64 / 1e6, memory_bytes: memory });
    }
    // cgroup v1: a hierarchy per controller.
    let ns = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|c| read(root.join(c).join(&rel).join("cpuacct.usage")).and_then(number))?;
    let memory = read(root.join("memory").join(&rel).join("memory.usage_in_bytes")).and_then(number)?;
    Some(Usage { cpu_seconds: ns as f64 / 1e9, memory_bytes: memory })
}

/// How long [`measure`] watches CPU time to turn it into a rate.
pub const USAGE_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

/// What the node and its replicas use now (`flotilla top`): CPU over [`USAGE_WINDOW`], memory
/// at its end. Containers from their cgroups, Wasm replicas from `wasm`.
pub async fn measure(
    node: &str,
    runtimes: &HashMap<String, Runtime>,
    wasm: &WasmUsage,
) -> proto::messages::UsageReport {
    let containers: Vec<&String> =
        runtimes.iter().filter(|(_, r)| **r == Runtime::Container).map(|(name, _)| name).collect();
    let sample = || {
        let node_cpu = node_cpu_seconds();
        let mut each: HashMap<String, (Usage, Runtime)> = containers
            .iter()
            .filter_map(|r| Some(((*r).clone(), (cgroup_usage(node, r)?, Runtime::Container))))
            .collect();
        // Only replicas still assigned as Wasm: a run of a removed one may be winding down.
        let listed = wasm.sample().into_iter().filter(|(name, _)| runtimes.get(name) == Some(&Runtime::Wasm));
        each.extend(listed.map(|(name, usage)| (name, (usage, Runtime::Wasm))));
        (std::time::Instant::now(), node_cpu, each)
    };
    let (t0, node0, each0) = sample();
    tokio::time::sleep(USAGE_WINDOW).await;
    let (t1, node1, each1) = sample();
    let window = t1.duration_since(t0).as_secs_f64().max(1e-3);
    let millis = |a: f64, b: f64| ((b - a).max(0.0) / window * 1000.0).round() as u64;
    let (memory_total_bytes, memory_available) = meminfo().unwrap_or((0, 0));
    let replicas = each1
        .into_iter()
        .filter_map(|(name, (now, runtime))| {
            let (before, _) = each0.get(&name)?;
            let usage = proto::messages::Usage {
                cpu_millis: millis(before.cpu_seconds, now.cpu_seconds),
                memory_bytes: now.memory_bytes,
                runtime: Some(runtime),
            };
            Some((name, usage))
        })
        .collect();
    proto::messages::UsageReport {
        node: proto::messages::Usage {
            cpu_millis: match (node0, node1) {
                (Some(a), Some(b)) => millis(a, b),
                _ => 0,
            },
            memory_bytes: memory_total_bytes.saturating_sub(memory_available),
            runtime: None,
        },
        memory_total_bytes,
        replicas,
    }
}

/// CPU time the whole node spent busy (not idle or waiting for I/O), from `/proc/stat`.
fn node_cpu_seconds() -> Option<f64> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_proc_stat(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    // USER_HZ is 100 on every Linux architecture Flotilla builds for.
    Some(total.saturating_sub(idle) as f64 / 100.0)
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
fn meminfo() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((kb("MemTotal:")? * 1024, kb("MemAvailable:")? * 1024))
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn node_counters_are_read_from_proc() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some(1.6), "user+nice+system+irq+softirq+steal, in seconds");
        let mem = "MemTotal:       2048 kB\nMemFree:         100 kB\nMemAvailable:    512 kB\n";
        assert_eq!(parse_meminfo(mem), Some((2048 * 1024, 512 * 1024)));
        assert!(node_cpu_seconds().is_some() && meminfo().is_some_and(|(t, a)| t >= a && t > 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sources(
        statuses: watch::Receiver<BTreeMap<String, ReplicaStatus>>,
        runtimes: watch::Receiver<HashMap<String, Runtime>>,
        connected: watch::Receiver<bool>,
        wasm: WasmUsage,
    ) -> Sources {
        let (session_tx, session) = watch::channel(None);
        // No link in these tests: the sender may go.
        drop(session_tx);
        Sources {
            statuses,
            runtimes,
            connected,
            node: "n".into(),
            wasm,
            wasm_host: None,
            session,
            recorders: Recorders::default(),
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn pulls_probe_failures_programs_and_instances_are_exported() {
        let running = ReplicaStatus { phase: proto::messages::Phase::Running, ..Default::default() };
        let (st_tx, statuses) = watch::channel(BTreeMap::from([("web-0".to_string(), running.clone())]));
        let (_rt_tx, runtimes) = watch::channel(HashMap::from([("web-0".to_string(), Runtime::Wasm)]));
        let (_c_tx, connected) = watch::channel(true);
        let wasm = WasmUsage::default();
        let dir = tempfile::tempdir().unwrap();
        let host = wasm_runtime::WasmHost::new(wasm_runtime::HostConfig {
            cache_dir: dir.path().to_path_buf(),
            ..Default::default()
        })
        .unwrap();
        let mut s = sources(statuses, runtimes, connected, wasm.clone());
        s.wasm_host = Some(host.clone());
        let recorders = s.recorders.clone();
        let m = AgentMetrics::new(s);

        // Before anything happened: every pull series at zero, no probe series.
        let text = m.render();
        assert_eq!(value(&text, "flotilla_agent_pulls_total{kind=\"image\",result=\"ok\"}"), Some(0.0), "{text}");
        assert_eq!(value(&text, "flotilla_agent_link_bytes_total{direction=\"sent\"}"), Some(0.0), "{text}");
        assert!(!text.contains("flotilla_agent_probe_failures_total{"), "{text}");

        let second = std::time::Duration::from_secs(1);
        recorders.pulls.record(PullKind::Image, second, Ok(1000));
        recorders.pulls.record(PullKind::Image, second, Ok(24));
        recorders.pulls.record(PullKind::Wasm, second, Err(()));
        for kind in [ProbeKind::Readiness, ProbeKind::Readiness, ProbeKind::Liveness] {
            recorders.probe_failures.failed("web-0", kind);
        }
        recorders.probe_failures.failed("gone-0", ProbeKind::Startup);
        let module = wat::parse_str(r#"(module (func (export "_start")))"#).unwrap();
        let _ = host.load_bytes(&module).unwrap();
        let _ = host.load_bytes(&module).unwrap();
        let _run = wasm.track("web-0");

        let text = m.render();
        let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("no {series}: {text}"));
        assert_eq!(v("flotilla_agent_pulls_total{kind=\"image\",result=\"ok\"}"), 2.0);
        assert_eq!(v("flotilla_agent_pulls_total{kind=\"wasm\",result=\"error\"}"), 1.0);
        assert_eq!(v("flotilla_agent_pulled_bytes_total{kind=\"image\"}"), 1024.0);
        assert_eq!(v("flotilla_agent_pulled_bytes_total{kind=\"wasm\"}"), 0.0, "a failed pull fetched nothing");
        assert_eq!(v("flotilla_agent_pull_duration_seconds_count{kind=\"image\"}"), 2.0);
        assert_eq!(v("flotilla_agent_probe_failures_total{replica=\"web-0\",probe=\"readiness\"}"), 2.0);
        assert_eq!(v("flotilla_agent_probe_failures_total{replica=\"web-0\",probe=\"liveness\"}"), 1.0);
        assert!(!text.contains("gone-0"), "a replica not on the node has no series: {text}");
        assert_eq!(v("flotilla_agent_wasm_programs_loaded_total{source=\"compiled\"}"), 1.0);
        assert_eq!(v("flotilla_agent_wasm_programs_loaded_total{source=\"memory\"}"), 1.0);
        assert_eq!(v("flotilla_agent_wasm_instances"), 1.0);

        // Counters hold across scrapes and grow by what happened since.
        recorders.probe_failures.failed("web-0", ProbeKind::Readiness);
        let _ = host.load_bytes(&module).unwrap();
        let text = m.render();
        assert_eq!(
            value(&text, "flotilla_agent_probe_failures_total{replica=\"web-0\",probe=\"readiness\"}"),
            Some(3.0)
        );
        assert_eq!(value(&text, "flotilla_agent_wasm_programs_loaded_total{source=\"memory\"}"), Some(2.0));
        assert_eq!(value(&text, "flotilla_agent_wasm_programs_loaded_total{source=\"compiled\"}"), Some(1.0));
        // The replica leaves the node: its probe series go, and a new replica of the same
        // name later counts from zero.
        st_tx.send_replace(BTreeMap::new());
        let text = m.render();
        assert!(!text.contains("flotilla_agent_probe_failures_total{"), "{text}");
        st_tx.send_replace(BTreeMap::from([("web-0".to_string(), running)]));
        assert!(!m.render().contains("flotilla_agent_probe_failures_total{"));
    }

    #[test]
    fn usage_is_read_from_either_cgroup_version() {
        let v1 = tempfile::tempdir().unwrap();
        let rel = Path::new("flotilla/n1/web-0");
        std::fs::create_dir_all(v1.path().join("cpuacct").join(rel)).unwrap();
        std::fs::create_dir_all(v1.path().join("memory").join(rel)).unwrap();
        std::fs::write(v1.path().join("cpuacct").join(rel).join("cpuacct.usage"), "2500000000\n").unwrap();
        std::fs::write(v1.path().join("memory").join(rel).join("memory.usage_in_bytes"), "1048576\n").unwrap();
        assert_eq!(usage_under(v1.path(), "n1", "web-0"), Some(Usage { cpu_seconds: 2.5, memory_bytes: 1 << 20 }));
        assert_eq!(usage_under(v1.path(), "n1", "other"), None);

        let v2 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v2.path().join(rel)).unwrap();
        std::fs::write(v2.path().join(rel).join("cpu.stat"), "usage_usec 1500000\nuser_usec 1000000\n").unwrap();
        std::fs::write(v2.path().join(rel).join("memory.current"), "4096\n").unwrap();
        assert_eq!(usage_under(v2.path(), "n1", "web-0"), Some(Usage { cpu_seconds: 1.5, memory_bytes: 4096 }));
    }

    #[tokio::test]
    async fn replicas_and_restarts_are_exported_and_follow_the_replicas() {
        let status = |phase, restarts| ReplicaStatus { phase, restarts, ..Default::default() };
        let (st_tx, statuses) = watch::channel(BTreeMap::from([
            ("a-0".to_string(), status(proto::messages::Phase::Running, 2)),
            ("b-0".to_string(), status(proto::messages::Phase::Pending, 0)),
        ]));
        let (_rt_tx, runtimes) =
            watch::channel(HashMap::from([("a-0".to_string(), Runtime::Wasm), ("b-0".to_string(), Runtime::Wasm)]));
        let (_c_tx, connected) = watch::channel(true);
        let m = AgentMetrics::new(sources(statuses, runtimes, connected, WasmUsage::default()));
        let text = m.render();
        assert!(text.contains("flotilla_agent_replicas{phase=\"Running\",runtime=\"wasm\"} 1"), "{text}");
        assert!(text.contains("flotilla_agent_replica_restarts_total{replica=\"a-0\"} 2"), "{text}");
        assert!(text.contains("flotilla_agent_hub_connected 1"), "{text}");
        // The restart count grows; a replica that left the node leaves no series.
        st_tx.send_replace(BTreeMap::from([("a-0".to_string(), status(proto::messages::Phase::Running, 5))]));
        let text = m.render();
        assert!(text.contains("flotilla_agent_replica_restarts_total{replica=\"a-0\"} 5"), "{text}");
        assert!(!text.contains("b-0"), "{text}");
    }
}

#[cfg(test)]
mod wasm_tests {
    use super::*;
    use std::time::{Duration, Instant};
    use wasm_runtime::{HostConfig, OutputSink, RunOptions, WasmHost};

    struct Discard;
    impl OutputSink for Discard {
        fn write(&self, _: &[u8]) {}
    }

    /// Sleeps for 60 s (poll_oneoff on a relative monotonic clock) in `pages` pages of memory.
    fn sleeper(pages: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") {pages})
                (func (export "_start")
                    (i64.store (i32.const 0) (i64.const 7))
                    (i32.store8 (i32.const 8) (i32.const 0))
                    (i32.store (i32.const 16) (i32.const 1))
                    (i64.store (i32.const 24) (i64.const 60000000000))
                    (i64.store (i32.const 32) (i64.const 0))
                    (i32.store16 (i32.const 40) (i32.const 0))
                    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#
        ))
        .unwrap()
    }

    // Two workers, as the agent has at least: the busy guest keeps one, the test the other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wasm_replicas_are_measured_for_top_and_exported_while_they_run() {
        let dir = tempfile::tempdir().unwrap();
        let host = WasmHost::new(HostConfig { cache_dir: dir.path().to_path_buf(), ..HostConfig::default() }).unwrap();
        let busy =
            wat::parse_str(r#"(module (memory (export "memory") 4) (func (export "_start") (loop $l (br $l))))"#)
                .unwrap();
        let wasm = WasmUsage::default();
        let start = |name: &str, bytes: &[u8]| {
            let program = host.load_bytes(bytes).unwrap();
            let metering = wasm.track(name);
            let mut o = RunOptions::new(name, Arc::new(Discard), Arc::new(Discard));
            o.usage = Some(metering.usage());
            let host = host.clone();
            tokio::spawn(async move {
                let _listed = metering;
                host.run(&program, o).await
            })
        };
        let started = Instant::now();
        let runs = [start("spin-0", &busy), start("idle-0", &sleeper(2))];
        let runtimes = HashMap::from([
            ("spin-0".to_string(), Runtime::Wasm),
            ("idle-0".to_string(), Runtime::Wasm),
            // Assigned but not running: nothing to show.
            ("later-0".to_string(), Runtime::Wasm),
        ]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = measure("n", &runtimes, &wasm).await;
        let elapsed = started.elapsed();
        assert_eq!(report.replicas.keys().collect::<Vec<_>>(), ["idle-0", "spin-0"], "{report:?}");
        let (spin, idle) = (report.replicas["spin-0"], report.replicas["idle-0"]);
        // One core busy, measured over the window: about 1000m (less on a loaded machine).
        assert!((500..=1200).contains(&spin.cpu_millis), "{spin:?}");
        assert_eq!((spin.memory_bytes, spin.runtime), (4 << 16, Some(Runtime::Wasm)));
        assert!(idle.cpu_millis < 50, "{idle:?}");
        assert_eq!((idle.memory_bytes, idle.runtime), (2 << 16, Some(Runtime::Wasm)));
        // Over the whole ~1 s run so far, the same share of wall time.
        let total = wasm.sample()["spin-0"].cpu_seconds / elapsed.as_secs_f64();
        assert!((0.5..=1.2).contains(&total), "{total} of {elapsed:?}");

        // Prometheus: the running replicas' series, and none once they end.
        let status = ReplicaStatus { phase: proto::messages::Phase::Running, ..Default::default() };
        let statuses = runtimes.keys().map(|n| (n.clone(), status.clone())).collect();
        let (_st_tx, statuses) = watch::channel(statuses);
        let (_rt_tx, runtimes) = watch::channel(runtimes);
        let (_c_tx, connected) = watch::channel(true);
        let m = AgentMetrics::new(super::tests::sources(statuses, runtimes, connected, wasm.clone()));
        let text = m.render();
        assert!(text.contains("flotilla_agent_wasm_memory_bytes{replica=\"spin-0\"} 262144"), "{text}");
        assert!(text.contains("flotilla_agent_wasm_memory_bytes{replica=\"idle-0\"} 131072"), "{text}");
        let cpu = |text: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix("flotilla_agent_wasm_cpu_seconds_total{replica=\"spin-0\"} "))
                .map(|v| v.parse::<f64>().unwrap())
        };
        let first = cpu(&text).unwrap_or_else(|| panic!("no cpu series: {text}"));
        assert!(first > 0.5, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(cpu(&m.render()).unwrap() > first, "the counter grows while the guest runs");
        // A replica that does not run has no usage series (only its restart count).
        assert!(!text.lines().any(|l| l.starts_with("flotilla_agent_wasm") && l.contains("later-0")), "{text}");
        for run in runs {
            run.abort();
            let _ = run.await;
        }
        assert!(wasm.sample().is_empty());
        let text = m.render();
        assert!(!text.contains("flotilla_agent_wasm_cpu_seconds_total{"), "{text}");
        assert!(!text.contains("flotilla_agent_wasm_memory_bytes{"), "{text}");
    }
}
