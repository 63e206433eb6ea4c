//! Rolling updates: given a workload's replicas, which of them keep their old template for
//! now ([`plan`]), whether the rollout still progresses ([`track`]), and where a rollback goes
//! ([`rollback_target`]). The controller runs them on every pass; a replica [`plan`] releases
//! gets the workload's current template (the agent restarts it on the new one).
//!
//! Rules (Kubernetes' `RollingUpdate` with `maxUnavailable` and `maxSurge`, replicas updated
//! in place):
//! - A replica is *available* when it runs its assigned template and reports ready.
//! - While old replicas remain, the workload runs up to `maxSurge` extra replicas (the
//!   highest indexes, on the current template; at most one per desired replica): stand-ins
//!   that keep capacity up while old replicas are replaced. They all stay until every desired
//!   replica runs the current template and serves, then go away (scale-down drops the
//!   highest indexes): availability counts them, so removing one earlier could take it below
//!   `replicas − maxUnavailable`.
//! - Old replicas that are not available are released at once: updating them costs nothing.
//! - Available old replicas are released, lowest index first, only while the available
//!   replicas (stand-ins included) stay at least `replicas - maxUnavailable`. So the update
//!   advances only as updated replicas become ready; a new template that never gets ready
//!   holds the rollout with at least `replicas - maxUnavailable` still serving on the old
//!   one. With `maxUnavailable: 0` and a surge, availability never drops below `replicas`.
//! - New replicas (scale-up during a rollout) start on the current template.

use std::collections::BTreeSet;

use proto::manifest::{Manifest, WorkloadKind};

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
    /// Of those, the desired ones (not surge stand-ins or replicas a scale-down removes).
    pub desired_available: u32,
    /// Extra replicas to run beyond the desired count this pass.
    pub surge: u32,
}

impl Plan {
    /// Whether all `desired` replicas run the current template and are available. Stand-ins
    /// and replicas a scale-down removes do not count: they go in the same pass.
    pub fn complete(&self, desired: u32) -> bool {
        self.desired_available == desired
    }
}

/// How a rollout may use capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The workload's desired replica count (without surge).
    pub desired: u32,
    pub max_unavailable: u32,
    pub max_surge: u32,
    /// The desired replicas are indexes `0..desired` (Replicated); otherwise (EveryNode)
    /// every replica is a desired one.
    pub indexed: bool,
}

/// A workload's rollout limits. A Replicated workload wants its manifest's count, whatever
/// runs now (surge replicas included). An EveryNode workload wants as many replicas as it has
/// (one per matching node), so its batches are a quarter of those by default, never all at
/// once; it never surges (a node runs one replica of it).
pub fn limits(m: &Manifest, current_replicas: u32) -> Limits {
    let replicated = m.spec.kind == WorkloadKind::Replicated;
    let desired = if replicated { m.spec.replicas() } else { current_replicas };
    let strategy = &m.spec.strategy;
    Limits {
        desired,
        max_unavailable: strategy.max_unavailable(desired),
        max_surge: if replicated { strategy.max_surge(desired) } else { 0 },
        indexed: replicated,
    }
}

impl Limits {
    /// How many replicas may be unavailable while old ones are replaced in place: without a
    /// surge, one at least, or the update could never start.
    pub fn effective_max_unavailable(&self) -> u32 {
        if self.max_surge == 0 { self.max_unavailable.max(1) } else { self.max_unavailable }
    }
}

/// Plans one pass of the rollout of the workload whose current template hash is `current`.
/// `replicas` are those the workload has now, surge replicas of an earlier pass included.
pub fn plan(current: &str, replicas: &[RolloutReplica], limits: Limits) -> Plan {
    let mut plan = Plan::default();
    // Stand-ins are asked for while desired replicas are old (or stand-ins already run), and
    // all of them stay until every desired replica runs the current template and serves: the
    // budget below counts them as available, so none may go while an updated replica is still
    // starting. At most one per desired replica. Decided before this pass's releases, so
    // feeding the pass its own output asks for the same number again.
    let rolling = replicas.iter().any(|r| r.index < limits.desired && (r.template_hash != current || !r.available));
    let old = replicas.iter().any(|r| r.index < limits.desired && r.template_hash != current);
    let standing_in = replicas.iter().any(|r| r.index >= limits.desired);
    plan.surge = if rolling && (old || standing_in) { limits.max_surge.min(limits.desired) } else { 0 };

    // Replicas past the desired ones and the stand-ins go this pass (a scale-down): they are
    // neither released nor held, and their availability counts for nothing.
    let stays = |r: &RolloutReplica| !limits.indexed || r.index < limits.desired.saturating_add(plan.surge);
    let mut sorted: Vec<&RolloutReplica> = replicas.iter().filter(|r| stays(r)).collect();
    sorted.sort_by_key(|r| r.index);
    let max_unavailable = limits.effective_max_unavailable();
    let available = sorted.iter().filter(|r| r.available).count() as u32;
    let mut budget = available.saturating_sub(limits.desired.saturating_sub(max_unavailable));
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
            if !limits.indexed || r.index < limits.desired {
                plan.desired_available += 1;
            }
        }
    }
    plan
}

/// How a rollout is doing over time: when its count of updated, available replicas last
/// grew. Kept in the store, one per workload (table `rollouts`), so a new leader goes on
/// with the same deadline. Times are cluster time (see [`super::time`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub workload: String,
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

/// Advances `prev` with this pass's `plan` of `workload`, of `replicas` on template `current`.
pub fn track(
    workload: &str,
    prev: Option<&Progress>,
    current: &str,
    plan: &Plan,
    replicas: u32,
    now_ms: u64,
    deadline_ms: u64,
) -> (Progress, Verdict) {
    let mut p = match prev {
        Some(p) if p.template_hash == current => p.clone(),
        _ => Progress {
            workload: workload.to_string(),
            template_hash: current.to_string(),
            best: plan.updated_available,
            since_ms: now_ms,
            done: false,
        },
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

/// No revision to roll back to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("no revision {wanted} (revisions: {known})")]
    NoSuchRevision { wanted: u64, known: String },
    #[error("no earlier revision with a different template to roll back to")]
    NoEarlierTemplate,
}

/// One template a workload had, as a rollback looks at it.
pub trait Revision {
    fn revision(&self) -> u64;
    fn template_hash(&self) -> &str;
}

/// Which revision a rollback goes to: `to`, or the newest one before the current template
/// whose template differs from it. `revisions` are the workload's, oldest first.
pub fn rollback_target<'a, R: Revision>(
    revisions: &'a [R],
    current_hash: &str,
    to: Option<u64>,
) -> Result<&'a R, TargetError> {
    if let Some(n) = to {
        return revisions.iter().find(|r| r.revision() == n).ok_or_else(|| {
            let known: Vec<String> = revisions.iter().map(|r| r.revision().to_string()).collect();
            TargetError::NoSuchRevision { wanted: n, known: known.join(", ") }
        });
    }
    // The current template's own revision is the newest with its hash; go before it.
    let current = revisions.iter().rposition(|r| r.template_hash() == current_hash).unwrap_or(revisions.len());
    revisions[..current].iter().rev().find(|r| r.template_hash() != current_hash).ok_or(TargetError::NoEarlierTemplate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(index: u32, hash: &str, available: bool) -> RolloutReplica {
        RolloutReplica { name: format!("w-{index}"), index, template_hash: hash.into(), available }
    }

    /// A plan without surge for a workload that wants as many replicas as it has.
    fn plan_t(current: &str, replicas: &[RolloutReplica], max_unavailable: u32) -> Plan {
        plan(current, replicas, Limits { desired: replicas.len() as u32, max_unavailable, max_surge: 0, indexed: true })
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
            desired_available: updated_available,
        };
        // A new template: the clock starts.
        let (p, v) = track("w", None, "new", &plan(0, &["w-1", "w-2"], 1), 3, 1_000, 5_000);
        assert_eq!((v, p.since_ms), (Verdict::Progressing, 1_000));
        // One replica ready at 4 s: progress, the clock restarts.
        let (p, v) = track("w", Some(&p), "new", &plan(1, &["w-2"], 2), 3, 4_000, 5_000);
        assert_eq!((v, p.since_ms, p.best), (Verdict::Progressing, 4_000, 1));
        // Nothing more for 5 s: still within the deadline at 9 s, stalled after it.
        let (p, v) = track("w", Some(&p), "new", &plan(1, &["w-2"], 2), 3, 9_000, 5_000);
        assert_eq!(v, Verdict::Progressing);
        let (_, v) = track("w", Some(&p), "new", &plan(1, &["w-2"], 2), 3, 9_001, 5_000);
        assert_eq!(v, Verdict::Stalled);
        // Completed once, a later outage is not the rollout's.
        let (p, v) = track("w", Some(&p), "new", &plan(3, &[], 3), 3, 9_500, 5_000);
        assert_eq!(v, Verdict::Complete);
        let (_, v) = track("w", Some(&p), "new", &plan(0, &[], 3), 3, 99_000, 5_000);
        assert_eq!(v, Verdict::Complete);
        // Another template starts over.
        let (p, v) = track("w", Some(&p), "newer", &plan(0, &["w-1", "w-2"], 1), 3, 100_000, 5_000);
        assert_eq!((v, p.since_ms, p.done), (Verdict::Progressing, 100_000, false));
    }

    #[test]
    fn a_surge_keeps_every_replica_serving_with_max_unavailable_zero() {
        let limits = Limits { desired: 3, max_unavailable: 0, max_surge: 1, indexed: true };
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
        let p =
            plan("same", &[r(0, "same", true)], Limits { desired: 1, max_unavailable: 0, max_surge: 2, indexed: true });
        assert_eq!(p.surge, 0);
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[derive(Debug)]
    struct R(u64, &'static str);
    impl Revision for R {
        fn revision(&self) -> u64 {
            self.0
        }
        fn template_hash(&self) -> &str {
            self.1
        }
    }

    #[test]
    fn rollback_goes_to_the_previous_different_template_or_the_one_named() {
        let revs = [R(1, "a"), R(3, "b"), R(4, "c")];
        assert_eq!(rollback_target(&revs, "c", None).unwrap().0, 3);
        assert_eq!(rollback_target(&revs, "c", Some(1)).unwrap().0, 1);
        assert_eq!(rollback_target(&revs, "c", Some(2)).unwrap_err().to_string(), "no revision 2 (revisions: 1, 3, 4)");
        // After an undo to a's template (revision 5), the previous different one is c.
        let revs = [R(1, "a"), R(3, "b"), R(4, "c"), R(5, "a")];
        assert_eq!(rollback_target(&revs, "a", None).unwrap().0, 4);
        assert_eq!(rollback_target(&revs[..1], "a", None).unwrap_err(), TargetError::NoEarlierTemplate);
    }

    #[test]
    fn every_node_rollouts_go_in_batches_of_their_own_size() {
        let m = |spec: &str| {
            proto::manifest::parse_manifests(&format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: w}}\nspec: {{runtime: wasm, image: r/w:1, {spec}}}\n"
            ))
            .unwrap()
            .remove(0)
        };
        // Eight gateways: two at a time by default, not all eight.
        let l = limits(&m("kind: EveryNode"), 8);
        assert_eq!((l.desired, l.max_unavailable, l.max_surge), (8, 2, 0));
        let l = limits(&m("kind: EveryNode, strategy: {maxUnavailable: 1}"), 8);
        assert_eq!(l.max_unavailable, 1);
        // Replicated: the manifest's count, whatever runs now (surge replicas included).
        let l = limits(&m("replicas: 4, strategy: {maxUnavailable: 0, maxSurge: 1}"), 5);
        assert_eq!((l.desired, l.max_unavailable, l.max_surge), (4, 0, 1));
    }
}
