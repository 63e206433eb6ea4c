//! The scheduler: a pure function from a snapshot of nodes, workloads and current placements
//! to the placements the cluster should have. No I/O, no clock, no randomness: the same
//! snapshot always yields the same decisions, so it is unit-tested in microseconds and the
//! controller can re-run it after a crash without surprises.
//!
//! Rules:
//! - A workload with `replicas: n` has replicas `<name>-0 .. <name>-(n-1)`; scaling down drops
//!   the highest indexes.
//! - A placed replica stays where it is while its node exists, supports the runtime and matches
//!   the selector, even when the node is not Ready: the edge keeps running through partitions.
//! - New or displaced replicas go to Ready nodes that support the runtime and match the
//!   selector, preferring the node with the fewest replicas of the same workload, then the
//!   fewest replicas overall, then the name (deterministic ties).
//! - A node holds at most one replica per host port (HTTP components listen on the node).
//! - A replica no node can take is left unplaced with a reason that counts nodes per cause.

use std::collections::{BTreeMap, HashMap, HashSet};

use proto::manifest::Runtime;

#[derive(Debug, Clone, Default)]
pub struct SchedNode {
    pub name: String,
    pub ready: bool,
    pub runtimes: Vec<Runtime>,
    /// The node's labels, including the built-in `flotilla.dev/*` ones.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct SchedWorkload {
    pub name: String,
    pub replicas: u32,
    pub runtime: Runtime,
    pub node_selector: BTreeMap<String, String>,
    /// Ports each replica binds on its node.
    pub host_ports: Vec<u16>,
}

impl Default for SchedWorkload {
    fn default() -> Self {
        SchedWorkload {
            name: String::new(),
            replicas: 0,
            runtime: Runtime::Wasm,
            node_selector: BTreeMap::new(),
            host_ports: Vec::new(),
        }
    }
}

/// A replica and the node it is on (`None`: not placed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub replica: String,
    pub workload: String,
    pub index: u32,
    pub node: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Every replica the cluster should have, sorted by workload then index.
    pub placements: Vec<Placement>,
    /// Why each unplaced replica could not be placed.
    pub unschedulable: BTreeMap<String, String>,
}

pub fn replica_name(workload: &str, index: u32) -> String {
    format!("{workload}-{index}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Misfit {
    NotReady,
    Runtime,
    Selector,
    PortInUse,
}

/// Host ports taken on each node.
type Ports<'a> = HashMap<&'a str, HashSet<u16>>;

fn misfit(node: &SchedNode, w: &SchedWorkload, ports: &Ports) -> Option<Misfit> {
    if !node.runtimes.contains(&w.runtime) {
        Some(Misfit::Runtime)
    } else if !w.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
        Some(Misfit::Selector)
    } else if ports.get(node.name.as_str()).is_some_and(|used| w.host_ports.iter().any(|p| used.contains(p))) {
        Some(Misfit::PortInUse)
    } else if !node.ready {
        Some(Misfit::NotReady)
    } else {
        None
    }
}

/// Computes the placements for `workloads` given the `current` ones.
pub fn schedule(nodes: &[SchedNode], workloads: &[SchedWorkload], current: &[Placement]) -> Decisions {
    let by_name: HashMap<&str, &SchedNode> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let current: HashMap<&str, &Placement> = current.iter().map(|p| (p.replica.as_str(), p)).collect();

    // Replicas per node over all workloads, counting only placements that survive.
    let mut load: HashMap<&str, u32> = HashMap::new();
    let mut ports: Ports = HashMap::new();
    let mut kept: HashMap<(String, u32), String> = HashMap::new();
    let mut sorted: Vec<&SchedWorkload> = workloads.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for w in &sorted {
        for index in 0..w.replicas {
            let name = replica_name(&w.name, index);
            let Some(node) = current.get(name.as_str()).and_then(|p| p.node.as_deref()) else { continue };
            let Some(n) = by_name.get(node) else { continue };
            // A not-ready node keeps what it has; only a real misfit displaces. Placements
            // are kept in (workload, index) order, so of two replicas wanting one port the
            // first keeps it.
            if matches!(misfit(n, w, &ports), None | Some(Misfit::NotReady)) {
                *load.entry(n.name.as_str()).or_default() += 1;
                ports.entry(n.name.as_str()).or_default().extend(&w.host_ports);
                kept.insert((w.name.clone(), index), n.name.clone());
            }
        }
    }

    let mut out = Decisions::default();
    for w in sorted {
        let mut per_node: HashMap<&str, u32> = HashMap::new();
        for index in 0..w.replicas {
            if let Some(node) = kept.get(&(w.name.clone(), index)) {
                *per_node.entry(by_name[node.as_str()].name.as_str()).or_default() += 1;
            }
        }
        let mut sorted_nodes: Vec<&SchedNode> = nodes.iter().collect();
        sorted_nodes.sort_by(|a, b| a.name.cmp(&b.name));
        for index in 0..w.replicas {
            let replica = replica_name(&w.name, index);
            let node = match kept.get(&(w.name.clone(), index)) {
                Some(node) => Some(node.clone()),
                None => {
                    // Re-filtered per replica: placing one may take a port the next needs.
                    let candidates = sorted_nodes.iter().filter(|n| misfit(n, w, &ports).is_none());
                    let best = candidates.min_by_key(|n| {
                        let name = n.name.as_str();
                        (per_node.get(name).copied().unwrap_or(0), load.get(name).copied().unwrap_or(0), name)
                    });
                    match best {
                        Some(n) => {
                            *per_node.entry(n.name.as_str()).or_default() += 1;
                            *load.entry(n.name.as_str()).or_default() += 1;
                            ports.entry(n.name.as_str()).or_default().extend(&w.host_ports);
                            Some(n.name.clone())
                        }
                        None => {
                            out.unschedulable.insert(replica.clone(), explain(nodes, w, &ports));
                            None
                        }
                    }
                }
            };
            out.placements.push(Placement { replica, workload: w.name.clone(), index, node });
        }
    }
    out
}

/// "0/3 nodes available: 2 lack runtime container, 1 does not match nodeSelector".
fn explain(nodes: &[SchedNode], w: &SchedWorkload, ports: &Ports) -> String {
    if nodes.is_empty() {
        return "0/0 nodes available: no node has joined".into();
    }
    let mut counts: BTreeMap<Misfit, usize> = BTreeMap::new();
    for n in nodes {
        if let Some(m) = misfit(n, w, ports) {
            *counts.entry(m).or_default() += 1;
        }
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(m, c)| match m {
            Misfit::NotReady => format!("{c} not ready"),
            Misfit::Runtime => format!("{c} lack runtime {}", w.runtime),
            Misfit::Selector => format!("{c} do not match nodeSelector"),
            Misfit::PortInUse => {
                let list: Vec<String> = w.host_ports.iter().map(|p| p.to_string()).collect();
                format!("{c} have port {} in use", list.join(","))
            }
        })
        .collect();
    format!("0/{} nodes available: {}", nodes.len(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, runtimes: &[Runtime], labels: &[(&str, &str)]) -> SchedNode {
        SchedNode {
            name: name.into(),
            ready,
            runtimes: runtimes.to_vec(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn wl(name: &str, replicas: u32, selector: &[(&str, &str)]) -> SchedWorkload {
        SchedWorkload {
            name: name.into(),
            replicas,
            runtime: Runtime::Wasm,
            node_selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            host_ports: vec![],
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
}
