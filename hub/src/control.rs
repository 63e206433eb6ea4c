//! The controller's I/O shell. Only the holder of the controller lease runs it. A pass is:
//! read the store in one read transaction, add what this hub observed (which nodes are
//! connected, since when the others are not, cluster time), run the pure
//! [`crate::controller::pass`], write its decisions in one transaction fenced by the lease,
//! and wake the sessions of the nodes whose assignment sets changed. Nothing is decided here.
//!
//! The loop runs a pass on every trigger (an apply, a status, a session that starts or
//! ends), at least every `RESYNC_PERIOD`, and at the next deadline the pass names (a
//! failover, a Job retry, a rollout's progress deadline), so deadlines need no outside event.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::cluster::Shared;
use crate::controller::{self, Node, Snapshot, StopReason, Workload, WriteOp, time};
use crate::leader;
use crate::metrics::StoreOp;
use crate::now_ms;
use crate::store::{Fence, StoreError, Written};

/// The controller re-runs at least this often even without triggers (level-triggered safety)
/// on a shared store, where other hubs write too.
const RESYNC_PERIOD: Duration = Duration::from_secs(5);
/// The same alone on SQLite, where every change comes through this hub's own triggers and
/// every deadline is named by the pass. A pass reads the whole store: with 10,000 idle nodes
/// a pass every 5 s was most of the hub's idle CPU, and with the controller's and the
/// services' passes every 30 s they were still a third of it (BENCHMARKS.md, "Fleet scale").
const RESYNC_ALONE: Duration = Duration::from_secs(120);

/// How long the controller may go without a pass when nothing triggers one.
pub(crate) fn resync_period(shared: &Shared, shared_store: Duration, alone: Duration) -> Duration {
    if shared.store.is_shared() { shared_store } else { alone }
}
/// A pass reads the whole store, so its cost grows with the fleet; a trigger that comes while
/// one runs is served by the next pass, not one each. After a pass that took `took`, the next
/// one triggered by an event waits this long: three times the pass, at most [`MAX_PASS_GAP`].
/// At ten nodes that is a few milliseconds; at 10,000 reconnecting after a hub restart (every
/// session start a trigger) it keeps each loop's passes to a quarter of a core, where a
/// profile of that storm had the controller and services passes taking most of one between
/// them (BENCHMARKS.md, "Fleet scale"). Deadlines the pass named are not delayed past their
/// own time by more than the gap.
pub(crate) fn pass_gap(took: Duration) -> Duration {
    (took * 3).min(MAX_PASS_GAP)
}
const MAX_PASS_GAP: Duration = Duration::from_secs(1);

/// Wait past a deadline before the pass that acts on it (clock granularity).
const DEADLINE_SLACK: Duration = Duration::from_millis(20);
/// First retry delay after a failed reconcile pass; doubles up to `RESYNC_PERIOD`.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Passes computed from rows that changed before they were written are run again at once,
/// this many times, then after `RETRY_MIN`.
const STALE_RETRIES: u32 = 3;

pub(crate) async fn controller_loop(shared: Arc<Shared>) {
    let mut failures = 0u32;
    let mut leader = shared.leader.clone();
    let resync = resync_period(&shared, RESYNC_PERIOD, RESYNC_ALONE);
    loop {
        if !*leader.borrow_and_update() {
            debug!("not the leader; controllers idle");
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let started = std::time::Instant::now();
        // A failed pass is retried soon with backoff, not at the next periodic resync.
        let wait = match reconcile(&shared).await {
            Ok(deadline) => {
                failures = 0;
                // A deadline is met to within a few ms, not at the next resync.
                deadline.map_or(resync, |d| (d + DEADLINE_SLACK).min(resync))
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, failures, "reconcile failed; retrying");
                (RETRY_MIN * 2u32.saturating_pow(failures - 1)).min(RESYNC_PERIOD)
            }
        };
        // Triggers meanwhile are kept (one `Notify` permit) and served after the gap.
        let gap = pass_gap(started.elapsed()).min(wait);
        tokio::time::sleep(gap).await;
        tokio::select! {
            _ = shared.reconcile.notified() => {}
            _ = tokio::time::sleep(wait - gap) => {}
            _ = leader.changed() => {}
        }
    }
}

/// One pass: read → [`controller::pass`] → fenced write → wake. Returns how long until the
/// next deadline the pass named, if any.
async fn reconcile(shared: &Shared) -> Result<Option<Duration>, StoreError> {
    let started = std::time::Instant::now();
    let result = reconcile_once(shared).await;
    shared.metrics.pass_duration.observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_once(shared: &Shared) -> Result<Option<Duration>, StoreError> {
    for _ in 0..STALE_RETRIES {
        let rows = shared.metrics.timed(StoreOp::ControllerRead, shared.store.controller_rows()).await?;
        let mono = shared.mono_ms();
        let now = shared.clock.now(rows.clock.as_ref(), mono);
        let nodes = {
            // Who is connected first, then presence, never both held: a session that ends
            // holds `sessions` while it records the end in `presence`, so asking for a node's
            // session while holding `presence` deadlocked the hub (found with `flotilla sim
            // --drop-links` at 10,000 nodes: 1,000 sessions ending during a pass).
            let ready: Vec<bool> = rows.nodes.iter().map(|n| shared.is_connected(&n.name)).collect();
            let presence = shared.presence.lock().unwrap();
            rows.nodes
                .into_iter()
                .zip(ready)
                .map(|(n, ready)| Node {
                    not_ready_since_ms: (!ready)
                        .then(|| time::to_cluster(presence.not_ready_since(&n.name), mono, now)),
                    ready,
                    cordoned: n.cordoned,
                    draining: n.draining,
                    facts: n.facts,
                    name: n.name,
                })
                .collect()
        };
        let snapshot = Snapshot {
            now_ms: now,
            workloads: rows.workloads.into_iter().map(|w| Workload::new(w.manifest, w.revision)).collect(),
            nodes,
            replicas: rows.replicas,
            job_indexes: rows.job_indexes,
            rollouts: rows.rollouts,
            revisions: rows.revisions,
        };
        let pass = controller::pass(&snapshot);
        {
            // Logged once each, not on every pass.
            let mut seen = shared.warned.lock().unwrap();
            for w in pass.warnings.iter().filter(|w| !seen.contains(*w)) {
                warn!(warning = %w, "scheduler input ignored");
            }
            *seen = pass.warnings.iter().cloned().collect();
        }
        let wake = pass.wake_at_ms.map(|at| Duration::from_millis(at.saturating_sub(now)));
        if pass.writes_nothing() && !shared.clock.anchor_due(rows.clock.as_ref(), mono) {
            return Ok(wake);
        }
        let fence = Fence { lease: leader::CONTROLLER_LEASE, holder: &shared.hub_id };
        let anchor = shared.clock.anchor(now, mono);
        let written = shared.store.write_pass(Some(fence), &pass, &anchor, now_ms());
        match shared.metrics.timed(StoreOp::ControllerWrite, written).await? {
            Written::Stale(why) => {
                debug!(%why, "the store changed under the pass; running it again");
                continue;
            }
            Written::Done => {}
        }
        report(&pass);
        if !pass.changed_nodes.is_empty() {
            debug!(nodes = ?pass.changed_nodes, "assignment sets changed");
            shared.wake_nodes(&pass.changed_nodes);
        }
        if !pass.rollbacks.is_empty() {
            // The rolled-back template is rolled out by the next pass.
            shared.trigger_reconcile();
        }
        return Ok(wake);
    }
    Ok(Some(RETRY_MIN))
}

/// Logs what a written pass did.
fn report(pass: &controller::Pass) {
    for a in &pass.job_attempts {
        info!(job = %a.workload, index = a.index, node = %a.node, succeeded = a.succeeded, "job attempt finished");
    }
    for s in pass.stops.iter().filter(|s| s.reason != StopReason::Removed) {
        let to = pass.writes.iter().find_map(|w| match &w.op {
            WriteOp::Change { node, .. } if w.replica == s.replica => Some(node.clone()),
            _ => None,
        });
        let fenced = s.reason == StopReason::Fenced;
        info!(replica = %s.replica, from = %s.node, to = ?to.flatten(), fenced, "replica moved");
    }
    for r in &pass.rollbacks {
        warn!(workload = %r.workload, to_revision = r.to_revision, cause = %r.cause, "rollout made no progress within its deadline; rolled back");
    }
    for s in &pass.left_stalled {
        warn!(workload = %s.workload, reason = %s.why, "rollout made no progress within its deadline; cannot roll back");
    }
    for (node, left) in &pass.drains {
        debug!(%node, left, "draining");
    }
}
