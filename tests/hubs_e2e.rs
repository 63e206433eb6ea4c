//! Several hubs on one PostgreSQL store: two `flotilla hub` processes share a real PostgreSQL
//! server (Debian's package, started by the test), agents (each in a network namespace of its
//! own) are given both hub addresses, and
//! the leader is killed with SIGKILL. The other hub must take over within seconds (a new
//! workload is scheduled and runs) while the replicas that were running keep running. And a
//! hub SIGKILLed while applies stream in keeps every apply it acknowledged, on either store.
//!
//! Needs root, `postgresql`, `docker-registry` and the wasm32-wasip1 target
//! (`scripts/install-deps.sh`); skips and says why without them, except under CI.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/netns.rs"]
mod netns;
#[path = "../hub/tests/support/postgres.rs"]
mod postgres;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cluster::{Proc, wait_for};
use postgres::TestPostgres;
use proto::messages::{NodeView, Phase, ReplicaView, WorkloadView};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(40);

fn manifest(name: &str, image: &str, replicas: u32) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: wasm\n  image: {image}\n  replicas: {replicas}\n"
    )
}

struct HubProc {
    name: String,
    dir: PathBuf,
    addr: String,
    proc: Proc,
}

impl HubProc {
    fn start(root: &Path, name: &str, datastore: &str) -> HubProc {
        Self::start_at(root, name, datastore, format!("127.0.0.1:{}", cluster::free_udp_port()))
    }

    fn start_at(root: &Path, name: &str, datastore: &str, addr: String) -> HubProc {
        let dir = root.join(name);
        // Listening on all addresses, so agents in network namespaces reach it at their
        // host-side address; the CLI dials loopback.
        let listen = addr.replace("127.0.0.1", "0.0.0.0");
        // One cluster key for every hub of the test (the first makes it): the store holds the
        // CA key and token sealed with it.
        let key = root.join("cluster.key");
        let args = [
            "hub",
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--advertise",
            &addr,
            "--datastore",
            datastore,
        ];
        let mut log = root.join(format!("{name}.log"));
        for k in 2.. {
            if !log.exists() {
                break;
            }
            log = root.join(format!("{name}.{k}.log"));
        }
        let proc = Proc::spawn(name, &args, log);
        let h = HubProc { name: name.to_string(), dir, addr, proc };
        wait_for(&format!("{name} to write its admin config"), Duration::from_secs(30), || {
            h.dir.join("admin.yaml").exists() && h.dir.join("token").exists()
        });
        h
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(cluster::bin());
        cmd.arg("--config").arg(self.dir.join("admin.yaml")).args(args);
        cluster::run_with_stdin(cmd, stdin)
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "flotilla {args:?} via {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `get` as JSON, `None` while the hub cannot answer.
    fn get<T: serde::de::DeserializeOwned>(&self, kind: &str) -> Option<T> {
        let out = self.cli(&["get", kind, "-o", "api-json"], None);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn leads(&self) -> bool {
        self.proc.log_text().contains("became leader")
    }
}

fn running(replicas: &[ReplicaView], workload: &str, n: usize) -> bool {
    let mine: Vec<_> = replicas.iter().filter(|r| r.workload == workload).collect();
    mine.len() == n
        && mine.iter().all(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
}

#[test]
fn two_hubs_on_postgres_survive_the_leader_being_killed() {
    if !netns::netns_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let Some(pg) = TestPostgres::start() else { return };
    let datastore = pg.create_database("flotilla");
    let pushed = reg.reference("hello:v1");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), cluster::example_wasm().as_os_str(), pushed.as_ref()]);
    assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
    // Each agent runs in a network namespace of its own and reaches the hubs and the
    // registry over its veth link.
    let sites = [netns::Netns::create(), netns::Netns::create()];
    let fwd = netns::TcpForward::start(sites[1].host_ip(), reg.addr.parse().unwrap());
    let image = pushed.replacen(&reg.addr, &fwd.addr.to_string(), 1);

    let root = tempfile::tempdir().unwrap();
    let a = HubProc::start(root.path(), "hub-a", &datastore);
    let b = HubProc::start(root.path(), "hub-b", &datastore);
    // One cluster identity: the second hub took the first one's CA and token from the store.
    let token = std::fs::read_to_string(a.dir.join("token")).unwrap();
    assert_eq!(std::fs::read_to_string(b.dir.join("token")).unwrap(), token);
    assert_eq!(
        std::fs::read_to_string(a.dir.join("tls/ca.pem")).unwrap(),
        std::fs::read_to_string(b.dir.join("tls/ca.pem")).unwrap()
    );
    wait_for("one hub to lead", Duration::from_secs(15), || a.leads() || b.leads());
    assert!(!(a.leads() && b.leads()), "two leaders");

    // Each agent knows both hubs; they start on different ones, so each hub serves one.
    let token_file = a.dir.join("token");
    let mut agents = Vec::new();
    let port = |h: &HubProc| h.addr.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap();
    let registry = fwd.addr.to_string();
    for (i, name) in ["edge-1", "edge-2"].into_iter().enumerate() {
        let ip = sites[i].host_ip();
        let (first, second) = if i == 0 { (&a, &b) } else { (&b, &a) };
        let hubs = format!("{ip}:{},{ip}:{}", port(first), port(second));
        let data = root.path().join(format!("agent-{name}"));
        let prefix = sites[i].exec_prefix();
        let mut args: Vec<String> = prefix[1..].to_vec();
        args.push(cluster::bin().to_string());
        for arg in ["agent", "--hub", &hubs, "--token-file", token_file.to_str().unwrap(), "--name", name] {
            args.push(arg.to_string());
        }
        for arg in ["--insecure-registry", &registry, "--data-dir", data.to_str().unwrap()] {
            args.push(arg.to_string());
        }
        agents.push(Proc::spawn_program(name, &prefix[0], &args, root.path().join(format!("{name}.log"))));
    }
    for h in [&a, &b] {
        wait_for(&format!("both nodes ready as seen by {}", h.name), WAIT, || {
            h.get::<Vec<NodeView>>("nodes").is_some_and(|n| n.len() == 2 && n.iter().all(|n| n.ready))
        });
    }

    // Each hub holds one agent's session (the agent dials its first address first).
    assert!(a.proc.log_text().contains("node=edge-1"), "edge-1 not served by hub-a");
    assert!(b.proc.log_text().contains("node=edge-2"), "edge-2 not served by hub-b");

    // An apply through either hub is scheduled by the leader and runs on both nodes.
    b.ok(&["apply", "-f", "-"], Some(&manifest("hello", &image, 2)));
    wait_for("hello running on both nodes", WAIT, || {
        a.get::<Vec<ReplicaView>>("replicas").is_some_and(|r| running(&r, "hello", 2))
    });
    let nodes: std::collections::BTreeSet<_> =
        a.get::<Vec<ReplicaView>>("replicas").unwrap().into_iter().filter_map(|r| r.node).collect();
    assert_eq!(nodes.len(), 2, "one replica per node");

    // Optimistic concurrency through the CLI: the current resourceVersion is accepted once,
    // then refused as stale with a clear message.
    let w = b.get::<Vec<WorkloadView>>("workloads").unwrap();
    let rev = w[0].revision;
    assert_eq!(w[0].manifest.metadata.resource_version, Some(rev));
    let at = |r: u64, replicas: u32| {
        manifest("hello", &image, replicas)
            .replace("  name: hello\n", &format!("  name: hello\n  resourceVersion: {r}\n"))
    };
    a.ok(&["apply", "-f", "-"], Some(&at(rev, 2).replace("replicas: 2", "replicas: 2\n  env: {MODE: x}")));
    let out = b.cli(&["apply", "-f", "-"], Some(&at(rev, 2)));
    assert!(!out.status.success(), "a stale resourceVersion was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("workload hello was changed since revision {rev} (now {})", rev + 1)),
        "unclear conflict error: {err}"
    );
    wait_for("hello running with the new template", WAIT, || {
        a.get::<Vec<ReplicaView>>("replicas").is_some_and(|r| running(&r, "hello", 2))
    });

    // A secret applied through one hub is sealed in PostgreSQL: the other hub describes it
    // (keys and sizes), and the database's files hold the sealed row, never the value.
    let pw = format!("pg-secret-{:x}", rand::random::<u64>());
    b.ok(&["create", "secret", "db", "--from-literal", &format!("password={pw}")], None);
    let shown = a.ok(&["describe", "secret", "db"], None);
    assert!(shown.contains("password: ") && !shown.contains(&pw), "{shown}");
    assert!(
        !cluster::files_holding(pg.data_dir(), b"sealed:v2:").is_empty(),
        "the sealed row is not in the files read"
    );
    let found = cluster::files_holding(pg.data_dir(), pw.as_bytes());
    assert!(found.is_empty(), "the secret's plaintext is in PostgreSQL's files: {found:?}");

    let before: Vec<ReplicaView> = a.get("replicas").unwrap();
    let (mut leader, survivor) = if a.leads() { (a, b) } else { (b, a) };
    // SIGKILL: no lease release, no goodbye to the agents.
    leader.proc.kill();
    let killed = Instant::now();

    wait_for("the survivor to take the lease", Duration::from_secs(15), || survivor.leads());
    let takeover = killed.elapsed();
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    eprintln!("{} took over {takeover:?} after {} was killed", survivor.name, leader.name);

    // The new leader schedules new work, onto both nodes (which moved over to it).
    survivor.ok(&["apply", "-f", "-"], Some(&manifest("second", &image, 2)));
    wait_for("second running after the failover", WAIT, || {
        survivor.get::<Vec<ReplicaView>>("replicas").is_some_and(|r| running(&r, "second", 2))
    });
    let nodes: Vec<NodeView> = survivor.get("nodes").unwrap();
    assert!(nodes.iter().all(|n| n.ready), "every node reconnected to the survivor: {nodes:?}");

    // Nothing that was healthy restarted.
    let after: Vec<ReplicaView> = survivor.get("replicas").unwrap();
    for old in before.iter().filter(|r| r.workload == "hello") {
        let now = after.iter().find(|r| r.name == old.name).expect("replica kept");
        assert_eq!(now.node, old.node, "{} moved", old.name);
        assert_eq!(now.status.phase, Phase::Running);
        assert_eq!(now.status.started_at_ms, old.status.started_at_ms, "{} restarted", old.name);
        assert_eq!(now.status.restarts, 0);
    }
    drop(leader);
    drop(agents);
    drop(fwd);
    drop(sites);
}

/// A hub SIGKILLed while applies stream in restarts with every apply it acknowledged.
fn killed_mid_apply_keeps_every_acknowledged_write(datastore: &str) {
    let root = tempfile::tempdir().unwrap();
    let hub = HubProc::start(root.path(), "hub", datastore);
    let config = hub.dir.join("admin.yaml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mut cmd = Command::new(cluster::bin());
                cmd.arg("--config").arg(&config).args(["apply", "-f", "-"]);
                let out = cluster::run_with_stdin(cmd, Some(&manifest(&format!("w-{i}"), "r/x:1", 1)));
                if !out.status.success() {
                    break;
                }
                acked.push(format!("w-{i}"));
            }
            acked
        })
    };
    // Kill it while applies are in flight (each CLI apply takes tens of milliseconds).
    std::thread::sleep(Duration::from_secs(3));
    let mut hub = hub;
    hub.proc.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() >= 3, "too few applies before the kill to prove anything: {acked:?}");

    let hub = HubProc::start_at(root.path(), "hub", datastore, hub.addr.clone());
    let mut names = Vec::new();
    wait_for("the restarted hub to answer", WAIT, || match hub.get::<Vec<WorkloadView>>("workloads") {
        Some(w) => {
            names = w.into_iter().map(|w| w.manifest.metadata.name).collect();
            true
        }
        None => false,
    });
    for name in &acked {
        assert!(names.contains(name), "acknowledged workload {name} lost; the store has {names:?}");
    }
}

#[test]
fn sqlite_hub_killed_mid_apply_keeps_every_acknowledged_write() {
    killed_mid_apply_keeps_every_acknowledged_write("sqlite");
}

#[test]
fn postgres_hub_killed_mid_apply_keeps_every_acknowledged_write() {
    let Some(pg) = TestPostgres::start() else { return };
    killed_mid_apply_keeps_every_acknowledged_write(&pg.create_database("flotilla"));
}
