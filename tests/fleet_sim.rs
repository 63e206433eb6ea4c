//! The fleet simulator (`flotilla sim`), test-sized so it cannot rot: 60 simulated nodes from
//! three source addresses join a real hub, connect, sit idle for a moment, and take an
//! EveryNode workload, reporting each replica Running; the hub sees all of them Ready and the
//! workload 60/60 ready. A second run takes the same kind of fleet through every mode: a
//! rolling update at `maxUnavailable: 10%`, links cut and restored, and the hub SIGKILLed and
//! restarted. The measured runs are in BENCHMARKS.md ("Fleet scale").

#[path = "support/cluster.rs"]
mod cluster;

use std::path::Path;
use std::time::Duration;

use cluster::Cluster;

/// An EveryNode workload `tick` running `image`, with `strategy` lines appended to its spec.
fn every_node(image: &str, strategy: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: tick\nspec:\n  runtime: wasm\n  image: {image}\n  kind: EveryNode\n{strategy}"
    )
}

/// `flotilla sim` with `agents` nodes against `c`'s hub, 20 to an address, replicas Running
/// 100 ms after they arrive, each phase bounded at 60 s, applying `manifest`, with `extra`
/// flags; its output, once it succeeded.
fn sim(c: &Cluster, agents: &str, manifest: &Path, extra: &[&str]) -> String {
    let hub_pid = c.hub.child.id().to_string();
    let token = c.token_path();
    let config = c.config_path();
    let mut args = vec![
        "sim",
        "--hub",
        &c.hub_addr,
        "--token-file",
        token.to_str().unwrap(),
        "--agents",
        agents,
        "--per-address",
        "20",
        "--run-delay",
        "100ms",
        "--wait",
        "60s",
        "--apply",
        manifest.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--hub-pid",
        &hub_pid,
    ];
    args.extend_from_slice(extra);
    let out = cluster::flotilla(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    assert!(out.status.success(), "sim: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn simulated_nodes_join_connect_and_run_an_every_node_workload() {
    let c = Cluster::start();
    let manifest = c.dir.path().join("every.yaml");
    std::fs::write(&manifest, every_node("registry.invalid/tick:1", "")).unwrap();
    let text = sim(&c, "60", &manifest, &["--idle", "2s"]);
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

#[test]
fn the_simulator_times_a_rolling_update_cut_links_and_a_hub_restart() {
    let c = Cluster::start();
    let (first, second) = (c.dir.path().join("every.yaml"), c.dir.path().join("update.yaml"));
    std::fs::write(&first, every_node("registry.invalid/tick:1", "")).unwrap();
    std::fs::write(&second, every_node("registry.invalid/tick:2", "  strategy: {maxUnavailable: 10%}\n")).unwrap();
    // The restart runs the hub as the cluster started it: same data dir, address and CIDR.
    let restart = format!(
        "exec {} hub --data-dir {} --listen {} --cluster-cidr {} >>{} 2>&1",
        cluster::bin(),
        c.hub_dir().display(),
        c.hub_addr,
        cluster::test_cluster_cidr(c.dir.path()),
        c.dir.path().join("hub-restarted.log").display()
    );
    let text = sim(
        &c,
        "40",
        &first,
        &[
            "--first-address",
            "127.1.1.1",
            "--idle",
            "1s",
            "--update",
            second.to_str().unwrap(),
            "--drop-links",
            "4",
            "--drop-for",
            "1s",
            "--restart-hub",
            &restart,
        ],
    );
    assert!(text.contains("rolling update answered"), "{text}");
    assert_eq!(text.matches("40 replicas reported Running").count(), 2, "{text}");
    assert!(text.contains("all 4 cut nodes NotReady at the hub"), "{text}");
    assert!(text.contains("all 4 nodes Ready again"), "{text}");
    // Nothing a node runs is started again by a hub restart.
    assert!(text.contains("all 40 reconnected") && text.contains("0 replicas started again"), "{text}");
    assert!(text.contains("peak RSS"), "{text}");
}
