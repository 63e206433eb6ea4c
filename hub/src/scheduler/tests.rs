//! Rule-by-rule tests on small hand-built snapshots.
use super::*;

fn tcp(port: u16) -> HostPort {
    HostPort { port, protocol: proto::manifest::Protocol::Tcp }
}

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
    web.host_ports = vec![tcp(8080)];
    let d = schedule(&nodes, std::slice::from_ref(&web), &[]);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b"), None]);
    assert_eq!(d.unschedulable["web-2"], "0/2 nodes available: 2 have port 8080/tcp in use");
    // Another workload on the same port finds no room either; one on another port does.
    let mut other = wl("other", 1, &[]);
    other.host_ports = vec![tcp(8080)];
    let mut third = wl("third", 1, &[]);
    third.host_ports = vec![tcp(9090)];
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

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn at(replica: &str, workload: &str, index: u32, node: &str) -> Placement {
    Placement { replica: replica.into(), workload: workload.into(), index, node: Some(node.into()) }
}

fn by_replica(d: &Decisions) -> BTreeMap<&str, Option<&str>> {
    d.placements.iter().map(|p| (p.replica.as_str(), p.node.as_deref())).collect()
}

fn sized(name: &str, cpu: u64, mem: u64) -> SchedNode {
    let mut n = node(name, true, WASM, &[]);
    n.allocatable = Some(Resources { cpu_millis: cpu, memory_bytes: mem });
    n
}

#[test]
fn explains_with_counts_per_cause() {
    let mut nodes: Vec<SchedNode> = (0..7).map(|i| node(&format!("w{i}"), true, WASM, &[])).collect();
    nodes.extend((0..5).map(|i| {
        let mut n = node(&format!("c{i}"), true, &[Runtime::Container], &[]);
        n.allocatable = Some(Resources { cpu_millis: 1000, memory_bytes: 100 });
        n
    }));
    let mut w = wl("w", 1, &[]);
    w.runtime = Runtime::Container;
    w.requests = Resources { cpu_millis: 10, memory_bytes: 1000 };
    let d = schedule(&nodes, &[w], &[]);
    assert_eq!(d.unschedulable["w-0"], "0/12 nodes available: 7 lack runtime container, 5 insufficient memory");
}

#[test]
fn selector_expressions_follow_kubernetes_semantics() {
    let l = labels(&[("zone", "a"), ("gpu", "")]);
    let req = |key: &str, operator, values: &[&str]| SelectorRequirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    };
    assert!(req("zone", SelectorOperator::In, &["a", "b"]).matches(&l));
    assert!(!req("zone", SelectorOperator::In, &["b"]).matches(&l));
    assert!(!req("site", SelectorOperator::In, &["a"]).matches(&l));
    assert!(req("zone", SelectorOperator::NotIn, &["b"]).matches(&l));
    assert!(!req("zone", SelectorOperator::NotIn, &["a"]).matches(&l));
    assert!(req("site", SelectorOperator::NotIn, &["a"]).matches(&l), "NotIn matches a missing key");
    assert!(req("gpu", SelectorOperator::Exists, &[]).matches(&l));
    assert!(!req("gpu", SelectorOperator::DoesNotExist, &[]).matches(&l));
    assert!(req("site", SelectorOperator::DoesNotExist, &[]).matches(&l));

    let nodes = [node("a", true, WASM, &[("zone", "a")]), node("b", true, WASM, &[("zone", "b")])];
    let mut w = wl("w", 2, &[]);
    w.match_expressions = vec![req("zone", SelectorOperator::NotIn, &["a"])];
    assert_eq!(nodes_of(&schedule(&nodes, &[w], &[])), [Some("b"), Some("b")]);
}

#[test]
fn os_and_arch_come_from_the_builtin_labels() {
    let nodes = [
        node("a", true, WASM, &[(OS_LABEL, "linux"), (ARCH_LABEL, "x86_64")]),
        node("b", true, WASM, &[(OS_LABEL, "linux"), (ARCH_LABEL, "aarch64")]),
    ];
    let mut w = wl("w", 1, &[]);
    w.arch = Some("aarch64".into());
    assert_eq!(nodes_of(&schedule(&nodes, std::slice::from_ref(&w), &[])), [Some("b")]);
    // Go's names are the same machines.
    w.arch = Some("amd64".into());
    assert_eq!(nodes_of(&schedule(&nodes, std::slice::from_ref(&w), &[])), [Some("a")]);
    w.arch = Some("arm64".into());
    assert_eq!(nodes_of(&schedule(&nodes, std::slice::from_ref(&w), &[])), [Some("b")]);
    w.os = Some("windows".into());
    let d = schedule(&nodes, &[w], &[]);
    assert_eq!(d.unschedulable["w-0"], "0/2 nodes available: 2 are not windows/arm64");
}

#[test]
fn tolerations_follow_kubernetes_semantics() {
    let taint = Taint { key: "k".into(), value: "v".into(), effect: TaintEffect::NoSchedule };
    let tol = |key: &str, operator, value: &str, effect| Toleration {
        key: key.into(),
        operator,
        value: value.into(),
        effect,
    };
    assert!(tol("k", TolerationOperator::Equal, "v", None).tolerates(&taint));
    assert!(!tol("k", TolerationOperator::Equal, "w", None).tolerates(&taint));
    assert!(tol("k", TolerationOperator::Exists, "", Some(TaintEffect::NoSchedule)).tolerates(&taint));
    assert!(!tol("k", TolerationOperator::Exists, "", Some(TaintEffect::NoExecute)).tolerates(&taint));
    assert!(tol("", TolerationOperator::Exists, "", None).tolerates(&taint), "empty key with Exists tolerates all");
    assert!(!tol("other", TolerationOperator::Exists, "", None).tolerates(&taint));
}

#[test]
fn taints_repel_new_replicas_and_no_execute_evicts_running_ones() {
    let mut a = node("a", true, WASM, &[]);
    a.taints = vec![Taint { key: "dedicated".into(), value: "gpu".into(), effect: TaintEffect::NoSchedule }];
    let b = node("b", true, WASM, &[]);
    let w = wl("w", 2, &[]);
    let d = schedule(&[a.clone(), b.clone()], std::slice::from_ref(&w), &[]);
    assert_eq!(nodes_of(&d), [Some("b"), Some("b")]);
    let d = schedule(std::slice::from_ref(&a), std::slice::from_ref(&w), &[]);
    assert_eq!(d.unschedulable["w-0"], "0/1 nodes available: 1 have untolerated taints");

    // A toleration lets it in.
    let mut tolerant = w.clone();
    tolerant.tolerations =
        vec![Toleration { key: "dedicated".into(), value: "gpu".into(), effect: None, ..Default::default() }];
    assert_eq!(nodes_of(&schedule(&[a.clone(), b.clone()], &[tolerant], &[])), [Some("a"), Some("b")]);

    // NoSchedule keeps what runs; NoExecute moves it.
    let current = [at("w-0", "w", 0, "a"), at("w-1", "w", 1, "b")];
    assert_eq!(
        nodes_of(&schedule(&[a.clone(), b.clone()], std::slice::from_ref(&w), &current)),
        [Some("a"), Some("b")]
    );
    a.taints[0].effect = TaintEffect::NoExecute;
    assert_eq!(nodes_of(&schedule(&[a, b], &[w], &current)), [Some("b"), Some("b")]);
}

#[test]
fn cordoned_nodes_take_nothing_new_but_keep_what_they_run() {
    let mut a = node("a", true, WASM, &[]);
    a.cordoned = true;
    let b = node("b", true, WASM, &[]);
    let w = wl("w", 2, &[]);
    assert_eq!(nodes_of(&schedule(&[a.clone(), b.clone()], std::slice::from_ref(&w), &[])), [Some("b"), Some("b")]);
    let current = [at("w-0", "w", 0, "a")];
    assert_eq!(nodes_of(&schedule(&[a.clone(), b], std::slice::from_ref(&w), &current)), [Some("a"), Some("b")]);
    let d = schedule(&[a], &[w], &[]);
    assert_eq!(d.unschedulable["w-0"], "0/1 nodes available: 1 cordoned");
}

#[test]
fn requests_never_exceed_allocatable_and_shrinking_capacity_displaces() {
    let nodes = [sized("a", 1000, 1000), sized("b", 500, 1000)];
    let mut w = wl("w", 4, &[]);
    w.requests = Resources { cpu_millis: 300, memory_bytes: 100 };
    let d = schedule(&nodes, std::slice::from_ref(&w), &[]);
    // a takes 3 (900m), b one (300m); the fourth: a has 100m left, b 200m.
    assert_eq!(nodes_of(&d), [Some("a"), Some("b"), Some("a"), Some("a")]);
    w.replicas = 5;
    let d5 = schedule(&nodes, std::slice::from_ref(&w), &d.placements);
    assert_eq!(d5.unschedulable["w-4"], "0/2 nodes available: 2 insufficient cpu");
    // A node whose capacity shrank keeps what still fits, lowest indexes first.
    let smaller = [sized("a", 600, 1000), sized("b", 1000, 1000)];
    w.replicas = 4;
    let d = schedule(&smaller, &[w], &d.placements);
    assert_eq!(nodes_of(&d), [Some("a"), Some("b"), Some("a"), Some("b")]);
}

#[test]
fn unreported_capacity_is_unlimited() {
    let nodes = [node("a", true, WASM, &[])];
    let mut w = wl("w", 3, &[]);
    w.requests = Resources { cpu_millis: u64::MAX / 2, memory_bytes: u64::MAX / 2 };
    assert_eq!(nodes_of(&schedule(&nodes, &[w], &[])), [Some("a"); 3]);
}

#[test]
fn spreads_over_a_topology_label_and_skips_nodes_without_it() {
    let nodes = [
        node("a1", true, WASM, &[("site", "a")]),
        node("a2", true, WASM, &[("site", "a")]),
        node("a3", true, WASM, &[("site", "a")]),
        node("b1", true, WASM, &[("site", "b")]),
        node("c1", true, WASM, &[("site", "c")]),
        node("nolabel", true, WASM, &[]),
    ];
    let mut w = wl("w", 6, &[]);
    w.spread_by = Some("site".into());
    let d = schedule(&nodes, std::slice::from_ref(&w), &[]);
    assert_eq!(nodes_of(&d), [Some("a1"), Some("b1"), Some("c1"), Some("a2"), Some("b1"), Some("c1")]);
    // Kept replicas count: with a's replicas in place, new ones go to the emptier sites.
    let current = [at("w-0", "w", 0, "a1"), at("w-1", "w", 1, "a2"), at("w-2", "w", 2, "a3")];
    let d = schedule(&nodes, std::slice::from_ref(&w), &current);
    assert_eq!(nodes_of(&d), [Some("a1"), Some("a2"), Some("a3"), Some("b1"), Some("c1"), Some("b1")]);
    let d = schedule(&nodes[5..], &[w], &[]);
    assert_eq!(d.unschedulable["w-0"], "0/1 nodes available: 1 lack label site");
}

#[test]
fn least_allocated_spreads_and_bin_pack_fills() {
    let nodes = [sized("a", 1000, 1 << 30), sized("b", 1000, 1 << 30), sized("c", 2000, 1 << 30)];
    let mut other = wl("other", 1, &[]);
    other.requests = Resources { cpu_millis: 500, memory_bytes: 0 };
    let current = [at("other-0", "other", 0, "a")];
    let mut w = wl("w", 2, &[]);
    w.requests = Resources { cpu_millis: 400, memory_bytes: 0 };
    let d = schedule(&nodes, &[other.clone(), w.clone()], &current);
    // Least allocated: c (20 %) then b (40 %); a would be at 90 %.
    assert_eq!(by_replica(&d)["w-0"], Some("c"));
    assert_eq!(by_replica(&d)["w-1"], Some("b"));
    w.packing = Packing::BinPack;
    let d = schedule(&nodes, &[other, w], &current);
    // Bin-pack: a (90 %), then a is full for another 400m; b (40 %) beats c (20 %).
    assert_eq!(by_replica(&d)["w-0"], Some("a"));
    assert_eq!(by_replica(&d)["w-1"], Some("b"));
}

#[test]
fn failover_moves_replicas_off_a_long_not_ready_node_only_when_asked() {
    let mut a = node("a", false, WASM, &[]);
    a.not_ready_since_ms = Some(1_000);
    let nodes = [a, node("b", true, WASM, &[])];
    let current = [at("w-0", "w", 0, "a")];
    let mut w = wl("w", 1, &[]);
    let seen = |now_ms| Observed { now_ms, ready: HashMap::new() };
    assert_eq!(nodes_of(&schedule_at(&nodes, std::slice::from_ref(&w), &current, &seen(1_000_000))), [Some("a")]);
    w.failover = Failover::After(60_000);
    assert_eq!(nodes_of(&schedule_at(&nodes, std::slice::from_ref(&w), &current, &seen(60_999))), [Some("a")]);
    assert_eq!(nodes_of(&schedule_at(&nodes, std::slice::from_ref(&w), &current, &seen(61_000))), [Some("b")]);
    // Without a NotReady timestamp nothing fails over.
    let mut unknown = nodes.clone();
    unknown[0].not_ready_since_ms = None;
    assert_eq!(nodes_of(&schedule_at(&unknown, &[w], &current, &seen(u64::MAX))), [Some("a")]);
}

#[test]
fn every_node_puts_one_replica_on_each_matching_node_and_never_moves_it() {
    let mut cordoned = node("c", true, WASM, &[("role", "edge")]);
    cordoned.cordoned = true;
    let mut down = node("d", false, WASM, &[("role", "edge")]);
    down.not_ready_since_ms = Some(0);
    let nodes =
        vec![node("a", true, WASM, &[("role", "edge")]), node("b", true, WASM, &[("role", "core")]), cordoned, down];
    let mut w = wl("agent", 0, &[("role", "edge")]);
    w.kind = WorkloadKind::EveryNode;
    w.failover = Failover::After(0);
    let d = schedule_at(&nodes, std::slice::from_ref(&w), &[], &Observed { now_ms: 10, ..Default::default() });
    let got: Vec<(&str, u32, Option<&str>)> =
        d.placements.iter().map(|p| (p.replica.as_str(), p.index, p.node.as_deref())).collect();
    assert_eq!(got, [("agent-a", 0, Some("a")), ("agent-c", 1, Some("c")), ("agent-d", 2, Some("d"))]);

    // A new matching node gets one at once, with the lowest free index; the others keep theirs.
    let mut more = nodes.clone();
    more.push(node("aa", true, WASM, &[("role", "edge")]));
    let current: Vec<Placement> = d.placements.iter().filter(|p| p.replica != "agent-c").cloned().collect();
    let d2 = schedule_at(&more, std::slice::from_ref(&w), &current, &Observed { now_ms: 10, ..Default::default() });
    let got: Vec<(&str, u32, Option<&str>)> =
        d2.placements.iter().map(|p| (p.replica.as_str(), p.index, p.node.as_deref())).collect();
    assert_eq!(
        got,
        [("agent-a", 0, Some("a")), ("agent-aa", 1, Some("aa")), ("agent-d", 2, Some("d")), ("agent-c", 3, Some("c"))]
    );
    // A node that stops matching loses its replica.
    more[0].labels.insert("role".into(), "core".into());
    let d3 = schedule(&more, &[w], &d2.placements);
    assert!(!by_replica(&d3).contains_key("agent-a"));
    assert_eq!(by_replica(&d3)["agent-aa"], Some("aa"));
}

#[test]
fn every_node_unplaced_replicas_keep_their_index_when_a_node_joins() {
    // "agent-b" does not fit and stays unplaced at index 1; node "ab" joins and sorts before
    // "b": it must not be given index 1, which the stored unplaced replica still holds.
    let nodes = vec![sized("a", 1000, 1000), sized("b", 100, 100)];
    let mut w = wl("agent", 0, &[]);
    w.kind = WorkloadKind::EveryNode;
    w.requests = Resources { cpu_millis: 200, memory_bytes: 10 };
    let d = schedule(&nodes, std::slice::from_ref(&w), &[]);
    let idx = |d: &Decisions, r: &str| d.placements.iter().find(|p| p.replica == r).map(|p| (p.index, p.node.clone()));
    assert_eq!(idx(&d, "agent-b"), Some((1, None)));
    let mut more = nodes.clone();
    more.push(sized("ab", 1000, 1000));
    let d2 = schedule(&more, std::slice::from_ref(&w), &d.placements);
    assert_eq!(idx(&d2, "agent-b"), Some((1, None)));
    assert_eq!(idx(&d2, "agent-ab"), Some((2, Some("ab".into()))));
    assert_eq!(idx(&d2, "agent-a"), Some((0, Some("a".into()))));
}

#[test]
fn every_node_replicas_with_overlong_names_are_not_placed() {
    let long = "n".repeat(proto::manifest::MAX_NAME_LEN);
    let nodes = [node("a", true, WASM, &[]), node(&long, true, WASM, &[])];
    let mut w = wl("agent", 0, &[]);
    w.kind = WorkloadKind::EveryNode;
    let d = schedule(&nodes, &[w], &[]);
    let replica = format!("agent-{long}");
    assert_eq!(by_replica(&d)["agent-a"], Some("a"));
    assert_eq!(by_replica(&d)[replica.as_str()], None);
    assert!(d.unschedulable[&replica].contains("longer than"), "{:?}", d.unschedulable);
}

#[test]
fn every_node_reports_a_node_without_room() {
    let nodes = [sized("a", 100, 100), sized("b", 1000, 1000)];
    let mut w = wl("agent", 0, &[]);
    w.kind = WorkloadKind::EveryNode;
    w.requests = Resources { cpu_millis: 200, memory_bytes: 10 };
    let d = schedule(&nodes, &[w], &[]);
    assert_eq!(by_replica(&d)["agent-a"], None);
    assert_eq!(by_replica(&d)["agent-b"], Some("b"));
    assert_eq!(d.unschedulable["agent-a"], "0/1 nodes available: 1 insufficient cpu");
}

#[test]
fn every_node_names_never_take_an_indexed_replica_name() {
    // Workload "a" on node "b-0" would be "a-b-0", the name of replica 0 of workload "a-b".
    let nodes = [node("b-0", true, WASM, &[])];
    let mut daemon = wl("a", 0, &[]);
    daemon.kind = WorkloadKind::EveryNode;
    let d = schedule(&nodes, &[daemon, wl("a-b", 1, &[])], &[]);
    assert_eq!(d.placements.len(), 1);
    assert_eq!(d.placements[0].workload, "a-b");
    assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
}

#[test]
fn drain_moves_replicated_replicas_within_the_disruption_budget() {
    let mut a = node("a", true, WASM, &[]);
    let b = node("b", true, WASM, &[]);
    let mut w = wl("w", 3, &[]);
    w.max_unavailable = 2;
    let mut daemon = wl("agent", 0, &[]);
    daemon.kind = WorkloadKind::EveryNode;
    let first = schedule(&[a.clone()], &[w.clone(), daemon.clone()], &[]);
    assert_eq!(placed_on(&first, "a"), 4);

    a.draining = true;
    let nodes = [a, b];
    let ready = Observed::all_ready(&first.placements);
    let d = schedule_at(&nodes, &[w.clone(), daemon.clone()], &first.placements, &ready);
    let got = by_replica(&d);
    assert_eq!((got["w-0"], got["w-1"], got["w-2"]), (Some("b"), Some("b"), Some("a")), "two per pass");
    assert_eq!(got["agent-a"], Some("a"), "EveryNode replicas stay");
    assert_eq!(got["agent-b"], Some("b"));
    assert_eq!(d.drains["a"], 1);
    // The moved replicas are not ready on b yet: the next pass with the same observations
    // moves nothing more (idempotent).
    assert_eq!(schedule_at(&nodes, &[w.clone(), daemon.clone()], &d.placements, &ready), d);
    // Once they are ready there, the last one moves and the drain is complete.
    let ready = Observed::all_ready(&d.placements);
    let done = schedule_at(&nodes, &[w.clone(), daemon.clone()], &d.placements, &ready);
    assert_eq!(done.drains["a"], 0);
    assert_eq!(by_replica(&done)["w-2"], Some("b"));

    // A replica already unready uses the budget: with max_unavailable 1, nothing moves.
    w.max_unavailable = 1;
    let mut ready = Observed::all_ready(&first.placements);
    ready.ready.remove("w-0");
    let d = schedule_at(&nodes, &[w.clone()], &first.placements, &ready);
    let got = by_replica(&d);
    assert_eq!((got["w-0"], got["w-1"], got["w-2"]), (Some("b"), Some("a"), Some("a")), "only the unready one");
}

#[test]
fn drain_keeps_replicas_that_no_other_node_can_take() {
    let mut a = node("a", true, WASM, &[]);
    a.draining = true;
    let w = wl("w", 1, &[("site", "x")]);
    let nodes = [a, node("b", true, WASM, &[("site", "y")])];
    let mut a_labelled = nodes.clone();
    a_labelled[0].labels.insert("site".into(), "x".into());
    let current = [at("w-0", "w", 0, "a")];
    let d = schedule(&a_labelled, &[w], &current);
    assert_eq!(nodes_of(&d), [Some("a")]);
    assert_eq!(d.drains["a"], 1);
}

fn placed_on(d: &Decisions, node: &str) -> usize {
    d.placements.iter().filter(|p| p.node.as_deref() == Some(node)).count()
}

#[test]
fn job_plan_fills_parallelism_and_reports_phase() {
    let spec = JobSpec { completions: 5, parallelism: 2, backoff_limit: 2, ..Default::default() };
    let mut progress = JobProgress::default();
    let plan = job_plan(&spec, &progress, 0);
    assert_eq!((plan.phase, plan.active.clone()), (JobPhase::Running, vec![0, 1]));

    // 0 succeeded, 1 runs, 2 failed recently: 3 takes the free slot, 2 waits out its backoff.
    progress.indexes.insert(0, IndexOutcome { succeeded: true, ..Default::default() });
    progress.indexes.insert(1, IndexOutcome { running: true, ..Default::default() });
    progress.indexes.insert(2, IndexOutcome { failures: 1, last_failure_ms: Some(1_000), ..Default::default() });
    let plan = job_plan(&spec, &progress, 5_000);
    assert_eq!(plan.active, [1, 3]);
    assert_eq!((plan.succeeded, plan.failed), (1, 1));
    // With 3 also running, the next slot would be 2 but its backoff ends at 11 s.
    progress.indexes.insert(3, IndexOutcome { running: true, ..Default::default() });
    let spec3 = JobSpec { parallelism: 3, ..spec.clone() };
    let plan = job_plan(&spec3, &progress, 5_000);
    assert_eq!(plan.active, [1, 3, 4]);
    let spec4 = JobSpec { parallelism: 4, ..spec.clone() };
    let plan = job_plan(&spec4, &progress, 5_000);
    assert_eq!((plan.active.clone(), plan.retry_at_ms), (vec![1, 3, 4], Some(11_000)));
    assert_eq!(job_plan(&spec4, &progress, 11_000).active, [1, 2, 3, 4]);
    // Parallelism shrinking keeps the lowest running indexes.
    let spec1 = JobSpec { parallelism: 1, ..spec.clone() };
    assert_eq!(job_plan(&spec1, &progress, 5_000).active, [1]);

    // Failures beyond the limit fail the job.
    if let Some(o) = progress.indexes.get_mut(&2) {
        o.failures = 3;
    }
    let plan = job_plan(&spec, &progress, 5_000);
    assert_eq!((plan.phase, plan.active.len()), (JobPhase::Failed, 0));

    // All indexes succeeded: complete.
    let done =
        JobProgress { indexes: (0..5).map(|i| (i, IndexOutcome { succeeded: true, ..Default::default() })).collect() };
    let plan = job_plan(&spec, &done, 0);
    assert_eq!((plan.phase, plan.active.len(), plan.succeeded), (JobPhase::Complete, 0, 5));
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let spec = JobSpec { backoff_limit: 100, backoff_base_ms: 10, backoff_max_ms: 35, ..Default::default() };
    let failed = |failures| JobProgress {
        indexes: [(0, IndexOutcome { failures, last_failure_ms: Some(0), ..Default::default() })].into(),
    };
    assert_eq!(job_plan(&spec, &failed(1), 0).retry_at_ms, Some(10));
    assert_eq!(job_plan(&spec, &failed(2), 0).retry_at_ms, Some(20));
    assert_eq!(job_plan(&spec, &failed(3), 0).retry_at_ms, Some(35));
    assert_eq!(job_plan(&spec, &failed(90), 0).retry_at_ms, Some(35));
}

#[test]
fn jobs_place_their_active_indexes_and_stop_when_done() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[])];
    let mut job = wl("batch", 0, &[]);
    job.kind = WorkloadKind::Job(JobSpec { completions: 3, parallelism: 2, ..Default::default() });
    let d = schedule(&nodes, std::slice::from_ref(&job), &[]);
    assert_eq!(by_replica(&d), BTreeMap::from([("batch-0", Some("a")), ("batch-1", Some("b"))]));
    assert_eq!(d.jobs["batch"].phase, JobPhase::Running);

    job.job_progress.indexes.insert(0, IndexOutcome { succeeded: true, ..Default::default() });
    job.job_progress.indexes.insert(1, IndexOutcome { running: true, ..Default::default() });
    let d2 = schedule(&nodes, std::slice::from_ref(&job), &d.placements);
    assert_eq!(by_replica(&d2), BTreeMap::from([("batch-1", Some("b")), ("batch-2", Some("a"))]));

    job.job_progress.indexes = (0..3).map(|i| (i, IndexOutcome { succeeded: true, ..Default::default() })).collect();
    let d3 = schedule(&nodes, std::slice::from_ref(&job), &d2.placements);
    assert!(d3.placements.is_empty());
    assert_eq!(d3.jobs["batch"].phase, JobPhase::Complete);
}

#[test]
fn decisions_do_not_depend_on_input_order() {
    let nodes = vec![
        node("a", true, WASM, &[("site", "x")]),
        node("b", true, WASM, &[("site", "y")]),
        node("c", true, WASM, &[("site", "x")]),
    ];
    let mut w1 = wl("w1", 4, &[]);
    w1.spread_by = Some("site".into());
    let ws = vec![w1, wl("w2", 2, &[])];
    let d = schedule(&nodes, &ws, &[]);
    let mut rn = nodes.clone();
    rn.reverse();
    let mut rw = ws.clone();
    rw.reverse();
    assert_eq!(schedule(&rn, &rw, &[]), d);
    let mut cur = d.placements.clone();
    cur.reverse();
    assert_eq!(schedule(&rn, &rw, &cur), d);
}

#[test]
fn drain_moves_unready_replicas_without_spending_the_budget() {
    let mut a = node("a", true, WASM, &[]);
    a.draining = true;
    let nodes = [a, node("b", true, WASM, &[])];
    let mut w = wl("w", 3, &[]);
    w.max_unavailable = 2;
    let current = [at("w-0", "w", 0, "a"), at("w-1", "w", 1, "a"), at("w-2", "w", 2, "a")];
    let mut ready = Observed::all_ready(&current);
    ready.ready.remove("w-2");
    let d = schedule_at(&nodes, &[w], &current, &ready);
    assert_eq!(nodes_of(&d), [Some("b"), Some("a"), Some("b")]);
    assert_eq!(d.drains["a"], 1);
}

#[test]
fn surge_replicas_follow_the_desired_ones_and_go_with_the_surge() {
    let nodes = [node("a", true, WASM, &[]), node("b", true, WASM, &[])];
    let mut w = wl("web", 2, &[]);
    w.surge = 1;
    let d = schedule(&nodes, std::slice::from_ref(&w), &[]);
    let names: Vec<&str> = d.placements.iter().map(|p| p.replica.as_str()).collect();
    assert_eq!(names, ["web-0", "web-1", "web-2"]);
    // The surge ends: the stand-in goes, the desired ones stay where they are.
    w.surge = 0;
    let again = schedule(&nodes, &[w], &d.placements);
    assert_eq!(again.placements, d.placements[..2]);
}
