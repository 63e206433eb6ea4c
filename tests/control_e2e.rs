//! Scheduling controls end to end: EveryNode workloads following node labels, failover of a
//! node cut off from the hub (and fencing of the old copy when it returns), and cordon/drain
//! through the CLI, Jobs. Real hub and agent processes, every agent in a network namespace of
//! its own (root, iproute2; the failover test cuts one), Wasm replicas pulled from a real
//! registry (Debian's docker-registry) over the agents' links. Without them the tests say why
//! and skip, unless `CI` is set.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::Cluster;
use proto::messages::{Phase, ReplicaView};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// The QUIC idle timeout after which the hub sees a silent agent as gone (transport's
/// `Tuning::default()`): the "heartbeat grace" a failover deadline comes on top of.
const HEARTBEAT_GRACE: Duration = Duration::from_secs(8);

/// A Wasm workload running the tick module (a line every 200 ms); `extra` is more `spec`
/// lines, each indented by two spaces.
fn tick(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: wasm\n  image: {image}\n  args: [\"--interval-ms\", \"200\"]\n  env: {{GREETING: tick}}\n{extra}"
    )
}

fn push_tick(reg: &TestRegistry) {
    let wasm = cluster::example_wasm();
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), reg.reference("tick:v1").as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
}

fn apply(c: &Cluster, docs: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(docs));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

/// Replica name → node, for one workload.
fn placements(c: &Cluster, workload: &str) -> BTreeMap<String, Option<String>> {
    c.replicas().into_iter().filter(|r| r.workload == workload).map(|r| (r.name, r.node)).collect()
}

fn running(r: &ReplicaView) -> bool {
    r.status.phase == Phase::Running && r.status.template_hash == r.template_hash
}

fn replica(c: &Cluster, name: &str) -> Option<ReplicaView> {
    c.replicas().into_iter().find(|r| r.name == name)
}

fn running_on(c: &Cluster, name: &str, node: &str) -> bool {
    replica(c, name).is_some_and(|r| r.node.as_deref() == Some(node) && running(&r))
}

fn nodes_ready(c: &Cluster, n: usize) -> bool {
    c.nodes().iter().filter(|n| n.ready).count() == n
}

/// Lines a replica printed into its log file on `node`'s disk.
fn tick_lines(c: &Cluster, node: &str, replica: &str) -> usize {
    let path = c.agent_dir(node).join("logs").join(format!("{replica}.log"));
    std::fs::read_to_string(path).map(|t| t.lines().filter(|l| l.contains("tick #")).count()).unwrap_or(0)
}

#[test]
fn every_node_workload_follows_its_selector_and_tolerations_onto_nodes_that_join_later() {
    let Some(mut s) = Sites::start(6) else { return };
    let image = s.image();
    s.add_agent(0, "edge-1", &["--label", "role=edge"]);
    s.add_agent(1, "edge-2", &["--label", "role=edge"]);
    s.add_agent(2, "core-1", &["--label", "role=core"]);
    s.c.wait_for("3 nodes Ready", WAIT, || nodes_ready(&s.c, 3));

    apply(&s.c, &tick("tick", &image, "  kind: EveryNode\n  nodeSelector: {role: edge}\n"));
    s.c.wait_for("tick on both edge nodes", WAIT, || {
        running_on(&s.c, "tick-edge-1", "edge-1") && running_on(&s.c, "tick-edge-2", "edge-2")
    });
    let expected: BTreeMap<String, Option<String>> =
        [("tick-edge-1", "edge-1"), ("tick-edge-2", "edge-2")].map(|(r, n)| (r.into(), Some(n.into()))).into();
    assert_eq!(placements(&s.c, "tick"), expected, "exactly one replica per matching node");
    let w = s.c.workloads().into_iter().find(|w| w.manifest.metadata.name == "tick").unwrap();
    assert_eq!(w.desired_replicas, 2);
    let table = s.c.ok(&["get", "workloads"]);
    assert!(table.lines().any(|l| l.starts_with("tick") && l.contains("2/2")), "{table}");

    // A matching node that joins later gets its replica within seconds; a non-matching one
    // never, nor a matching one with a taint the workload does not tolerate.
    s.add_agent(3, "edge-3", &["--label", "role=edge"]);
    s.add_agent(4, "core-2", &["--label", "role=core"]);
    s.add_agent(5, "edge-t", &["--label", "role=edge", "--taint", "dedicated=lab:NoSchedule"]);
    let joined = Instant::now();
    s.c.wait_for("6 nodes Ready", WAIT, || nodes_ready(&s.c, 6));
    let ready_after = joined.elapsed();
    let took = cluster::time_until(WAIT, POLL, || running_on(&s.c, "tick-edge-3", "edge-3"))
        .unwrap_or_else(|| panic!("edge-3 never ran tick: {:?}", placements(&s.c, "tick")));
    eprintln!("edge-3 Ready {ready_after:?} after its agent started; its replica Running {took:?} later");
    assert!(took < Duration::from_secs(15), "edge-3's replica took {took:?}");
    // Let a few reconcile passes go by: still nothing on the core nodes or the tainted one.
    std::thread::sleep(Duration::from_secs(6));
    let now = placements(&s.c, "tick");
    let want: Vec<&str> = vec!["tick-edge-1", "tick-edge-2", "tick-edge-3"];
    assert_eq!(now.keys().map(String::as_str).collect::<Vec<_>>(), want, "{now:?}");
    for (node, replica) in [("core-1", "tick-core-1"), ("core-2", "tick-core-2"), ("edge-t", "tick-edge-t")] {
        assert_eq!(tick_lines(&s.c, node, replica), 0, "{node} ran tick");
    }
    let described = s.c.ok(&["describe", "node", "edge-t"]);
    assert!(described.contains("Taint:        dedicated=lab:NoSchedule"), "{described}");

    // Tolerating the taint places a replica there, and restarts none of the others: placement
    // fields are not part of the replica template.
    let before: BTreeMap<String, (String, u32)> =
        s.c.replicas()
            .into_iter()
            .filter(|r| r.workload == "tick")
            .map(|r| (r.name, (r.template_hash, r.status.restarts)))
            .collect();
    let lines_before = tick_lines(&s.c, "edge-1", "tick-edge-1");
    apply(
        &s.c,
        &tick(
            "tick",
            &image,
            "  kind: EveryNode\n  nodeSelector: {role: edge}\n  tolerations: [{key: dedicated, operator: Exists}]\n",
        ),
    );
    s.c.wait_for("tick on the tainted node", WAIT, || running_on(&s.c, "tick-edge-t", "edge-t"));
    for r in s.c.replicas().into_iter().filter(|r| before.contains_key(&r.name)) {
        assert_eq!(before[&r.name], (r.template_hash.clone(), r.status.restarts), "{} changed", r.name);
        assert!(running(&r), "{} stopped", r.name);
    }
    let log = std::fs::read_to_string(s.c.agent_dir("edge-1").join("logs/tick-edge-1.log")).unwrap_or_default();
    assert!(tick_lines(&s.c, "edge-1", "tick-edge-1") > lines_before, "tick-edge-1 stopped writing");
    assert!(!log.lines().skip(lines_before).any(|l| l.contains("tick #1 ")), "tick-edge-1 started over:\n{log}");
}

/// Agents each in a network namespace of their own (`ns[i]`), a hub listening on all
/// addresses, the registry forwarded on the last namespace's host-side address (tests cut
/// the other links, never that one). Dropped in field order: the hub and agents (killed), the
/// data dir, the forwarder, the namespaces, the registry.
struct Sites {
    c: Cluster,
    fwd: netns::TcpForward,
    ns: Vec<netns::Netns>,
    _reg: TestRegistry,
    port: u16,
}

impl Sites {
    /// `n` namespaces, or `None` (after saying why) without root/iproute2 or the registry.
    fn start(n: usize) -> Option<Sites> {
        if !netns::netns_possible() {
            return None;
        }
        let reg = TestRegistry::start()?;
        push_tick(&reg);
        let ns: Vec<netns::Netns> = (0..n.max(1)).map(|_| netns::Netns::create()).collect();
        let reg_addr: SocketAddr = reg.addr.parse().unwrap();
        let fwd = netns::TcpForward::start(ns[ns.len() - 1].host_ip(), reg_addr);
        let port = cluster::free_udp_port();
        let c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
        Some(Sites { c, fwd, ns, _reg: reg, port })
    }

    fn image(&self) -> String {
        format!("{}/tick:v1", self.fwd.addr)
    }

    /// Starts agent `name` inside `ns[i]`.
    fn add_agent(&mut self, i: usize, name: &str, extra: &[&str]) {
        let ns = &self.ns[i];
        let (prefix, hub) = (ns.exec_prefix(), format!("{}:{}", ns.host_ip(), self.port));
        let registry = self.fwd.addr.to_string();
        let mut args = vec!["--insecure-registry", registry.as_str()];
        args.extend_from_slice(extra);
        self.c.add_agent_via(&prefix, &hub, name, &args);
    }
}

#[test]
fn failover_moves_a_replica_off_a_cut_node_and_fences_it_when_the_node_returns() {
    let Some(mut s) = Sites::start(2) else { return };
    // Only site-a exists when the workloads are applied, so both start there.
    s.add_agent(0, "site-a", &[]);
    s.c.wait_for("site-a Ready", WAIT, || nodes_ready(&s.c, 1));
    let image = s.image();
    let docs = format!(
        "{}---\n{}",
        tick("mover", &image, "  failover: {after: 10s}\n"),
        tick("pinned", &image, "  failover: never\n")
    );
    apply(&s.c, &docs);
    s.c.wait_for("both replicas Running on site-a", WAIT, || {
        running_on(&s.c, "mover-0", "site-a") && running_on(&s.c, "pinned-0", "site-a")
    });
    s.add_agent(1, "site-b", &[]);
    s.c.wait_for("site-b Ready", WAIT, || nodes_ready(&s.c, 2));
    assert!(running_on(&s.c, "mover-0", "site-a"), "a node joining moved nothing");

    s.ns[0].cut();
    let cut = Instant::now();
    let detected = cluster::time_until(Duration::from_secs(30), POLL, || {
        !s.c.nodes().iter().any(|n| n.name == "site-a" && n.ready)
    })
    .expect("the hub still sees site-a Ready 30 s after the cut");
    let limit = Duration::from_secs(10) + HEARTBEAT_GRACE + Duration::from_secs(4);
    let moved = cluster::time_until(limit + Duration::from_secs(20), POLL, || {
        replica(&s.c, "mover-0").is_some_and(|r| r.node.as_deref() == Some("site-b"))
    })
    .map(|_| cut.elapsed())
    .unwrap_or_else(|| panic!("mover-0 was not moved off the cut node: {:?}", s.c.replicas()));
    eprintln!(
        "failover: site-a seen NotReady {detected:?} after the cut; mover-0 reassigned to site-b {moved:?} after the cut ({:?} after NotReady; failover after 10s)",
        moved.saturating_sub(detected)
    );
    assert!(moved >= Duration::from_secs(10), "moved before its failover delay: {moved:?}");
    assert!(moved <= limit, "failover took {moved:?}, more than 10 s + {HEARTBEAT_GRACE:?} heartbeat grace + slack");
    s.c.wait_for("mover-0 Running on site-b", WAIT, || running_on(&s.c, "mover-0", "site-b"));
    let pinned = replica(&s.c, "pinned-0").unwrap();
    assert_eq!(pinned.node.as_deref(), Some("site-a"), "the failover: never replica left the cut node");
    assert_eq!(pinned.status.phase, Phase::Unknown);
    // The cut node keeps running both copies meanwhile: the edge runs through partitions.
    let (m, p) = (tick_lines(&s.c, "site-a", "mover-0"), tick_lines(&s.c, "site-a", "pinned-0"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(tick_lines(&s.c, "site-a", "pinned-0") > p, "pinned-0 stopped on the cut node");
    assert!(tick_lines(&s.c, "site-a", "mover-0") > m, "mover-0 stopped on the cut node before it heard of the move");

    // The link returns: the old copy is fenced, the pinned one keeps running untouched.
    s.ns[0].restore();
    s.c.wait_for("site-a Ready again", WAIT, || nodes_ready(&s.c, 2));
    s.c.wait_for("site-a acknowledged its new assignment set", WAIT, || {
        s.c.nodes().iter().any(|n| n.name == "site-a" && n.acked_generation == n.generation)
    });
    let stopped = cluster::time_until(Duration::from_secs(20), POLL, || {
        let before = tick_lines(&s.c, "site-a", "mover-0");
        std::thread::sleep(Duration::from_millis(1500));
        tick_lines(&s.c, "site-a", "mover-0") == before
    });
    assert!(stopped.is_some(), "the fenced copy of mover-0 still writes its log on site-a");
    let on_a: Vec<String> =
        s.c.replicas().into_iter().filter(|r| r.node.as_deref() == Some("site-a")).map(|r| r.name).collect();
    assert_eq!(on_a, ["pinned-0"], "the hub's view of site-a");
    assert!(running_on(&s.c, "mover-0", "site-b"));
    s.c.wait_for("pinned-0 Running on site-a", WAIT, || running_on(&s.c, "pinned-0", "site-a"));
    let pinned = replica(&s.c, "pinned-0").unwrap();
    assert_eq!(pinned.status.restarts, 0, "pinned-0 was restarted: {pinned:?}");
    let p = tick_lines(&s.c, "site-a", "pinned-0");
    std::thread::sleep(Duration::from_secs(1));
    assert!(tick_lines(&s.c, "site-a", "pinned-0") > p, "pinned-0 stopped after the link returned");
}

#[test]
fn drain_moves_replicas_within_max_unavailable_and_uncordon_allows_placement_again() {
    let Some(mut s) = Sites::start(3) else { return };
    let image = s.image();
    s.add_agent(0, "n1", &[]);
    s.c.wait_for("n1 Ready", WAIT, || nodes_ready(&s.c, 1));
    apply(&s.c, &tick("web", &image, "  replicas: 2\n  strategy: {maxUnavailable: 1}\n"));
    s.c.wait_for("both web replicas Running on n1", WAIT, || {
        running_on(&s.c, "web-0", "n1") && running_on(&s.c, "web-1", "n1")
    });
    s.add_agent(1, "n2", &[]);
    s.add_agent(2, "n3", &[]);
    s.c.wait_for("3 nodes Ready", WAIT, || nodes_ready(&s.c, 3));

    // Drain n1 through the CLI while watching how many web replicas are unavailable.
    let mut drain = std::process::Command::new(cluster::bin())
        .arg("--config")
        .arg(s.c.config_path())
        .args(["drain", "n1", "--timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut most_unavailable = 0;
    let status = loop {
        if let Some(st) = drain.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "flotilla drain did not return");
        let web: Vec<ReplicaView> = s.c.replicas().into_iter().filter(|r| r.workload == "web").collect();
        let unavailable = web.iter().filter(|r| !(running(r) && r.status.ready)).count();
        most_unavailable = most_unavailable.max(unavailable);
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = drain.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "drain failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    eprintln!("drain took {:?}:\n{stdout}", start.elapsed());
    assert!(stdout.contains("node/n1 draining: 2 replicas left"), "{stdout}");
    assert!(stdout.contains("node/n1 drained"), "{stdout}");
    assert!(most_unavailable <= 1, "{most_unavailable} web replicas were unavailable at once (maxUnavailable 1)");
    let web = placements(&s.c, "web");
    assert!(web.values().all(|n| matches!(n.as_deref(), Some("n2" | "n3"))), "{web:?}");
    s.c.wait_for("web Running on n2/n3", WAIT, || {
        s.c.replicas().iter().filter(|r| r.workload == "web").all(|r| running(r) && r.node.as_deref() != Some("n1"))
    });
    let nodes = s.c.ok(&["get", "nodes"]);
    assert!(nodes.lines().any(|l| l.starts_with("n1 ") && l.contains("Ready,SchedulingDisabled")), "{nodes}");
    assert!(s.c.ok(&["describe", "node", "n1"]).contains("Draining:     true (0 replicas left to move)"));

    // Cordoned: a workload pinned to n1 waits, with the reason; uncordoned, it runs there.
    apply(&s.c, &tick("pin", &image, "  nodeSelector: {flotilla.dev/node: n1}\n"));
    s.c.wait_for("pin-0 unschedulable", WAIT, || {
        replica(&s.c, "pin-0").is_some_and(|r| r.node.is_none() && r.unschedulable.contains("1 cordoned"))
    });
    let out = s.c.ok(&["uncordon", "n1"]);
    assert!(out.contains("node/n1 uncordoned"), "{out}");
    s.c.wait_for("pin-0 Running on n1", WAIT, || running_on(&s.c, "pin-0", "n1"));
    let nodes = s.c.ok(&["get", "nodes"]);
    assert!(nodes.lines().any(|l| l.starts_with("n1 ") && !l.contains("SchedulingDisabled")), "{nodes}");

    // A plain cordon keeps what runs, and an unknown node is an error.
    let before = placements(&s.c, "web");
    let out = s.c.ok(&["cordon", "n2"]);
    assert!(out.contains("node/n2 cordoned"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(placements(&s.c, "web"), before, "a cordon moved replicas");
    let bad = s.c.cli(&["drain", "nope", "--timeout", "1s"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("node \"nope\" not found"), "{bad:?}");
}

#[test]
fn a_job_runs_its_indexes_to_completion_and_a_failing_one_stops_at_its_backoff_limit() {
    let Some(mut s) = Sites::start(2) else { return };
    let image = s.image();
    s.add_agent(0, "j1", &[]);
    s.add_agent(1, "j2", &[]);
    s.c.wait_for("2 nodes Ready", WAIT, || nodes_ready(&s.c, 2));
    let job = |name: &str, args: &str, job: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: wasm\n  image: {image}\n  args: {args}\n  env: {{GREETING: tick}}\n  kind: Job\n  job: {job}\n"
        )
    };
    apply(
        &s.c,
        &format!(
            "{}---\n{}",
            job("batch", "[\"--interval-ms\", \"300\", \"--count\", \"3\"]", "{completions: 4, parallelism: 2}"),
            job(
                "broken",
                "[\"--count\", \"1\", \"--exit-code\", \"3\", \"--interval-ms\", \"50\"]",
                "{backoffLimit: 1}"
            )
        ),
    );
    let view = |name: &str| s.c.workloads().into_iter().find(|w| w.manifest.metadata.name == name).and_then(|w| w.job);
    let start = Instant::now();
    let mut most_active = 0;
    while view("batch").is_none_or(|j| j.phase != "Complete") {
        assert!(start.elapsed() < WAIT, "batch did not complete: {:?}\n{:?}", view("batch"), s.c.replicas());
        let attempts = s.c.replicas().iter().filter(|r| r.workload == "batch" && r.node.is_some()).count();
        most_active = most_active.max(attempts);
        std::thread::sleep(POLL);
    }
    let batch = view("batch").unwrap();
    eprintln!("batch completed in {:?}: {batch:?}", start.elapsed());
    assert_eq!((batch.succeeded, batch.completions, batch.failed), (4, 4, 0));
    assert!((1..=2).contains(&most_active), "{most_active} attempts at once with parallelism 2");
    let table = s.c.ok(&["get", "workloads"]);
    assert!(table.lines().any(|l| l.starts_with("batch") && l.contains("4/4 Complete")), "{table}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(s.c.replicas().iter().all(|r| r.workload != "batch"), "a completed job runs nothing: {:?}", s.c.replicas());

    // Each attempt exits 3: retried once after its back-off (10 s), then the job fails.
    s.c.wait_for("broken to fail", Duration::from_secs(60), || view("broken").is_some_and(|j| j.phase == "Failed"));
    let broken = view("broken").unwrap();
    assert_eq!((broken.succeeded, broken.failed), (0, 2), "{broken:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(s.c.replicas().iter().all(|r| r.workload != "broken"), "a failed job runs nothing");
    assert_eq!(view("broken").unwrap().failed, 2, "no attempt after the job failed");
    assert!(s.c.ok(&["describe", "workload", "broken"]).contains("Job:            Failed (0/1 succeeded, 2 failed"));
}
