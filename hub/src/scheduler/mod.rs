//! The scheduler: a pure function from a snapshot of nodes, workloads, current placements and
//! the time to the placements the cluster should have. No I/O, no clock of its own, no
//! randomness: the same snapshot yields the same decisions whatever the order of its inputs,
//! and feeding the decisions back in changes nothing, so the controller can run it on every
//! change and after a crash without surprises. It never talks to nodes or the store.
//!
//! Workload kinds:
//! - `Replicated`: replicas `<name>-0 .. <name>-(n-1)`, spread over nodes, then the rollout's
//!   `surge` stand-ins `<name>-n ..` after them; scaling down drops the highest indexes.
//! - `EveryNode`: one replica `<name>-<node>` on each node that passes the workload's runtime,
//!   os/arch, selector and taint filters, whether cordoned or NotReady (as a Kubernetes
//!   DaemonSet tolerates `unschedulable`): it is bound to its node and never moved. Its index
//!   is sticky (taken from the current placement, else the lowest free one) so that
//!   `(workload, index)` stays unique.
//! - `Job`: [`job_plan`] decides which indexes run; they are placed like replicas.
//!
//! Rules:
//! - New replicas go to nodes that are Ready, not cordoned or draining, support the runtime
//!   and os/arch, match the selector and expressions, carry the spread label (if the workload
//!   spreads), have no untolerated NoSchedule/NoExecute taint, have the host ports free and
//!   the requested CPU and memory left under their allocatable capacity.
//! - Among those: the spread domain with the fewest replicas of the workload, then (least
//!   allocated, the default) the node with the fewest replicas of the workload, the lowest
//!   utilisation after placing, the fewest replicas overall, the name; or (bin-pack) the
//!   highest utilisation, the most replicas overall, the name.
//! - A placed replica stays while its node exists, supports the runtime and os/arch, matches
//!   the selector, has no untolerated NoExecute taint and still has room (placements are
//!   re-counted in a fixed order, so of two that no longer fit together the first stays).
//!   Cordons and NoSchedule taints never evict. A NotReady node keeps its replicas unless the
//!   workload's `failover` is `After(ms)` and the node has been NotReady that long.
//! - A draining node is cordoned; its `Replicated` replicas move elsewhere, at most
//!   `max_unavailable` minus the workload's unavailable replicas per pass, and only when
//!   another node can take them. Job replicas finish there; EveryNode replicas stay.
//! - A node holds at most one replica per host port.
//! - A replica no node can take is left unplaced with a reason that counts nodes per cause.

mod filter;
mod job;
mod pool;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};

use proto::manifest::{HostPort, Runtime};

pub use filter::{ARCH_LABEL, OS_LABEL};
pub use job::{IndexOutcome, JobPhase, JobPlan, JobProgress, JobSpec, job_plan};

use pool::Pool;

/// CPU and memory, as requested by a replica or offered by a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaintEffect {
    /// No new replicas unless tolerated; running ones stay.
    #[default]
    NoSchedule,
    /// No new replicas, and running ones that do not tolerate it are moved off.
    NoExecute,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Toleration {
    /// Empty with `Exists`: every key.
    pub key: String,
    pub operator: TolerationOperator,
    /// Compared under `Equal`, ignored under `Exists`.
    pub value: String,
    /// `None`: every effect.
    pub effect: Option<TaintEffect>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SelectorOperator {
    #[default]
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Used by `In` and `NotIn`.
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SchedNode {
    /// Unique in the snapshot.
    pub name: String,
    /// Connected now.
    pub ready: bool,
    pub runtimes: Vec<Runtime>,
    /// The node's labels, including the built-in `flotilla.dev/*` ones.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// No new placements (EveryNode excepted); what runs there stays.
    pub cordoned: bool,
    /// Cordoned, and its Replicated replicas are moved off within their disruption budgets.
    pub draining: bool,
    /// What replicas may request in total; `None` (not reported): no limit.
    pub allocatable: Option<Resources>,
    /// Since when the node has been NotReady (same clock as `Observed::now_ms`); `None` while
    /// ready or unknown, which never triggers failover.
    pub not_ready_since_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WorkloadKind {
    #[default]
    Replicated,
    EveryNode,
    Job(JobSpec),
}

/// How to choose among feasible nodes (after spread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Packing {
    /// Fewest replicas of the workload, then lowest utilisation: spreads load.
    #[default]
    LeastAllocated,
    /// Highest utilisation first: fills nodes and leaves others empty.
    BinPack,
}

/// What happens to replicas on a node that stopped being Ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Failover {
    /// They stay assigned to it (the edge keeps running through partitions).
    #[default]
    Never,
    /// They move once the node has been NotReady for at least this many milliseconds.
    After(u64),
}

#[derive(Debug, Clone)]
pub struct SchedWorkload {
    pub name: String,
    /// Replicated only: the desired count.
    pub replicas: u32,
    /// Replicated only: extra replicas a rollout runs beyond `replicas` for now (its
    /// `maxSurge` stand-ins, the indexes after the desired ones). Placed like the others.
    pub surge: u32,
    pub runtime: Runtime,
    /// `matchLabels`.
    pub node_selector: BTreeMap<String, String>,
    /// Ports each replica takes on its node (published container ports, Wasm HTTP ports).
    pub host_ports: Vec<HostPort>,
    pub kind: WorkloadKind,
    /// Required value of the node's `flotilla.dev/os` label.
    pub os: Option<String>,
    /// Required value of the node's `flotilla.dev/arch` label.
    pub arch: Option<String>,
    /// `matchExpressions`, all of which must hold.
    pub match_expressions: Vec<SelectorRequirement>,
    pub tolerations: Vec<Toleration>,
    /// Per replica.
    pub requests: Resources,
    /// Node label whose values are spread domains (`site`): new replicas go to the domain with
    /// the fewest replicas of this workload, and only to nodes carrying the label.
    pub spread_by: Option<String>,
    pub packing: Packing,
    pub failover: Failover,
    /// Disruption budget of drains, an absolute count. Default 1.
    pub max_unavailable: u32,
    /// Job only: what the indexes did so far.
    pub job_progress: JobProgress,
}

impl Default for SchedWorkload {
    fn default() -> Self {
        SchedWorkload {
            name: String::new(),
            replicas: 0,
            surge: 0,
            runtime: Runtime::Wasm,
            node_selector: BTreeMap::new(),
            host_ports: Vec::new(),
            kind: WorkloadKind::Replicated,
            os: None,
            arch: None,
            match_expressions: Vec::new(),
            tolerations: Vec::new(),
            requests: Resources::default(),
            spread_by: None,
            packing: Packing::LeastAllocated,
            failover: Failover::Never,
            max_unavailable: 1,
            job_progress: JobProgress::default(),
        }
    }
}

impl SchedWorkload {
    /// How many indexed replicas a Replicated workload runs now: the desired ones and the
    /// rollout's stand-ins.
    fn slots(&self) -> u32 {
        self.replicas.saturating_add(self.surge)
    }
}

/// A replica and the node it is on (`None`: not placed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub replica: String,
    pub workload: String,
    pub index: u32,
    pub node: Option<String>,
}

/// What the scheduler observes beyond the desired state.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Time of this pass (same clock as `SchedNode::not_ready_since_ms`).
    pub now_ms: u64,
    /// Replica name → the node it is reported running and ready on. A replica counts as
    /// available for drain budgets only while placed on that node and the node is Ready.
    pub ready: HashMap<String, String>,
}

impl Observed {
    /// Time 0 and every placed replica ready: what [`schedule`] assumes.
    pub fn all_ready(current: &[Placement]) -> Observed {
        let ready = current.iter().filter_map(|p| Some((p.replica.clone(), p.node.clone()?))).collect();
        Observed { now_ms: 0, ready }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Every replica the cluster should have, sorted by workload then index.
    pub placements: Vec<Placement>,
    /// Why each unplaced replica could not be placed.
    pub unschedulable: BTreeMap<String, String>,
    /// Plan of every Job workload.
    pub jobs: BTreeMap<String, JobPlan>,
    /// Every draining node → replicas still assigned to it that the drain moves or waits for
    /// (Replicated and Job); 0: the drain is complete.
    pub drains: BTreeMap<String, u32>,
    /// Inputs the scheduler had to ignore (duplicate names, replica-name collisions).
    pub warnings: Vec<String>,
}

pub fn replica_name(workload: &str, index: u32) -> String {
    format!("{workload}-{index}")
}

/// Name of an EveryNode replica: stable for its node.
pub fn every_node_replica_name(workload: &str, node: &str) -> String {
    format!("{workload}-{node}")
}

/// Why a node cannot take a replica; the order is the order of the explanation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Misfit {
    NotReady,
    Runtime,
    Platform,
    Selector,
    Taint,
    Cordoned,
    Topology,
    PortInUse,
    Cpu,
    Memory,
}

/// Mutable per-node tallies while scheduling.
#[derive(Debug, Clone, Default)]
struct NodeState {
    used: Resources,
    load: u32,
    ports: Vec<HostPort>,
}

impl NodeState {
    fn ports_free(&self, w: &SchedWorkload) -> bool {
        !w.host_ports.iter().any(|p| self.ports.contains(p))
    }

    /// `None` if `w`'s request fits, else which resource does not.
    fn resource_misfit(&self, node: &SchedNode, w: &SchedWorkload) -> Option<Misfit> {
        let cap = node.allocatable?;
        if self.used.cpu_millis.saturating_add(w.requests.cpu_millis) > cap.cpu_millis {
            Some(Misfit::Cpu)
        } else if self.used.memory_bytes.saturating_add(w.requests.memory_bytes) > cap.memory_bytes {
            Some(Misfit::Memory)
        } else {
            None
        }
    }

    fn fits(&self, node: &SchedNode, w: &SchedWorkload) -> bool {
        self.ports_free(w) && self.resource_misfit(node, w).is_none()
    }

    fn add(&mut self, w: &SchedWorkload) {
        self.used.cpu_millis = self.used.cpu_millis.saturating_add(w.requests.cpu_millis);
        self.used.memory_bytes = self.used.memory_bytes.saturating_add(w.requests.memory_bytes);
        self.load += 1;
        self.ports.extend(&w.host_ports);
    }

    fn remove(&mut self, w: &SchedWorkload) {
        self.used.cpu_millis = self.used.cpu_millis.saturating_sub(w.requests.cpu_millis);
        self.used.memory_bytes = self.used.memory_bytes.saturating_sub(w.requests.memory_bytes);
        self.load = self.load.saturating_sub(1);
        self.ports.retain(|p| !w.host_ports.contains(p));
    }
}

/// Static reasons `node` cannot take a new replica of `w` (not capacity, ports or readiness).
fn static_misfit(node: &SchedNode, w: &SchedWorkload) -> Option<Misfit> {
    if !node.runtimes.contains(&w.runtime) {
        Some(Misfit::Runtime)
    } else if !filter::platform_matches(w, &node.labels) {
        Some(Misfit::Platform)
    } else if !filter::selector_matches(w, &node.labels) {
        Some(Misfit::Selector)
    } else if filter::untolerated(node, w, &[TaintEffect::NoSchedule, TaintEffect::NoExecute]) {
        Some(Misfit::Taint)
    } else if w.kind != WorkloadKind::EveryNode && (node.cordoned || node.draining) {
        Some(Misfit::Cordoned)
    } else if w.kind != WorkloadKind::EveryNode && w.spread_by.as_ref().is_some_and(|k| !node.labels.contains_key(k)) {
        Some(Misfit::Topology)
    } else {
        None
    }
}

/// Whether a replica of `w` already on `node` may stay there (capacity aside).
fn may_stay(node: &SchedNode, w: &SchedWorkload) -> bool {
    node.runtimes.contains(&w.runtime)
        && filter::platform_matches(w, &node.labels)
        && filter::selector_matches(w, &node.labels)
        && !filter::untolerated(node, w, &[TaintEffect::NoExecute])
}

/// Why `node` cannot take a new replica of `w` now.
fn misfit(node: &SchedNode, st: &NodeState, w: &SchedWorkload) -> Option<Misfit> {
    if let Some(m) = static_misfit(node, w) {
        return Some(m);
    }
    if !st.ports_free(w) {
        return Some(Misfit::PortInUse);
    }
    if let Some(m) = st.resource_misfit(node, w) {
        return Some(m);
    }
    (!node.ready && w.kind != WorkloadKind::EveryNode).then_some(Misfit::NotReady)
}

/// "0/3 nodes available: 2 lack runtime container, 1 does not match nodeSelector".
fn explain<'a>(nodes: impl ExactSizeIterator<Item = (&'a SchedNode, &'a NodeState)>, w: &SchedWorkload) -> String {
    let total = nodes.len();
    if total == 0 {
        return "0/0 nodes available: no node has joined".into();
    }
    let mut counts: BTreeMap<Misfit, usize> = BTreeMap::new();
    for (n, st) in nodes {
        if let Some(m) = misfit(n, st, w) {
            *counts.entry(m).or_default() += 1;
        }
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(m, c)| match m {
            Misfit::NotReady => format!("{c} not ready"),
            Misfit::Runtime => format!("{c} lack runtime {}", w.runtime),
            Misfit::Platform => {
                let os = w.os.as_deref().unwrap_or("*");
                let arch = w.arch.as_deref().unwrap_or("*");
                format!("{c} are not {os}/{arch}")
            }
            Misfit::Selector => format!("{c} do not match nodeSelector"),
            Misfit::Taint => format!("{c} have untolerated taints"),
            Misfit::Cordoned => format!("{c} cordoned"),
            Misfit::Topology => format!("{c} lack label {}", w.spread_by.as_deref().unwrap_or_default()),
            Misfit::PortInUse => {
                let list: Vec<String> = w.host_ports.iter().map(|p| p.to_string()).collect();
                format!("{c} have port {} in use", list.join(","))
            }
            Misfit::Cpu => format!("{c} insufficient cpu"),
            Misfit::Memory => format!("{c} insufficient memory"),
        })
        .collect();
    format!("0/{total} nodes available: {}", parts.join(", "))
}

/// Utilisation of `node` after adding `extra`, in parts per million, averaged over the
/// resources it declares a non-zero capacity for.
fn utilisation_ppm(node: &SchedNode, used: Resources, extra: Resources) -> u64 {
    let Some(cap) = node.allocatable else { return 0 };
    let mut sum = 0u128;
    let mut n = 0u128;
    for (u, e, c) in
        [(used.cpu_millis, extra.cpu_millis, cap.cpu_millis), (used.memory_bytes, extra.memory_bytes, cap.memory_bytes)]
    {
        if c > 0 {
            sum += (u as u128 + e as u128) * 1_000_000 / c as u128;
            n += 1;
        }
    }
    sum.checked_div(n).map_or(0, |avg| avg.min(u128::from(u64::MAX)) as u64)
}

/// Computes the placements for `workloads` given the `current` ones, with no clock and every
/// placed replica taken as ready (so failover never fires and drains move `max_unavailable`
/// replicas per pass). The controller should prefer [`schedule_at`].
pub fn schedule(nodes: &[SchedNode], workloads: &[SchedWorkload], current: &[Placement]) -> Decisions {
    schedule_at(nodes, workloads, current, &Observed::all_ready(current))
}

/// Per-workload bookkeeping between the keep and the place passes.
struct Plan<'a> {
    w: &'a SchedWorkload,
    /// Replicated / Job: (index, kept node). EveryNode: node → index.
    slots: Vec<(u32, Option<usize>)>,
    /// Replicated / Job: the replica name of each slot.
    names: Vec<String>,
    /// Replicated: kept replicas on draining nodes, (position in `slots`).
    drain: Vec<usize>,
    job: Option<JobPlan>,
}

/// Computes the placements for `workloads` given the `current` ones and what is `observed`.
pub fn schedule_at(
    nodes: &[SchedNode],
    workloads: &[SchedWorkload],
    current: &[Placement],
    observed: &Observed,
) -> Decisions {
    let mut out = Decisions::default();

    // Nodes in name order; the position is the final tie-break.
    let mut nodes: Vec<&SchedNode> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.dedup_by(|b, a| {
        let dup = a.name == b.name;
        if dup {
            out.warnings.push(format!("duplicate node {:?} ignored", b.name));
        }
        dup
    });
    let index_of: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    let mut state: Vec<NodeState> = vec![NodeState::default(); nodes.len()];

    // Workloads: EveryNode first (bound to their nodes, they get capacity first), then by name.
    let mut sorted: Vec<&SchedWorkload> = workloads.iter().collect();
    sorted.sort_by(|a, b| {
        (a.kind != WorkloadKind::EveryNode, &a.name).cmp(&(b.kind != WorkloadKind::EveryNode, &b.name))
    });
    let mut seen = HashSet::new();
    sorted.retain(|w| {
        let fresh = seen.insert(w.name.as_str());
        if !fresh {
            out.warnings.push(format!("duplicate workload {:?} ignored", w.name));
        }
        fresh
    });

    // Current placements by workload, then replica name (first of duplicates by node wins).
    let mut by_workload: HashMap<&str, HashMap<&str, &Placement>> = HashMap::new();
    for p in current {
        let slot = by_workload.entry(p.workload.as_str()).or_default().entry(p.replica.as_str()).or_insert(p);
        if (&p.node, p.index) < (&slot.node, slot.index) {
            *slot = p;
        }
    }
    let no_current = HashMap::new();

    let job_plans: HashMap<&str, JobPlan> = sorted
        .iter()
        .filter_map(|w| match &w.kind {
            WorkloadKind::Job(spec) => Some((w.name.as_str(), job_plan(spec, &w.job_progress, observed.now_ms))),
            _ => None,
        })
        .collect();

    // Replica names in use: EveryNode names (`<workload>-<node>`) must not take an indexed one.
    let mut taken: HashSet<String> = HashSet::new();
    if sorted.iter().any(|w| w.kind == WorkloadKind::EveryNode) {
        for w in &sorted {
            match &w.kind {
                WorkloadKind::EveryNode => {}
                WorkloadKind::Replicated => taken.extend((0..w.slots()).map(|i| replica_name(&w.name, i))),
                WorkloadKind::Job(_) => {
                    let active = job_plans.get(w.name.as_str()).map(|p| p.active.as_slice()).unwrap_or_default();
                    taken.extend(active.iter().map(|&i| replica_name(&w.name, i)));
                }
            }
        }
    }

    // Keep pass: re-count every placement that may stay, in a fixed order.
    let mut plans: Vec<Plan> = Vec::with_capacity(sorted.len());
    for &w in &sorted {
        let cur = by_workload.get(w.name.as_str()).unwrap_or(&no_current);
        let mut plan = Plan { w, slots: Vec::new(), names: Vec::new(), drain: Vec::new(), job: None };
        if w.kind == WorkloadKind::EveryNode {
            keep_every_node(w, cur, &nodes, &index_of, &mut state, &mut plan, &mut taken);
        } else {
            let indexes: Vec<u32> = match &w.kind {
                WorkloadKind::Job(_) => {
                    plan.job = job_plans.get(w.name.as_str()).cloned();
                    plan.job.as_ref().map(|p| p.active.clone()).unwrap_or_default()
                }
                _ => (0..w.slots()).collect(),
            };
            for index in indexes {
                let name = replica_name(&w.name, index);
                let kept = cur
                    .get(name.as_str())
                    .and_then(|p| p.node.as_deref())
                    .and_then(|n| index_of.get(n).copied())
                    .filter(|&i| {
                        let n = nodes[i];
                        let failed_over = !n.ready
                            && matches!(w.failover, Failover::After(ms)
                                if n.not_ready_since_ms.is_some_and(|s| observed.now_ms.saturating_sub(s) >= ms));
                        may_stay(n, w) && !failed_over && state[i].fits(n, w)
                    });
                if let Some(i) = kept {
                    state[i].add(w);
                    if nodes[i].draining && w.kind == WorkloadKind::Replicated {
                        plan.drain.push(plan.slots.len());
                    }
                }
                plan.slots.push((index, kept));
                plan.names.push(name);
            }
        }
        plans.push(plan);
    }

    // Place pass.
    let mut spread_domains: HashMap<&str, (Vec<u32>, u32)> = HashMap::new();
    for plan in &mut plans {
        let w = plan.w;
        if w.kind == WorkloadKind::EveryNode {
            let cur = by_workload.get(w.name.as_str()).unwrap_or(&no_current);
            place_every_node(w, plan, cur, &nodes, &mut state, &mut out, &mut taken);
            continue;
        }
        let pending: Vec<usize> = (0..plan.slots.len()).filter(|&s| plan.slots[s].1.is_none()).collect();
        let names = &plan.names;
        let available = |s: usize| {
            plan.slots[s]
                .1
                .is_some_and(|i| nodes[i].ready && observed.ready.get(&names[s]).is_some_and(|n| *n == nodes[i].name))
        };
        // Only a drain needs the budget; skip the lookups otherwise.
        let mut budget = 0u64;
        let mut drain_moves: Vec<(usize, bool)> = Vec::new();
        if !plan.drain.is_empty() {
            let unavailable = (0..plan.slots.len()).filter(|&s| !available(s)).count() as u64;
            budget = u64::from(w.max_unavailable).saturating_sub(unavailable);
            drain_moves = plan.drain.iter().map(|&s| (s, available(s))).filter(|&(_, a)| !a || budget > 0).collect();
        }
        if !pending.is_empty() || !drain_moves.is_empty() {
            let domains = w.spread_by.as_deref().map(|key| {
                &*spread_domains.entry(key).or_insert_with(|| {
                    let mut ids: HashMap<&str, u32> = HashMap::new();
                    let per_node = nodes
                        .iter()
                        .map(|n| match n.labels.get(key) {
                            Some(v) => {
                                let next = ids.len() as u32;
                                *ids.entry(v.as_str()).or_insert(next)
                            }
                            None => u32::MAX,
                        })
                        .collect();
                    (per_node, ids.len() as u32)
                })
            });
            let mut pool = Pool::new(w, &nodes, &state, &plan.slots, domains);
            let mut reason: Option<String> = None;
            for s in pending {
                match pool.take(w, &nodes, &mut state) {
                    Some(i) => plan.slots[s].1 = Some(i),
                    None => {
                        let why = reason.get_or_insert_with(|| explain(nodes.iter().copied().zip(state.iter()), w));
                        out.unschedulable.insert(plan.names[s].clone(), why.clone());
                    }
                }
            }
            for (s, avail) in drain_moves {
                if avail && budget == 0 {
                    continue;
                }
                let Some(from) = plan.slots[s].1 else { continue };
                let Some(to) = pool.take(w, &nodes, &mut state) else { break };
                state[from].remove(w);
                pool.moved_off(from);
                plan.slots[s].1 = Some(to);
                if avail {
                    budget -= 1;
                }
            }
        }
        for (&(index, node), replica) in plan.slots.iter().zip(std::mem::take(&mut plan.names)) {
            out.placements.push(Placement {
                replica,
                workload: w.name.clone(),
                index,
                node: node.map(|i| nodes[i].name.clone()),
            });
        }
        if let Some(jp) = plan.job.take() {
            out.jobs.insert(w.name.clone(), jp);
        }
    }

    out.placements.sort_by(|a, b| (&a.workload, a.index).cmp(&(&b.workload, b.index)));

    for n in nodes.iter().filter(|n| n.draining) {
        out.drains.insert(n.name.clone(), 0);
    }
    if !out.drains.is_empty() {
        let drain_kind: HashMap<&str, bool> =
            sorted.iter().map(|w| (w.name.as_str(), w.kind != WorkloadKind::EveryNode)).collect();
        for p in &out.placements {
            if let Some(node) = &p.node
                && drain_kind.get(p.workload.as_str()).copied().unwrap_or(false)
                && let Some(left) = out.drains.get_mut(node)
            {
                *left += 1;
            }
        }
    }
    out
}

/// Keep pass of an EveryNode workload: its current replicas whose node still takes them.
fn keep_every_node(
    w: &SchedWorkload,
    cur: &HashMap<&str, &Placement>,
    nodes: &[&SchedNode],
    index_of: &HashMap<&str, usize>,
    state: &mut [NodeState],
    plan: &mut Plan,
    taken: &mut HashSet<String>,
) {
    // (node, index) of replicas named for the node they are on, in node order.
    let mut found: Vec<(usize, u32)> = cur
        .values()
        .filter_map(|p| {
            let i = *index_of.get(p.node.as_deref()?)?;
            (p.replica == every_node_replica_name(&w.name, &nodes[i].name)).then_some((i, p.index))
        })
        .collect();
    found.sort_unstable();
    let mut indexes = HashSet::new();
    for (i, index) in found {
        let n = nodes[i];
        let name = every_node_replica_name(&w.name, &n.name);
        if may_stay(n, w) && state[i].fits(n, w) && !taken.contains(&name) && indexes.insert(index) {
            taken.insert(name);
            state[i].add(w);
            plan.slots.push((index, Some(i)));
        }
    }
}

/// Place pass of an EveryNode workload: a replica on each node that passes the static filters
/// and has none yet. Its index is the one the replica had in `cur` (an unplaced replica keeps
/// its index, so a node joining later cannot be given an index that is still taken), else the
/// lowest free one. A replica whose name would be longer than a name may be is left unplaced:
/// agents refuse such names.
fn place_every_node(
    w: &SchedWorkload,
    plan: &Plan,
    cur: &HashMap<&str, &Placement>,
    nodes: &[&SchedNode],
    state: &mut [NodeState],
    out: &mut Decisions,
    taken: &mut HashSet<String>,
) {
    let mut used: HashSet<u32> = plan.slots.iter().map(|s| s.0).collect();
    let has: HashSet<usize> = plan.slots.iter().filter_map(|s| s.1).collect();
    // (node, replica name, index reused from `cur`).
    let mut wanted: Vec<(usize, String, Option<u32>)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if has.contains(&i) || static_misfit(n, w).is_some() {
            continue;
        }
        let replica = every_node_replica_name(&w.name, &n.name);
        if !taken.insert(replica.clone()) {
            out.warnings.push(format!("replica name {replica:?} of workload {:?} is taken; not placed", w.name));
            continue;
        }
        let reused = cur.get(replica.as_str()).map(|p| p.index).filter(|&ix| used.insert(ix));
        wanted.push((i, replica, reused));
    }
    let mut cursor = 0u32;
    let mut new = Vec::new();
    for (i, replica, reused) in wanted {
        let index = reused.unwrap_or_else(|| {
            while used.contains(&cursor) {
                cursor += 1;
            }
            used.insert(cursor);
            cursor
        });
        let n = nodes[i];
        let node = if replica.len() > proto::manifest::MAX_NAME_LEN {
            out.unschedulable.insert(
                replica.clone(),
                format!(
                    "replica name {replica:?} (<workload>-<node>) is longer than {} characters; shorten the workload or node name",
                    proto::manifest::MAX_NAME_LEN
                ),
            );
            None
        } else if state[i].fits(n, w) {
            state[i].add(w);
            Some(n.name.clone())
        } else {
            out.unschedulable.insert(replica.clone(), explain(std::iter::once((n, &state[i])), w));
            None
        };
        new.push(Placement { replica, workload: w.name.clone(), index, node });
    }
    for &(index, node) in &plan.slots {
        let Some(i) = node else { continue };
        out.placements.push(Placement {
            replica: every_node_replica_name(&w.name, &nodes[i].name),
            workload: w.name.clone(),
            index,
            node: Some(nodes[i].name.clone()),
        });
    }
    out.placements.extend(new);
}
