//! Node identity end to end: the real `flotilla hub` and agents on loopback, a real registry
//! (Debian's docker-registry) and wasmtime running the example module.
//!
//! - A join under an existing node's name is refused, even with the cluster token, and the
//!   real node's replica is not restarted while the impostor tries.
//! - Tokens admit only the names they match, as often as they allow, and give their labels;
//!   a label an agent claims in the hub's reserved namespace is ignored; a revoked token
//!   admits nobody.
//! - A deleted node's agent is told so, stops retrying, and cannot come back on its old
//!   certificate; its replica runs elsewhere.
//! - A hub whose store was deleted and made anew stops nothing on its nodes.
//! - An assignment set larger than a frame (20 MB) reaches its node.
//! - The hub's serving certificate renews while the hub runs, cutting no agent link.
//! - Node certificates that last a minute renew over the link several times with no replica
//!   restart and no NotReady, and an agent that was offline past its certificate's expiry
//!   renews it within the hub's grace and comes back.
//!
//! Needs `/usr/bin/docker-registry` and the wasm32-wasip1 target (`scripts/install-deps.sh`);
//! without the registry the tests skip and say why, except under CI (`CI` set), where they
//! fail. Run under the e2e lock: `flock /tmp/flotilla-e2e.lock cargo test --test identity_e2e`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::{Cluster, Proc};
use proto::messages::{NodeView, Phase, ReplicaView, TokenView};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(30);
const RESERVED: &str = "node-restriction.flotilla.dev/";

fn manifest(name: &str, image: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: wasm\n  image: {image}\n  replicas: {replicas}\n{extra}"
    )
}

fn push_hello(reg: &TestRegistry) -> String {
    let reference = reg.reference("hello:v1");
    let wasm = cluster::example_wasm();
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
    reference
}

fn apply(c: &Cluster, yaml: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn running(c: &Cluster, workload: &str) -> Vec<ReplicaView> {
    c.replicas().into_iter().filter(|r| r.workload == workload && r.status.phase == Phase::Running).collect()
}

fn node(c: &Cluster, name: &str) -> Option<NodeView> {
    c.nodes().into_iter().find(|n| n.name == name)
}

/// Starts an agent named `name` on data dir `data`, joining with the token in `token`
/// (none: the saved identity only). Its log is `<log>.log` in the cluster dir.
fn agent(c: &Cluster, name: &str, data: &Path, token: Option<&Path>, log: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["agent", "--hub", &c.hub_addr, "--name", name, "--data-dir", data.to_str().unwrap()];
    if let Some(t) = token {
        args.extend(["--token-file", t.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    Proc::spawn(&format!("agent {name} ({log})"), &args, c.dir.path().join(format!("{log}.log")))
}

/// Creates a token with `args` (after `token create`) and writes it to a file.
fn create_token(c: &Cluster, file: &str, args: &[&str]) -> PathBuf {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let token = c.ok(&all);
    assert!(token.trim().starts_with("FLT1::"), "a token pinning the CA: {token}");
    let path = c.dir.path().join(file);
    std::fs::write(&path, token.trim()).unwrap();
    path
}

/// An agent that must give up: it exits unsuccessfully within `WAIT` with `needle` in its log.
fn refused(p: &mut Proc, needle: &str) {
    let status = p.wait_exit(WAIT).unwrap_or_else(|| panic!("{} gives up\n{}", p.name, p.log_text()));
    assert!(!status.success(), "{} exits unsuccessfully", p.name);
    let log = p.log_text();
    assert!(log.contains(needle), "{} says {needle:?}:\n{log}", p.name);
}

#[test]
fn an_impostor_cannot_take_a_nodes_name_and_the_real_replica_never_restarts() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    apply(&c, &manifest("hello", &image, 1, "  env: {SECRET_ENV: for-edge-1-only}\n"));
    c.wait_for("replica Running", WAIT, || running(&c, "hello").len() == 1);
    let before = running(&c, "hello").remove(0);

    // The impostor holds the cluster token (a valid one) and asks for the real node's name.
    let data = c.dir.path().join("impostor");
    let mut impostor = agent(&c, "edge-1", &data, Some(&c.token_path()), "impostor", &[]);
    refused(&mut impostor, "already exists");
    assert!(!data.join("identity/node.pem").exists(), "no certificate was signed for the impostor");
    assert!(c.hub.log_text().contains("identity is not for the taking"), "the hub warns:\n{}", c.hub.log_text());

    // The real node kept its session the whole time.
    std::thread::sleep(Duration::from_secs(2));
    let after = running(&c, "hello");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].status.restarts, 0);
    assert_eq!(after[0].status.started_at_ms, before.status.started_at_ms, "the real replica was not restarted");
    assert!(node(&c, "edge-1").is_some_and(|n| n.ready));
    assert!(!c.agents[0].log_text().contains("replaced"), "the real agent's session was never replaced");
}

#[test]
fn tokens_limit_who_joins_and_their_labels_are_the_hubs() {
    let mut c = Cluster::start();
    let once = create_token(&c, "stores.token", &["--uses", "1", "--name-pattern", "store-*", "--label", "site=s12"]);
    let tokens: Vec<TokenView> = serde_json::from_str(&c.ok(&["token", "list", "-o", "json"])).unwrap();
    let view = tokens.iter().find(|t| t.name_pattern == "store-*").expect("the new token is listed");
    assert_eq!((view.uses, view.max_uses), (0, Some(1)));
    assert!(!c.ok(&["token", "list"]).contains(std::fs::read_to_string(&once).unwrap().rsplit("::").next().unwrap()));

    // A name the token does not admit.
    let mut other = agent(&c, "edge-9", &c.dir.path().join("edge-9"), Some(&once), "edge-9", &[]);
    refused(&mut other, "admits node names matching");

    // Its one use; the token's label is the hub's, the claimed reserved one is dropped.
    let reserved = format!("{RESERVED}vault=true");
    c.agents.push(agent(
        &c,
        "store-1",
        &c.dir.path().join("store-1"),
        Some(&once),
        "store-1",
        &["--label", &reserved, "--label", "site=claimed", "--label", "zone=a"],
    ));
    c.wait_for("store-1 Ready", WAIT, || node(&c, "store-1").is_some_and(|n| n.ready));
    let n = node(&c, "store-1").unwrap();
    assert_eq!(n.facts.labels.get("site").map(String::as_str), Some("s12"), "the token's label wins");
    assert_eq!(n.facts.labels.get("zone").map(String::as_str), Some("a"));
    assert!(!n.facts.labels.contains_key(&format!("{RESERVED}vault")), "{:?}", n.facts.labels);
    assert!(n.notices.iter().any(|m| m.contains(RESERVED)), "{:?}", n.notices);
    let describe = c.ok(&["describe", "node", "store-1"]);
    assert!(describe.contains("vault"), "describe shows the ignored claim:\n{describe}");

    // Used up.
    let mut second = agent(&c, "store-2", &c.dir.path().join("store-2"), Some(&once), "store-2", &[]);
    refused(&mut second, "its limit");

    // Admin labels: set, override, remove.
    c.ok(&["label", "node", "store-1", "tier=gold", "zone=b"]);
    c.wait_for("admin labels applied", WAIT, || {
        node(&c, "store-1").is_some_and(|n| {
            n.facts.labels.get("tier").map(String::as_str) == Some("gold")
                && n.facts.labels.get("zone").map(String::as_str) == Some("b")
        })
    });
    c.ok(&["label", "node", "store-1", "tier-"]);
    assert!(!node(&c, "store-1").unwrap().facts.labels.contains_key("tier"));
    let out = c.cli(&["label", "node", "nope", "a=b"]);
    assert!(!out.status.success(), "labels of an unknown node are refused");

    // The cluster token, revoked, admits nobody new.
    c.ok(&["token", "revoke", "cluster"]);
    let mut late = agent(&c, "edge-2", &c.dir.path().join("edge-2"), Some(&c.token_path()), "edge-2", &[]);
    refused(&mut late, "revoked");
    // A node already joined keeps its identity.
    assert!(node(&c, "store-1").is_some_and(|n| n.ready));
}

#[test]
fn a_deleted_node_cannot_connect_and_its_replica_moves() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &["--label", "pick=me"]);
    c.add_agent("edge-2", &[]);
    c.wait_for("two nodes Ready", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    apply(&c, &manifest("hello", &image, 1, "  nodeSelector: {pick: me}\n"));
    c.wait_for("replica Running on edge-1", WAIT, || {
        running(&c, "hello").iter().any(|r| r.node.as_deref() == Some("edge-1"))
    });
    // Let it go anywhere, so it can move when its node goes.
    apply(&c, &manifest("hello", &image, 1, ""));

    c.ok(&["delete", "node", "edge-1"]);
    refused(&mut c.agents[0], "revoked");
    c.wait_for("replica Running on edge-2", WAIT, || {
        running(&c, "hello").iter().any(|r| r.node.as_deref() == Some("edge-2"))
    });
    assert!(node(&c, "edge-1").is_none(), "the node is gone");

    // Its old certificate is refused; the agent says it must join again and gives up.
    let mut again = agent(&c, "edge-1", &c.agent_dir("edge-1"), None, "edge-1-again", &[]);
    refused(&mut again, "join again");
    assert!(node(&c, "edge-1").is_none());
}

#[test]
fn a_hub_whose_store_was_made_anew_stops_nothing() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    apply(&c, &manifest("hello", &image, 1, "  args: [--interval-ms, '100']\n"));
    c.wait_for("replica Running", WAIT, || running(&c, "hello").len() == 1);
    let replica = running(&c, "hello").remove(0).name;
    let log = c.agent_dir("edge-1").join("logs").join(format!("{replica}.log"));
    let lines = || std::fs::read_to_string(&log).map(|t| t.lines().filter(|l| l.contains(" #")).count()).unwrap_or(0);

    // The hub comes back with its CA (so the agent trusts it) but an empty store.
    c.hub.kill();
    for f in ["hub.db", "hub.db-wal", "hub.db-shm"] {
        let _ = std::fs::remove_file(c.hub_dir().join(f));
    }
    c.restart_hub();
    c.wait_for("the node back at the new store", WAIT, || node(&c, "edge-1").is_some_and(|n| n.ready));
    c.wait_for("the agent refusing the new store's set", WAIT, || {
        node(&c, "edge-1").is_some_and(|n| n.problem.contains("store"))
    });
    assert!(c.agents[0].log_text().contains("assignment set refused"));
    // The workload keeps running: its log keeps growing.
    let seen = lines();
    c.wait_for("the replica still printing", Duration::from_secs(10), || lines() > seen + 5);
    assert!(c.workloads().is_empty(), "the new store knows no workload");
}

#[test]
fn an_assignment_set_larger_than_a_frame_reaches_its_node() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || node(&c, "edge-1").is_some_and(|n| n.ready));
    // 20 replicas with 1 MiB of environment each: a 20 MB set, over the 16 MiB frame limit.
    let big = "x".repeat(1 << 20);
    apply(&c, &manifest("big", &image, 20, &format!("  args: [--interval-ms, '60000']\n  env: {{PAD: {big}}}\n")));
    c.wait_for("20 replicas Running", Duration::from_secs(90), || running(&c, "big").len() == 20);
    // Statuses may reach the hub before the acknowledgement does.
    c.wait_for("the node to acknowledge its set", WAIT, || {
        node(&c, "edge-1").is_some_and(|n| n.generation > 0 && n.acked_generation == n.generation)
    });
    let n = node(&c, "edge-1").unwrap();
    assert!(n.problem.is_empty(), "{}", n.problem);
}

/// Lines of the hub's log that record a renewal of `node`'s certificate.
fn renewals(c: &Cluster, node: &str) -> usize {
    c.hub
        .log_text()
        .lines()
        .filter(|l| l.contains("node certificate renewed") && l.contains(&format!("node={node}")))
        .count()
}

fn cert_fingerprint(data: &Path) -> String {
    transport::pki::fingerprint_pem(&std::fs::read_to_string(data.join("identity/node.pem")).unwrap()).unwrap()
}

#[test]
fn node_certificates_renew_over_the_link_and_after_an_offline_expiry() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start_with(&["--node-cert-validity", "60s", "--node-cert-grace", "10m"]);
    c.add_agent("edge-1", &["--label", "site=one"]);
    apply(&c, &manifest("hello", &image, 1, "  nodeSelector: {site: one}\n"));
    c.wait_for("replica Running", WAIT, || running(&c, "hello").len() == 1);
    let before = running(&c, "hello").remove(0);
    let first_cert = cert_fingerprint(&c.agent_dir("edge-1"));

    // edge-2 joins and goes offline at once; its certificate expires while it is away.
    let data2 = c.dir.path().join("edge-2");
    let mut edge2 = agent(&c, "edge-2", &data2, Some(&c.token_path()), "edge-2", &[]);
    c.wait_for("edge-2 Ready", WAIT, || node(&c, "edge-2").is_some_and(|n| n.ready));
    let offline_at = std::time::Instant::now();
    edge2.kill();
    let expired_cert = cert_fingerprint(&data2);

    // Three renewals of edge-1's certificate (at 40 s, 80 s and 120 s), watched every second.
    let start = std::time::Instant::now();
    let mut not_ready = Vec::new();
    let mut back = None;
    while renewals(&c, "edge-1") < 3 || back.is_none() {
        assert!(start.elapsed() < Duration::from_secs(170), "3 renewals within 170 s; hub log:\n{}", c.hub.log_text());
        if !node(&c, "edge-1").is_some_and(|n| n.ready) {
            not_ready.push(start.elapsed());
        }
        if back.is_none() && offline_at.elapsed() > Duration::from_secs(70) {
            // Offline past its certificate's end: it renews over the join protocol and comes back.
            back = Some(agent(&c, "edge-2", &data2, None, "edge-2-back", &[]));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut back = back.unwrap();
    c.wait_for("edge-2 Ready again", WAIT, || node(&c, "edge-2").is_some_and(|n| n.ready));
    let back_log = back.log_text();
    assert!(back_log.contains("certificate has expired; asking the hub to renew it"), "{back_log}");
    assert_ne!(cert_fingerprint(&data2), expired_cert, "edge-2 holds a renewed certificate");
    assert!(renewals(&c, "edge-2") >= 1);
    back.kill();

    assert!(not_ready.is_empty(), "edge-1 was NotReady at {not_ready:?}");
    let after = running(&c, "hello");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].status.restarts, 0);
    assert_eq!(after[0].status.started_at_ms, before.status.started_at_ms, "the replica was never restarted");
    let log = c.agents[0].log_text();
    assert!(!log.contains("lost the hub connection"), "renewals cost no reconnect:\n{log}");
    assert!(log.matches("node certificate renewed").count() >= 3, "{log}");
    assert_ne!(cert_fingerprint(&c.agent_dir("edge-1")), first_cert, "the renewed certificate is saved");
    let described = c.ok(&["describe", "node", "edge-1"]);
    assert!(described.contains("Certificate:  expires in"), "{described}");
}

#[test]
fn the_hubs_serving_certificate_renews_while_it_runs() {
    let mut c = Cluster::start_with(&["--hub-cert-validity", "30s"]);
    let hub_pem = c.hub_dir().join("tls/hub.pem");
    let first = transport::pki::leaf_facts(&std::fs::read_to_string(&hub_pem).unwrap()).unwrap();
    c.add_agent("edge-1", &[]);
    c.wait_for("edge-1 Ready", WAIT, || node(&c, "edge-1").is_some_and(|n| n.ready));

    // Past the first certificate's expiry, new connections still verify the hub's.
    while std::time::SystemTime::now() < first.not_after + Duration::from_secs(2) {
        assert!(node(&c, "edge-1").is_some_and(|n| n.ready), "edge-1 stays Ready while the hub's certificate renews");
        std::thread::sleep(Duration::from_secs(1));
    }
    let now = transport::pki::leaf_facts(&std::fs::read_to_string(&hub_pem).unwrap()).unwrap();
    assert_ne!(now.fingerprint, first.fingerprint, "a new serving certificate was written");
    assert!(now.not_after > first.not_after);
    let hub_log = c.hub.log_text();
    assert!(hub_log.contains("hub serving certificate renewed"), "{hub_log}");
    let agent_log = c.agents[0].log_text();
    assert!(!agent_log.contains("lost the hub connection"), "the agent's link was never cut:\n{agent_log}");

    // A restarted agent makes a full handshake with the renewed certificate.
    c.agents[0].kill();
    let data = c.agent_dir("edge-1");
    let log = c.dir.path().join("agent-edge-1.2.log");
    let args = ["agent", "--hub", &c.hub_addr, "--name", "edge-1", "--data-dir", data.to_str().unwrap()];
    c.agents.push(Proc::spawn("agent edge-1 again", &args, log));
    c.wait_for("edge-1 Ready after its restart", WAIT, || {
        node(&c, "edge-1").is_some_and(|n| n.ready) && c.agents[1].log_text().contains("connected to hub")
    });
}
