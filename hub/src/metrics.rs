//! The hub's Prometheus metrics (`hub --metrics-listen ADDR`, `GET /metrics`).
//!
//! Most are read at scrape time from the store and the sessions (a scrape every 15 s costs
//! three queries); the controller's pass duration and the store's transaction times are
//! observed as they happen. Labels are bounded by what the cluster holds: states, phases,
//! runtimes and store operations are fixed sets, and the per-replica, per-workload and
//! per-node series exist only while their replica, workload or node does.
//!
//! Link traffic is quinn's UDP byte count of each agent session, added up over a node's
//! sessions ([`LinkTraffic`]): read at each scrape, and once more when a session ends so its
//! last bytes count.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `flotilla_hub_nodes` | gauge | `state`: `ready`, `not_ready`, `cordoned` |
//! | `flotilla_hub_replicas` | gauge | `phase`, `runtime` |
//! | `flotilla_hub_replica_restarts_total` | counter | `workload`, `replica`, `node` |
//! | `flotilla_hub_agent_sessions` | gauge | (agents connected to this hub) |
//! | `flotilla_hub_node_rtt_seconds` | gauge | `node` (its link's round-trip time) |
//! | `flotilla_hub_workloads` | gauge | |
//! | `flotilla_hub_controller_pass_duration_seconds` | histogram | |
//! | `flotilla_hub_leader` | gauge | 1 while this hub holds the controller lease |
//! | `flotilla_hub_workload_replicas` | gauge | `workload`, `state`: `desired`, `updated`, `ready`, `available` (as `rollout status` counts) |
//! | `flotilla_hub_link_bytes_total` | counter | `node`, `direction`: `sent`, `received` (UDP bytes of its links to this hub) |
//! | `flotilla_hub_store_seconds` | histogram | `op`: `controller_read`, `controller_write`, `status`, `apply` |

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use transport::metrics::{LinkTraffic, Traffic};

use crate::cluster::Shared;
use crate::controller::{self, Reported};
use crate::store::StoreError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
    runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    workload: String,
    replica: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadStateLabels {
    workload: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    node: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// The store transactions timed by `flotilla_hub_store_seconds`: the ones on the paths that
/// matter (the controller's loop, agents' reports, operators' applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOp {
    /// The controller pass's read of everything it decides on.
    ControllerRead,
    /// The controller pass's fenced write of what it decided.
    ControllerWrite,
    /// Recording the replica statuses an agent reports.
    Status,
    /// `flotilla apply`.
    Apply,
}

impl StoreOp {
    const ALL: [StoreOp; 4] = [StoreOp::ControllerRead, StoreOp::ControllerWrite, StoreOp::Status, StoreOp::Apply];

    fn label(self) -> &'static str {
        match self {
            StoreOp::ControllerRead => "controller_read",
            StoreOp::ControllerWrite => "controller_write",
            StoreOp::Status => "status",
            StoreOp::Apply => "apply",
        }
    }
}

/// The nodes' link traffic counted so far.
#[derive(Default)]
struct Links {
    traffic: LinkTraffic<String>,
    /// Nodes with a `link_bytes` series, so those of deleted nodes can go.
    nodes: HashSet<String>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub(crate) struct HubMetrics {
    registry: Registry,
    nodes: Family<StateLabel, Gauge>,
    replicas: Family<PhaseLabels, Gauge>,
    restarts: Family<ReplicaLabels, Counter>,
    sessions: Gauge,
    rtt: Family<NodeLabel, Gauge<f64, AtomicU64>>,
    workloads: Gauge,
    leader: Gauge,
    pub(crate) pass_duration: Histogram,
    workload_replicas: Family<WorkloadStateLabels, Gauge>,
    link_bytes: Family<LinkLabels, Counter>,
    store_seconds: HistogramFamily<OpLabel>,
    links: Mutex<Links>,
    /// One scrape refreshes the families at a time (they are cleared and filled again).
    refreshing: tokio::sync::Mutex<()>,
    /// The restart counts last exported, per replica: counters only grow by the difference.
    seen_restarts: Mutex<HashMap<ReplicaLabels, u32>>,
}

impl Default for HubMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = HubMetrics {
            nodes: Family::default(),
            replicas: Family::default(),
            restarts: Family::default(),
            sessions: Gauge::default(),
            rtt: Family::default(),
            workloads: Gauge::default(),
            leader: Gauge::default(),
            // 1 ms to about 16 s.
            pass_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            workload_replicas: Family::default(),
            link_bytes: Family::default(),
            // 100 µs (SQLite on a fast disk) to about 3 s (a shared store far away).
            store_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 15))),
            links: Mutex::new(Links::default()),
            refreshing: tokio::sync::Mutex::new(()),
            seen_restarts: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register("flotilla_hub_nodes", "Nodes by state", m.nodes.clone());
        registry.register("flotilla_hub_replicas", "Replicas by phase and runtime", m.replicas.clone());
        registry.register(
            "flotilla_hub_replica_restarts",
            "Restarts of each replica on its node, as its agent reports them",
            m.restarts.clone(),
        );
        registry.register("flotilla_hub_agent_sessions", "Agents connected to this hub", m.sessions.clone());
        registry.register(
            "flotilla_hub_node_rtt_seconds",
            "Round-trip time of each node's link to this hub",
            m.rtt.clone(),
        );
        registry.register("flotilla_hub_workloads", "Workloads in the store", m.workloads.clone());
        registry.register("flotilla_hub_leader", "1 while this hub holds the controller lease", m.leader.clone());
        registry.register(
            "flotilla_hub_controller_pass_duration_seconds",
            "Duration of controller passes (read, decide, write)",
            m.pass_duration.clone(),
        );
        registry.register(
            "flotilla_hub_workload_replicas",
            "Replicas of each workload: desired, updated (current template), ready (updated and available), available",
            m.workload_replicas.clone(),
        );
        registry.register(
            "flotilla_hub_link_bytes",
            "UDP bytes of each node's links to this hub, over all sessions",
            m.link_bytes.clone(),
        );
        registry.register(
            "flotilla_hub_store_seconds",
            "Duration of store transactions, by operation",
            m.store_seconds.clone(),
        );
        for op in StoreOp::ALL {
            let _ = m.store_seconds.get_or_create(&OpLabel { op: op.label() });
        }
        HubMetrics { registry, ..m }
    }
}

impl HubMetrics {
    /// Runs the store transaction `work`, timing it as `op`.
    pub(crate) async fn timed<T>(&self, op: StoreOp, work: impl Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = work.await;
        self.store_seconds.get_or_create(&OpLabel { op: op.label() }).observe(started.elapsed().as_secs_f64());
        out
    }

    /// Counts the last bytes of `node`'s session that ended on `conn`.
    pub(crate) fn link_ended(&self, node: &str, conn: &quinn::Connection) {
        let (id, total) = Traffic::of(conn);
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let grown = links.traffic.end(node.to_string(), id, total);
        links.nodes.insert(node.to_string());
        self.count_link(node, grown);
    }

    fn count_link(&self, node: &str, grown: Traffic) {
        for (direction, bytes) in [("sent", grown.sent), ("received", grown.received)] {
            self.link_bytes.get_or_create(&LinkLabels { node: node.to_string(), direction }).inc_by(bytes);
        }
    }
}

/// The exposition text, refreshed from the store and the sessions (with the store down, the
/// values of the last refresh).
pub(crate) async fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let _one = m.refreshing.lock().await;
    if let Err(e) = refresh(shared).await {
        tracing::warn!(error = %e, "metrics: cannot read the store; serving the last values");
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

async fn refresh(shared: &Shared) -> Result<(), StoreError> {
    let m = &shared.metrics;
    let nodes = shared.store.nodes().await?;
    let replicas = shared.store.replicas().await?;
    let workloads = shared.store.workloads().await?;
    let runtimes: HashMap<String, String> =
        workloads.iter().map(|w| (w.manifest.metadata.name.clone(), w.manifest.spec.runtime.to_string())).collect();

    m.nodes.clear();
    for state in ["ready", "not_ready", "cordoned"] {
        m.nodes.get_or_create(&StateLabel { state }).set(0);
    }
    for n in &nodes {
        let state = if shared.is_connected(&n.name) { "ready" } else { "not_ready" };
        m.nodes.get_or_create(&StateLabel { state }).inc();
        if n.cordoned {
            m.nodes.get_or_create(&StateLabel { state: "cordoned" }).inc();
        }
    }
    m.replicas.clear();
    let mut seen = m.seen_restarts.lock().unwrap_or_else(|e| e.into_inner());
    let mut current = HashMap::with_capacity(replicas.len());
    for r in &replicas {
        let runtime = runtimes.get(&r.workload).cloned().unwrap_or_default();
        m.replicas.get_or_create(&PhaseLabels { phase: format!("{:?}", r.status.phase), runtime }).inc();
        let labels = ReplicaLabels {
            workload: r.workload.clone(),
            replica: r.name.clone(),
            node: r.node.clone().unwrap_or_default(),
        };
        let before = seen.get(&labels).copied().unwrap_or(0);
        let counter = m.restarts.get_or_create(&labels);
        // A replica started over (moved, recreated) reports fewer: a new series would be
        // right, so the counter is made anew.
        if r.status.restarts < before {
            drop(counter);
            m.restarts.remove(&labels);
            m.restarts.get_or_create(&labels).inc_by(u64::from(r.status.restarts));
        } else {
            counter.inc_by(u64::from(r.status.restarts - before));
        }
        current.insert(labels, r.status.restarts);
    }
    for gone in seen.keys().filter(|l| !current.contains_key(*l)) {
        m.restarts.remove(gone);
    }
    *seen = current;
    drop(seen);

    m.rtt.clear();
    let sessions: Vec<(String, quinn::Connection)> =
        shared.sessions.lock().unwrap().iter().map(|(n, s)| (n.clone(), s.conn.clone())).collect();
    m.sessions.set(sessions.len() as i64);
    for (node, conn) in &sessions {
        m.rtt.get_or_create(&NodeLabel { node: node.clone() }).set(conn.rtt().as_secs_f64());
    }
    {
        // The live sessions are read under the links' lock: a session's end is counted after
        // it left the list, so no byte counts twice.
        let mut links = m.links.lock().unwrap_or_else(|e| e.into_inner());
        let sessions: Vec<(String, quinn::Connection)> =
            shared.sessions.lock().unwrap().iter().map(|(n, s)| (n.clone(), s.conn.clone())).collect();
        let live = sessions.iter().map(|(node, conn)| {
            let (id, total) = Traffic::of(conn);
            (node.clone(), id, total)
        });
        for (node, grown) in links.traffic.tally(live) {
            m.count_link(&node, grown);
            links.nodes.insert(node);
        }
        // A deleted node's series go (a node re-joining under its name starts over).
        let known: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        links.nodes.retain(|node| {
            let keep = known.contains(node.as_str());
            if !keep {
                for direction in ["sent", "received"] {
                    m.link_bytes.remove(&LinkLabels { node: node.clone(), direction });
                }
            }
            keep
        });
    }
    m.workload_replicas.clear();
    let mut by_workload: HashMap<&str, Vec<&crate::store::ReplicaRow>> = HashMap::new();
    for r in &replicas {
        by_workload.entry(r.workload.as_str()).or_default().push(r);
    }
    // Available by the controller's rule, on this hub's view of which nodes are connected
    // (what `rollout status` shows).
    let available = |r: &crate::store::ReplicaRow| {
        let connected = r.node.as_deref().is_some_and(|n| shared.is_connected(n));
        controller::is_available(&Reported::of(&r.status), &r.template_hash, connected)
    };
    for w in &workloads {
        let name = &w.manifest.metadata.name;
        let own = by_workload.get(name.as_str()).map_or(&[][..], Vec::as_slice);
        let counts = crate::revisions::rollout_counts(w, own, available);
        for (state, n) in [
            ("desired", counts.desired),
            ("updated", counts.updated),
            ("ready", counts.ready),
            ("available", counts.available),
        ] {
            m.workload_replicas.get_or_create(&WorkloadStateLabels { workload: name.clone(), state }).set(i64::from(n));
        }
    }
    m.workloads.set(workloads.len() as i64);
    m.leader.set(i64::from(*shared.leader.borrow()));
    Ok(())
}

/// Nodes asked at once by `flotilla top`.
const TOP_PARALLEL: usize = 64;
/// How long a node has to answer `flotilla top` (it measures for half a second).
const TOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `flotilla top`: asks every node connected to this hub what it uses now
/// (`HubRequest::Usage`), a bounded number at a time; a node that does not answer in time
/// is listed without a report.
pub(crate) async fn top(shared: &Shared) -> proto::messages::ApiResponse {
    use proto::messages::{HubRequest, NodeUsageView, UsageReport};
    let sessions: Vec<(String, quinn::Connection)> =
        shared.sessions.lock().unwrap().iter().map(|(n, s)| (n.clone(), s.conn.clone())).collect();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(TOP_PARALLEL));
    let mut asks = tokio::task::JoinSet::new();
    for (node, conn) in sessions {
        let slots = slots.clone();
        asks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let ask = async {
                let (mut send, mut recv) = conn.open_bi().await.ok()?;
                transport::frame::write(&mut send, &HubRequest::Usage).await.ok()?;
                let _ = send.finish();
                transport::frame::read::<UsageReport>(&mut recv).await.ok()?
            };
            let report = tokio::time::timeout(TOP_TIMEOUT, ask).await.ok().flatten();
            NodeUsageView { node, report }
        });
    }
    let mut nodes = Vec::new();
    while let Some(done) = asks.join_next().await {
        if let Ok(view) = done {
            nodes.push(view);
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    proto::messages::ApiResponse::Top { nodes }
}
