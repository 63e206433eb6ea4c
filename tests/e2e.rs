//! End-to-end tests: a real registry (Debian's docker-registry), a hub and agents as separate
//! `flotilla` processes on loopback, QUIC with mutual TLS between them, wasmtime running the
//! modules. Everything is driven through the CLI.
//!
//! Needs `/usr/bin/docker-registry` and the wasm32-wasip1 target (`scripts/install-deps.sh`).
//! Without the registry the tests skip and say why, except under CI (`CI` set), where they fail.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::collections::BTreeSet;
use std::time::Duration;

use cluster::{Cluster, Proc};
use proto::messages::{Phase, ReplicaView};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(30);

fn manifest(name: &str, image: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: wasm\n  image: {image}\n  replicas: {replicas}\n{extra}"
    )
}

fn push(reg: &TestRegistry, wasm: &std::path::Path, name: &str) -> String {
    let reference = reg.reference(name);
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256:"));
    reference
}

fn push_wat(reg: &TestRegistry, dir: &std::path::Path, name: &str, wat: &str) -> String {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    push(reg, &path, name)
}

fn of<'a>(replicas: &'a [ReplicaView], workload: &str) -> Vec<&'a ReplicaView> {
    replicas.iter().filter(|r| r.workload == workload).collect()
}

fn all_running(c: &Cluster, workload: &str, n: usize) -> bool {
    let rs = c.replicas();
    let mine = of(&rs, workload);
    mine.len() == n
        && mine.iter().all(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
}

#[test]
fn two_replica_workload_runs_updates_and_deletes_across_two_agents() {
    let Some(reg) = TestRegistry::start() else { return };
    let wasm = cluster::example_wasm();
    let image = push(&reg, &wasm, "hello:v1");

    let mut c = Cluster::start();
    c.add_agent("edge-1", &["--label", "site=a"]);
    c.add_agent("edge-2", &["--label", "site=b"]);
    c.wait_for("two Ready nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let nodes = c.nodes();
    // Containers need root and cgroups; where the agent has them it offers both runtimes.
    let containers = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        && (std::path::Path::new("/sys/fs/cgroup/memory").is_dir()
            || std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists());
    let offered =
        if containers { vec![proto::Runtime::Wasm, proto::Runtime::Container] } else { vec![proto::Runtime::Wasm] };
    assert!(nodes.iter().all(|n| n.facts.runtimes == offered && n.facts.cpus >= 1), "{nodes:?}");
    assert_eq!(nodes.iter().find(|n| n.name == "edge-1").unwrap().facts.labels["site"], "a");

    let v1 = manifest("hello", &image, 2, "  args: [\"--interval-ms\", \"100\"]\n  env: {GREETING: first-greeting}\n");
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&v1));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/hello created");

    c.wait_for("both replicas Running", WAIT, || all_running(&c, "hello", 2));
    let rs = c.replicas();
    let placed: BTreeSet<_> = of(&rs, "hello").iter().map(|r| r.node.clone().unwrap()).collect();
    assert_eq!(placed, BTreeSet::from(["edge-1".to_string(), "edge-2".to_string()]), "replicas spread over both nodes");

    // Logs of both replicas come from the agents through the hub.
    c.wait_for("logs from both replicas", WAIT, || {
        let logs = c.ok(&["logs", "hello"]);
        ["[hello-0] first-greeting #", "[hello-1] first-greeting #"].iter().all(|l| logs.contains(l))
    });
    let one = c.ok(&["logs", "hello", "--replica", "hello-1", "--tail", "200"]);
    assert!(one.contains("first-greeting #") && !one.contains("[hello-"), "{one}");
    let last_two = c.ok(&["logs", "hello", "--replica", "hello-1", "--tail", "2"]);
    assert_eq!(last_two.lines().count(), 2, "{last_two}");
    assert!(last_two.lines().all(|l| l.contains("first-greeting #")), "{last_two}");
    let described = c.ok(&["describe", "workload", "hello"]);
    assert!(described.contains("2 desired, 2 ready"), "{described}");
    // Both clocks are this machine's: the skew reported is small, with no warning.
    let node = c.ok(&["describe", "node", "edge-1"]);
    let skew = node.lines().find(|l| l.starts_with("Clock skew:")).unwrap_or_else(|| panic!("{node}"));
    assert!(skew.contains("the hub") && !skew.contains("time sync"), "{skew}");

    // Re-applying the same file changes nothing; a new template restarts the replicas with it.
    let same = c.cli_with_stdin(&["apply", "-f", "-"], Some(&v1));
    assert_eq!(String::from_utf8_lossy(&same.stdout).trim(), "workload/hello unchanged");
    let v1_hash = c.replicas()[0].template_hash.clone();
    let v2 = v1.replace("first-greeting", "second-greeting");
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&v2));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/hello configured");
    c.wait_for("updated replicas Running", WAIT, || {
        c.replicas().iter().all(|r| r.template_hash != v1_hash) && all_running(&c, "hello", 2)
    });
    c.wait_for("logs with the new greeting", WAIT, || {
        let logs = c.ok(&["logs", "hello", "--tail", "300"]);
        ["[hello-0] second-greeting #", "[hello-1] second-greeting #"].iter().all(|l| logs.contains(l))
    });
    assert_eq!(c.workloads()[0].revision, 2);

    // Follow streams new lines as they are written.
    let mut follow = std::process::Command::new(cluster::bin())
        .arg("--config")
        .arg(c.config_path())
        .args(["logs", "hello", "--replica", "hello-0", "-f", "--tail", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = follow.kill();
    let followed = follow.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&followed.stdout).matches("second-greeting #").count();
    assert!(lines >= 5, "following for 1.5 s at 10 lines/s gave {lines} lines");

    // Delete: the replicas disappear from the hub and stop on the agents.
    let file = c.dir.path().join("hello.yaml");
    std::fs::write(&file, &v2).unwrap();
    assert_eq!(c.ok(&["delete", "-f", file.to_str().unwrap()]).trim(), "workload/hello deleted");
    assert!(c.replicas().is_empty());
    c.wait_for("agents to stop the replicas and drop their logs", WAIT, || {
        ["edge-1", "edge-2"].iter().all(|a| {
            let logs = c.agent_dir(a).join("logs");
            std::fs::read_dir(&logs).map(|d| d.count() == 0).unwrap_or(false)
        })
    });
    c.wait_for("nodes to acknowledge the final generation", WAIT, || {
        c.nodes().iter().all(|n| n.acked_generation == n.generation && n.generation >= 3)
    });
    let err = c.cli(&["delete", "workload", "hello"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("not found"));
}

#[test]
fn bad_manifests_are_refused_and_store_nothing() {
    let c = Cluster::start();
    let good = manifest("ok", "127.0.0.1:1/x:1", 1, "");
    for (bad, expect) in [
        (good.replace("replicas:", "replicaz:"), "spec.replicaz: unknown field `replicaz`"),
        (good.replace("runtime: wasm", "runtime: jvm"), "spec.runtime: unknown variant `jvm`"),
        (good.replace("name: ok", "name: Not_Valid"), "metadata.name"),
        ("apiVersion: [".to_string(), "invalid YAML"),
        // The second document is bad: the first must not be stored either.
        (
            format!("{good}---\n{}", good.replace("name: ok", "name: two").replace("image:", "imgae:")),
            "document 2: spec.imgae",
        ),
    ] {
        let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&bad));
        assert!(!out.status.success(), "accepted {bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "expected {expect:?} in {stderr}");
    }
    assert!(c.workloads().is_empty(), "nothing stored after refused applies");
    let out = c.cli(&["get", "pods"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown resource kind"));
}

#[test]
fn wrong_token_and_missing_admin_credential_are_refused() {
    let mut c = Cluster::start();
    let token = std::fs::read_to_string(c.token_path()).unwrap();
    let fingerprint = token.trim().split("::").nth(1).unwrap().to_string();

    // Right CA pin, wrong secret: refused by the hub.
    let wrong = format!("FLT1::{fingerprint}::{}", "ab".repeat(24));
    let dir = c.dir.path().join("intruder");
    let mut intruder = Proc::spawn(
        "intruder",
        &["agent", "--hub", &c.hub_addr, "--token", &wrong, "--name", "intruder", "--data-dir", dir.to_str().unwrap()],
        c.dir.path().join("intruder.log"),
    );
    let status = intruder.wait_exit(WAIT).expect("agent with a wrong token exits");
    assert!(!status.success());
    assert!(intruder.log_text().contains("invalid join token"), "{}", intruder.log_text());
    assert!(!dir.join("identity/node.pem").exists());

    // A token pinning another CA: the agent refuses the hub.
    let foreign = format!("FLT1::{}::{}", "0".repeat(64), token.trim().split("::").nth(2).unwrap());
    let mut fooled = Proc::spawn(
        "fooled",
        &["agent", "--hub", &c.hub_addr, "--token", &foreign, "--name", "fooled", "--data-dir", dir.to_str().unwrap()],
        c.dir.path().join("fooled.log"),
    );
    assert!(!fooled.wait_exit(WAIT).expect("agent with a foreign pin exits").success());
    assert!(fooled.log_text().contains("does not match the token's pin"), "{}", fooled.log_text());

    // The hub keeps serving: a good agent joins.
    c.add_agent("good", &[]);
    c.wait_for("the good agent Ready", WAIT, || c.nodes().iter().any(|n| n.name == "good" && n.ready));
    assert!(c.nodes().iter().all(|n| n.name == "good"), "refused agents never became nodes");

    // A node's certificate is not the admin credential.
    let admin: proto::messages::ClientConfigFile =
        serde_saphyr::from_str(&std::fs::read_to_string(c.config_path()).unwrap()).unwrap();
    let id = c.agent_dir("good").join("identity");
    let as_node = proto::messages::ClientConfigFile {
        cert_pem: std::fs::read_to_string(id.join("node.pem")).unwrap(),
        key_pem: std::fs::read_to_string(id.join("node.key")).unwrap(),
        ..admin.clone()
    };
    let cfg = c.dir.path().join("node-as-admin.yaml");
    std::fs::write(&cfg, serde_saphyr::to_string(&as_node).unwrap()).unwrap();
    let out = cluster::flotilla(&["--config", cfg.to_str().unwrap(), "get", "nodes"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a user's credential is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A config with no usable credential at all.
    let none = proto::messages::ClientConfigFile { cert_pem: String::new(), key_pem: String::new(), ..admin };
    std::fs::write(&cfg, serde_saphyr::to_string(&none).unwrap()).unwrap();
    let out = cluster::flotilla(&["--config", cfg.to_str().unwrap(), "get", "nodes"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("credentials are unusable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Still serving the admin.
    assert_eq!(c.nodes().len(), 1);
}

#[test]
fn trapping_and_missing_modules_report_why() {
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));

    let trap = push_wat(
        &reg,
        c.dir.path(),
        "trap:v1",
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    );
    let sleeper = push_wat(
        &reg,
        c.dir.path(),
        "sleeper:v1",
        r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start") (loop $l (br $l))))"#,
    );
    let all = [
        manifest("trap", &trap, 1, "  restartPolicy: Never\n"),
        manifest("missing", &reg.reference("does-not-exist:v1"), 1, ""),
        manifest("busy", &sleeper, 1, ""),
    ]
    .join("---\n");
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&all));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    c.wait_for("the trapping replica Failed", WAIT, || {
        c.replicas().iter().any(|r| r.name == "trap-0" && r.status.phase == Phase::Failed)
    });
    let d = c.ok(&["describe", "replica", "trap-0"]);
    assert!(d.contains("Phase:         Failed") && d.contains("unreachable"), "{d}");

    c.wait_for("the missing module reported", WAIT, || {
        c.ok(&["describe", "workload", "missing"]).contains("not found in registry")
    });
    let rs = c.replicas();
    let missing = rs.iter().find(|r| r.name == "missing-0").unwrap();
    assert_eq!(missing.status.phase, Phase::Pending);

    // The looping guest keeps running beside them, and the agent stays responsive.
    c.wait_for("busy replica Running", WAIT, || all_running(&c, "busy", 1));
    assert!(c.nodes()[0].ready);
}

#[test]
fn hub_restart_keeps_credentials_state_and_running_replicas() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push(&reg, &cluster::example_wasm(), "hello:v1");
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    let token = std::fs::read_to_string(c.token_path()).unwrap();
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&manifest("hello", &image, 1, "")));
    assert!(out.status.success());
    c.wait_for("replica Running", WAIT, || all_running(&c, "hello", 1));
    let started = c.replicas()[0].status.started_at_ms;

    c.restart_hub();
    c.wait_for("the agent back and Ready", WAIT, || {
        let out = c.cli(&["get", "nodes", "-o", "api-json"]);
        out.status.success()
            && serde_json::from_slice::<Vec<proto::messages::NodeView>>(&out.stdout)
                .is_ok_and(|n| n.len() == 1 && n[0].ready)
    });
    assert_eq!(std::fs::read_to_string(c.token_path()).unwrap(), token, "token survives a restart");
    assert_eq!(c.workloads().len(), 1);
    let r = &c.replicas()[0];
    assert_eq!(r.status.phase, Phase::Running);
    assert_eq!(r.status.started_at_ms, started, "the replica was not restarted");
    assert_eq!(r.status.restarts, 0);
}

/// A backup taken while the hub runs, the hub's data dir lost, a restore into a new one: the
/// hub started on it is the same cluster (the agent reconnects with its certificate, the
/// replica keeps running unrestarted), and holds what was applied before the backup, not
/// after. Restore refuses a data dir that holds a hub.
#[test]
fn a_hub_restored_from_a_backup_keeps_its_agents_and_their_replicas() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push(&reg, &cluster::example_wasm(), "hello:v1");
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&manifest("hello", &image, 1, "")));
    assert!(out.status.success());
    c.wait_for("replica Running", WAIT, || all_running(&c, "hello", 1));
    let started = c.replicas()[0].status.started_at_ms;
    let backup = c.dir.path().join("backup");
    let hub_dir = c.hub_dir();
    let out = cluster::flotilla(&[
        "backup".as_ref(),
        "--data-dir".as_ref(),
        hub_dir.as_os_str(),
        "--to".as_ref(),
        backup.as_os_str(),
    ]);
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    // Applied after the backup: not in it.
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&manifest("later", &image, 1, "")));
    assert!(out.status.success());
    let restore = || {
        let args: [&std::ffi::OsStr; 5] =
            ["restore".as_ref(), "--from".as_ref(), backup.as_os_str(), "--data-dir".as_ref(), hub_dir.as_os_str()];
        cluster::flotilla(&args)
    };
    // Restoring over a live data dir is refused, and changes nothing.
    let out = restore();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already holds a hub"));

    // The hub machine is lost: its data dir goes, a new hub is restored from the backup.
    c.hub.kill();
    std::fs::rename(&hub_dir, c.dir.path().join("hub-lost")).unwrap();
    let out = restore();
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    c.restart_hub();
    c.wait_for("the agent back and Ready", WAIT, || {
        let out = c.cli(&["get", "nodes", "-o", "api-json"]);
        out.status.success()
            && serde_json::from_slice::<Vec<proto::messages::NodeView>>(&out.stdout)
                .is_ok_and(|n| n.len() == 1 && n[0].ready && n[0].name == "edge-1")
    });
    let names: Vec<String> = c.workloads().iter().map(|w| w.manifest.metadata.name.clone()).collect();
    assert_eq!(names, ["hello"], "the restored hub holds what the backup held");
    c.wait_for("the agent's report in", WAIT, || all_running(&c, "hello", 1));
    let r = &c.replicas()[0];
    assert_eq!(r.status.started_at_ms, started, "the replica was not restarted");
    assert_eq!(r.status.restarts, 0);
}

#[test]
fn a_stopped_agent_leaves_at_once_and_its_replicas_show_unknown() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push(&reg, &cluster::example_wasm(), "hello:v1");
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&manifest("hello", &image, 1, "")));
    assert!(out.status.success());
    c.wait_for("replica Running", WAIT, || all_running(&c, "hello", 1));

    // SIGTERM: the agent closes its connection, so the hub sees it leave well before the
    // 8 s idle timeout would have told it.
    let pid = c.agents[0].child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = c.agents[0].wait_exit(WAIT).expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status:?}");
    let left = std::time::Instant::now();
    c.wait_for("node NotReady", Duration::from_secs(3), || c.nodes().iter().all(|n| !n.ready));
    assert!(left.elapsed() < Duration::from_secs(3));
    assert!(c.agents[0].log_text().contains("agent shutting down"));
    let r = &c.replicas()[0];
    assert_eq!(r.status.phase, Phase::Unknown);
    assert!(r.status.message.contains("not connected; it last reported Running"), "{}", r.status.message);
    assert!(c.ok(&["get", "workloads"]).contains("0/1"));

    // Back on the same data dir: no token needed, the replica runs again.
    c.agents.clear();
    let data = c.agent_dir("edge-1");
    c.agents.push(Proc::spawn(
        "agent edge-1 (restarted)",
        &["agent", "--hub", &c.hub_addr, "--name", "edge-1", "--data-dir", data.to_str().unwrap()],
        c.dir.path().join("agent-edge-1-again.log"),
    ));
    c.wait_for("replica Running again", WAIT, || all_running(&c, "hello", 1));
}

/// The dead-link grace is configurable: an agent started with `--link-timeout 2s` (QUIC uses
/// the smaller of the two sides' idle timeouts) that freezes is NotReady at the hub within a
/// few seconds, not the default 8 to 10; thawed, it is Ready again.
#[test]
fn a_shorter_link_timeout_marks_a_frozen_node_not_ready_sooner() {
    let mut c = Cluster::start();
    c.add_agent("edge-1", &["--link-timeout", "2s"]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let pid = c.agents[0].child.id().to_string();
    let signal = |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let frozen = std::time::Instant::now();
    c.wait_for("node NotReady", Duration::from_secs(30), || !c.nodes().iter().any(|n| n.ready));
    let took = frozen.elapsed();
    signal("-CONT");
    eprintln!("frozen agent NotReady after {took:?}");
    assert!(took < Duration::from_secs(6), "NotReady after {took:?} with a 2 s link timeout");
    c.wait_for("node Ready again", WAIT, || c.nodes().iter().any(|n| n.ready));
    // A bad value is refused up front.
    let out = cluster::flotilla(&["agent", "--hub", "127.0.0.1:1", "--link-timeout", "50ms"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("outside 1s..10m"));
}
