//! The fleet simulator (`flotilla sim`), test-sized so it cannot rot: 60 simulated nodes from
//! three source addresses join a real hub, connect, sit idle for a moment, and take an
//! EveryNode workload, reporting each replica Running; the hub sees all of them Ready and the
//! workload 60/60 ready. The measured runs are in BENCHMARKS.md ("Fleet scale").

#[path = "support/cluster.rs"]
mod cluster;

use std::time::Duration;

use cluster::Cluster;

#[test]
fn simulated_nodes_join_connect_and_run_an_every_node_workload() {
    let c = Cluster::start();
    let manifest = c.dir.path().join("every.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: tick\nspec:\n  runtime: wasm\n  image: registry.invalid/tick:1\n  kind: EveryNode\n",
    )
    .unwrap();
    let hub_pid = c.hub.child.id().to_string();
    let out = cluster::flotilla(&[
        "sim",
        "--hub",
        &c.hub_addr,
        "--token-file",
        c.token_path().to_str().unwrap(),
        "--agents",
        "60",
        "--per-address",
        "20",
        "--idle",
        "2s",
        "--run-delay",
        "100ms",
        "--wait",
        "60s",
        "--apply",
        manifest.to_str().unwrap(),
        "--config",
        c.config_path().to_str().unwrap(),
        "--hub-pid",
        &hub_pid,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "sim: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("all 60 connected"), "{text}");
    assert!(text.contains("60 replicas reported Running"), "{text}");
    assert!(text.contains("per node") && text.contains("kbit/s"), "{text}");
    assert!(text.contains("hub RSS"), "{text}");
    // The hub's view agrees: 60 nodes Ready, the workload 60/60 ready, from 3 addresses.
    c.wait_for("the hub to see every replica ready", Duration::from_secs(30), || {
        c.workloads().iter().any(|w| w.ready_replicas == 60 && w.desired_replicas == 60)
    });
    assert_eq!(c.nodes().len(), 60);
    let log = c.hub.log_text();
    for a in ["127.1.0.1", "127.1.0.2", "127.1.0.3"] {
        assert!(log.contains(a), "no connection from {a} in the hub log");
    }
}
