//! Rolling updates, as a pure function: given a workload's replicas, which of them must keep
//! their old template for now. The controller runs it on every pass; a replica it releases
//! gets the workload's current template (the agent restarts it on the new one).
//!
//! Rules (Kubernetes' `RollingUpdate` with `maxUnavailable`, replicas updated in place):
//! - A replica is *available* when it runs its assigned template and reports ready.
//! - Old replicas that are not available are released at once: updating them costs nothing.
//! - Of the available old replicas, at most `maxUnavailable` minus the replicas already
//!   unavailable are released per pass, lowest index first. So the update advances only as
//!   updated replicas become ready; a new template that never gets ready holds the rollout
//!   with all but `maxUnavailable` replicas still serving on the old one.
//! - New replicas (scale-up during a rollout) start on the current template.

use std::collections::BTreeSet;

/// One replica of the workload as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutReplica {
    pub name: String,
    pub index: u32,
    /// The template hash the replica is assigned now.
    pub template_hash: String,
    /// Running its assigned template and ready.
    pub available: bool,
}

/// Where a workload's rollout stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Replicas that keep their old template this pass.
    pub held: BTreeSet<String>,
    /// Replicas on the current template (including those released this pass).
    pub updated: u32,
    /// Replicas on the current template and available.
    pub updated_available: u32,
}

impl Plan {
    /// Whether every replica runs the current template and is available.
    pub fn complete(&self, replicas: u32) -> bool {
        self.held.is_empty() && self.updated == replicas && self.updated_available == replicas
    }
}

/// Plans one pass of the rollout of the workload whose current template hash is `current`.
pub fn plan(current: &str, replicas: &[RolloutReplica], max_unavailable: u32) -> Plan {
    let mut sorted: Vec<&RolloutReplica> = replicas.iter().collect();
    sorted.sort_by_key(|r| r.index);
    let unavailable = sorted.iter().filter(|r| !r.available).count() as u32;
    let mut budget = max_unavailable.max(1).saturating_sub(unavailable);
    let mut plan = Plan::default();
    for r in sorted {
        // Already updated, or not serving anyway: releasing it costs no availability.
        let release = if r.template_hash == current || !r.available {
            true
        } else if budget > 0 {
            budget -= 1;
            true
        } else {
            false
        };
        if !release {
            plan.held.insert(r.name.clone());
            continue;
        }
        plan.updated += 1;
        if r.template_hash == current && r.available {
            plan.updated_available += 1;
        }
    }
    plan
}

/// How a rollout is doing over time: when its count of updated, available replicas last
/// grew. The controller keeps one per workload in memory (a new leader starts the clock
/// again, which only delays a rollback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub template_hash: String,
    /// The most updated-and-available replicas seen for this template.
    pub best: u32,
    /// When `best` last grew, or the template changed.
    pub since_ms: u64,
    /// The rollout completed once: later failures are not the rollout's.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Progressing,
    Complete,
    /// No progress within the deadline: roll back.
    Stalled,
}

/// Advances `prev` with this pass's `plan` of a workload of `replicas` on template `current`.
pub fn track(
    prev: Option<&Progress>,
    current: &str,
    plan: &Plan,
    replicas: u32,
    now_ms: u64,
    deadline_ms: u64,
) -> (Progress, Verdict) {
    let mut p = match prev {
        Some(p) if p.template_hash == current => p.clone(),
        _ => {
            Progress { template_hash: current.to_string(), best: plan.updated_available, since_ms: now_ms, done: false }
        }
    };
    if plan.updated_available > p.best {
        p.best = plan.updated_available;
        p.since_ms = now_ms;
    }
    if plan.complete(replicas) {
        p.done = true;
    }
    let verdict = if p.done {
        Verdict::Complete
    } else if now_ms.saturating_sub(p.since_ms) > deadline_ms {
        Verdict::Stalled
    } else {
        Verdict::Progressing
    };
    (p, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(index: u32, hash: &str, available: bool) -> RolloutReplica {
        RolloutReplica { name: format!("w-{index}"), index, template_hash: hash.into(), available }
    }

    fn held(p: &Plan) -> Vec<&str> {
        p.held.iter().map(String::as_str).collect()
    }

    #[test]
    fn updates_one_at_a_time_as_updated_replicas_become_ready() {
        // All three serve the old template: one is released.
        let p = plan("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-1", "w-2"]);
        // w-0 restarts on the new template: not available, so nothing more moves.
        let p = plan("new", &[r(0, "new", false), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-1", "w-2"]);
        assert_eq!((p.updated, p.updated_available), (1, 0));
        // w-0 ready: the next one goes.
        let p = plan("new", &[r(0, "new", true), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-2"]);
        let p = plan("new", &[r(0, "new", true), r(1, "new", true), r(2, "new", true)], 1);
        assert!(p.complete(3));
    }

    #[test]
    fn a_new_template_that_never_gets_ready_holds_the_rollout() {
        let replicas = [r(0, "new", false), r(1, "old", true), r(2, "old", true), r(3, "old", true)];
        for _ in 0..5 {
            let p = plan("new", &replicas, 1);
            assert_eq!(held(&p), ["w-1", "w-2", "w-3"]);
            assert!(!p.complete(4));
        }
    }

    #[test]
    fn max_unavailable_sets_the_batch_and_unavailable_old_replicas_go_free() {
        let p = plan("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true), r(3, "old", true)], 2);
        assert_eq!(held(&p), ["w-2", "w-3"]);
        // A crashed old replica is updated at once and uses up the budget.
        let p = plan("new", &[r(0, "old", true), r(1, "old", false), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-0", "w-2"]);
        // maxUnavailable 0 would never progress in place: it acts as 1.
        let p = plan("new", &[r(0, "old", true), r(1, "old", true)], 0);
        assert_eq!(held(&p), ["w-1"]);
    }

    #[test]
    fn nothing_is_held_when_the_template_did_not_change() {
        let p = plan("same", &[r(0, "same", false), r(1, "same", true)], 1);
        assert!(p.held.is_empty());
        assert_eq!((p.updated, p.updated_available), (2, 1));
    }

    #[test]
    fn a_rollout_that_stops_progressing_is_stalled_after_its_deadline_and_only_then() {
        let plan = |updated_available, held: &[&str], updated| Plan {
            held: held.iter().map(|h| h.to_string()).collect(),
            updated,
            updated_available,
        };
        // A new template: the clock starts.
        let (p, v) = track(None, "new", &plan(0, &["w-1", "w-2"], 1), 3, 1_000, 5_000);
        assert_eq!((v, p.since_ms), (Verdict::Progressing, 1_000));
        // One replica ready at 4 s: progress, the clock restarts.
        let (p, v) = track(Some(&p), "new", &plan(1, &["w-2"], 2), 3, 4_000, 5_000);
        assert_eq!((v, p.since_ms, p.best), (Verdict::Progressing, 4_000, 1));
        // Nothing more for 5 s: still within the deadline at 9 s, stalled after it.
        let (p, v) = track(Some(&p), "new", &plan(1, &["w-2"], 2), 3, 9_000, 5_000);
        assert_eq!(v, Verdict::Progressing);
        let (_, v) = track(Some(&p), "new", &plan(1, &["w-2"], 2), 3, 9_001, 5_000);
        assert_eq!(v, Verdict::Stalled);
        // Completed once, a later outage is not the rollout's.
        let (p, v) = track(Some(&p), "new", &plan(3, &[], 3), 3, 9_500, 5_000);
        assert_eq!(v, Verdict::Complete);
        let (_, v) = track(Some(&p), "new", &plan(0, &[], 3), 3, 99_000, 5_000);
        assert_eq!(v, Verdict::Complete);
        // Another template starts over.
        let (p, v) = track(Some(&p), "newer", &plan(0, &["w-1", "w-2"], 1), 3, 100_000, 5_000);
        assert_eq!((v, p.since_ms, p.done), (Verdict::Progressing, 100_000, false));
    }
}
