//! One pass at a time, on a fake store: each rule with the snapshot that exercises it.

use std::collections::BTreeMap;

use proto::manifest::{Manifest, parse_manifests};
use proto::messages::Phase;

use super::sim::{FakeStore, write_back};
use super::*;

fn manifest(name: &str, spec: &str) -> Manifest {
    parse_manifests(&format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: wasm\n{spec}"
    ))
    .unwrap()
    .remove(0)
}

/// A store with nodes `names`, all Ready.
fn store(names: &[&str]) -> FakeStore {
    let mut s = FakeStore::default();
    for n in names {
        s.add_node(n, &[]);
    }
    s
}

/// A pass at `now` with every node Ready except those in `down` (NotReady since the time given).
fn pass_at(s: &FakeStore, now: u64, down: &[(&str, u64)]) -> Pass {
    let down: BTreeMap<&str, u64> = down.iter().copied().collect();
    super::pass(&s.snapshot(now, |n| (!down.contains_key(n), down.get(n).copied()), 0))
}

/// Every placed replica reports Running and ready on its template.
fn all_ready(s: &mut FakeStore) {
    for r in s.replicas.values_mut().filter(|r| r.replica.node.is_some()) {
        r.replica.reported =
            Reported { phase: Phase::Running, ready: true, template_hash: r.replica.template_hash.clone() };
    }
}

fn hashes(s: &FakeStore, workload: &str) -> Vec<String> {
    s.replicas.values().filter(|r| r.replica.workload == workload).map(|r| r.replica.template_hash.clone()).collect()
}

/// Runs passes at `now` until one writes nothing; returns how many wrote.
fn settle(s: &mut FakeStore, now: u64, down: &[(&str, u64)]) -> usize {
    for n in 0..10 {
        let p = pass_at(s, now, down);
        if p.writes_nothing() {
            return n;
        }
        write_back(s, &p);
    }
    panic!("no fixed point");
}

#[test]
fn a_new_workload_is_placed_in_one_pass_and_a_pass_on_that_output_changes_nothing() {
    let mut s = store(&["a", "b"]);
    s.apply(&manifest("web", "  image: r/web:1\n  replicas: 3\n"), "apply");
    let p = pass_at(&s, 1_000, &[]);
    assert_eq!(p.writes.len(), 3);
    assert!(p.writes.iter().all(|w| matches!(w.op, WriteOp::Create { node: Some(_), .. })));
    assert_eq!(p.changed_nodes.len(), 2);
    assert_eq!(p.templates.len(), 1, "one template for the three replicas");
    // The new rollout's progress is recorded, and its deadline is a wake-up.
    assert_eq!(p.rollouts.len(), 1);
    assert_eq!(p.wake_at_ms, Some(1_000 + 600_000 + 1));
    write_back(&mut s, &p);
    assert!(pass_at(&s, 1_000, &[]).writes_nothing());
    all_ready(&mut s);
    // Complete: recorded once, then nothing more to write and no deadline.
    let p = pass_at(&s, 2_000, &[]);
    assert!(p.rollouts[0].done && p.writes.is_empty());
    write_back(&mut s, &p);
    let p = pass_at(&s, 3_000, &[]);
    assert!(p.writes_nothing() && p.wake_at_ms.is_none(), "{p:#?}");
}

#[test]
fn the_same_snapshot_in_any_order_gives_the_same_pass() {
    let mut s = store(&["a", "b", "c"]);
    s.apply(
        &manifest("web", "  image: r/web:1\n  replicas: 4\n  strategy: {maxUnavailable: 1, maxSurge: 1}\n"),
        "apply",
    );
    s.apply(&manifest("agent", "  image: r/agent:1\n  kind: EveryNode\n"), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    s.apply(
        &manifest("web", "  image: r/web:2\n  replicas: 4\n  strategy: {maxUnavailable: 1, maxSurge: 1}\n"),
        "apply",
    );
    let view = |n: &str| (n != "c", (n == "c").then_some(5));
    let reference = super::pass(&s.snapshot(10_000, view, 0));
    assert!(!reference.writes.is_empty());
    for seed in 1..50u64 {
        assert_eq!(super::pass(&s.snapshot(10_000, view, seed * 0x9e37_79b9)), reference, "seed {seed}");
    }
}

#[test]
fn a_rollout_releases_within_max_unavailable_and_holds_the_rest_with_a_reason() {
    let mut s = store(&["a", "b"]);
    let web =
        |v: u32| manifest("web", &format!("  image: r/web:{v}\n  replicas: 3\n  strategy: {{maxUnavailable: 1}}\n"));
    s.apply(&web(1), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    settle(&mut s, 0, &[]);
    let v1 = hashes(&s, "web")[0].clone();
    s.apply(&web(2), "apply");
    let p = pass_at(&s, 1_000, &[]);
    let released: Vec<&str> = p
        .writes
        .iter()
        .filter(|w| matches!(w.op, WriteOp::Change { new_template: true, .. }))
        .map(|w| w.replica.as_str())
        .collect();
    assert_eq!(released, ["web-0"]);
    assert_eq!(p.held.keys().map(String::as_str).collect::<Vec<_>>(), ["web-1", "web-2"]);
    assert!(p.held["web-1"].contains(&format!("keeps template {v1}")), "{}", p.held["web-1"]);
    write_back(&mut s, &p);
    // web-0 restarts on the new template: not available, so nothing more moves.
    assert!(pass_at(&s, 2_000, &[]).writes_nothing());
    all_ready(&mut s);
    let p = pass_at(&s, 3_000, &[]);
    assert_eq!(p.writes.len(), 1);
    assert_eq!(p.writes[0].replica, "web-1");
}

#[test]
fn surge_is_a_field_of_its_own_and_the_stand_in_goes_when_the_rollout_is_done() {
    let mut s = store(&["a", "b"]);
    let web = |v: u32| {
        manifest("web", &format!("  image: r/web:{v}\n  replicas: 2\n  strategy: {{maxUnavailable: 0, maxSurge: 1}}\n"))
    };
    s.apply(&web(1), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    s.apply(&web(2), "apply");
    let p = pass_at(&s, 1_000, &[]);
    // Nothing old goes before the stand-in web-2 serves; web-2 starts on the new template.
    assert_eq!(p.held.len(), 2);
    let created: Vec<&str> =
        p.writes.iter().filter(|w| matches!(w.op, WriteOp::Create { .. })).map(|w| w.replica.as_str()).collect();
    assert_eq!(created, ["web-2"]);
    write_back(&mut s, &p);
    // The stored manifest still asks for 2: the surge never inflated it.
    assert_eq!(s.workloads["web"].manifest.spec.replicas, Some(2));
    for _ in 0..6 {
        all_ready(&mut s);
        settle(&mut s, 2_000, &[]);
    }
    let v2 = web(2).template().hash();
    assert_eq!(hashes(&s, "web"), [v2.clone(), v2]);
}

#[test]
fn a_stalled_rollout_is_rolled_back_once_with_its_cause_and_a_rollback_is_not_rolled_back() {
    let mut s = store(&["a"]);
    let web = |v: u32| {
        manifest(
            "web",
            &format!("  image: r/web:{v}\n  replicas: 2\n  strategy: {{maxUnavailable: 1, progressDeadline: 30s}}\n"),
        )
    };
    s.apply(&web(1), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    settle(&mut s, 0, &[]);
    s.apply(&web(2), "apply");
    settle(&mut s, 1_000, &[]);
    let v2 = web(2).template().hash();
    // Within the deadline: nothing but the wake-up for it.
    let p = pass_at(&s, 31_000, &[]);
    assert!(p.rollbacks.is_empty() && p.wake_at_ms == Some(31_001), "{p:#?}");
    let p = pass_at(&s, 31_001, &[]);
    assert_eq!(
        p.rollbacks,
        [Rollback {
            workload: "web".into(),
            expected_revision: 2,
            to_revision: 1,
            cause: format!("rollback: template {v2} made no progress in 30s"),
        }]
    );
    assert!(p.rollouts[0].done);
    write_back(&mut s, &p);
    assert_eq!(s.workloads["web"].manifest.template().hash(), web(1).template().hash());
    assert_eq!(s.revisions.last().unwrap().0.cause, format!("rollback: template {v2} made no progress in 30s"));
    // The rollback itself never gets ready (say its image is gone now): it is left alone.
    for r in s.replicas.values_mut() {
        r.replica.reported.ready = false;
    }
    settle(&mut s, 31_001, &[]);
    let p = pass_at(&s, 200_000, &[]);
    assert!(p.rollbacks.is_empty());
    assert_eq!(
        p.left_stalled,
        [LeftStalled { workload: "web".into(), why: "its template is already a rollback".into() }]
    );
    write_back(&mut s, &p);
    assert!(pass_at(&s, 900_000, &[]).writes_nothing(), "looked at again");
}

#[test]
fn rollout_progress_survives_a_new_leader_because_it_is_in_the_store() {
    let mut s = store(&["a"]);
    let web = |v: u32| {
        manifest(
            "web",
            &format!("  image: r/web:{v}\n  replicas: 1\n  strategy: {{maxUnavailable: 1, progressDeadline: 30s}}\n"),
        )
    };
    s.apply(&web(1), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    settle(&mut s, 0, &[]);
    s.apply(&web(2), "apply");
    settle(&mut s, 5_000, &[]);
    // Any pass, by any hub, reads the same progress: stalled 30 s after 5 s.
    let fresh = s.clone();
    assert!(pass_at(&fresh, 35_000, &[]).rollbacks.is_empty());
    assert_eq!(pass_at(&fresh, 35_001, &[]).rollbacks.len(), 1);
}

#[test]
fn failover_waits_for_its_deadline_and_wakes_for_it() {
    let mut s = store(&["a", "b"]);
    s.apply(
        &manifest("moves", "  image: r/m:1\n  failover: {after: 10s}\n  nodeSelector: {flotilla.dev/node: a}\n"),
        "apply",
    );
    s.apply(&manifest("stays", "  image: r/s:1\n  nodeSelector: {flotilla.dev/node: a}\n"), "apply");
    settle(&mut s, 0, &[]);
    // Let either go anywhere now.
    for name in ["moves", "stays"] {
        let mut m = s.workloads[name].manifest.clone();
        m.spec.node_selector.clear();
        s.apply(&m, "apply");
    }
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    settle(&mut s, 0, &[]);
    let node = |s: &FakeStore, r: &str| s.replicas[r].replica.node.clone();
    // a NotReady since 1 s: at 4 s nothing moves, and the pass asks to wake at 11 s.
    let p = pass_at(&s, 4_000, &[("a", 1_000)]);
    assert!(p.writes.iter().all(|w| !matches!(w.op, WriteOp::Change { .. })), "{p:#?}");
    assert_eq!(p.wake_at_ms, Some(11_000));
    write_back(&mut s, &p);
    let p = pass_at(&s, 11_000, &[("a", 1_000)]);
    assert_eq!(p.stops, [Stop { replica: "moves-0".into(), node: "a".into(), reason: StopReason::Fenced }]);
    assert!(p.changed_nodes.contains("a"), "the lost node's set changes: the copy is fenced on return");
    write_back(&mut s, &p);
    assert_eq!(node(&s, "moves-0").as_deref(), Some("b"));
    assert_eq!(node(&s, "stays-0").as_deref(), Some("a"));
    assert_eq!(pass_at(&s, 12_000, &[("a", 1_000)]).wake_at_ms, None);
}

#[test]
fn job_attempts_are_recorded_once_and_a_failed_index_waits_out_its_back_off_in_cluster_time() {
    let mut s = store(&["a"]);
    s.apply(&manifest("j", "  image: r/j:1\n  kind: Job\n  job: {completions: 2, backoffLimit: 3}\n"), "apply");
    settle(&mut s, 0, &[]);
    assert_eq!(s.replicas.len(), 1, "parallelism 1");
    let hash = s.replicas["j-0"].replica.template_hash.clone();
    s.replicas.get_mut("j-0").unwrap().replica.reported =
        Reported { phase: Phase::Failed, ready: false, template_hash: hash };
    let p = pass_at(&s, 5_000, &[]);
    assert_eq!(p.job_attempts.len(), 1);
    assert!(!p.job_attempts[0].succeeded);
    assert!(p.changed_nodes.contains("a"));
    // The failed index waits 10 s; the next index takes the free slot meanwhile.
    let created: Vec<&str> =
        p.writes.iter().filter(|w| matches!(w.op, WriteOp::Create { .. })).map(|w| w.replica.as_str()).collect();
    assert_eq!(created, ["j-1"]);
    assert_eq!(p.attempt_numbers, BTreeMap::from([("j-1".to_string(), 1)]), "j-1's first attempt");
    write_back(&mut s, &p);
    assert_eq!(s.job_indexes[&("j".to_string(), 0)].failed_at_ms, Some(5_000));
    let hash = s.replicas["j-1"].replica.template_hash.clone();
    s.replicas.get_mut("j-1").unwrap().replica.reported =
        Reported { phase: Phase::Succeeded, ready: false, template_hash: hash };
    let p = pass_at(&s, 6_000, &[]);
    assert!(p.writes.is_empty() || p.writes.iter().all(|w| w.replica != "j-0"), "retried early: {p:#?}");
    assert_eq!(p.wake_at_ms, Some(15_000));
    write_back(&mut s, &p);
    // Replaying the same attempts records nothing: they left the store.
    assert!(pass_at(&s, 6_000, &[]).job_attempts.is_empty());
    let p = pass_at(&s, 15_000, &[]);
    assert!(p.writes.iter().any(|w| w.replica == "j-0" && matches!(w.op, WriteOp::Create { .. })));
    assert_eq!(p.attempt_numbers.get("j-0"), Some(&2), "j-0 runs its second attempt: {p:#?}");
}

#[test]
fn a_running_job_attempt_keeps_its_template() {
    let mut s = store(&["a"]);
    s.apply(&manifest("j", "  image: r/j:1\n  kind: Job\n"), "apply");
    settle(&mut s, 0, &[]);
    s.apply(&manifest("j", "  image: r/j:2\n  kind: Job\n"), "apply");
    let p = pass_at(&s, 1_000, &[]);
    assert!(p.writes.is_empty(), "{p:#?}");
    assert!(p.held["j-0"].contains("runs to its end"));
}

#[test]
fn a_drain_and_a_rollout_never_spend_the_same_unavailability_twice() {
    let mut s = store(&["a", "b", "c"]);
    let web =
        |v: u32| manifest("web", &format!("  image: r/web:{v}\n  replicas: 4\n  strategy: {{maxUnavailable: 1}}\n"));
    s.apply(&web(1), "apply");
    settle(&mut s, 0, &[]);
    all_ready(&mut s);
    settle(&mut s, 0, &[]);
    let on_a = s.replicas.values().filter(|r| r.replica.node.as_deref() == Some("a")).count();
    assert!(on_a > 0);
    s.nodes.get_mut("a").unwrap().draining = true;
    s.nodes.get_mut("a").unwrap().cordoned = true;
    s.apply(&web(2), "apply");
    let p = pass_at(&s, 1_000, &[]);
    let disrupted = p
        .writes
        .iter()
        .filter(|w| matches!(&w.op, WriteOp::Change { from_node, node, new_template, .. } if from_node != node || *new_template))
        .count();
    assert_eq!(disrupted, 1, "one of four may be unavailable, for the rollout or the drain: {p:#?}");
}

#[test]
fn a_pass_computed_from_rows_that_changed_is_refused_whole() {
    let mut s = store(&["a"]);
    s.apply(&manifest("web", "  image: r/web:1\n  replicas: 2\n"), "apply");
    let p = pass_at(&s, 0, &[]);
    // An apply lands between the read and the write.
    s.apply(&manifest("web", "  image: r/web:2\n  replicas: 2\n"), "apply");
    let before = s.replicas.len();
    let anchor = time::ClockAnchor { cluster_ms: 0, clock: "x".into(), mono_ms: 0 };
    assert!(s.write(&p, anchor).is_err());
    assert_eq!(s.replicas.len(), before);
}
