//! The hub's controller: one pure function, [`pass`], from a [`Snapshot`] of the cluster to a
//! [`Pass`] of decisions. No store, no clock, no sockets: the shell (`server.rs`) reads the
//! snapshot in one read transaction, adds what it observed (which nodes are connected, since
//! when the others are not, the cluster time), runs [`pass`], writes the pass in one
//! transaction fenced by the controller lease and wakes the nodes whose assignment sets
//! changed. Feeding a pass's own output back in (same time, same observations) yields an
//! empty pass, so the shell may run it on every trigger and after any crash.
//!
//! One place per rule:
//! - **Availability** ([`is_available`]): running the assigned template, ready, on a
//!   connected node. Rollouts advance on it, drains spend their budget on it, the API counts
//!   ready replicas with it.
//! - **Placement**: [`crate::scheduler`], fed by [`inputs`] (the only translation from stored
//!   state to scheduler types), including failover (a replica leaves a NotReady node once its
//!   workload's `failover.after` has passed since the node went NotReady) and drains.
//! - **Rollouts** ([`rollout`]): which replicas keep their old template, how many surge
//!   replicas run (a field of the scheduler's input of its own, never extra `replicas`),
//!   progress and its deadline, and the automatic rollback with its cause. Progress is state
//!   in the store (table `rollouts`), so a new leader keeps the same deadline.
//! - **Jobs** ([`jobs`]): an attempt that ended is recorded once, in the transaction that
//!   removes it from its node; [`crate::scheduler::job_plan`] decides the indexes to run and
//!   their back-off. A Job attempt runs to its end on the template it started with.
//! - **The placement diff** ([`diff`]): the writes that make the replica rows match, the
//!   nodes whose sets change, the replicas that leave a node (fenced when that node is lost).
//! - **Time** ([`time`]): every instant here is cluster time, carried by the leaders'
//!   monotonic clocks; a wall-clock jump neither fires nor postpones a deadline.
//!
//! Invariants (checked by unit tests here and by the simulated fleet in `sim`):
//! - A Replicated workload never has more than `replicas + maxSurge` replicas placed.
//! - A pass never takes availability below `desired − maxUnavailable` (at least one below
//!   when there is no surge, or when a drain moves one), nor lower than it already is.
//! - A replica moved off a lost node leaves that node's set (a new generation), so the node
//!   stops it when it comes back; EveryNode workloads cover every matching node.
//! - The same snapshot, in any order, gives the same pass; a pass on its own output is empty.

pub mod diff;
pub mod inputs;
pub mod jobs;
pub mod rollout;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
pub mod time;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proto::manifest::{Manifest, ReplicaTemplate, WorkloadKind};

use crate::scheduler::{self, Failover, Observed, Placement, SchedWorkload};

pub use inputs::{Reported, is_available, job_spec, node_labels};

/// A workload as stored, with its replica template (`manifest.template()`) and that
/// template's hash, derived once by whoever builds the snapshot.
#[derive(Debug, Clone)]
pub struct Workload {
    pub manifest: Manifest,
    pub revision: u64,
    pub template: ReplicaTemplate,
    pub template_hash: String,
}

impl Workload {
    pub fn new(manifest: Manifest, revision: u64) -> Workload {
        let template = manifest.template();
        let template_hash = template.hash();
        Workload { manifest, revision, template, template_hash }
    }
}

/// A node as stored, with what the shell observed of it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub facts: proto::messages::NodeFacts,
    pub cordoned: bool,
    pub draining: bool,
    /// Connected now (to this hub, or to another on a shared store).
    pub ready: bool,
    /// Since when (cluster time) it is NotReady; ignored while ready.
    pub not_ready_since_ms: Option<u64>,
}

/// A replica row: where it is assigned, on which template, and what its node reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub name: String,
    pub workload: String,
    pub index: u32,
    pub node: Option<String>,
    /// The template the replica is assigned.
    pub template_hash: String,
    pub reported: Reported,
    pub unschedulable: String,
}

/// What a Job index did so far (table `job_indexes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIndex {
    pub workload: String,
    pub index: u32,
    pub succeeded: bool,
    pub failures: u32,
    /// When its last attempt failed (cluster time); `None` if none did.
    pub failed_at_ms: Option<u64>,
}

/// A template a workload had (table `workload_revisions`, without the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionEntry {
    pub workload: String,
    pub revision: u64,
    pub template_hash: String,
    pub cause: String,
}

impl rollout::Revision for RevisionEntry {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn template_hash(&self) -> &str {
        &self.template_hash
    }
}

/// Rollout progress as stored (table `rollouts`).
pub type RolloutRecord = rollout::Progress;

/// Everything one pass looks at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Cluster time of this pass ([`time`]).
    pub now_ms: u64,
    pub workloads: Vec<Workload>,
    pub nodes: Vec<Node>,
    pub replicas: Vec<Replica>,
    pub job_indexes: Vec<JobIndex>,
    pub rollouts: Vec<RolloutRecord>,
    pub revisions: Vec<RevisionEntry>,
}

/// A finished Job attempt to record: its replica row leaves its node and the index's
/// outcome is updated, at the pass's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAttempt {
    pub replica: String,
    pub workload: String,
    pub index: u32,
    pub node: String,
    pub succeeded: bool,
}

/// One change to the replica rows. Each names the row as it was read, so the store refuses
/// a pass whose rows changed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaWrite {
    pub replica: String,
    pub workload: String,
    pub index: u32,
    pub op: WriteOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// A new replica on the workload's current template, Pending.
    Create { node: Option<String>, unschedulable: String },
    /// The replica moves (it starts over as Pending) and/or takes the current template.
    Change {
        from_node: Option<String>,
        from_hash: String,
        node: Option<String>,
        new_template: bool,
        unschedulable: String,
    },
    /// The replica goes.
    Delete { from_node: Option<String> },
}

/// Why a replica leaves a node. The node's agent stops it when it gets its new set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Scaled down, its workload's plan no longer wants it, or its node no longer matches.
    Removed,
    /// Moved to another node (a drain, an eviction) while its node is connected.
    Moved,
    /// Moved off a node that is not connected (a failover, or a drain of a lost node): the
    /// old copy is *fenced*, stopped when the node returns and gets its new set.
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub replica: String,
    pub node: String,
    pub reason: StopReason,
}

/// A rollback to apply: the workload takes revision `to_revision`'s template, recorded with
/// `cause`, if its revision is still `expected_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    pub workload: String,
    pub expected_revision: u64,
    pub to_revision: u64,
    pub cause: String,
}

/// A stalled rollout that is not rolled back, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftStalled {
    pub workload: String,
    pub why: String,
}

/// A workload's current template, for the writes that give it to replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentTemplate {
    pub template: ReplicaTemplate,
    pub hash: String,
}

/// The decisions of one pass. The shell writes everything but the informational fields
/// (`stops`, `held`, `drains`, `warnings`, `left_stalled`) in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// The cluster time the pass ran at; the store records Job failures with it.
    pub now_ms: u64,
    /// Each workload's revision as the pass read it: the store writes the pass only while
    /// they are unchanged (an apply or a delete in between makes it stale).
    pub revisions_seen: BTreeMap<String, u64>,
    pub job_attempts: Vec<JobAttempt>,
    pub writes: Vec<ReplicaWrite>,
    /// The attempt number of each Job replica `writes` create: the index's failures so far
    /// plus one ([`jobs::attempt_number`]).
    pub attempt_numbers: BTreeMap<String, u32>,
    /// Templates of the workloads `writes` give their current template to.
    pub templates: BTreeMap<String, CurrentTemplate>,
    /// Nodes whose assignment sets change: each gets a new generation.
    pub changed_nodes: BTreeSet<String>,
    /// Rollout progress to store (only what changed).
    pub rollouts: Vec<RolloutRecord>,
    pub rollbacks: Vec<Rollback>,
    /// Replicas leaving a node.
    pub stops: Vec<Stop>,
    /// Replicas kept on an older template, with why.
    pub held: BTreeMap<String, String>,
    /// Draining nodes → replicas still to move off.
    pub drains: BTreeMap<String, u32>,
    pub left_stalled: Vec<LeftStalled>,
    /// Inputs the scheduler ignored.
    pub warnings: Vec<String>,
    /// When (cluster time) the next pass is due at the latest for a deadline: a failover, a
    /// Job retry, a rollout's progress deadline.
    pub wake_at_ms: Option<u64>,
}

impl Pass {
    /// Whether the pass changes nothing in the store.
    pub fn writes_nothing(&self) -> bool {
        self.job_attempts.is_empty() && self.writes.is_empty() && self.rollouts.is_empty() && self.rollbacks.is_empty()
    }
}

/// One workload's facts for this pass.
struct Current<'a> {
    w: &'a Workload,
    template: &'a ReplicaTemplate,
    hash: &'a str,
}

/// Runs one controller pass over `s`.
pub fn pass(s: &Snapshot) -> Pass {
    let now = s.now_ms;
    let mut out = Pass { now_ms: now, ..Pass::default() };

    // Workloads by name (the first of duplicate names).
    let mut workloads: BTreeMap<&str, Current> = BTreeMap::new();
    for w in &s.workloads {
        let (template, hash) = (&w.template, w.template_hash.as_str());
        workloads.entry(w.manifest.metadata.name.as_str()).or_insert(Current { w, template, hash });
    }
    out.revisions_seen = workloads.iter().map(|(n, c)| (n.to_string(), c.w.revision)).collect();
    let node_ready: HashMap<&str, bool> = s.nodes.iter().map(|n| (n.name.as_str(), n.ready)).collect();
    let ready_node = |n: &str| node_ready.get(n).copied().unwrap_or(false);

    let mut replicas: Vec<&Replica> = s.replicas.iter().collect();
    replicas.sort_by(|a, b| (&a.workload, a.index, &a.name).cmp(&(&b.workload, b.index, &b.name)));
    replicas.dedup_by(|b, a| a.name == b.name);

    // Jobs: attempts that ended are recorded and leave their node first.
    let job_names: BTreeSet<&str> =
        workloads.iter().filter(|(_, c)| c.w.manifest.spec.kind == WorkloadKind::Job).map(|(n, _)| *n).collect();
    out.job_attempts = jobs::finished_attempts(&job_names, &replicas);
    if !out.job_attempts.is_empty() {
        let done: BTreeSet<&str> = out.job_attempts.iter().map(|a| a.replica.as_str()).collect();
        replicas.retain(|r| !done.contains(r.name.as_str()));
        out.changed_nodes.extend(out.job_attempts.iter().map(|a| a.node.clone()));
    }
    let job_indexes = jobs::record(&s.job_indexes, &out.job_attempts, now);

    let available =
        |r: &Replica| inputs::is_available(&r.reported, &r.template_hash, r.node.as_deref().is_some_and(ready_node));
    let mut by_workload: BTreeMap<&str, Vec<&Replica>> = BTreeMap::new();
    for r in &replicas {
        by_workload.entry(r.workload.as_str()).or_default().push(r);
    }
    let stored: HashMap<&str, &RolloutRecord> = s.rollouts.iter().map(|p| (p.workload.as_str(), p)).collect();

    // Rollouts: who keeps an old template, how many stand-ins run, progress and rollbacks.
    let mut surge: HashMap<&str, u32> = HashMap::new();
    // Available replicas this pass takes off their old template: no longer available to a
    // drain's budget.
    let mut released: BTreeSet<&str> = BTreeSet::new();
    for (name, c) in &workloads {
        let members = by_workload.get(name).map(Vec::as_slice).unwrap_or_default();
        if c.w.manifest.spec.kind == WorkloadKind::Job {
            for r in members.iter().filter(|r| r.node.is_some() && r.template_hash != c.hash) {
                out.held.insert(
                    r.name.clone(),
                    format!("a Job attempt runs to its end on the template it started with ({})", r.template_hash),
                );
            }
            continue;
        }
        let members_view: Vec<rollout::RolloutReplica> = members
            .iter()
            .map(|r| rollout::RolloutReplica {
                name: r.name.clone(),
                index: r.index,
                template_hash: r.template_hash.clone(),
                available: available(r),
            })
            .collect();
        let limits = rollout::limits(&c.w.manifest, members.len() as u32);
        let plan = rollout::plan(c.hash, &members_view, limits);
        if plan.surge > 0 {
            surge.insert(name, plan.surge);
        }
        for r in members {
            if plan.held.contains(&r.name) {
                out.held.insert(
                    r.name.clone(),
                    format!(
                        "keeps template {} until the rollout to {} can spare it: {}/{} updated and available, at most {} may be unavailable",
                        r.template_hash,
                        c.hash,
                        plan.updated_available,
                        limits.desired,
                        limits.effective_max_unavailable()
                    ),
                );
            } else if r.template_hash != c.hash && available(r) {
                released.insert(r.name.as_str());
            }
        }
        let deadline = c.w.manifest.spec.strategy.progress_deadline_ms();
        let prev = stored.get(name).copied();
        let (mut progress, verdict) = rollout::track(name, prev, c.hash, &plan, limits.desired, now, deadline);
        if verdict == rollout::Verdict::Stalled {
            // Not looked at again until the template changes, whatever happens next.
            progress.done = true;
            stalled(name, c, &progress, now, &s.revisions, &mut out);
        } else if !progress.done {
            let due = progress.since_ms.saturating_add(deadline).saturating_add(1);
            out.wake_at_ms = Some(out.wake_at_ms.map_or(due, |w| w.min(due)));
        }
        if prev != Some(&progress) {
            out.rollouts.push(progress);
        }
    }

    // Placement.
    let sched_nodes: Vec<scheduler::SchedNode> = s.nodes.iter().map(inputs::sched_node).collect();
    let sched_workloads: Vec<SchedWorkload> = workloads
        .iter()
        .map(|(name, c)| {
            let mut sw = inputs::sched_workload(&c.w.manifest);
            match sw.kind {
                scheduler::WorkloadKind::Job(_) => {
                    let members = by_workload.get(name).map(Vec::as_slice).unwrap_or_default();
                    sw.job_progress =
                        jobs::progress(name, job_indexes.values(), members.iter().map(|r| (r.index, r.node.is_some())));
                }
                scheduler::WorkloadKind::Replicated => sw.surge = surge.get(name).copied().unwrap_or(0),
                scheduler::WorkloadKind::EveryNode => {}
            }
            sw
        })
        .collect();
    let current: Vec<Placement> = replicas
        .iter()
        .map(|r| Placement {
            replica: r.name.clone(),
            workload: r.workload.clone(),
            index: r.index,
            node: r.node.clone(),
        })
        .collect();
    let ready: HashMap<String, String> = replicas
        .iter()
        .filter(|r| available(r) && !released.contains(r.name.as_str()))
        .filter_map(|r| Some((r.name.clone(), r.node.clone()?)))
        .collect();
    let decisions = scheduler::schedule_at(&sched_nodes, &sched_workloads, &current, &Observed { now_ms: now, ready });

    // The diff.
    let d = diff::placement_writes(
        &replicas,
        &decisions.placements,
        &decisions.unschedulable,
        |w| workloads.get(w).map(|c| c.hash),
        &out.held,
        ready_node,
    );
    out.writes = d.writes;
    out.changed_nodes.extend(d.changed_nodes);
    out.stops = d.stops;
    for w in &out.writes {
        let takes_template = matches!(w.op, WriteOp::Create { .. } | WriteOp::Change { new_template: true, .. });
        if takes_template && let Some(c) = workloads.get(w.workload.as_str()) {
            out.templates
                .entry(w.workload.clone())
                .or_insert_with(|| CurrentTemplate { template: c.template.clone(), hash: c.hash.to_string() });
        }
    }
    for w in &out.writes {
        if matches!(w.op, WriteOp::Create { .. }) && job_names.contains(w.workload.as_str()) {
            out.attempt_numbers.insert(w.replica.clone(), jobs::attempt_number(&job_indexes, &w.workload, w.index));
        }
    }
    out.drains = decisions.drains;
    out.warnings = decisions.warnings;

    // Deadlines: replicas still on a NotReady node whose workload fails over, Job retries.
    let since: HashMap<&str, u64> = sched_nodes
        .iter()
        .filter(|n| !n.ready)
        .filter_map(|n| Some((n.name.as_str(), n.not_ready_since_ms?)))
        .collect();
    let after: HashMap<&str, u64> = sched_workloads
        .iter()
        .filter_map(|w| match w.failover {
            Failover::After(ms) => Some((w.name.as_str(), ms)),
            Failover::Never => None,
        })
        .collect();
    let failovers = decisions.placements.iter().filter_map(|p| {
        let due = since.get(p.node.as_deref()?)?.saturating_add(*after.get(p.workload.as_str())?);
        (due > now).then_some(due)
    });
    let retries = decisions.jobs.values().filter_map(|j| j.retry_at_ms);
    out.wake_at_ms = failovers.chain(retries).chain(out.wake_at_ms).min();
    out
}

/// A rollout that made no progress within its deadline: roll it back to the previous
/// different template, unless its current template is itself a rollback (no ping-pong between
/// two bad templates) or there is nothing to go back to.
fn stalled(name: &str, c: &Current, progress: &RolloutRecord, now: u64, revisions: &[RevisionEntry], out: &mut Pass) {
    let mut mine: Vec<&RevisionEntry> = revisions.iter().filter(|r| r.workload == name).collect();
    mine.sort_by_key(|r| r.revision);
    let waited_s = now.saturating_sub(progress.since_ms) / 1000;
    if mine.iter().rev().find(|r| r.template_hash == c.hash).is_some_and(|r| r.cause.starts_with("rollback")) {
        out.left_stalled
            .push(LeftStalled { workload: name.to_string(), why: "its template is already a rollback".into() });
        return;
    }
    let mine: Vec<RevisionEntry> = mine.into_iter().cloned().collect();
    match rollout::rollback_target(&mine, c.hash, None) {
        Ok(target) => out.rollbacks.push(Rollback {
            workload: name.to_string(),
            expected_revision: c.w.revision,
            to_revision: target.revision,
            cause: format!("rollback: template {} made no progress in {waited_s}s", c.hash),
        }),
        Err(why) => out.left_stalled.push(LeftStalled { workload: name.to_string(), why: why.to_string() }),
    }
}
