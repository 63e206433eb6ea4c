//! A simulated fleet, in the spirit of quinn-proto's test pair: the real controller
//! ([`super::pass`]) and the shell's real time keeping ([`super::time`]) driven by a fake clock,
//! over a fake store (a model of `Store::write_pass`, checked against the SQL by
//! `hub/tests/store.rs`) and N fake agents (a model of the agent: it persists the set it is
//! given, runs it, reports Running at once and ready a little later, or never for a bad
//! template; Job attempts end after a while, succeeding or failing; it can be cut off, restart
//! or have a replica crash). Events come one at a time: time passes, a node is lost and comes
//! back, the hub restarts (the fake store survives, the hub's memory does not), a template
//! changes mid-rollout, a scale, a cordon or a drain, a jump of the hub's wall clock. After each
//! the hub runs passes until one writes nothing, as the real one does on every trigger.
//!
//! Invariants, checked on every pass of every sequence ([`Sim::hub_pass`], [`Sim::settle`]):
//! 1. `surge`: a Replicated workload never has more than `replicas + maxSurge` replicas,
//!    in the store or running on connected agents.
//! 2. `availability`: a pass never disrupts available replicas below `desired −
//!    maxUnavailable` (at least one below without a surge or during a drain), nor below what
//!    is available already. A scale-down is the operator's: the indexes it removes are not
//!    counted.
//! 3. `fencing`: once a connected agent has its set, it runs only what the store assigns it:
//!    a replica moved off a lost node is stopped there when the node returns.
//! 4. `coverage`: every EveryNode workload has a replica on every node it matches.
//! 5. `idempotence`: a pass over its own output (same time, same observations) writes nothing.
//! 6. `deadlines`: failover and Job retries never happen before their time (by the fake
//!    clock's truth), whatever the hub's wall clock does; cluster time never goes back and
//!    never runs faster than the clock.
//! 7. `interleaving` (its own property): events that reach the hub between two passes, in any
//!    order, with the store's rows in any order, lead to the same placements.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use proto::manifest::{Failover, Manifest, ReplicaTemplate, Runtime, WorkloadKind, parse_manifests};
use proto::messages::{NodeFacts, Phase};

use super::time::{ClockAnchor, ClusterClock, Presence, to_cluster};
use super::*;

/// A replica of a good template reports ready this long after it starts.
const READY_AFTER_MS: u64 = 1_500;
/// A Job attempt runs this long.
const JOB_RUN_MS: u64 = 2_000;
/// Back-off of a Job index after `failures` failed attempts (the scheduler's defaults).
fn job_backoff(failures: u32) -> u64 {
    let spec = crate::scheduler::JobSpec::default();
    let shift = failures.saturating_sub(1).min(63);
    spec.backoff_base_ms.saturating_mul(1u64 << shift).min(spec.backoff_max_ms)
}

// ---------------------------------------------------------------------------------------------
// The fake store

#[derive(Debug, Clone)]
pub(super) struct Row {
    pub replica: Replica,
    pub template: ReplicaTemplate,
}

#[derive(Debug, Clone, Default)]
pub(super) struct FakeNode {
    pub facts: NodeFacts,
    pub cordoned: bool,
    pub draining: bool,
    pub generation: u64,
}

/// The store's state, and the store's writes as the SQL makes them.
#[derive(Debug, Clone, Default)]
pub(super) struct FakeStore {
    pub workloads: BTreeMap<String, Workload>,
    pub revisions: Vec<(RevisionEntry, Manifest)>,
    pub replicas: BTreeMap<String, Row>,
    pub nodes: BTreeMap<String, FakeNode>,
    pub job_indexes: BTreeMap<(String, u32), JobIndex>,
    pub rollouts: BTreeMap<String, RolloutRecord>,
    pub clock: Option<ClockAnchor>,
}

impl FakeStore {
    /// `apply_workloads_because` for one manifest.
    pub fn apply(&mut self, m: &Manifest, cause: &str) {
        let name = m.metadata.name.clone();
        let hash = m.template().hash();
        let revision = match self.workloads.get(&name) {
            None => 1,
            Some(w) if w.manifest == *m => return,
            Some(w) => {
                if w.template_hash == hash {
                    let revision = w.revision + 1;
                    self.workloads.insert(name, Workload::new(m.clone(), revision));
                    return;
                }
                w.revision + 1
            }
        };
        self.workloads.insert(name.clone(), Workload::new(m.clone(), revision));
        let entry = RevisionEntry { workload: name, revision, template_hash: hash, cause: cause.into() };
        self.revisions.push((entry, m.clone()));
    }

    pub fn add_node(&mut self, name: &str, labels: &[(&str, &str)]) {
        let facts = NodeFacts {
            os: "linux".into(),
            arch: "x86_64".into(),
            runtimes: vec![Runtime::Wasm],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        self.nodes.insert(name.into(), FakeNode { facts, ..Default::default() });
    }

    /// The snapshot a pass at cluster time `now` reads. `view` says whether a node is
    /// connected and since when (cluster time) it is not; `shuffle` permutes every list.
    pub fn snapshot(&self, now: u64, view: impl Fn(&str) -> (bool, Option<u64>), shuffle: u64) -> Snapshot {
        let mut s = Snapshot {
            now_ms: now,
            workloads: self.workloads.values().cloned().collect(),
            nodes: self
                .nodes
                .iter()
                .map(|(name, n)| {
                    let (ready, since) = view(name);
                    Node {
                        name: name.clone(),
                        facts: n.facts.clone(),
                        cordoned: n.cordoned,
                        draining: n.draining,
                        ready,
                        not_ready_since_ms: since,
                    }
                })
                .collect(),
            replicas: self.replicas.values().map(|r| r.replica.clone()).collect(),
            job_indexes: self.job_indexes.values().cloned().collect(),
            rollouts: self.rollouts.values().cloned().collect(),
            revisions: self.revisions.iter().map(|(e, _)| e.clone()).collect(),
        };
        if shuffle != 0 {
            permute(&mut s.workloads, shuffle);
            permute(&mut s.nodes, shuffle.rotate_left(7));
            permute(&mut s.replicas, shuffle.rotate_left(13));
            permute(&mut s.job_indexes, shuffle.rotate_left(19));
            permute(&mut s.rollouts, shuffle.rotate_left(29));
            permute(&mut s.revisions, shuffle.rotate_left(37));
        }
        s
    }

    /// `Store::write_pass`: all or nothing, refused when what the pass read changed.
    pub fn write(&mut self, pass: &Pass, anchor: ClockAnchor) -> Result<(), String> {
        self.check(pass)?;
        for a in &pass.job_attempts {
            self.replicas.remove(&a.replica);
            let i = self.job_indexes.entry((a.workload.clone(), a.index)).or_insert_with(|| JobIndex {
                workload: a.workload.clone(),
                index: a.index,
                succeeded: false,
                failures: 0,
                failed_at_ms: None,
            });
            if a.succeeded {
                i.succeeded = true;
            } else {
                i.failures += 1;
                i.failed_at_ms = Some(pass.now_ms);
            }
        }
        for w in &pass.writes {
            let template = || &pass.templates[&w.workload];
            match &w.op {
                WriteOp::Create { node, unschedulable } => {
                    let t = template();
                    let replica = Replica {
                        name: w.replica.clone(),
                        workload: w.workload.clone(),
                        index: w.index,
                        node: node.clone(),
                        template_hash: t.hash.clone(),
                        reported: Reported::default(),
                        unschedulable: unschedulable.clone(),
                    };
                    self.replicas.insert(w.replica.clone(), Row { replica, template: t.template.clone() });
                }
                WriteOp::Change { from_node, node, new_template, unschedulable, .. } => {
                    let row = self.replicas.get_mut(&w.replica).expect("checked");
                    if from_node != node {
                        row.replica.reported = Reported::default();
                    }
                    row.replica.node = node.clone();
                    row.replica.unschedulable = unschedulable.clone();
                    if *new_template {
                        let t = template();
                        row.replica.template_hash = t.hash.clone();
                        row.template = t.template.clone();
                    }
                }
                WriteOp::Delete { .. } => {
                    self.replicas.remove(&w.replica);
                }
            }
        }
        for n in &pass.changed_nodes {
            if let Some(node) = self.nodes.get_mut(n) {
                node.generation += 1;
            }
        }
        for p in &pass.rollouts {
            self.rollouts.insert(p.workload.clone(), p.clone());
        }
        for r in &pass.rollbacks {
            let target = &self
                .revisions
                .iter()
                .find(|(e, _)| e.workload == r.workload && e.revision == r.to_revision)
                .expect("checked")
                .1;
            let m = self.workloads[&r.workload].manifest.with_template_of(target);
            self.apply(&m, &r.cause);
        }
        self.clock = Some(anchor);
        Ok(())
    }

    /// What `Store::write_pass` checks before it writes anything.
    fn check(&self, pass: &Pass) -> Result<(), String> {
        if self.workloads.len() != pass.revisions_seen.len()
            || self.workloads.iter().any(|(n, w)| pass.revisions_seen.get(n) != Some(&w.revision))
        {
            return Err("workloads changed".into());
        }
        let mut gone = BTreeSet::new();
        for a in &pass.job_attempts {
            match self.replicas.get(&a.replica) {
                Some(r) if r.replica.node.as_deref() == Some(a.node.as_str()) => gone.insert(a.replica.as_str()),
                _ => return Err(format!("job attempt {} is gone", a.replica)),
            };
        }
        let mut created: BTreeSet<(&str, u32)> = BTreeSet::new();
        for w in &pass.writes {
            let row = self.replicas.get(&w.replica).filter(|_| !gone.contains(w.replica.as_str()));
            let takes_template = matches!(w.op, WriteOp::Create { .. } | WriteOp::Change { new_template: true, .. });
            if takes_template && !pass.templates.contains_key(&w.workload) {
                return Err(format!("no template for {}", w.workload));
            }
            match &w.op {
                WriteOp::Create { .. } => {
                    let taken = row.is_some()
                        || !created.insert((&w.workload, w.index))
                        || self.replicas.values().any(|r| {
                            r.replica.workload == w.workload
                                && r.replica.index == w.index
                                && !gone.contains(r.replica.name.as_str())
                                && !pass
                                    .writes
                                    .iter()
                                    .any(|d| d.replica == r.replica.name && matches!(d.op, WriteOp::Delete { .. }))
                        });
                    if taken {
                        return Err(format!("{} exists", w.replica));
                    }
                }
                WriteOp::Change { from_node, from_hash, .. } => {
                    if !row.is_some_and(|r| r.replica.node == *from_node && r.replica.template_hash == *from_hash) {
                        return Err(format!("{} changed", w.replica));
                    }
                }
                WriteOp::Delete { from_node } => {
                    if row.is_none_or(|r| r.replica.node != *from_node) {
                        return Err(format!("{} changed", w.replica));
                    }
                }
            }
        }
        for r in &pass.rollbacks {
            let current = self.workloads.get(&r.workload).ok_or("rolled back workload is gone")?;
            if current.revision != r.expected_revision {
                return Err("rolled back workload changed".into());
            }
            if !self.revisions.iter().any(|(e, _)| e.workload == r.workload && e.revision == r.to_revision) {
                return Err("no rollback target".into());
            }
        }
        Ok(())
    }

    /// `record_statuses`: only rows assigned to the reporting node.
    pub fn record_statuses(&mut self, node: &str, statuses: &BTreeMap<String, Reported>) {
        for (name, status) in statuses {
            if let Some(r) = self.replicas.get_mut(name)
                && r.replica.node.as_deref() == Some(node)
            {
                r.replica.reported = status.clone();
            }
        }
    }

    /// The node's generation and its replicas' template hashes.
    pub fn assigned(&self, node: &str) -> (u64, BTreeMap<&str, &str>) {
        let generation = self.nodes.get(node).map_or(0, |n| n.generation);
        let set = self
            .replicas
            .values()
            .filter(|r| r.replica.node.as_deref() == Some(node))
            .map(|r| (r.replica.name.as_str(), r.replica.template_hash.as_str()))
            .collect();
        (generation, set)
    }

    /// `assignment_set`: the node's generation and replicas.
    pub fn assignment(&self, node: &str) -> (u64, BTreeMap<String, (String, ReplicaTemplate)>) {
        let generation = self.nodes.get(node).map_or(0, |n| n.generation);
        let set = self
            .replicas
            .values()
            .filter(|r| r.replica.node.as_deref() == Some(node))
            .map(|r| (r.replica.name.clone(), (r.replica.template_hash.clone(), r.template.clone())))
            .collect();
        (generation, set)
    }
}

/// A deterministic permutation of `v` from `seed`.
fn permute<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// Applies `pass` to `store` as the shell would, at the same time.
pub(super) fn write_back(store: &mut FakeStore, pass: &Pass) {
    let anchor = ClockAnchor { cluster_ms: pass.now_ms, clock: "test".into(), mono_ms: pass.now_ms };
    store.write(pass, anchor).expect("the pass applies to the store it was computed from");
}

// ---------------------------------------------------------------------------------------------
// The fake agents

#[derive(Debug, Clone)]
struct Run {
    hash: String,
    started_ms: u64,
    template: ReplicaTemplate,
}

/// A model of the agent: it persists its set with its generation, runs it and reports.
#[derive(Debug, Clone, Default)]
struct Agent {
    /// Has a session with the hub.
    linked: bool,
    generation: u64,
    set: BTreeMap<String, (String, ReplicaTemplate)>,
    runs: BTreeMap<String, Run>,
}

fn is_job(t: &ReplicaTemplate) -> bool {
    t.env.contains_key("OUTCOME")
}

/// A Job attempt's outcome: `ok`, `fail`, or `odd` (odd indexes fail).
fn succeeds(replica: &str, t: &ReplicaTemplate) -> bool {
    match t.env.get("OUTCOME").map(String::as_str) {
        Some("fail") => false,
        Some("odd") => replica.rsplit('-').next().and_then(|i| i.parse::<u32>().ok()).is_none_or(|i| i % 2 == 0),
        _ => true,
    }
}

impl Agent {
    /// Takes a new set (persisted, then applied): runs that left it stop, new or changed
    /// replicas start.
    fn take(&mut self, generation: u64, set: BTreeMap<String, (String, ReplicaTemplate)>, now: u64) {
        self.generation = generation;
        self.set = set;
        self.runs.retain(|name, run| self.set.get(name).is_some_and(|(h, _)| *h == run.hash));
        for (name, (hash, template)) in &self.set {
            self.runs.entry(name.clone()).or_insert_with(|| Run {
                hash: hash.clone(),
                started_ms: now,
                template: template.clone(),
            });
        }
    }

    fn statuses(&self, now: u64) -> BTreeMap<String, Reported> {
        self.runs
            .iter()
            .map(|(name, run)| {
                let age = now.saturating_sub(run.started_ms);
                let (phase, ready) = if is_job(&run.template) {
                    match age >= JOB_RUN_MS {
                        false => (Phase::Running, false),
                        true if succeeds(name, &run.template) => (Phase::Succeeded, false),
                        true => (Phase::Failed, false),
                    }
                } else {
                    let good = run.template.env.get("READY").is_none_or(|r| r != "never");
                    (Phase::Running, good && age >= READY_AFTER_MS)
                };
                (name.clone(), Reported { phase, ready, template_hash: run.hash.clone() })
            })
            .collect()
    }

    /// When a run's reported state changes next.
    fn next_change(&self, now: u64) -> Option<u64> {
        self.runs
            .values()
            .map(|r| r.started_ms + if is_job(&r.template) { JOB_RUN_MS } else { READY_AFTER_MS })
            .filter(|&t| t > now)
            .min()
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation

/// What the hub process keeps in memory (lost when it restarts).
#[derive(Debug, Clone)]
struct Hub {
    clock: ClusterClock,
    presence: Presence,
    /// When (fake monotonic time) the last pass asked to run again.
    wake_at: Option<u64>,
    /// The last pass's (monotonic, cluster) time.
    last: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub(super) struct Sim {
    /// The fake monotonic clock, shared by everything (ms).
    mono: u64,
    /// The hub's wall clock offset: it may jump; nothing the controller does may depend on it.
    wall_offset: i64,
    restarts: u32,
    store: FakeStore,
    agents: BTreeMap<String, Agent>,
    hub: Hub,
    /// Truth: when each node was cut off.
    down_since: HashMap<String, u64>,
    /// Truth: when each Job index last failed.
    failed_at: HashMap<(String, u32), u64>,
    /// Permutes the store's rows in each snapshot (0: store order).
    shuffle: u64,
}

impl Sim {
    fn new(nodes: &[(&str, &[(&str, &str)])]) -> Sim {
        let mut store = FakeStore::default();
        let mut agents = BTreeMap::new();
        for (name, labels) in nodes {
            store.add_node(name, labels);
            agents.insert(name.to_string(), Agent { linked: true, ..Default::default() });
        }
        Sim {
            mono: 1,
            wall_offset: 1_700_000_000_000,
            restarts: 0,
            store,
            agents,
            hub: Hub { clock: ClusterClock::new("hub/0"), presence: Presence::new(1), wake_at: None, last: None },
            down_since: HashMap::new(),
            failed_at: HashMap::new(),
            shuffle: 0,
        }
    }

    /// The hub's wall clock, for display timestamps only.
    fn wall_ms(&self) -> u64 {
        (self.mono as i64 + self.wall_offset).max(0) as u64
    }

    fn apply(&mut self, m: &Manifest) {
        let _created_at = self.wall_ms();
        self.store.apply(m, "apply");
    }

    /// One pass as the shell runs it; returns whether it wrote anything. Checks invariants 1,
    /// 2, 4, 5 and 6.
    fn hub_pass(&mut self) -> bool {
        let mono = self.mono;
        let now = self.hub.clock.now(self.store.clock.as_ref(), mono);
        // Within one hub process, and across processes from what the store holds (the fake
        // clock is shared by all hub processes here, so the anchor's reading can be compared).
        for (m0, c0) in self.hub.last.into_iter().chain(self.store.clock.as_ref().map(|a| (a.mono_ms, a.cluster_ms))) {
            assert!(now >= c0, "deadlines: cluster time went back from {c0} to {now}");
            assert!(now - c0 <= mono - m0, "deadlines: cluster time ran faster than the clock");
        }
        self.hub.last = Some((mono, now));
        let agents = &self.agents;
        let presence = &self.hub.presence;
        let view = |n: &str| {
            let ready = agents.get(n).is_some_and(|a| a.linked);
            (ready, (!ready).then(|| to_cluster(presence.not_ready_since(n), mono, now)))
        };
        let snapshot = self.store.snapshot(now, view, self.shuffle);
        let pass = super::pass(&snapshot);
        self.check_availability(&snapshot, &pass);
        self.check_deadlines(&snapshot, &pass);
        self.hub.wake_at = pass.wake_at_ms.map(|at| mono + at.saturating_sub(now));
        if pass.writes_nothing() && !self.hub.clock.anchor_due(self.store.clock.as_ref(), mono) {
            return false;
        }
        let anchor = self.hub.clock.anchor(now, mono);
        self.store.write(&pass, anchor).expect("the sim has one writer");
        for a in pass.job_attempts.iter().filter(|a| !a.succeeded) {
            self.failed_at.insert((a.workload.clone(), a.index), mono);
        }
        self.check_surge();
        self.check_coverage();
        if pass.rollbacks.is_empty() {
            // A pass over its own output: the same time, the same observations.
            let agents = &self.agents;
            let presence = &self.hub.presence;
            let view = |n: &str| {
                let ready = agents.get(n).is_some_and(|a| a.linked);
                (ready, (!ready).then(|| to_cluster(presence.not_ready_since(n), mono, now)))
            };
            let again = super::pass(&self.store.snapshot(now, view, self.shuffle.rotate_left(3)));
            assert!(
                again.writes_nothing(),
                "idempotence: a pass over its own output wrote {again:#?}\nafter {pass:#?}"
            );
        }
        !pass.writes_nothing()
    }

    /// Connected agents get their sets and report; checks invariant 3.
    fn sync_agents(&mut self) {
        let now = self.mono;
        for (name, agent) in self.agents.iter_mut().filter(|(_, a)| a.linked) {
            if self.store.nodes.get(name).map_or(0, |n| n.generation) != agent.generation {
                let (generation, set) = self.store.assignment(name);
                agent.take(generation, set, now);
            }
            let (generation, set) = self.store.assigned(name);
            for (replica, run) in &agent.runs {
                assert!(
                    set.get(replica.as_str()).is_some_and(|h| *h == run.hash),
                    "fencing: {name} runs {replica} ({}) but is assigned {:?} at generation {generation}",
                    run.hash,
                    set.get(replica.as_str())
                );
            }
            let statuses = agent.statuses(now);
            self.store.record_statuses(name, &statuses);
        }
    }

    /// Invariant 1 at the agents, once they caught up with the passes.
    fn check_running(&self) {
        for w in self.store.workloads.values().filter(|w| w.manifest.spec.kind == WorkloadKind::Replicated) {
            let name = &w.manifest.metadata.name;
            let limit = w.manifest.spec.replicas() + w.manifest.spec.strategy.max_surge(w.manifest.spec.replicas());
            let running = self
                .agents
                .values()
                .filter(|a| a.linked)
                .flat_map(|a| a.runs.keys())
                .filter(|r| r.strip_prefix(name.as_str()).is_some_and(|i| i.starts_with('-')))
                .count() as u32;
            assert!(running <= limit, "surge: {running} replicas of {name} run on connected nodes, limit {limit}");
        }
    }

    /// Runs passes (and lets agents react) until a pass writes nothing.
    fn settle(&mut self) {
        for _ in 0..50 {
            self.sync_agents();
            if !self.hub_pass() {
                self.check_running();
                return;
            }
        }
        panic!("the controller did not settle:\n{:#?}", self.store.replicas);
    }

    /// Lets `ms` pass: the hub wakes when it asked to and agents' runs change on time.
    fn advance(&mut self, ms: u64) {
        let target = self.mono + ms;
        loop {
            let agent_change = self.agents.values().filter_map(|a| a.next_change(self.mono)).min();
            let next = [Some(target), self.hub.wake_at.filter(|&w| w > self.mono), agent_change]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(target);
            self.mono = next;
            self.settle();
            if next >= target {
                return;
            }
        }
    }

    fn event(&mut self, e: &Event, ws: &Workloads) {
        let node = |i: usize| format!("n{}", i % self.agents.len());
        match *e {
            Event::Advance(ms) => self.advance(ms),
            Event::Cut(i) => {
                let n = node(i);
                let a = self.agents.get_mut(&n).unwrap();
                if a.linked {
                    a.linked = false;
                    self.down_since.insert(n.clone(), self.mono);
                    self.hub.presence.session_ended(&n, self.mono);
                }
            }
            Event::Restore(i) => {
                let n = node(i);
                self.agents.get_mut(&n).unwrap().linked = true;
                self.down_since.remove(&n);
            }
            Event::AgentRestart(i) => {
                let now = self.mono;
                for run in self.agents.get_mut(&node(i)).unwrap().runs.values_mut() {
                    run.started_ms = now;
                }
            }
            Event::Crash(i, k) => {
                let now = self.mono;
                let a = self.agents.get_mut(&node(i)).unwrap();
                let len = a.runs.len();
                if let Some(run) = a.runs.values_mut().nth(k % len.max(1)) {
                    run.started_ms = now;
                }
            }
            Event::HubRestart => {
                self.restarts += 1;
                self.hub = Hub {
                    clock: ClusterClock::new(format!("hub/{}", self.restarts)),
                    presence: Presence::new(self.mono),
                    wake_at: None,
                    last: None,
                };
            }
            Event::Template(w, version, good) => {
                let m = ws.with_template(&self.store, w, version, good);
                self.apply(&m);
            }
            Event::Scale(replicas) => {
                let mut m = self.store.workloads["web"].manifest.clone();
                m.spec.replicas = Some(replicas);
                self.apply(&m);
            }
            Event::Cordon(i) => self.store.nodes.get_mut(&node(i)).unwrap().cordoned = true,
            Event::Drain(i) => {
                let n = self.store.nodes.get_mut(&node(i)).unwrap();
                (n.cordoned, n.draining) = (true, true);
            }
            Event::Uncordon(i) => {
                let n = self.store.nodes.get_mut(&node(i)).unwrap();
                (n.cordoned, n.draining) = (false, false);
            }
            Event::WallJump(by) => self.wall_offset += by,
        }
    }

    /// Invariant 2.
    fn check_availability(&self, s: &Snapshot, pass: &Pass) {
        let ready: HashMap<&str, bool> = s.nodes.iter().map(|n| (n.name.as_str(), n.ready)).collect();
        let draining: BTreeSet<&str> = s.nodes.iter().filter(|n| n.draining).map(|n| n.name.as_str()).collect();
        let disrupted: HashMap<&str, Option<&str>> = pass
            .writes
            .iter()
            .filter_map(|w| match &w.op {
                WriteOp::Change { from_node, node, new_template, .. } if from_node != node || *new_template => {
                    Some((w.replica.as_str(), from_node.as_deref()))
                }
                WriteOp::Delete { from_node } => Some((w.replica.as_str(), from_node.as_deref())),
                _ => None,
            })
            .collect();
        for w in s.workloads.iter().filter(|w| w.manifest.spec.kind != WorkloadKind::Job) {
            let name = &w.manifest.metadata.name;
            let members: Vec<&Replica> = s.replicas.iter().filter(|r| r.workload == *name).collect();
            let spec = &w.manifest.spec;
            let replicated = spec.kind == WorkloadKind::Replicated;
            let desired = if replicated { spec.replicas() } else { members.len() as u32 };
            let surge = if replicated { spec.strategy.max_surge(desired) } else { 0 };
            // A scale-down removes the highest indexes whatever their state (as Kubernetes'
            // maxUnavailable does not limit a scale-down): those past every stand-in slot
            // count neither as available nor as disrupted.
            let scaled_away = |r: &Replica| replicated && r.index >= desired + surge.min(desired);
            let available: Vec<&Replica> = members
                .iter()
                .copied()
                .filter(|r| !scaled_away(r))
                .filter(|r| is_available(&r.reported, &r.template_hash, r.node.as_deref().is_some_and(|n| ready[n])))
                .collect();
            let max_unavailable = spec.strategy.max_unavailable(desired);
            let drained = available
                .iter()
                .any(|r| disrupted.get(r.name.as_str()).is_some_and(|from| from.is_some_and(|f| draining.contains(f))));
            let allowed = if surge == 0 || drained { max_unavailable.max(1) } else { max_unavailable };
            let floor = desired.saturating_sub(allowed);
            let kept = available.iter().filter(|r| !disrupted.contains_key(r.name.as_str())).count() as u32;
            assert!(
                kept >= floor.min(available.len() as u32),
                "availability: a pass leaves {kept} of {} available replicas of {name} (desired {desired}, at most {allowed} unavailable)\n{pass:#?}",
                available.len()
            );
        }
    }

    /// Invariant 6: failovers and Job retries never come early.
    fn check_deadlines(&self, s: &Snapshot, pass: &Pass) {
        let draining: BTreeSet<&str> = s.nodes.iter().filter(|n| n.draining).map(|n| n.name.as_str()).collect();
        for stop in
            pass.stops.iter().filter(|st| st.reason == StopReason::Fenced && !draining.contains(st.node.as_str()))
        {
            let replica = s.replicas.iter().find(|r| r.name == stop.replica).unwrap();
            let w = s.workloads.iter().find(|w| w.manifest.metadata.name == replica.workload).unwrap();
            let after = w.manifest.spec.failover.after_ms().expect("only failover workloads fail over");
            let down = self.down_since.get(&stop.node).copied().expect("a failed-over node is cut off");
            assert!(
                self.mono - down >= after,
                "deadlines: {} failed over {} ms after {} was cut off (failover after {after} ms)",
                stop.replica,
                self.mono - down,
                stop.node
            );
        }
        for w in pass.writes.iter().filter(|w| matches!(w.op, WriteOp::Create { .. })) {
            let Some(i) = s.job_indexes.iter().find(|i| i.workload == w.workload && i.index == w.index) else {
                continue;
            };
            if i.failures == 0 || i.succeeded {
                continue;
            }
            let failed = self.failed_at[&(w.workload.clone(), w.index)];
            assert!(
                self.mono - failed >= job_backoff(i.failures),
                "deadlines: {} retried {} ms after its failure {} (back-off {} ms)",
                w.replica,
                self.mono - failed,
                i.failures,
                job_backoff(i.failures)
            );
        }
    }

    /// Invariant 1 in the store.
    fn check_surge(&self) {
        for w in self.store.workloads.values().filter(|w| w.manifest.spec.kind == WorkloadKind::Replicated) {
            let name = &w.manifest.metadata.name;
            let limit = w.manifest.spec.replicas() + w.manifest.spec.strategy.max_surge(w.manifest.spec.replicas());
            let rows = self.store.replicas.values().filter(|r| r.replica.workload == *name).count() as u32;
            assert!(rows <= limit, "surge: {name} has {rows} replicas, limit {limit}");
        }
    }

    /// Invariant 4.
    fn check_coverage(&self) {
        for w in self.store.workloads.values().filter(|w| w.manifest.spec.kind == WorkloadKind::EveryNode) {
            let name = &w.manifest.metadata.name;
            for (node, n) in &self.store.nodes {
                let labels = inputs::node_labels(node, &n.facts);
                if w.manifest.spec.node_selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                    continue;
                }
                let replica = crate::scheduler::every_node_replica_name(name, node);
                assert!(
                    self.store.replicas.get(&replica).is_some_and(|r| r.replica.node.as_deref() == Some(node)),
                    "coverage: {name} has no replica on {node}"
                );
            }
        }
    }

    /// Where each replica is and on which template.
    fn placements(&self) -> BTreeMap<String, (Option<String>, String)> {
        self.store
            .replicas
            .values()
            .map(|r| (r.replica.name.clone(), (r.replica.node.clone(), r.replica.template_hash.clone())))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// The three workloads of a scenario: `web` (Replicated), `agent` (EveryNode), `batch` (Job).
#[derive(Debug, Clone)]
struct Workloads {
    web: Manifest,
    every: Manifest,
    job: Manifest,
}

impl Workloads {
    fn all(&self) -> [&Manifest; 3] {
        [&self.web, &self.every, &self.job]
    }

    /// Workload `w` (0 web, 1 agent, 2 batch) as stored, with template `version`, good or
    /// (for web and agent) never ready, or (for batch) failing.
    fn with_template(&self, store: &FakeStore, w: usize, version: u32, good: bool) -> Manifest {
        let base = self.all()[w % 3];
        let mut m = store.workloads.get(&base.metadata.name).map_or_else(|| base.clone(), |w| w.manifest.clone());
        m.spec.image = format!("r/{}:{version}", m.metadata.name);
        if m.spec.kind == WorkloadKind::Job {
            m.spec.env.insert("OUTCOME".into(), if good { "ok" } else { "fail" }.into());
        } else if good {
            m.spec.env.remove("READY");
        } else {
            m.spec.env.insert("READY".into(), "never".into());
        }
        m
    }
}

#[derive(Debug, Clone)]
struct Setup {
    sites: Vec<u8>,
    replicas: u32,
    max_unavailable: u32,
    max_surge: u32,
    failover_s: Option<u64>,
    deadline_s: u64,
    every_selector: Option<u8>,
    completions: u32,
    parallelism: u32,
    backoff_limit: u32,
    outcome: u8,
}

impl Setup {
    fn workloads(&self) -> Workloads {
        // Parsed once; each scenario sets its fields on copies.
        static BASE: std::sync::OnceLock<Workloads> = std::sync::OnceLock::new();
        let base = BASE.get_or_init(|| {
            let parse = |yaml: &str| parse_manifests(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")).remove(0);
            Workloads {
                web: parse("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\nspec: {runtime: wasm, image: r/web:1}\n"),
                every: parse("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: agent}\nspec: {runtime: wasm, image: r/agent:1, kind: EveryNode}\n"),
                job: parse("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: batch}\nspec: {runtime: wasm, image: r/batch:1, kind: Job}\n"),
            }
        });
        let mut ws = base.clone();
        let deadline = Some(format!("{}s", self.deadline_s));
        let web = &mut ws.web.spec;
        web.replicas = Some(self.replicas);
        web.failover = self.failover_s.map_or(Failover::Never, |s| Failover::After(format!("{s}s")));
        // maxUnavailable 0 needs a surge.
        web.strategy.max_unavailable =
            Some(if self.max_surge == 0 { self.max_unavailable.max(1) } else { self.max_unavailable }.into());
        web.strategy.max_surge = Some(self.max_surge.into());
        web.strategy.progress_deadline = deadline.clone();
        let every = &mut ws.every.spec;
        if let Some(site) = self.every_selector {
            every.node_selector.insert("site".into(), format!("s{site}"));
        }
        every.strategy.max_unavailable = Some(1.into());
        every.strategy.progress_deadline = deadline;
        let job = &mut ws.job.spec;
        job.env.insert("OUTCOME".into(), ["ok", "fail", "odd"][self.outcome as usize % 3].into());
        job.job = Some(proto::manifest::JobSpec {
            completions: Some(self.completions),
            parallelism: Some(self.parallelism),
            backoff_limit: Some(self.backoff_limit),
        });
        for m in ws.all() {
            m.validate().unwrap_or_else(|e| panic!("{e:?}: {m:?}"));
        }
        ws
    }

    fn sim(&self) -> (Sim, Workloads) {
        let names: Vec<String> = (0..self.sites.len()).map(|i| format!("n{i}")).collect();
        let sites: Vec<String> = self.sites.iter().map(|s| format!("s{s}")).collect();
        let labels: Vec<[(&str, &str); 1]> = sites.iter().map(|s| [("site", s.as_str())]).collect();
        let nodes: Vec<(&str, &[(&str, &str)])> =
            names.iter().zip(&labels).map(|(n, l)| (n.as_str(), l.as_slice())).collect();
        let mut sim = Sim::new(&nodes);
        let ws = self.workloads();
        for m in ws.all() {
            sim.apply(m);
        }
        sim.settle();
        (sim, ws)
    }
}

#[derive(Debug, Clone)]
enum Event {
    Advance(u64),
    Cut(usize),
    Restore(usize),
    AgentRestart(usize),
    Crash(usize, usize),
    HubRestart,
    /// Workload, template version, good.
    Template(usize, u32, bool),
    Scale(u32),
    Cordon(usize),
    Drain(usize),
    Uncordon(usize),
    WallJump(i64),
}

fn arb_setup() -> impl Strategy<Value = Setup> {
    (
        (prop::collection::vec(0..2u8, 2..=4), 1..=4u32, 0..=2u32, 0..=2u32),
        (prop::option::of(5..=40u64), 10..=60u64, prop::option::of(0..2u8)),
        (1..=3u32, 1..=2u32, 0..=2u32, 0..3u8),
    )
        .prop_map(
            |(
                (sites, replicas, max_unavailable, max_surge),
                (failover_s, deadline_s, every_selector),
                (completions, parallelism, backoff_limit, outcome),
            )| Setup {
                sites,
                replicas,
                max_unavailable,
                max_surge,
                failover_s,
                deadline_s,
                every_selector,
                completions,
                parallelism,
                backoff_limit,
                outcome,
            },
        )
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (100..30_000u64).prop_map(Event::Advance),
        2 => (0..4usize).prop_map(Event::Cut),
        2 => (0..4usize).prop_map(Event::Restore),
        1 => (0..4usize).prop_map(Event::AgentRestart),
        1 => (0..4usize, 0..8usize).prop_map(|(n, k)| Event::Crash(n, k)),
        1 => Just(Event::HubRestart),
        3 => (0..3usize, 2..6u32, prop::bool::weighted(0.7)).prop_map(|(w, v, g)| Event::Template(w, v, g)),
        1 => (0..=5u32).prop_map(Event::Scale),
        1 => (0..4usize).prop_map(Event::Cordon),
        1 => (0..4usize).prop_map(Event::Drain),
        1 => (0..4usize).prop_map(Event::Uncordon),
        1 => prop_oneof![Just(-3_600_000i64), Just(3_600_000i64), Just(-86_400_000i64)].prop_map(Event::WallJump),
    ]
}

/// Runs `events` on `setup`, checking the invariants throughout, and lets the fleet quiesce.
fn run(setup: &Setup, events: &[Event]) -> Sim {
    let (mut sim, ws) = setup.sim();
    for e in events {
        sim.event(e, &ws);
        sim.settle();
    }
    // Every node back, time to finish what was started.
    for i in 0..sim.agents.len() {
        sim.event(&Event::Restore(i), &ws);
    }
    sim.settle();
    sim.advance(120_000);
    sim
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Invariants 1–6 over random event sequences.
    #[test]
    fn the_fleet_keeps_every_invariant(setup in arb_setup(), events in prop::collection::vec(arb_event(), 1..30)) {
        let sim = run(&setup, &events);
        // With every node back and time gone by, every connected agent runs exactly its set.
        for (name, agent) in &sim.agents {
            let (generation, set) = sim.store.assignment(name);
            prop_assert_eq!(agent.generation, generation);
            let running: Vec<&String> = agent.runs.keys().collect();
            let assigned: Vec<&String> = set.keys().collect();
            prop_assert_eq!(running, assigned);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// Invariant 7: a batch of events on distinct nodes and workloads that reach the hub
    /// between two passes, in two orders, with the store's rows in two orders, end in the same
    /// placements.
    #[test]
    fn any_interleaving_converges_to_the_same_placements(
        setup in arb_setup(),
        prefix in prop::collection::vec(arb_event(), 0..12),
        batch in prop::collection::vec(arb_event(), 1..8),
        seed in 1..u64::MAX,
    ) {
        let (mut base, ws) = setup.sim();
        for e in &prefix {
            base.event(e, &ws);
            base.settle();
        }
        // One event per node and per workload, none that moves time or restarts the hub.
        let mut seen = BTreeSet::new();
        let batch: Vec<Event> = batch
            .into_iter()
            .filter(|e| {
                let key = match e {
                    Event::Cut(i) | Event::Restore(i) | Event::AgentRestart(i) | Event::Crash(i, _)
                    | Event::Cordon(i) | Event::Drain(i) | Event::Uncordon(i) => format!("n{}", i % base.agents.len()),
                    Event::Template(w, ..) => format!("w{}", w % 3),
                    Event::Scale(_) => "w0".into(),
                    Event::WallJump(_) => "wall".into(),
                    Event::Advance(_) | Event::HubRestart => return false,
                };
                seen.insert(key)
            })
            .collect();
        let mut reordered = batch.clone();
        permute(&mut reordered, seed);
        let finish = |mut sim: Sim, events: &[Event], shuffle: u64| {
            sim.shuffle = shuffle;
            for e in events {
                sim.event(e, &ws);
            }
            sim.settle();
            sim.advance(60_000);
            sim.placements()
        };
        let a = finish(base.clone(), &batch, 0);
        let b = finish(base, &reordered, seed);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn a_rollout_across_a_lost_node_and_a_hub_restart_completes_with_its_fenced_copy_stopped() {
    let setup = Setup {
        sites: vec![0, 0, 1],
        replicas: 3,
        max_unavailable: 1,
        max_surge: 1,
        failover_s: Some(10),
        deadline_s: 600,
        every_selector: None,
        completions: 2,
        parallelism: 1,
        backoff_limit: 2,
        outcome: 0,
    };
    let (mut sim, ws) = setup.sim();
    sim.advance(5_000);
    let web_on = |sim: &Sim, node: &str| {
        sim.store
            .replicas
            .values()
            .filter(|r| r.replica.workload == "web" && r.replica.node.as_deref() == Some(node))
            .count()
    };
    let lost = (0..3).map(|i| format!("n{i}")).find(|n| web_on(&sim, n) > 0).unwrap();
    let i = lost[1..].parse().unwrap();
    sim.event(&Event::Template(0, 2, true), &ws);
    sim.settle();
    sim.event(&Event::Cut(i), &ws);
    sim.settle();
    sim.advance(5_000);
    sim.event(&Event::HubRestart, &ws);
    sim.settle();
    // The restarted hub counts the node lost from its own start: not yet moved 6 s later.
    sim.advance(6_000);
    assert!(web_on(&sim, &lost) > 0, "failed over before the restarted hub's deadline");
    sim.advance(10_000);
    assert_eq!(web_on(&sim, &lost), 0, "the lost node still holds web replicas");
    // Its agent still runs the old copies until it is back; then they stop.
    assert!(sim.agents[&lost].runs.keys().any(|r| r.starts_with("web-")));
    sim.event(&Event::Restore(i), &ws);
    sim.settle();
    assert!(!sim.agents[&lost].runs.keys().any(|r| r.starts_with("web-")), "fenced copies still run");
    sim.advance(30_000);
    let hash = ws.with_template(&sim.store, 0, 2, true).template().hash();
    let web: Vec<&Row> = sim.store.replicas.values().filter(|r| r.replica.workload == "web").collect();
    assert_eq!(web.len(), 3, "the stand-in is gone once the rollout completed");
    assert!(web.iter().all(|r| r.replica.template_hash == hash && r.replica.reported.ready));
    assert!(sim.store.rollouts["web"].done);
    // The job ran both indexes to completion meanwhile.
    assert!(sim.store.job_indexes.values().filter(|i| i.workload == "batch" && i.succeeded).count() == 2);
}

#[test]
fn a_hub_restart_neither_fires_nor_forgets_a_jobs_back_off() {
    let setup = Setup {
        sites: vec![0, 1],
        replicas: 1,
        max_unavailable: 1,
        max_surge: 0,
        failover_s: None,
        deadline_s: 600,
        every_selector: None,
        completions: 1,
        parallelism: 1,
        backoff_limit: 3,
        outcome: 1,
    };
    let (mut sim, ws) = setup.sim();
    // The first attempt fails 2 s in; its retry is due 10 s later.
    sim.advance(2_500);
    let failures = |sim: &Sim| sim.store.job_indexes.get(&("batch".to_string(), 0)).map_or(0, |i| i.failures);
    assert_eq!(failures(&sim), 1);
    let batch_placed = |sim: &Sim| sim.store.replicas.values().any(|r| r.replica.workload == "batch");
    assert!(!batch_placed(&sim));
    // A wall-clock jump a day back and a hub restart: the retry still comes, no earlier.
    sim.event(&Event::WallJump(-86_400_000), &ws);
    sim.advance(4_000);
    sim.event(&Event::HubRestart, &ws);
    sim.settle();
    sim.advance(4_000);
    assert!(!batch_placed(&sim), "retried before its back-off");
    sim.advance(7_000);
    assert!(batch_placed(&sim) || failures(&sim) == 2, "the retry never came");
}
