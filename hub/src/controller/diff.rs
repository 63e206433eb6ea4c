//! The placement diff: the scheduler's full answer set against the replica rows as the
//! controller read them, turned into the writes that make the rows match, the nodes whose
//! assignment sets change, and the replicas that leave a node.
//!
//! Rules:
//! - A replica gets its workload's current template unless it is held (a rollout has not
//!   reached it, or a Job attempt runs to its end); a held replica keeps its template even
//!   when it moves.
//! - A replica that moves starts over as Pending on its new node; one whose template changes
//!   in place keeps its status until the agent reports on the new template.
//! - A node's assignment set changes when a replica arrives, leaves, or changes template on
//!   it; a changed unschedulable reason alone changes no node.
//! - Every write names the row as it was read (node, template), so the store can refuse a
//!   pass computed from rows that changed since.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::scheduler::Placement;

use super::{Replica, ReplicaWrite, Stop, StopReason, WriteOp};

/// What the diff produced.
#[derive(Debug, Default)]
pub struct Diff {
    pub writes: Vec<ReplicaWrite>,
    pub changed_nodes: BTreeSet<String>,
    pub stops: Vec<Stop>,
}

/// The writes that turn `current` into `placements`. `current_hash` gives a workload's current
/// template hash (`None`: unknown workload, its placements are skipped); `held` the replicas
/// that keep their template; `node_ready` whether a node is connected (a replica leaving a node
/// that is not is fenced: stopped when the node comes back).
pub fn placement_writes<'a>(
    current: &[&Replica],
    placements: &[Placement],
    unschedulable: &BTreeMap<String, String>,
    current_hash: impl Fn(&str) -> Option<&'a str>,
    held: &BTreeMap<String, String>,
    node_ready: impl Fn(&str) -> bool,
) -> Diff {
    let mut rows: HashMap<&str, &Replica> = current.iter().map(|r| (r.name.as_str(), *r)).collect();
    let mut out = Diff::default();
    for p in placements {
        let Some(hash) = current_hash(&p.workload) else { continue };
        let why = unschedulable.get(&p.replica).cloned().unwrap_or_default();
        let Some(row) = rows.remove(p.replica.as_str()) else {
            out.changed_nodes.extend(p.node.clone());
            out.writes.push(ReplicaWrite {
                replica: p.replica.clone(),
                workload: p.workload.clone(),
                index: p.index,
                op: WriteOp::Create { node: p.node.clone(), unschedulable: why },
            });
            continue;
        };
        let new_template = row.template_hash != hash && !held.contains_key(&p.replica);
        let moved = row.node != p.node;
        if !moved && !new_template && row.unschedulable == why {
            continue;
        }
        if moved || new_template {
            out.changed_nodes.extend(row.node.clone());
            out.changed_nodes.extend(p.node.clone());
        }
        if moved && let Some(from) = &row.node {
            let reason = if node_ready(from) { StopReason::Moved } else { StopReason::Fenced };
            out.stops.push(Stop { replica: p.replica.clone(), node: from.clone(), reason });
        }
        out.writes.push(ReplicaWrite {
            replica: p.replica.clone(),
            workload: p.workload.clone(),
            index: p.index,
            op: WriteOp::Change {
                from_node: row.node.clone(),
                from_hash: row.template_hash.clone(),
                node: p.node.clone(),
                new_template,
                unschedulable: why,
            },
        });
    }
    // Replicas the scheduler no longer wants, in name order.
    let mut gone: Vec<&Replica> = rows.into_values().collect();
    gone.sort_by(|a, b| a.name.cmp(&b.name));
    for row in gone {
        out.changed_nodes.extend(row.node.clone());
        if let Some(from) = &row.node {
            out.stops.push(Stop { replica: row.name.clone(), node: from.clone(), reason: StopReason::Removed });
        }
        out.writes.push(ReplicaWrite {
            replica: row.name.clone(),
            workload: row.workload.clone(),
            index: row.index,
            op: WriteOp::Delete { from_node: row.node.clone() },
        });
    }
    out.stops.sort_by(|a, b| a.replica.cmp(&b.replica));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::inputs::Reported;

    fn row(name: &str, node: Option<&str>, hash: &str) -> Replica {
        Replica {
            name: name.into(),
            workload: "hello".into(),
            index: name.rsplit('-').next().unwrap().parse().unwrap(),
            node: node.map(Into::into),
            template_hash: hash.into(),
            reported: Reported::default(),
            unschedulable: String::new(),
        }
    }

    fn at(name: &str, node: Option<&str>) -> Placement {
        Placement {
            replica: name.into(),
            workload: "hello".into(),
            index: name.rsplit('-').next().unwrap().parse().unwrap(),
            node: node.map(Into::into),
        }
    }

    fn diff(current: &[Replica], placements: &[Placement], held: &[&str], hash: &'static str) -> Diff {
        let refs: Vec<&Replica> = current.iter().collect();
        let held = held.iter().map(|h| (h.to_string(), "held".to_string())).collect();
        placement_writes(&refs, placements, &BTreeMap::new(), |_| Some(hash), &held, |n| n != "down")
    }

    #[test]
    fn the_same_placements_write_nothing() {
        let current = [row("hello-0", Some("a"), "t1"), row("hello-1", Some("b"), "t1")];
        let d = diff(&current, &[at("hello-0", Some("a")), at("hello-1", Some("b"))], &[], "t1");
        assert!(d.writes.is_empty() && d.changed_nodes.is_empty() && d.stops.is_empty());
    }

    #[test]
    fn a_new_template_reaches_only_released_replicas_and_held_ones_keep_theirs_when_they_move() {
        let current = [row("hello-0", Some("a"), "t1"), row("hello-1", Some("b"), "t1")];
        let d = diff(&current, &[at("hello-0", Some("a")), at("hello-1", Some("b"))], &["hello-1"], "t2");
        assert_eq!(d.changed_nodes, BTreeSet::from(["a".to_string()]));
        assert_eq!(d.writes.len(), 1);
        assert!(matches!(&d.writes[0].op, WriteOp::Change { new_template: true, node: Some(n), .. } if n == "a"));
        // The held one moves to a: both nodes change, its template stays.
        let d = diff(&current, &[at("hello-0", Some("a")), at("hello-1", Some("a"))], &["hello-0", "hello-1"], "t2");
        assert_eq!(d.changed_nodes, BTreeSet::from(["a".to_string(), "b".to_string()]));
        assert!(matches!(&d.writes[0].op, WriteOp::Change { new_template: false, from_node: Some(f), .. } if f == "b"));
        assert_eq!(d.stops, [Stop { replica: "hello-1".into(), node: "b".into(), reason: StopReason::Moved }]);
    }

    #[test]
    fn removals_and_moves_off_a_lost_node_stop_replicas_there() {
        let current = [row("hello-0", Some("down"), "t1"), row("hello-1", Some("a"), "t1"), row("hello-2", None, "t1")];
        let d = diff(&current, &[at("hello-0", Some("a"))], &[], "t1");
        assert_eq!(
            d.stops,
            [
                Stop { replica: "hello-0".into(), node: "down".into(), reason: StopReason::Fenced },
                Stop { replica: "hello-1".into(), node: "a".into(), reason: StopReason::Removed },
            ]
        );
        assert_eq!(d.changed_nodes, BTreeSet::from(["a".to_string(), "down".to_string()]));
        let deleted: Vec<&str> =
            d.writes.iter().filter(|w| matches!(w.op, WriteOp::Delete { .. })).map(|w| w.replica.as_str()).collect();
        assert_eq!(deleted, ["hello-1", "hello-2"]);
    }

    #[test]
    fn a_new_unschedulable_reason_is_written_without_changing_a_node() {
        let current = [row("hello-0", None, "t1")];
        let refs: Vec<&Replica> = current.iter().collect();
        let why = BTreeMap::from([("hello-0".to_string(), "0/0 nodes available".to_string())]);
        let d = placement_writes(&refs, &[at("hello-0", None)], &why, |_| Some("t1"), &BTreeMap::new(), |_| true);
        assert_eq!(d.writes.len(), 1);
        assert!(d.changed_nodes.is_empty());
    }
}
