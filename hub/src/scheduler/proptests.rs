//! Property tests over random snapshots: safety (filters, capacity, ports), EveryNode
//! coverage, idempotence, independence from input order and spread balance.

use proptest::prelude::*;

use super::*;

const SITES: [&str; 3] = ["a", "b", "c"];

fn arb_node(i: usize) -> impl Strategy<Value = SchedNode> {
    (
        (any::<bool>(), 0..3usize, prop::option::of(0..3usize), any::<bool>()),
        (prop::option::weighted(0.3, (any::<bool>(), any::<bool>())), prop::bool::weighted(0.15)),
        (prop::bool::weighted(0.15), prop::option::of((0..2000u64, 0..2000u64)), prop::option::of(0..100u64)),
    )
        .prop_map(move |((ready, rt, site, role), (taint, cordoned), (draining, alloc, since))| {
            let mut labels = BTreeMap::new();
            if let Some(s) = site {
                labels.insert("site".to_string(), SITES[s].to_string());
            }
            labels.insert("role".to_string(), if role { "x" } else { "y" }.to_string());
            SchedNode {
                name: format!("n{i}"),
                ready,
                runtimes: [vec![Runtime::Wasm], vec![Runtime::Container], vec![Runtime::Wasm, Runtime::Container]][rt]
                    .clone(),
                labels,
                taints: taint
                    .map(|(exec, v)| Taint {
                        key: "t".into(),
                        value: if v { "1" } else { "2" }.into(),
                        effect: if exec { TaintEffect::NoExecute } else { TaintEffect::NoSchedule },
                    })
                    .into_iter()
                    .collect(),
                cordoned,
                draining,
                allocatable: alloc.map(|(cpu_millis, memory_bytes)| Resources { cpu_millis, memory_bytes }),
                not_ready_since_ms: if ready { None } else { since },
            }
        })
}

fn arb_workload(j: usize) -> impl Strategy<Value = SchedWorkload> {
    (
        (0..10u32, 0..6u32, any::<bool>(), prop::option::of(any::<bool>())),
        (prop::option::of(0..4usize), any::<bool>(), (0..600u64, 0..600u64), any::<bool>()),
        (any::<bool>(), any::<bool>(), prop::option::of(0..50u64), 0..3u32),
        (1..4u32, 1..3u32, 0..3u32),
    )
        .prop_map(
            move |(
                (kind, replicas, container, selector),
                (expr, tolerate, (cpu, mem), spread),
                (port, binpack, failover, max_unavailable),
                (completions, parallelism, done),
            )| {
                let kind = match kind {
                    0 | 1 => WorkloadKind::EveryNode,
                    2 => WorkloadKind::Job(JobSpec { completions, parallelism, ..Default::default() }),
                    _ => WorkloadKind::Replicated,
                };
                let mut w = SchedWorkload {
                    name: format!("w{j}"),
                    replicas,
                    runtime: if container { Runtime::Container } else { Runtime::Wasm },
                    kind,
                    requests: Resources { cpu_millis: cpu, memory_bytes: mem },
                    spread_by: spread.then(|| "site".to_string()),
                    packing: if binpack { Packing::BinPack } else { Packing::LeastAllocated },
                    failover: failover.map_or(Failover::Never, Failover::After),
                    max_unavailable,
                    host_ports: if port {
                        vec![HostPort { port: 80, protocol: proto::manifest::Protocol::Tcp }]
                    } else {
                        vec![]
                    },
                    ..Default::default()
                };
                if let Some(x) = selector {
                    w.node_selector.insert("role".into(), if x { "x" } else { "y" }.into());
                }
                if let Some(e) = expr {
                    let (operator, values) = [
                        (SelectorOperator::In, vec!["a".to_string(), "b".to_string()]),
                        (SelectorOperator::NotIn, vec!["a".to_string()]),
                        (SelectorOperator::Exists, vec![]),
                        (SelectorOperator::DoesNotExist, vec![]),
                    ][e]
                        .clone();
                    w.match_expressions.push(SelectorRequirement { key: "site".into(), operator, values });
                }
                if tolerate {
                    w.tolerations.push(Toleration { key: "t".into(), value: "1".into(), ..Default::default() });
                }
                for i in 0..done.min(completions) {
                    w.job_progress.indexes.insert(i, IndexOutcome { succeeded: true, ..Default::default() });
                }
                w
            },
        )
}

#[derive(Debug, Clone)]
struct Snapshot {
    nodes: Vec<SchedNode>,
    workloads: Vec<SchedWorkload>,
    current: Vec<Placement>,
    observed: Observed,
}

/// A snapshot whose current placements are an earlier decision on a perturbed cluster, so
/// they look like real history (kept replicas, then nodes that changed under them).
fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    let nodes = (1..7usize).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>());
    let workloads = (1..5usize).prop_flat_map(|n| (0..n).map(arb_workload).collect::<Vec<_>>());
    (nodes, workloads, any::<u64>(), 0..200u64).prop_map(|(nodes, workloads, seed, now_ms)| {
        // History: schedule on a calm version of the cluster, then let the random one apply.
        let calm: Vec<SchedNode> = nodes
            .iter()
            .map(|n| SchedNode { ready: true, cordoned: false, draining: false, taints: vec![], ..n.clone() })
            .collect();
        let earlier = schedule(&calm, &workloads, &[]);
        let mut ready = HashMap::new();
        for (k, p) in earlier.placements.iter().enumerate() {
            if let Some(node) = &p.node
                && (seed >> (k % 64)) & 1 == 1
            {
                ready.insert(p.replica.clone(), node.clone());
            }
        }
        Snapshot { nodes, workloads, current: earlier.placements, observed: Observed { now_ms, ready } }
    })
}

fn run(s: &Snapshot) -> Decisions {
    schedule_at(&s.nodes, &s.workloads, &s.current, &s.observed)
}

/// Deterministic shuffle.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

fn workload<'a>(s: &'a Snapshot, name: &str) -> &'a SchedWorkload {
    s.workloads.iter().find(|w| w.name == name).expect("decisions name only known workloads")
}

fn node<'a>(s: &'a Snapshot, name: &str) -> &'a SchedNode {
    s.nodes.iter().find(|n| n.name == name).expect("decisions name only known nodes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn placements_respect_filters_capacity_and_ports(s in arb_snapshot()) {
        let d = run(&s);
        let mut used: HashMap<&str, Resources> = HashMap::new();
        let mut ports: HashSet<(&str, HostPort)> = HashSet::new();
        for p in &d.placements {
            let Some(n) = p.node.as_deref() else {
                prop_assert!(d.unschedulable.contains_key(&p.replica), "{} unplaced without a reason", p.replica);
                continue;
            };
            let (w, n) = (workload(&s, &p.workload), node(&s, n));
            let was_here = s.current.iter().any(|c| c.replica == p.replica && c.node.as_deref() == Some(&n.name));
            if was_here {
                prop_assert!(may_stay(n, w), "{} kept on {} that no longer fits", p.replica, n.name);
            } else {
                prop_assert_eq!(static_misfit(n, w), None, "{} newly on {}", &p.replica, &n.name);
                prop_assert!(n.ready || w.kind == WorkloadKind::EveryNode, "{} newly on NotReady {}", p.replica, n.name);
            }
            let u = used.entry(n.name.as_str()).or_default();
            u.cpu_millis += w.requests.cpu_millis;
            u.memory_bytes += w.requests.memory_bytes;
            if let Some(cap) = n.allocatable {
                prop_assert!(u.cpu_millis <= cap.cpu_millis && u.memory_bytes <= cap.memory_bytes, "{} over capacity", n.name);
            }
            for &port in &w.host_ports {
                prop_assert!(ports.insert((n.name.as_str(), port)), "port {} twice on {}", port, n.name);
            }
        }
        let mut names = HashSet::new();
        prop_assert!(d.placements.iter().all(|p| names.insert(&p.replica)), "replica names unique");
        let mut pairs = HashSet::new();
        prop_assert!(d.placements.iter().all(|p| pairs.insert((&p.workload, p.index))), "(workload, index) unique");
    }

    #[test]
    fn every_node_has_one_replica_per_matching_node(s in arb_snapshot()) {
        let d = run(&s);
        for w in s.workloads.iter().filter(|w| w.kind == WorkloadKind::EveryNode) {
            for n in &s.nodes {
                let mine: Vec<&Placement> = d.placements.iter().filter(|p| p.workload == w.name && p.node.as_deref() == Some(n.name.as_str())).collect();
                prop_assert!(mine.len() <= 1, "{} has {} replicas of {}", n.name, mine.len(), w.name);
                let name = every_node_replica_name(&w.name, &n.name);
                let listed = d.placements.iter().any(|p| p.replica == name);
                if n.ready && static_misfit(n, w).is_none() {
                    prop_assert!(listed, "matching ready node {} lacks {}", n.name, name);
                }
                if listed {
                    prop_assert!(may_stay(n, w), "{} listed on a node it does not match", name);
                }
            }
            // Never moved: an EveryNode replica is only ever on the node it is named for.
            for p in d.placements.iter().filter(|p| p.workload == w.name) {
                if let Some(n) = &p.node {
                    prop_assert_eq!(&p.replica, &every_node_replica_name(&w.name, n));
                }
            }
        }
    }

    #[test]
    fn feeding_decisions_back_changes_nothing(s in arb_snapshot()) {
        let d = run(&s);
        let again = schedule_at(&s.nodes, &s.workloads, &d.placements, &s.observed);
        prop_assert_eq!(again, d);
    }

    #[test]
    fn input_order_does_not_matter(s in arb_snapshot(), seed in any::<u64>()) {
        let d = run(&s);
        let mut t = s.clone();
        shuffle(&mut t.nodes, seed);
        shuffle(&mut t.workloads, seed.rotate_left(17));
        shuffle(&mut t.current, seed.rotate_left(41));
        prop_assert_eq!(run(&t), d);
        // From scratch too, where every tie is decided anew.
        let fresh = schedule_at(&s.nodes, &s.workloads, &[], &s.observed);
        prop_assert_eq!(schedule_at(&t.nodes, &t.workloads, &[], &t.observed), fresh);
    }

    #[test]
    fn spread_is_balanced_when_every_domain_has_room(
        sites in prop::collection::vec(0..3usize, 1..10),
        replicas in prop::collection::vec(0..12u32, 1..4),
        binpack in any::<bool>(),
    ) {
        let nodes: Vec<SchedNode> = sites
            .iter()
            .enumerate()
            .map(|(i, &s)| SchedNode {
                name: format!("n{i}"),
                ready: true,
                runtimes: vec![Runtime::Wasm],
                labels: [("site".to_string(), SITES[s].to_string())].into(),
                ..Default::default()
            })
            .collect();
        let workloads: Vec<SchedWorkload> = replicas
            .iter()
            .enumerate()
            .map(|(j, &r)| SchedWorkload {
                name: format!("w{j}"),
                replicas: r,
                spread_by: Some("site".into()),
                packing: if binpack { Packing::BinPack } else { Packing::LeastAllocated },
                ..Default::default()
            })
            .collect();
        let d = schedule(&nodes, &workloads, &[]);
        let domains: BTreeSet<&str> = sites.iter().map(|&s| SITES[s]).collect();
        for w in &workloads {
            let mut per: BTreeMap<&str, u32> = domains.iter().map(|&s| (s, 0)).collect();
            for p in d.placements.iter().filter(|p| p.workload == w.name) {
                let n = node_of(&nodes, p.node.as_deref().expect("room for all"));
                *per.get_mut(n.labels["site"].as_str()).expect("known site") += 1;
            }
            let (min, max) = (per.values().min().copied().unwrap_or(0), per.values().max().copied().unwrap_or(0));
            prop_assert!(max - min <= 1, "{}: {:?}", w.name, per);
        }
    }
}

fn node_of<'a>(nodes: &'a [SchedNode], name: &str) -> &'a SchedNode {
    nodes.iter().find(|n| n.name == name).expect("placed on a known node")
}

use std::collections::BTreeSet;
