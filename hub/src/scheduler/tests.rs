//! Rule-by-rule tests on small hand-built snapshots.
use super::*;

fn node(name: &str, ready: bool, runtimes: &[Runtime], labels: &[(&str, &str)]) -> SchedNode {
    SchedNode {
        name: name.into(),
        ready,
        runtimes: runtimes.to_vec(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn wl(name: &str, replicas: u32, selector: &[(&str, &str)]) -> SchedWorkload {
    SchedWorkload {
        name: name.into(),
        replicas,
        runtime: Runtime::Wasm,
        node_selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        host_ports: vec![],
        ..Default::default()
    }
}

fn nodes_of(d: &Decisions) -> Vec<Option<&str>> {
    d.placements.iter().map(|p| p.node.as_deref()).collect()
}

const WASM: &[Runtime] = &[Runtime::Wasm];

#[test]
fn spreads_replicas_across_nodes() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[])];
    let d = schedule(&nodes, &[wl("hello", 2, &[])], &[]);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b")]);
    assert!(d.unschedulable.is_empty());
    let d = schedule(&nodes, &[wl("hello", 4, &[])], &[]);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b"), Some("a"), Some("b")]);
}

#[test]
fn respects_runtime_selector_and_readiness() {
    let nodes = [
        node("a", true, &[Runtime::Container], &[]),
        node("b", true, WASM, &[("site", "x")]),
        node("c", true, WASM, &[("site", "y")]),
        node("d", false, WASM, &[("site", "y")]),
    ];
    let d = schedule(&nodes, &[wl("w", 2, &[("site", "y")])], &[]);
    assert_eq!(nodes_of(&d), [Some("c"), Some("c")]);
}

#[test]
fn explains_unplaceable_replicas() {
    let nodes = [
        node("a", true, &[Runtime::Container], &[]),
        node("b", true, WASM, &[("site", "x")]),
        node("c", false, WASM, &[("site", "y")]),
    ];
    let d = schedule(&nodes, &[wl("w", 1, &[("site", "y")])], &[]);
    assert_eq!(nodes_of(&d), [None]);
    assert_eq!(
        d.unschedulable["w-0"],
        "0/3 nodes available: 1 not ready, 1 lack runtime wasm, 1 do not match nodeSelector"
    );
    let d = schedule(&[], &[wl("w", 1, &[])], &[]);
    assert!(d.unschedulable["w-0"].contains("no node has joined"));
}

#[test]
fn keeps_placements_on_not_ready_nodes() {
    let nodes = [node("a", false, WASM, &[]), node("b", true, WASM, &[])];
    let current = [Placement { replica: "w-0".into(), workload: "w".into(), index: 0, node: Some("a".into()) }];
    let d = schedule(&nodes, &[wl("w", 2, &[])], &current);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b")]);
}

#[test]
fn displaces_replicas_whose_node_no_longer_fits() {
    let nodes = [node("a", true, WASM, &[("site", "x")]), node("b", true, WASM, &[("site", "y")])];
    let current = [Placement { replica: "w-0".into(), workload: "w".into(), index: 0, node: Some("a".into()) }];
    let d = schedule(&nodes, &[wl("w", 1, &[("site", "y")])], &current);
    assert_eq!(nodes_of(&d), [Some("b")]);
    // A node that vanished from the snapshot displaces too.
    let d = schedule(&nodes[1..], &[wl("w", 1, &[])], &current);
    assert_eq!(nodes_of(&d), [Some("b")]);
}

#[test]
fn scaling_down_drops_the_highest_indexes_and_keeps_the_rest_in_place() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[])];
    let first = schedule(&nodes, &[wl("w", 3, &[])], &[]);
    let second = schedule(&nodes, &[wl("w", 2, &[])], &first.placements);
    assert_eq!(second.placements, first.placements[..2]);
}

#[test]
fn a_host_port_holds_one_replica_per_node() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[])];
    let mut web = wl("web", 3, &[]);
    web.host_ports = vec![8080];
    let d = schedule(&nodes, std::slice::from_ref(&web), &[]);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b"), None]);
    assert_eq!(d.unschedulable["web-2"], "0/2 nodes available: 2 have port 8080 in use");
    // Another workload on the same port finds no room either; one on another port does.
    let mut other = wl("other", 1, &[]);
    other.host_ports = vec![8080];
    let mut third = wl("third", 1, &[]);
    third.host_ports = vec![9090];
    let d2 = schedule(&nodes, &[web, other, third], &d.placements);
    let by_name: HashMap<_, _> = d2.placements.iter().map(|p| (p.replica.as_str(), p.node.as_deref())).collect();
    assert_eq!(by_name["other-0"], None);
    assert!(by_name["third-0"].is_some());
    assert_eq!(by_name["web-0"], Some("a"), "placed replicas keep their port");
}

#[test]
fn is_idempotent_and_balances_across_workloads() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[]), node("c", true, WASM, &[])];
    let ws = [wl("x", 2, &[]), wl("y", 1, &[])];
    let d1 = schedule(&nodes, &ws, &[]);
    // y goes to the node x left empty.
    assert_eq!(nodes_of(&d1), [Some("a"), Some("b"), Some("c")]);
    let d2 = schedule(&nodes, &ws, &d1.placements);
    assert_eq!(d1, d2);
}
