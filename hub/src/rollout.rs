//! Rolling updates, as a pure function: given a workload's replicas, which of them must keep
//! their old template for now. The controller runs it on every pass; a replica it releases
//! gets the workload's current template (the agent restarts it on the new one).
//!
//! Rules (Kubernetes' `RollingUpdate` with `maxUnavailable` and `maxSurge`, replicas updated
//! in place):
//! - A replica is *available* when it runs its assigned template and reports ready.
//! - While old replicas remain, the workload runs up to `maxSurge` extra replicas (the
//!   highest indexes, on the current template): stand-ins that keep capacity up while old
//!   replicas are replaced. They go away (scale-down drops the highest indexes) once no old
//!   replica is left.
//! - Old replicas that are not available are released at once: updating them costs nothing.
//! - Available old replicas are released, lowest index first, only while the available
//!   replicas (stand-ins included) stay at least `replicas - maxUnavailable`. So the update
//!   advances only as updated replicas become ready; a new template that never gets ready
//!   holds the rollout with at least `replicas - maxUnavailable` still serving on the old
//!   one. With `maxUnavailable: 0` and a surge, availability never drops below `replicas`.
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
    /// Extra replicas to run beyond the desired count this pass.
    pub surge: u32,
}

impl Plan {
    /// Whether every replica runs the current template and is available.
    pub fn complete(&self, replicas: u32) -> bool {
        self.held.is_empty() && self.updated == replicas && self.updated_available == replicas
    }
}

/// How a rollout may use capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The workload's desired replica count (without surge).
    pub desired: u32,
    pub max_unavailable: u32,
    pub max_surge: u32,
}

/// Plans one pass of the rollout of the workload whose current template hash is `current`.
/// `replicas` are those the workload has now, surge replicas of an earlier pass included.
pub fn plan(current: &str, replicas: &[RolloutReplica], limits: Limits) -> Plan {
    let mut sorted: Vec<&RolloutReplica> = replicas.iter().collect();
    sorted.sort_by_key(|r| r.index);
    // Without a surge, an in-place update needs room for one replica down at least.
    let max_unavailable = if limits.max_surge == 0 { limits.max_unavailable.max(1) } else { limits.max_unavailable };
    let available = sorted.iter().filter(|r| r.available).count() as u32;
    let mut budget = available.saturating_sub(limits.desired.saturating_sub(max_unavailable));
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
    // The stand-ins stay until every desired replica runs the current template and serves:
    // one that was just updated and is still starting must not lose its cover.
    let rolling = replicas.iter().any(|r| r.index < limits.desired && (r.template_hash != current || !r.available));
    let old_left = replicas.iter().filter(|r| r.template_hash != current && r.index < limits.desired).count() as u32;
    plan.surge = if rolling && (old_left > 0 || replicas.iter().any(|r| r.index >= limits.desired)) {
        limits.max_surge.min(old_left.max(1))
    } else {
        0
    };
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

    /// A plan without surge for a workload that wants as many replicas as it has.
    fn plan_t(current: &str, replicas: &[RolloutReplica], max_unavailable: u32) -> Plan {
        plan(current, replicas, Limits { desired: replicas.len() as u32, max_unavailable, max_surge: 0 })
    }

    fn held(p: &Plan) -> Vec<&str> {
        p.held.iter().map(String::as_str).collect()
    }

    #[test]
    fn updates_one_at_a_time_as_updated_replicas_become_ready() {
        // All three serve the old template: one is released.
        let p = plan_t("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-1", "w-2"]);
        // w-0 restarts on the new template: not available, so nothing more moves.
        let p = plan_t("new", &[r(0, "new", false), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-1", "w-2"]);
        assert_eq!((p.updated, p.updated_available), (1, 0));
        // w-0 ready: the next one goes.
        let p = plan_t("new", &[r(0, "new", true), r(1, "old", true), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-2"]);
        let p = plan_t("new", &[r(0, "new", true), r(1, "new", true), r(2, "new", true)], 1);
        assert!(p.complete(3));
    }

    #[test]
    fn a_new_template_that_never_gets_ready_holds_the_rollout() {
        let replicas = [r(0, "new", false), r(1, "old", true), r(2, "old", true), r(3, "old", true)];
        for _ in 0..5 {
            let p = plan_t("new", &replicas, 1);
            assert_eq!(held(&p), ["w-1", "w-2", "w-3"]);
            assert!(!p.complete(4));
        }
    }

    #[test]
    fn max_unavailable_sets_the_batch_and_unavailable_old_replicas_go_free() {
        let p = plan_t("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true), r(3, "old", true)], 2);
        assert_eq!(held(&p), ["w-2", "w-3"]);
        // A crashed old replica is updated at once and uses up the budget.
        let p = plan_t("new", &[r(0, "old", true), r(1, "old", false), r(2, "old", true)], 1);
        assert_eq!(held(&p), ["w-0", "w-2"]);
        // maxUnavailable 0 would never progress in place: it acts as 1.
        let p = plan_t("new", &[r(0, "old", true), r(1, "old", true)], 0);
        assert_eq!(held(&p), ["w-1"]);
    }

    #[test]
    fn nothing_is_held_when_the_template_did_not_change() {
        let p = plan_t("same", &[r(0, "same", false), r(1, "same", true)], 1);
        assert!(p.held.is_empty());
        assert_eq!((p.updated, p.updated_available), (2, 1));
    }

    #[test]
    fn a_rollout_that_stops_progressing_is_stalled_after_its_deadline_and_only_then() {
        let plan = |updated_available, held: &[&str], updated| Plan {
            surge: 0,
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

    #[test]
    fn a_surge_keeps_every_replica_serving_with_max_unavailable_zero() {
        let limits = Limits { desired: 3, max_unavailable: 0, max_surge: 1 };
        // Nothing old may go before a stand-in serves; one stand-in is asked for.
        let p = plan("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true)], limits);
        assert_eq!((held(&p), p.surge), (vec!["w-0", "w-1", "w-2"], 1));
        // The stand-in w-3 starts on the new template; not ready yet, still nothing goes.
        let p = plan("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true), r(3, "new", false)], limits);
        assert_eq!((held(&p), p.surge), (vec!["w-0", "w-1", "w-2"], 1));
        // It serves: w-0 is replaced, availability stays at 3.
        let p = plan("new", &[r(0, "old", true), r(1, "old", true), r(2, "old", true), r(3, "new", true)], limits);
        assert_eq!((held(&p), p.surge), (vec!["w-1", "w-2"], 1));
        let p = plan("new", &[r(0, "new", false), r(1, "old", true), r(2, "old", true), r(3, "new", true)], limits);
        assert_eq!(held(&p), ["w-1", "w-2"]);
        // The last old one was just updated and is starting: the stand-in stays.
        let p = plan("new", &[r(0, "new", true), r(1, "new", true), r(2, "new", false), r(3, "new", true)], limits);
        assert_eq!((p.held.len(), p.surge), (0, 1));
        // The last old one replaced and ready: the stand-in is no longer wanted.
        let p = plan("new", &[r(0, "new", true), r(1, "new", true), r(2, "new", true), r(3, "new", true)], limits);
        assert_eq!((p.held.len(), p.surge), (0, 0));
        // No rollout, no surge.
        let p = plan("same", &[r(0, "same", true)], Limits { desired: 1, max_unavailable: 0, max_surge: 2 });
        assert_eq!(p.surge, 0);
    }
}
