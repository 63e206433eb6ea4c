//! Scheduler throughput: places 100 workloads × 1,000 replicas (selectors, expressions,
//! tolerations, requests, spread over 1,000 sites) onto 10,000 nodes (some tainted, cordoned
//! or NotReady, varied capacity) from an empty state, then re-runs on the placed state (what
//! the controller does on every change) and after one workload scales up. Prints the median of
//! several rounds. Run with `cargo bench -p flotilla-hub --bench scheduler`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_hub::scheduler::{
    Decisions, Observed, Packing, Placement, Resources, SchedNode, SchedWorkload, SelectorOperator,
    SelectorRequirement, Taint, TaintEffect, Toleration, TolerationOperator, schedule_at,
};
use proto::manifest::Runtime;

const NODES: usize = 10_000;
const WORKLOADS: usize = 100;
const REPLICAS: u32 = 1_000;
const ROUNDS: usize = 5;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn nodes() -> Vec<SchedNode> {
    (0..NODES)
        .map(|i| {
            let site = i % 1_000;
            let mut labels = BTreeMap::new();
            labels.insert("site".to_string(), format!("s{site}"));
            labels.insert("zone".to_string(), format!("z{}", site % 20));
            labels.insert("role".to_string(), ["edge", "gateway", "compute"][i % 3].to_string());
            labels.insert("flotilla.dev/os".to_string(), "linux".to_string());
            let arch = if i % 10 == 0 { "aarch64" } else { "x86_64" };
            labels.insert("flotilla.dev/arch".to_string(), arch.to_string());
            if i % 7 == 0 {
                labels.insert("gpu".to_string(), "true".to_string());
            }
            let runtimes = if i % 10 < 7 { vec![Runtime::Wasm, Runtime::Container] } else { vec![Runtime::Wasm] };
            let taints = if i % 50 == 0 {
                vec![Taint { key: "dedicated".into(), value: "gpu".into(), effect: TaintEffect::NoSchedule }]
            } else {
                vec![]
            };
            SchedNode {
                name: format!("node-{i:05}"),
                ready: i % 100 != 99,
                runtimes,
                labels,
                taints,
                cordoned: i % 200 == 1,
                allocatable: Some(Resources {
                    cpu_millis: 4_000 + (i as u64 % 4) * 4_000,
                    memory_bytes: (8 + (i as u64 % 4) * 8) * GIB,
                }),
                ..Default::default()
            }
        })
        .collect()
}

fn workloads(replicas: u32) -> Vec<SchedWorkload> {
    (0..WORKLOADS)
        .map(|j| {
            let mut w = SchedWorkload {
                name: format!("app-{j:03}"),
                replicas,
                runtime: if j % 10 < 3 { Runtime::Container } else { Runtime::Wasm },
                requests: Resources {
                    cpu_millis: 10 + (j as u64 % 5) * 10,
                    memory_bytes: (32 + (j as u64 % 4) * 32) * MIB,
                },
                ..Default::default()
            };
            match j % 4 {
                0 => {
                    w.node_selector.insert("role".into(), "edge".into());
                }
                1 => w.match_expressions.push(SelectorRequirement {
                    key: "zone".into(),
                    operator: SelectorOperator::In,
                    values: (0..10).map(|z| format!("z{z}")).collect(),
                }),
                2 => w.match_expressions.push(SelectorRequirement {
                    key: "role".into(),
                    operator: SelectorOperator::NotIn,
                    values: vec!["compute".into()],
                }),
                _ => w.match_expressions.push(SelectorRequirement {
                    key: "gpu".into(),
                    operator: SelectorOperator::DoesNotExist,
                    values: vec![],
                }),
            }
            if j % 5 == 0 {
                w.arch = Some("x86_64".into());
            }
            if j % 8 == 0 {
                w.tolerations.push(Toleration {
                    key: "dedicated".into(),
                    operator: TolerationOperator::Exists,
                    ..Default::default()
                });
            }
            if j % 5 != 4 {
                w.spread_by = Some("site".into());
            }
            if j % 6 == 5 {
                w.packing = Packing::BinPack;
            }
            if j % 9 == 0 {
                w.host_ports =
                    vec![proto::manifest::HostPort { port: 8000 + j as u16, protocol: proto::manifest::Protocol::Tcp }];
            }
            w
        })
        .collect()
}

/// Median duration of `ROUNDS` runs of `f`, and its last result.
fn measure(mut f: impl FnMut() -> Decisions) -> (Duration, Decisions) {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut last = Decisions::default();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        last = f();
        times.push(start.elapsed());
    }
    times.sort();
    (times[ROUNDS / 2], last)
}

fn placed(d: &Decisions) -> usize {
    d.placements.iter().filter(|p| p.node.is_some()).count()
}

fn report(case: &str, time: Duration, replicas: usize) {
    let rate = replicas as f64 / time.as_secs_f64();
    println!("{case:<40} median {:>9.1} ms   {rate:>12.0} replicas/s", time.as_secs_f64() * 1e3);
}

fn main() {
    let nodes = nodes();
    let ws = workloads(REPLICAS);
    let empty: Vec<Placement> = Vec::new();

    let (t, first) = measure(|| schedule_at(&nodes, &ws, &empty, &Observed::default()));
    println!(
        "{} nodes, {} workloads, {} replicas: {} placed, {} unschedulable",
        nodes.len(),
        ws.len(),
        first.placements.len(),
        placed(&first),
        first.unschedulable.len()
    );
    report("from empty", t, placed(&first));

    let observed = Observed::all_ready(&first.placements);
    let (t, again) = measure(|| schedule_at(&nodes, &ws, &first.placements, &observed));
    assert!(again == first, "re-running on the placed state changed decisions");
    report("re-run on placed state (no change)", t, again.placements.len());

    let mut scaled = ws.clone();
    scaled[0].replicas += 100;
    let (t, more) = measure(|| schedule_at(&nodes, &scaled, &first.placements, &observed));
    report("re-run after one workload +100", t, more.placements.len());
}
