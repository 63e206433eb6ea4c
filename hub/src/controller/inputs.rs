//! The only translation from stored state to the scheduler's types, and the availability
//! rule every consumer shares (the rollout, drains, `get workloads`, `rollout status`).

use std::collections::BTreeMap;

use proto::manifest::{self as pm, Manifest};
use proto::messages::{NodeFacts, Phase, ReplicaStatus};

use crate::scheduler::{self, SchedNode, SchedWorkload};

use super::Node;

/// What the controller needs of a replica's last reported status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Reported {
    pub phase: Phase,
    pub ready: bool,
    /// The template the status describes.
    pub template_hash: String,
}

impl Reported {
    pub fn of(status: &ReplicaStatus) -> Reported {
        Reported { phase: status.phase, ready: status.ready, template_hash: status.template_hash.clone() }
    }
}

/// A replica is *available* when it runs the template it is assigned and reports ready, on a
/// node that is connected now. The one definition: rollouts advance on it, drains spend their
/// budget on it, and the API counts ready replicas with it.
pub fn is_available(reported: &Reported, assigned_hash: &str, node_ready: bool) -> bool {
    node_ready && reported.phase == Phase::Running && reported.ready && reported.template_hash == assigned_hash
}

/// Built-in labels every node carries, usable in node selectors.
pub fn node_labels(name: &str, facts: &NodeFacts) -> BTreeMap<String, String> {
    let mut labels = facts.labels.clone();
    labels.insert("flotilla.dev/node".into(), name.to_string());
    labels.insert("flotilla.dev/os".into(), facts.os.clone());
    labels.insert("flotilla.dev/arch".into(), facts.arch.clone());
    labels
}

/// The scheduler's view of a node. Capacity is the node's CPUs × 1000 millicores and its
/// memory (unknown: no limit); taints come from the agent's `--taint`; cordon and drain from
/// the store; readiness and since when it is NotReady from the shell (see [`super::time`]).
pub fn sched_node(n: &Node) -> SchedNode {
    let unknown_is_unlimited = |v: u64| if v == 0 { u64::MAX } else { v };
    SchedNode {
        name: n.name.clone(),
        ready: n.ready,
        runtimes: n.facts.runtimes.clone(),
        labels: node_labels(&n.name, &n.facts),
        taints: n
            .facts
            .taints
            .iter()
            .map(|t| scheduler::Taint { key: t.key.clone(), value: t.value.clone(), effect: taint_effect(t.effect) })
            .collect(),
        cordoned: n.cordoned || n.draining,
        draining: n.draining,
        allocatable: (n.facts.cpus > 0 || n.facts.memory_bytes > 0).then(|| scheduler::Resources {
            cpu_millis: unknown_is_unlimited(u64::from(n.facts.cpus) * 1000),
            memory_bytes: unknown_is_unlimited(n.facts.memory_bytes),
        }),
        not_ready_since_ms: if n.ready { None } else { n.not_ready_since_ms },
    }
}

fn taint_effect(e: pm::TaintEffect) -> scheduler::TaintEffect {
    match e {
        pm::TaintEffect::NoSchedule => scheduler::TaintEffect::NoSchedule,
        pm::TaintEffect::NoExecute => scheduler::TaintEffect::NoExecute,
    }
}

/// The scheduler's form of a manifest's `spec.job`.
pub fn job_spec(m: &Manifest) -> scheduler::JobSpec {
    let j = m.spec.job.unwrap_or_default();
    scheduler::JobSpec {
        completions: j.completions(),
        parallelism: j.parallelism(),
        backoff_limit: j.backoff_limit(),
        ..Default::default()
    }
}

/// What the scheduler needs of a manifest: everything but the replica template. The rollout's
/// surge and a Job's progress are filled in by the controller.
pub fn sched_workload(m: &Manifest) -> SchedWorkload {
    let s = &m.spec;
    let (cpu_millis, memory_bytes) = s.resources.requests.as_ref().map(|r| r.parsed()).unwrap_or_default();
    SchedWorkload {
        name: m.metadata.name.clone(),
        replicas: s.replicas(),
        surge: 0,
        runtime: s.runtime,
        node_selector: s.node_selector.clone(),
        host_ports: m.template().host_ports(),
        kind: match s.kind {
            pm::WorkloadKind::Replicated => scheduler::WorkloadKind::Replicated,
            pm::WorkloadKind::EveryNode => scheduler::WorkloadKind::EveryNode,
            pm::WorkloadKind::Job => scheduler::WorkloadKind::Job(job_spec(m)),
        },
        os: s.os.clone(),
        arch: s.arch.clone(),
        match_expressions: s
            .node_affinity
            .iter()
            .map(|r| scheduler::SelectorRequirement {
                key: r.key.clone(),
                operator: match r.operator {
                    pm::SelectorOperator::In => scheduler::SelectorOperator::In,
                    pm::SelectorOperator::NotIn => scheduler::SelectorOperator::NotIn,
                    pm::SelectorOperator::Exists => scheduler::SelectorOperator::Exists,
                    pm::SelectorOperator::DoesNotExist => scheduler::SelectorOperator::DoesNotExist,
                },
                values: r.values.clone(),
            })
            .collect(),
        tolerations: s
            .tolerations
            .iter()
            .map(|t| scheduler::Toleration {
                key: t.key.clone(),
                operator: match t.operator {
                    pm::TolerationOperator::Equal => scheduler::TolerationOperator::Equal,
                    pm::TolerationOperator::Exists => scheduler::TolerationOperator::Exists,
                },
                value: t.value.clone(),
                effect: t.effect.map(taint_effect),
            })
            .collect(),
        requests: scheduler::Resources { cpu_millis, memory_bytes },
        spread_by: s.spread_by.clone(),
        packing: match s.packing {
            pm::Packing::LeastAllocated => scheduler::Packing::LeastAllocated,
            pm::Packing::BinPack => scheduler::Packing::BinPack,
        },
        failover: match s.failover.after_ms() {
            None => scheduler::Failover::Never,
            Some(ms) => scheduler::Failover::After(ms),
        },
        // A drain moves replicas one way only (no surge): it needs room for one at least.
        max_unavailable: s.strategy.max_unavailable(s.replicas()).max(1),
        job_progress: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Failover, Packing, WorkloadKind};

    #[test]
    fn manifests_map_to_scheduler_workloads() {
        let yaml = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec:\n  runtime: wasm\n  image: r/w:1\n  kind: EveryNode\n  nodeSelector: {site: a}\n  nodeAffinity: [{key: tier, operator: NotIn, values: [lab]}]\n  tolerations: [{key: k, value: v, effect: NoExecute}]\n  os: linux\n  arch: x86_64\n  resources: {requests: {cpu: 250m, memory: 64Mi}}\n  spreadBy: site\n  packing: binPack\n  failover: {after: 10s}\n  strategy: {maxUnavailable: 3}\n";
        let m = proto::manifest::parse_manifests(yaml).unwrap().remove(0);
        let w = sched_workload(&m);
        assert_eq!(w.kind, WorkloadKind::EveryNode);
        assert_eq!(w.node_selector.get("site").map(String::as_str), Some("a"));
        assert_eq!(w.match_expressions[0].operator, scheduler::SelectorOperator::NotIn);
        assert_eq!(w.tolerations[0].effect, Some(scheduler::TaintEffect::NoExecute));
        assert_eq!((w.os.as_deref(), w.arch.as_deref()), (Some("linux"), Some("x86_64")));
        assert_eq!(w.requests, scheduler::Resources { cpu_millis: 250, memory_bytes: 64 << 20 });
        assert_eq!(w.spread_by.as_deref(), Some("site"));
        assert_eq!(w.packing, Packing::BinPack);
        assert_eq!(w.failover, Failover::After(10_000));
        assert_eq!(w.max_unavailable, 3);
        let plain = proto::manifest::parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: p}\nspec: {runtime: wasm, image: r/p:1, replicas: 8}\n",
        )
        .unwrap()
        .remove(0);
        let w = sched_workload(&plain);
        assert_eq!(
            (w.kind, w.replicas, w.surge, w.failover, w.max_unavailable),
            (WorkloadKind::Replicated, 8, 0, Failover::Never, 2)
        );
    }

    #[test]
    fn nodes_map_to_scheduler_nodes() {
        let facts = NodeFacts {
            os: "linux".into(),
            arch: "aarch64".into(),
            cpus: 4,
            memory_bytes: 0,
            taints: vec![pm::Taint { key: "k".into(), value: "v".into(), effect: pm::TaintEffect::NoExecute }],
            ..Default::default()
        };
        let n = Node {
            name: "gw".into(),
            facts,
            cordoned: false,
            draining: true,
            ready: false,
            not_ready_since_ms: Some(42),
        };
        let s = sched_node(&n);
        assert!(s.cordoned && s.draining && !s.ready);
        assert_eq!(s.not_ready_since_ms, Some(42));
        assert_eq!(s.labels.get("flotilla.dev/arch").map(String::as_str), Some("aarch64"));
        assert_eq!(s.labels.get("flotilla.dev/node").map(String::as_str), Some("gw"));
        assert_eq!(s.allocatable, Some(scheduler::Resources { cpu_millis: 4000, memory_bytes: u64::MAX }));
        assert_eq!(s.taints[0].effect, scheduler::TaintEffect::NoExecute);
        // Ready: never NotReady-since, whatever the shell passed.
        let s = sched_node(&Node { ready: true, ..n });
        assert_eq!(s.not_ready_since_ms, None);
    }

    #[test]
    fn only_a_ready_replica_on_its_template_and_a_connected_node_is_available() {
        let r = Reported { phase: Phase::Running, ready: true, template_hash: "t1".into() };
        assert!(is_available(&r, "t1", true));
        assert!(!is_available(&r, "t1", false), "a node that is not connected");
        assert!(!is_available(&r, "t2", true), "a status for an older template");
        assert!(!is_available(&Reported { ready: false, ..r.clone() }, "t1", true));
        assert!(!is_available(&Reported { phase: Phase::Succeeded, ..r }, "t1", true));
    }
}
