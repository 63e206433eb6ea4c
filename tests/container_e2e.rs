//! End-to-end tests of container workloads through hub and agents: a busybox image built from
//! Debian's `busybox-static`, pushed with `flotilla push` to a real registry, run under real
//! namespaces and cgroups by agents started as separate processes. They need root and cgroup
//! v1 or v2 controllers; without them they say why and skip, unless `CI` is set.

#[path = "../oci-runtime/tests/support/busybox_image.rs"]
mod busybox_image;
#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/containers.rs"]
mod containers;
#[path = "support/janitor.rs"]
mod janitor;
#[path = "support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::Cluster;
use containers::push_busybox;
use janitor::Janitor;
use proto::messages::{Phase, ReplicaView, Termination};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(90);

fn containers_possible() -> bool {
    containers::containers_possible("container")
}

fn workload(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: container\n  image: {image}\n{extra}"
    )
}

fn apply(c: &Cluster, doc: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn replica(c: &Cluster, name: &str) -> Option<ReplicaView> {
    c.replicas().into_iter().find(|r| r.name == name)
}

fn running(c: &Cluster, name: &str) -> bool {
    replica(c, name).is_some_and(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
}

/// The pids in a replica's container cgroup (any controller hierarchy that has it).
fn container_pids(node: &str, replica: &str) -> Vec<u32> {
    for root in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        let procs = Path::new(root).join("flotilla").join(node).join(replica).join("cgroup.procs");
        if let Ok(text) = std::fs::read_to_string(&procs) {
            let mut pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            pids.sort_unstable();
            return pids;
        }
    }
    Vec::new()
}

/// Everything a replica's container could leave behind on the node.
fn leftovers(c: &Cluster, node: &str, replica: &str) -> Vec<String> {
    let mut left = Vec::new();
    for ctl in ["memory", "cpu", "cpuacct", "pids", "devices", "freezer", "blkio", "cpuset", ""] {
        let p = Path::new("/sys/fs/cgroup").join(ctl).join("flotilla").join(node).join(replica);
        if p.exists() {
            left.push(format!("cgroup {}", p.display()));
        }
    }
    let agent_dir = c.agent_dir(node);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mounts.lines() {
        if let Some(m) = l.split(' ').nth(4)
            && m.starts_with(agent_dir.to_str().unwrap())
            && m.contains(replica)
        {
            left.push(format!("mount {m}"));
        }
    }
    for sub in ["containers/state", "containers/bundles", "network/netns"] {
        let p = agent_dir.join(sub).join(replica);
        if p.exists() {
            left.push(format!("dir {}", p.display()));
        }
    }
    let record = agent_dir.join("network/attachments").join(format!("{replica}.json"));
    if record.exists() {
        left.push(format!("network attachment {}", record.display()));
    }
    // host-local keeps one file per address, holding the container id.
    for f in walk(&agent_dir.join("network/ipam")) {
        if std::fs::read_to_string(&f).is_ok_and(|t| t.lines().next() == Some(replica)) {
            left.push(format!("address allocation {}", f.display()));
        }
    }
    left
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// A hub listening on all addresses and one agent in a network namespace of its own, reaching
/// the hub and the registry (forwarded on the namespace's host-side address) over its veth
/// link. Dropped in field order: hub and agent, data dir, forwarder, namespace.
struct NsSite {
    c: Cluster,
    fwd: netns::TcpForward,
    _ns: netns::Netns,
}

impl NsSite {
    /// `None` (after saying why) without root and iproute2, unless `CI` is set.
    fn start(reg: &TestRegistry, node: &str) -> Option<NsSite> {
        if !netns::netns_possible() {
            return None;
        }
        let ns = netns::Netns::create();
        let fwd = netns::TcpForward::start(ns.host_ip(), reg.addr.parse().unwrap());
        let port = cluster::free_udp_port();
        let mut c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
        let registry = fwd.addr.to_string();
        let hub = format!("{}:{port}", ns.host_ip());
        c.add_agent_via(&ns.exec_prefix(), &hub, node, &["--containers", "on", "--insecure-registry", &registry]);
        Some(NsSite { c, fwd, _ns: ns })
    }

    /// Runs `args` in the agent's network namespace; its stdout.
    fn in_ns(&self, args: &[&str]) -> String {
        let prefix = self._ns.exec_prefix();
        let out = std::process::Command::new(&prefix[0]).args(&prefix[1..]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `reference` (pushed to the registry on loopback) as the agent pulls it, over its link.
    fn via_link(&self, reg: &TestRegistry, reference: &str) -> String {
        reference.replacen(&reg.addr, &self.fwd.addr.to_string(), 1)
    }
}

fn logs(c: &Cluster, replica: &str) -> String {
    String::from_utf8_lossy(&c.cli(&["logs", replica]).stdout).into_owned()
}

#[test]
fn container_workload_runs_on_two_agents_survives_agent_restart_and_leaves_nothing() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["n1", "n2"]);
    let image = push_busybox(
        &reg,
        c.dir.path(),
        "busybox:v1",
        &["sh", "-c", "echo hello from $(hostname) pid $$; exec sleep 100000"],
    );
    c.add_agent("n1", &["--containers", "on"]);
    c.add_agent("n2", &["--containers", "on"]);
    c.wait_for("two Ready nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);

    apply(&c, &workload("web", &image, "  replicas: 2\n  resources: {memory: 64Mi, cpu: 500m, pids: 32}\n"));
    c.wait_for("both container replicas running", WAIT, || running(&c, "web-0") && running(&c, "web-1"));
    let placed: Vec<(String, String)> =
        ["web-0", "web-1"].iter().map(|r| (r.to_string(), replica(&c, r).unwrap().node.unwrap())).collect();
    let nodes: std::collections::BTreeSet<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both agents: {placed:?}");
    // Containers are on their node's bridge by default, each node with a subnet of its own.
    let addresses: Vec<std::net::IpAddr> =
        placed.iter().map(|(r, _)| replica(&c, r).unwrap().status.address.expect("a bridged address")).collect();
    let subnets: std::collections::BTreeSet<String> =
        addresses.iter().map(|a| a.to_string().rsplit_once('.').unwrap().0.to_string()).collect();
    assert_eq!(subnets.len(), 2, "one subnet per node: {addresses:?}");

    // Logs come through `flotilla logs`; the container sees its own hostname and is pid 1.
    for (r, _) in &placed {
        c.wait_for("container output in the logs", WAIT, || logs(&c, r).contains(&format!("hello from {r} pid 1")));
    }

    // SIGKILL the agent of web-0 and start it again: the container keeps running, adopted.
    let (r0, n0) = placed[0].clone();
    let before = container_pids(&n0, &r0);
    assert!(!before.is_empty(), "no processes in the cgroup of {r0}");
    let idx = c.agents.iter().position(|a| a.name == format!("agent {n0}")).unwrap();
    c.agents[idx].kill();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(container_pids(&n0, &r0), before, "the container died with its agent");
    let agent = c.agents.remove(idx);
    drop(agent);
    c.add_agent(&n0, &["--containers", "on"]);
    c.wait_for("node back and replica running", WAIT, || {
        c.nodes().iter().any(|n| n.name == n0 && n.ready) && running(&c, &r0)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(container_pids(&n0, &r0), before, "the restarted agent replaced the container");
    let st = replica(&c, &r0).unwrap().status;
    assert_eq!(st.restarts, 0, "{st:?}");
    assert!(
        std::fs::read_to_string(c.agent_dir(&n0).join("logs").join(format!("{r0}.log")))
            .unwrap()
            .contains("adopted running container"),
        "no adoption note"
    );
    // The shim stamped the container's output like the agent's own lines, and an adopted
    // container is the same run: no previous one.
    let stamped = c.ok(&["logs", &r0, "--timestamps"]);
    for line in stamped.lines() {
        let ts = line.split(' ').next().unwrap();
        assert!(oci_runtime::logline::parse_timestamp(ts.as_bytes()).is_some(), "unstamped line {line:?}");
    }
    assert!(stamped.contains(&format!("Z hello from {r0} pid 1\n")), "{stamped}");
    let out = c.cli(&["logs", &r0, "--previous"]);
    assert!(!out.status.success(), "adoption made a previous run: {}", String::from_utf8_lossy(&out.stdout));

    // Deleting the workload removes containers, cgroups, mounts and state.
    let out = c.cli(&["delete", "workload", "web"]);
    assert!(out.status.success(), "delete: {}", String::from_utf8_lossy(&out.stderr));
    c.wait_for("replicas gone", WAIT, || c.replicas().is_empty());
    c.wait_for("nothing left behind on the nodes", WAIT, || placed.iter().all(|(r, n)| leftovers(&c, n, r).is_empty()));
    for (r, n) in &placed {
        assert!(leftovers(&c, n, r).is_empty(), "{:?}", leftovers(&c, n, r));
        let left = container_pids(n, r);
        assert!(left.is_empty(), "processes {left:?} of {r} still run");
    }
}

#[test]
fn a_failed_container_job_shows_why_and_its_output_stays_readable_through_the_hub() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    // A node name of its own: the janitor clears every container of its nodes.
    let _janitor = Janitor::new(c.dir.path(), &["cj1"]);
    let image = push_busybox(
        &reg,
        c.dir.path(),
        "busybox:job",
        &["sh", "-c", "echo container step one; echo cannot reach the ledger >&2; exit 4"],
    );
    c.add_agent("cj1", &["--containers", "on"]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("cjob", &image, "  kind: Job\n  job: {backoffLimit: 0}\n"));
    let phase = |c: &Cluster| {
        c.workloads().into_iter().find(|w| w.manifest.metadata.name == "cjob").and_then(|w| w.job).map(|j| j.phase)
    };
    c.wait_for("the job to fail", WAIT, || phase(&c).as_deref() == Some("Failed"));

    let text = c.ok(&["describe", "workload", "cjob"]);
    let attempt = text.lines().find(|l| l.contains("cjob-0 attempt 1 on cj1")).unwrap_or_default();
    assert!(attempt.ends_with("exited with code 4"), "{text}");
    assert!(text.contains("| container step one") && text.contains("| cannot reach the ledger"), "{text}");
    assert!(text.contains("Command:        <the image's entrypoint>"), "{text}");
    // The shim wrote the container's output into the attempt's own log, which the hub reads.
    let out = c.ok(&["logs", "cjob"]);
    assert!(out.contains("container step one") && out.contains("cannot reach the ledger"), "{out}");
    let logs_dir = c.agent_dir("cj1").join("logs");
    assert!(logs_dir.join("attempts/cjob/cjob-0.1.log").exists());
    assert!(!logs_dir.join("cjob-0.log").exists(), "an attempt writes no replica log");
    c.wait_for("the ended attempt's container to go", WAIT, || leftovers(&c, "cj1", "cjob-0").is_empty());

    c.ok(&["delete", "workload", "cjob"]);
    c.wait_for("the attempt logs to go with the job", WAIT, || !logs_dir.join("attempts/cjob").exists());
}

#[test]
fn memory_hog_is_oomkilled_fork_bomb_is_held_and_tampered_layer_refused() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["oom-1"]);
    let hog = push_busybox(&reg, c.dir.path(), "hog:v1", &["sh", "-c", "x=aaaaaaaa; while true; do x=$x$x; done"]);
    let bomb = push_busybox(
        &reg,
        c.dir.path(),
        "bomb:v1",
        &["sh", "-c", "i=0; while [ $i -lt 500 ]; do sleep 300 & i=$((i+1)); done; echo spawned; sleep 300"],
    );
    let calm = push_busybox(&reg, c.dir.path(), "calm:v1", &["sleep", "100000"]);
    c.add_agent("oom-1", &["--containers", "on"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));

    apply(&c, &workload("calm", &calm, ""));
    c.wait_for("calm running", WAIT, || running(&c, "calm-0"));
    let calm_pids = container_pids("oom-1", "calm-0");

    // Past its memory limit: OOMKilled, and restarted per policy (Always).
    apply(&c, &workload("hog", &hog, "  resources: {memory: 32Mi}\n"));
    c.wait_for("the hog OOMKilled and restarted", WAIT, || {
        replica(&c, "hog-0")
            .is_some_and(|r| r.status.restarts >= 1 && r.status.last_termination == Some(Termination::OomKilled))
    });
    let describe = String::from_utf8_lossy(&c.cli(&["describe", "workload", "hog"]).stdout).into_owned();
    assert!(describe.contains("OOMKilled"), "{describe}");
    // The replica's event history says why it is not simply running.
    let describe = String::from_utf8_lossy(&c.cli(&["describe", "replica", "hog-0"]).stdout).into_owned();
    let events = describe.split_once("Events:").map(|(_, e)| e.to_string()).unwrap_or_default();
    for want in ["Started", "OomKilled", "OOMKilled: exceeded its memory limit", "BackOff", "restarting in"] {
        assert!(events.contains(want), "no {want:?} in the events:\n{describe}");
    }
    let oom = events.find("OomKilled").unwrap();
    assert!(events[oom..].contains("BackOff"), "BackOff should follow the OOM kill:\n{describe}");

    // A fork bomb meets the pids limit: its forks fail, the shell gives up (exit 2) and the
    // replica restarts per policy, while the node and its other containers hold.
    apply(&c, &workload("bomb", &bomb, "  resources: {pids: 16}\n"));
    c.wait_for("the bomb stopped by its pids limit", WAIT, || {
        replica(&c, "bomb-0").is_some_and(|r| r.status.last_termination == Some(Termination::Exited { code: 2 }))
            && logs(&c, "bomb-0").contains("can't fork")
    });
    assert!(!logs(&c, "bomb-0").contains("spawned"), "500 processes were spawned despite pids: 16");

    // A layer changed in the registry after the push is refused with its digest. The image
    // has a layer of its own (the busybox layer is shared and already on the node).
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
    let layer = busybox_image::layer_tar(&[busybox_image::file("data/unique", b"only in this image", 0o644)]);
    let built = busybox_image::build_image(&[(layer, true)], "linux", arch, &["true"]);
    let layout = c.dir.path().join("layout-tampered");
    busybox_image::write_oci_layout(&layout, &built, "tampered:v1");
    let tampered = reg.reference("tampered:v1");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), layout.as_os_str(), tampered.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    let layer_digest = busybox_image::sha256(&built.layers[0].1);
    let blob = reg.blob_data_path(&layer_digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    apply(&c, &workload("tampered", &tampered, ""));
    c.wait_for("the tampered image refused", WAIT, || {
        replica(&c, "tampered-0").is_some_and(|r| match &r.status.last_termination {
            Some(Termination::StartFailed { message }) => message.contains(&layer_digest),
            _ => false,
        })
    });
    let images: PathBuf =
        c.agent_dir("oom-1").join("images/blobs/sha256").join(layer_digest.trim_start_matches("sha256:"));
    assert!(!images.exists(), "the tampered blob became visible");

    // Through all of it the calm container kept running, untouched.
    assert!(running(&c, "calm-0"));
    assert_eq!(container_pids("oom-1", "calm-0"), calm_pids);

    for w in ["hog", "bomb", "tampered", "calm"] {
        c.cli(&["delete", "workload", w]);
    }
    c.wait_for("replicas gone", WAIT, || c.replicas().is_empty());
    c.wait_for("nothing left behind", WAIT, || {
        ["hog-0", "bomb-0", "tampered-0", "calm-0"].iter().all(|r| leftovers(&c, "oom-1", r).is_empty())
    });
}

#[test]
fn imported_image_runs_on_an_agent_without_any_registry() {
    if !containers_possible() {
        return;
    }
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["air-1"]);
    // An air-gapped site: the image arrives as an OCI layout tar and is imported on the node;
    // the reference names a registry that does not exist.
    let layout = c.dir.path().join("layout");
    assert!(busybox_image::write_busybox_layout(&layout, "v1", &["sh", "-c", "echo offline ok; exec sleep 100000"]));
    let tar = c.dir.path().join("busybox.tar");
    let st = std::process::Command::new("tar").arg("-cf").arg(&tar).arg("-C").arg(&layout).arg(".").status().unwrap();
    assert!(st.success());
    let reference = "registry.invalid/site/busybox:v1";
    let agent_dir = c.agent_dir("air-1");
    let out = cluster::flotilla(&[
        std::ffi::OsStr::new("image"),
        "import".as_ref(),
        tar.as_os_str(),
        "--data-dir".as_ref(),
        agent_dir.as_os_str(),
        "--name".as_ref(),
        reference.as_ref(),
    ]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported"), "{}", String::from_utf8_lossy(&out.stdout));

    c.add_agent("air-1", &["--containers", "on"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("offline", reference, ""));
    c.wait_for("the imported image running", WAIT, || running(&c, "offline-0"));
    c.wait_for("its output", WAIT, || logs(&c, "offline-0").contains("offline ok"));

    // A corrupt archive is refused with a clear error and imports nothing.
    let bad = c.dir.path().join("bad.tar");
    std::fs::write(&bad, b"not a tar archive at all").unwrap();
    let out = cluster::flotilla(&[
        std::ffi::OsStr::new("image"),
        "import".as_ref(),
        bad.as_os_str(),
        "--data-dir".as_ref(),
        agent_dir.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.tar"), "{err}");

    c.cli(&["delete", "workload", "offline"]);
    c.wait_for("replicas gone", WAIT, || c.replicas().is_empty());
    c.wait_for("nothing left behind", WAIT, || leftovers(&c, "air-1", "offline-0").is_empty());
}

#[test]
fn a_node_short_of_disk_refuses_to_pull_with_a_clear_status() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["disk-1"]);
    let image = push_busybox(&reg, c.dir.path(), "busybox:v1", &["sleep", "100000"]);
    // No disk has a million GiB free: every pull and container start is refused.
    c.add_agent("disk-1", &["--containers", "on", "--min-free-disk", "1000000Gi"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("big", &image, ""));
    c.wait_for("the start refused for lack of disk", WAIT, || {
        replica(&c, "big-0").is_some_and(|r| match &r.status.last_termination {
            Some(Termination::StartFailed { message }) => message.contains("not enough disk space"),
            _ => false,
        })
    });
    let describe = String::from_utf8_lossy(&c.cli(&["describe", "replica", "big-0"]).stdout).into_owned();
    assert!(describe.contains("StartFailed") && describe.contains("MiB required"), "{describe}");
    // Nothing was pulled or unpacked.
    let blobs = c.agent_dir("disk-1").join("images/blobs/sha256");
    let pulled = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pulled, 0, "blobs were written to a disk the agent considers full");
    assert!(leftovers(&c, "disk-1", "big-0").is_empty(), "{:?}", leftovers(&c, "disk-1", "big-0"));
}

#[test]
fn probes_reach_into_the_container_and_an_unhealthy_one_is_restarted() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    // The agent runs in a network namespace of its own.
    let Some(mut site) = NsSite::start(&reg, "probe-1") else { return };
    let _janitor = Janitor::new(site.c.dir.path(), &["probe-1"]);
    // Serves HTTP on 8080 inside its own network namespace and is healthy for two seconds.
    let script = "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && touch /tmp/healthy && \
                  httpd -f -p 8080 -h /tmp/www & (sleep 2; rm /tmp/healthy) & exec sleep 100000";
    let image = push_busybox(&reg, site.c.dir.path(), "busybox:probes", &["sh", "-c", script]);
    let image = site.via_link(&reg, &image);
    let c = &mut site.c;
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    let probe = |kind: &str, handler: &str, extra: &str| {
        format!("  {kind}: {{{handler}, period: 300ms, timeout: 2s{extra}}}\n")
    };
    let web = format!(
        "{}{}",
        probe("readinessProbe", "httpGet: {path: /index.html, port: 8080}", ""),
        probe("livenessProbe", "exec: {command: [cat, /tmp/healthy]}", ", failureThreshold: 2"),
    );
    apply(c, &workload("web", &image, &web));
    // Nothing listens on 9999: running, never ready, never restarted for it.
    apply(c, &workload("shy", &image, &probe("readinessProbe", "tcpSocket: {port: 9999}", "")));

    c.wait_for("web ready", WAIT, || replica(c, "web-0").is_some_and(|r| r.status.ready));
    c.wait_for("web killed by its liveness probe", WAIT, || {
        replica(c, "web-0").is_some_and(|r| matches!(r.status.last_termination, Some(Termination::Unhealthy { .. })))
    });
    let r = replica(c, "web-0").unwrap();
    let Some(Termination::Unhealthy { message }) = &r.status.last_termination else { unreachable!() };
    assert!(
        message.starts_with("liveness probe failed 2 times in a row: exec cat /tmp/healthy exited with code 1"),
        "{message}"
    );
    // The restarted container is healthy and ready again (a fresh writable layer).
    c.wait_for("web ready after its restart", WAIT, || {
        replica(c, "web-0")
            .is_some_and(|r| r.status.restarts >= 1 && r.status.ready && r.status.phase == Phase::Running)
    });
    let text = String::from_utf8_lossy(&c.cli(&["describe", "replica", "web-0"]).stdout).into_owned();
    assert!(text.contains("Unhealthy") && text.contains("readiness probe passed"), "{text}");

    let shy = replica(c, "shy-0").unwrap();
    assert_eq!((shy.status.phase, shy.status.ready, shy.status.restarts), (Phase::Running, false, 0), "{shy:?}");
    let w = c.workloads().into_iter().find(|w| w.manifest.metadata.name == "shy").unwrap();
    assert_eq!(w.ready_replicas, 0);
    c.ok(&["delete", "workload", "web"]);
    c.ok(&["delete", "workload", "shy"]);
    c.wait_for("containers removed", WAIT, || c.replicas().is_empty());
    c.wait_for("nothing left", WAIT, || {
        leftovers(c, "probe-1", "web-0").is_empty() && leftovers(c, "probe-1", "shy-0").is_empty()
    });
}

/// A busybox httpd serving `/$PAGE` (default `index.html`) on port 8080 in the container's
/// own network namespace: ready (to the probe on `/index.html`) unless PAGE names another page.
const HTTPD: &str = "mkdir -p /tmp/www && echo ok > /tmp/www/${PAGE:-index.html} && exec httpd -f -p 8080 -h /tmp/www";

/// Revision `v` of the httpd workload `web`: `replicas`, serving `page`, with `strategy`.
fn web_revision(image: &str, replicas: u32, page: &str, v: u32, strategy: &str) -> String {
    workload(
        "web",
        image,
        &format!(
            "  replicas: {replicas}\n  env: {{PAGE: {page}, V: \"{v}\"}}\n  terminationGracePeriod: 1s\n  strategy: {strategy}\n  readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, period: 200ms, timeout: 3s, failureThreshold: 10}}\n"
        ),
    )
}

/// The replicas' template hashes, by replica name.
fn template_hashes(c: &Cluster) -> Vec<String> {
    let mut rs = c.replicas();
    rs.sort_by(|a, b| a.name.cmp(&b.name));
    rs.into_iter().map(|r| r.template_hash).collect()
}

/// Replicas running and ready.
fn ready_count(c: &Cluster) -> usize {
    c.replicas().iter().filter(|r| r.status.ready && r.status.phase == Phase::Running).count()
}

/// An agent `node` in its own network namespace, Ready, and the httpd image as it pulls it.
/// The janitor comes first so it is dropped (and cleans up) before the site.
fn httpd_site(reg: &TestRegistry, node: &'static str, tag: &str) -> Option<(Janitor, NsSite, String)> {
    if !containers_possible() {
        return None;
    }
    let site = NsSite::start(reg, node)?;
    let janitor = Janitor::new(site.c.dir.path(), &[node]);
    let image = push_busybox(reg, site.c.dir.path(), tag, &["sh", "-c", HTTPD]);
    let image = site.via_link(reg, &image);
    site.c.wait_for("node", WAIT, || site.c.nodes().iter().any(|n| n.ready));
    Some((janitor, site, image))
}

#[test]
fn a_rolling_update_advances_on_readiness_and_a_never_ready_revision_holds_it() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some((_janitor, mut site, image)) = httpd_site(&reg, "roll-1", "busybox:rollout") else { return };
    let c = &mut site.c;
    let revision = |page: &str, v: u32| web_revision(&image, 3, page, v, "{maxUnavailable: 1}");
    apply(c, &revision("index.html", 1));
    c.wait_for("3 ready", WAIT, || ready_count(c) == 3);
    let v1 = template_hashes(c)[0].clone();

    // Revision 2 never gets ready: one replica moves to it, the other two keep serving v1.
    apply(c, &revision("other.html", 2));
    c.wait_for("the first replica on revision 2", WAIT, || {
        replica(c, "web-0").is_some_and(|r| r.template_hash != v1 && r.status.phase == Phase::Running)
    });
    let v2 = replica(c, "web-0").unwrap().template_hash;
    let held_since = std::time::Instant::now();
    while held_since.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            template_hashes(c),
            [v2.clone(), v1.clone(), v1.clone()],
            "the rollout went past a replica that is not ready"
        );
        assert!(ready_count(c) >= 2, "{:?}", c.replicas());
        std::thread::sleep(Duration::from_millis(200));
    }
    let r0 = replica(c, "web-0").unwrap();
    assert!(!r0.status.ready && r0.status.restarts == 0, "{r0:?}");

    // Revision 3 is healthy: the stuck replica goes first, then one at a time, never fewer
    // than two serving.
    apply(c, &revision("index.html", 3));
    let mut min_available = 3;
    c.wait_for("all on revision 3 and ready", WAIT, || {
        min_available = min_available.min(ready_count(c));
        let h = template_hashes(c);
        h.len() == 3 && h.iter().all(|x| *x != v1 && *x != v2) && ready_count(c) == 3
    });
    assert!(min_available >= 2, "{min_available} replicas served during the rollout (maxUnavailable 1)");
    let w = c.workloads().into_iter().find(|w| w.manifest.metadata.name == "web").unwrap();
    assert_eq!(w.ready_replicas, 3);
}

#[test]
fn a_rollout_that_makes_no_progress_rolls_back_by_itself_and_history_undo_scale_work() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some((_janitor, mut site, image)) = httpd_site(&reg, "undo-1", "busybox:rollback") else { return };
    let c = &mut site.c;
    let revision = |page: &str, v: u32| web_revision(&image, 2, page, v, "{maxUnavailable: 1, progressDeadline: 4s}");

    apply(c, &revision("index.html", 1));
    // `rollout status` waits for the rollout and says it completed.
    let status = c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    assert!(status.contains("complete: 2/2 updated and available"), "{status}");
    let v1 = template_hashes(c)[0].clone();

    // Revision 2 never gets ready: after its 4 s deadline the hub rolls it back by itself.
    apply(c, &revision("other.html", 2));
    c.wait_for("revision 2 reaches web-0", WAIT, || template_hashes(c)[0] != v1);
    let v2 = template_hashes(c)[0].clone();
    c.wait_for("rolled back to revision 1's template, both ready", WAIT, || {
        template_hashes(c) == [v1.clone(), v1.clone()] && ready_count(c) == 2
    });
    let history = c.ok(&["rollout", "history", "web"]);
    let lines: Vec<&str> = history.lines().skip(2).collect();
    assert_eq!(lines.len(), 3, "{history}");
    assert!(lines[0].starts_with('1') && lines[0].contains(&v1) && lines[0].contains('*'), "{history}");
    assert!(lines[1].contains(&v2) && !lines[1].contains('*'), "{history}");
    assert!(
        lines[2].contains(&v1) && lines[2].contains("rollback: template") && lines[2].contains("no progress"),
        "{history}"
    );
    // The rollback kept what is not the template: still 2 replicas with the same strategy.
    let w = c.workloads().into_iter().find(|w| w.manifest.metadata.name == "web").unwrap();
    assert_eq!(w.manifest.spec.replicas, Some(2));
    assert_eq!(w.manifest.spec.env.get("V").map(|v| v.to_string()).as_deref(), Some("1"));

    // Scale up, a new good revision, then undo to revision 1 by number.
    c.ok(&["scale", "web", "--replicas", "3"]);
    c.wait_for("3 ready", WAIT, || ready_count(c) == 3);
    apply(c, &revision("index.html", 3).replace("replicas: 2", "replicas: 3"));
    c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    let v3 = template_hashes(c)[0].clone();
    assert!(v3 != v1 && template_hashes(c).iter().all(|h| *h == v3));
    c.ok(&["rollout", "undo", "web", "--to-revision", "1"]);
    c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    assert_eq!(template_hashes(c), [v1.clone(), v1.clone(), v1.clone()]);
    let undo = c.cli(&["rollout", "undo", "web", "--to-revision", "42"]);
    assert!(!undo.status.success() && String::from_utf8_lossy(&undo.stderr).contains("no revision 42"));
    let scale = c.cli(&["scale", "nope", "--replicas", "2"]);
    assert!(!scale.status.success() && String::from_utf8_lossy(&scale.stderr).contains("not found"));
}

#[test]
fn a_surge_rollout_never_drops_below_the_desired_count() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some((_janitor, mut site, image)) = httpd_site(&reg, "surge-1", "busybox:surge") else { return };
    let c = &mut site.c;
    let revision = |v: u32| web_revision(&image, 2, "index.html", v, "{maxUnavailable: 0, maxSurge: 1}");
    apply(c, &revision(1));
    c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    let v1 = c.replicas()[0].template_hash.clone();
    apply(c, &revision(2));
    let (mut min_ready, mut max_replicas) = (2, 2);
    c.wait_for("all on revision 2, the stand-in gone", WAIT, || {
        let rs = c.replicas();
        min_ready = min_ready.min(ready_count(c));
        max_replicas = max_replicas.max(rs.len());
        rs.len() == 2 && rs.iter().all(|r| r.template_hash != v1 && r.status.ready)
    });
    assert_eq!(max_replicas, 3, "the surge replica web-2 never appeared");
    assert!(min_ready >= 2, "only {min_ready} replicas were ready during a maxUnavailable: 0 rollout");
}

#[test]
fn a_hub_killed_mid_rollout_finishes_it_after_restart_without_extra_restarts() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some((_janitor, mut site, image)) = httpd_site(&reg, "kill-1", "busybox:midroll") else { return };
    let c = &mut site.c;
    let revision = |v: u32| web_revision(&image, 3, "index.html", v, "{maxUnavailable: 1}");
    apply(c, &revision(1));
    c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    let v1 = c.replicas()[0].template_hash.clone();

    // SIGKILL the hub once the rollout has started and before it is done.
    apply(c, &revision(2));
    c.wait_for("the rollout under way", WAIT, || {
        let rs = c.replicas();
        let updated = rs.iter().filter(|r| r.template_hash != v1).count();
        (1..3).contains(&updated)
    });
    c.restart_hub();
    let status = c.ok(&["rollout", "status", "web", "--timeout", "90s"]);
    assert!(status.contains("complete: 3/3 updated and available"), "{status}");
    for r in c.replicas() {
        assert_ne!(r.template_hash, v1);
        assert_eq!(r.status.restarts, 0, "{} restarted: {:?}", r.name, r.status);
        // One start on revision 1, one on revision 2: nothing started twice.
        let starts = r.status.events.iter().filter(|e| e.reason == proto::messages::EventReason::Started).count();
        assert_eq!(starts, 2, "{} started {starts} times: {:?}", r.name, r.status.events);
    }
}

/// Autonomy scenario 6, first part, with the agent in a network namespace of its own: a
/// container that crash-loops backs off 1 s, 2 s, 4 s (doubling up to 30 s), and
/// `describe replica` shows why, exit by exit.
#[test]
fn a_crash_looping_container_backs_off_doubling_and_describe_shows_why() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let Some(mut site) = NsSite::start(&reg, "crash-1") else { return };
    let _janitor = Janitor::new(site.c.dir.path(), &["crash-1"]);
    let image = push_busybox(&reg, site.c.dir.path(), "busybox:crash", &["sh", "-c", "echo failing; exit 3"]);
    let image = site.via_link(&reg, &image);
    let c = &mut site.c;
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(c, &workload("crash", &image, ""));
    c.wait_for("three restarts", WAIT, || replica(c, "crash-0").is_some_and(|r| r.status.restarts >= 3));
    let r = replica(c, "crash-0").unwrap();
    assert_eq!(r.status.last_termination, Some(Termination::Exited { code: 3 }));
    let text = c.ok(&["describe", "replica", "crash-0"]);
    let events = text.split_once("Events:").map(|(_, e)| e.to_string()).unwrap_or_default();
    let delays = cluster::backoff_delays(&text);
    assert!(
        delays.windows(3).any(|w| w == ["1s", "2s", "4s"]),
        "expected back-offs 1s, 2s, 4s in order, got {delays:?}:\n{text}"
    );
    assert!(events.contains("exited with code 3"), "{text}");
}

/// The session id of a process (field 6 of /proc/PID/stat).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(3)?.parse().ok()
}

/// The parent pid of a process (field 4 of /proc/PID/stat).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// `systemctl restart` with `KillMode=process`: SIGTERM to the agent's main pid only, wait for
/// it to exit, start it again. Every container keeps its processes (same pids), RESTARTS stays
/// 0, the restart and the adoption are events in `describe replica`, and the shims live in
/// sessions of their own (a signal to the agent's session or group never reaches them). With
/// `--stop-workloads-on-exit` the same SIGTERM stops the containers and leaves nothing behind.
#[test]
fn an_agent_stopped_with_sigterm_leaves_its_containers_running_and_adopts_them() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["term-1"]);
    let image = push_busybox(&reg, c.dir.path(), "busybox:term", &["sh", "-c", "echo up; exec sleep 100000"]);
    c.add_agent("term-1", &["--containers", "on"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("calm", &image, "  replicas: 2\n"));
    c.wait_for("both running", WAIT, || running(&c, "calm-0") && running(&c, "calm-1"));
    let before: Vec<Vec<u32>> = ["calm-0", "calm-1"].iter().map(|r| container_pids("term-1", r)).collect();
    assert!(before.iter().all(|p| !p.is_empty()), "no container processes: {before:?}");
    let agent_pid = c.agents[0].child.id();
    for pids in &before {
        let shim = parent_of(pids[0]).expect("the container's parent");
        assert_ne!(session_of(shim), session_of(agent_pid), "shim {shim} shares the agent's session");
    }

    let stop = |c: &mut Cluster| {
        let pid = c.agents[0].child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = c.agents[0].wait_exit(WAIT).expect("the agent exits on SIGTERM");
        assert!(status.success(), "agent exit status {status:?}");
        c.agents.clear();
    };
    stop(&mut c);
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<Vec<u32>> = ["calm-0", "calm-1"].iter().map(|r| container_pids("term-1", r)).collect();
    assert_eq!(after, before, "a graceful agent stop stopped its containers");

    c.add_agent("term-1", &["--containers", "on"]);
    c.wait_for("node back and both running", WAIT, || {
        c.nodes().iter().any(|n| n.name == "term-1" && n.ready) && running(&c, "calm-0") && running(&c, "calm-1")
    });
    std::thread::sleep(Duration::from_secs(1));
    let adopted: Vec<Vec<u32>> = ["calm-0", "calm-1"].iter().map(|r| container_pids("term-1", r)).collect();
    assert_eq!(adopted, before, "the restarted agent replaced a container");
    for r in ["calm-0", "calm-1"] {
        let st = replica(&c, r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r}: {st:?}");
        let text = c.ok(&["describe", "replica", r]);
        let events = text.split_once("Events:").map(|(_, e)| e.to_string()).unwrap_or_default();
        assert!(events.contains("AgentRestarted") && events.contains("after a clean stop"), "{text}");
        assert!(events.contains("Adopted") && events.contains("adopted running container"), "{text}");
        // The history from before the restart is still there.
        assert!(events.find("Started").unwrap() < events.find("AgentRestarted").unwrap(), "{text}");
    }

    // Stopping with --stop-workloads-on-exit stops them, and cleans up after them.
    c.agents.clear();
    c.wait_for("node gone", WAIT, || c.nodes().iter().all(|n| !n.ready));
    c.add_agent("term-1", &["--containers", "on", "--stop-workloads-on-exit"]);
    c.wait_for("node back and both running", WAIT, || {
        c.nodes().iter().any(|n| n.name == "term-1" && n.ready) && running(&c, "calm-0") && running(&c, "calm-1")
    });
    stop(&mut c);
    for r in ["calm-0", "calm-1"] {
        assert!(container_pids("term-1", r).is_empty(), "{r} still runs");
        assert!(leftovers(&c, "term-1", r).is_empty(), "{:?}", leftovers(&c, "term-1", r));
    }
}

/// Kills, when dropped, every process whose command line names `dir`: agents that a rollback
/// restarted (no longer children of the test) and their helpers.
struct Orphans(PathBuf);

impl Drop for Orphans {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if pid == std::process::id() as i32 {
                continue;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

fn upgrade_status(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.ok(&["upgrade", "status", "-o", "json"])).unwrap()
}

fn node_state<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("{node} in {status}"))
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    format!("sha256:{}", String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap())
}

/// `flotilla upgrade agents` end to end, two agents each running a copy of the binary of its
/// own, with a container on each. The new binary is this build with bytes appended (another
/// digest, the same code: the previous commit's binary cannot take upgrade orders, which this
/// change introduces). One node at a time is upgraded; each agent restarts into the new binary
/// in the same process with its container untouched (same pids, 0 restarts) and reports the
/// new digest, keeping the previous binary beside it. Then a broken binary (`/bin/false`,
/// which exits at once): the first node's agent goes back to the previous binary by itself,
/// its container still untouched, and the upgrade pauses with the second node never ordered.
#[test]
fn agents_upgrade_in_batches_keeping_their_containers_and_a_broken_binary_rolls_back_and_pauses() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["up-1", "up-2"]);
    let _orphans = Orphans(c.dir.path().to_path_buf());
    let nodes = ["up-1", "up-2"];
    let root = c.dir.path().to_path_buf();
    let exe = |node: &str| root.join(format!("bin-{node}")).join("flotilla");
    let original = std::fs::read(cluster::bin()).unwrap();
    for node in nodes {
        std::fs::create_dir_all(exe(node).parent().unwrap()).unwrap();
        std::fs::copy(cluster::bin(), exe(node)).unwrap();
        let program = exe(node);
        c.add_agent_from(&program, node, &["--containers", "on"]);
    }
    c.wait_for("both nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let image = push_busybox(&reg, c.dir.path(), "busybox:upgrade", &["sh", "-c", "echo up; exec sleep 100000"]);
    apply(&c, &workload("calm", &image, "  kind: EveryNode\n"));
    let all_running = |c: &Cluster| {
        let reps = c.replicas();
        reps.len() == 2
            && reps.iter().all(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
    };
    c.wait_for("a container on each node", WAIT, || all_running(&c));
    let placed: Vec<(String, String)> =
        c.replicas().into_iter().map(|r| (r.node.clone().unwrap(), r.name.clone())).collect();
    let pids = || -> Vec<Vec<u32>> { placed.iter().map(|(n, r)| container_pids(n, r)).collect() };
    let before = pids();
    assert!(before.iter().all(|p| !p.is_empty()), "{before:?} {placed:?}");

    // The next binary: this build plus a trailer, pushed as an agent artifact.
    let next = c.dir.path().join("next").join("flotilla");
    std::fs::create_dir_all(next.parent().unwrap()).unwrap();
    let mut bytes = original.clone();
    bytes.extend_from_slice(b"\nflotilla upgrade test trailer\n");
    std::fs::write(&next, &bytes).unwrap();
    let next_digest = sha256_of(&next);
    let next_ref = reg.reference("flotilla-agent:next");
    let out = cluster::flotilla(&["push", "--agent", next.to_str().unwrap(), &next_ref, "--agent-version", "next"]);
    assert!(out.status.success(), "push --agent: {}", String::from_utf8_lossy(&out.stderr));

    let clock = std::time::Instant::now();
    let started = c.ok(&["upgrade", "agents", "--to", &next_ref, "--max-unavailable", "1", "--deadline", "60s"]);
    assert!(started.contains("Progressing"), "{started}");
    let mut most_at_once = 0;
    c.wait_for("the upgrade to complete", Duration::from_secs(180), || {
        let s = upgrade_status(&c);
        let upgrading = s["nodes"].as_array().unwrap().iter().filter(|n| n["state"] == "Upgrading").count();
        most_at_once = most_at_once.max(upgrading);
        assert_ne!(s["phase"], "Paused", "{s}");
        s["phase"] == "Complete"
    });
    eprintln!("upgrade of 2 nodes, one at a time: complete after {:?}", clock.elapsed());
    assert!(most_at_once <= 1, "{most_at_once} nodes upgrading at once with --max-unavailable 1");
    let s = upgrade_status(&c);
    for node in nodes {
        let n = node_state(&s, node);
        assert_eq!(n["state"], "Upgraded", "{s}");
        assert_eq!(n["binary"]["digest"], next_digest.as_str(), "{s}");
        assert_eq!(n["binary"]["image"], next_ref.as_str(), "{s}");
        assert_eq!(std::fs::read(exe(node)).unwrap(), bytes, "{node} runs the new binary from its path");
        let previous = exe(node).with_file_name("flotilla.previous");
        assert_eq!(std::fs::read(previous).unwrap(), original, "{node} kept the previous binary");
    }
    // The same agent processes (an exec keeps the pid), the same containers, no restarts.
    for a in c.agents.iter_mut() {
        assert!(a.child.try_wait().unwrap().is_none(), "{} exited", a.name);
    }
    assert_eq!(pids(), before, "an agent upgrade restarted a container");
    c.wait_for("both running after the upgrade", WAIT, || all_running(&c));
    for r in c.replicas() {
        assert_eq!(r.status.restarts, 0, "{}: {:?}", r.name, r.status);
    }
    let text = c.ok(&["describe", "node", "up-1"]);
    assert!(text.contains("Ready") || text.contains("ready"), "{text}");

    // A binary that exits at start: rolled back by the agent itself, and the upgrade pauses.
    let broken_ref = reg.reference("flotilla-agent:broken");
    let out = cluster::flotilla(&["push", "--agent", "/bin/false", &broken_ref]);
    assert!(out.status.success(), "push --agent: {}", String::from_utf8_lossy(&out.stderr));
    let clock = std::time::Instant::now();
    c.ok(&["upgrade", "agents", "--to", &broken_ref, "--max-unavailable", "1", "--deadline", "30s"]);
    c.wait_for("the upgrade to pause", Duration::from_secs(180), || upgrade_status(&c)["phase"] == "Paused");
    eprintln!("broken binary: upgrade paused after {:?}", clock.elapsed());
    let s = upgrade_status(&c);
    let message = s["message"].as_str().unwrap();
    // The watcher's own words: the new binary ran, exited, and the previous one came back.
    assert!(message.starts_with("node up-1:") && message.contains("rolled back"), "{s}");
    assert!(message.contains("exited before it reached the hub; back on the previous binary"), "{s}");
    let failed = node_state(&s, "up-1");
    assert_eq!(failed["state"], "Failed", "{s}");
    assert_eq!(node_state(&s, "up-2")["state"], "Pending", "the second node was ordered after a failure: {s}");
    // up-1 is back on the previous binary (the one the last upgrade installed), connected.
    c.wait_for("up-1 back", WAIT, || c.nodes().iter().any(|n| n.name == "up-1" && n.ready));
    let s = upgrade_status(&c);
    assert_eq!(node_state(&s, "up-1")["binary"]["digest"], next_digest.as_str(), "{s}");
    assert_eq!(std::fs::read(exe("up-1")).unwrap(), bytes, "the previous binary is back in place");
    assert_eq!(pids(), before, "a rolled-back upgrade restarted a container");
    c.wait_for("both running after the rollback", WAIT, || all_running(&c));
    for r in c.replicas() {
        assert_eq!(r.status.restarts, 0, "{}: {:?}", r.name, r.status);
    }
    let audit = c.ok(&["audit"]);
    assert!(audit.contains("upgrade agents") && audit.contains(&broken_ref), "{audit}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn containers_read_configs_and_secrets_as_files_and_env_updated_in_place_and_never_on_disk() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["s1", "s2"]);
    // The container shows digests of what it reads, never the secret itself.
    let image = push_busybox(
        &reg,
        c.dir.path(),
        "busybox:objects",
        &[
            "sh",
            "-c",
            "echo env=$(printf %s \"$DB_PASS\" | sha256sum | cut -d' ' -f1); \
             while true; do echo file=$(sha256sum < /run/secrets/password | cut -d' ' -f1) mode=$(cat /etc/app/mode) pid=$$; sleep 0.5; done",
        ],
    );
    c.add_agent("s1", &["--containers", "on"]);
    c.add_agent("s2", &["--containers", "on"]);
    c.wait_for("two Ready nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let suffix: u64 = rand::random();
    let (p1, p2) = (format!("first-secret-{suffix:x}"), format!("second-secret-{suffix:x}"));

    // The reader first: it waits, saying which object it lacks.
    apply(
        &c,
        &workload(
            "app",
            &image,
            "  env: {DB_PASS: {valueFrom: {secret: db, key: password}}}\n  volumes:\n  - {name: creds, mountPath: /run/secrets, secret: db}\n  - {name: settings, mountPath: /etc/app, config: app}\n",
        ),
    );
    apply(&c, "apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: app}\ndata: {mode: one}\n");
    c.wait_for("the replica waiting for the secret, saying so", WAIT, || {
        replica(&c, "app-0")
            .is_some_and(|r| r.status.phase == Phase::Pending && r.status.message.contains("secret/db not found"))
    });
    let describe = c.ok(&["describe", "replica", "app-0"]);
    assert!(describe.contains("secret/db not found"), "{describe}");
    // Deleting a config in use is refused.
    let out = c.cli(&["delete", "config", "app"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use by app"), "{out:?}");

    let out = c.cli(&["create", "secret", "db", "--from-literal", &format!("password={p1}")]);
    assert!(out.status.success(), "create secret: {}", String::from_utf8_lossy(&out.stderr));
    c.wait_for("the replica running once the secret exists", WAIT, || running(&c, "app-0"));
    let (s1, f1) = (sha256_hex(p1.as_bytes()), sha256_hex(p1.as_bytes()));
    c.wait_for("the secret read as env and as a file, the config as a file", WAIT, || {
        let l = logs(&c, "app-0");
        l.contains(&format!("env={s1}")) && l.contains(&format!("file={f1} mode=one"))
    });
    let before = replica(&c, "app-0").unwrap();
    assert_eq!(before.status.restarts, 0, "waiting for a secret is not a restart");

    // A config change reaches the running container in place: no restart.
    apply(&c, "apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: app}\ndata: {mode: two}\n");
    c.wait_for("the new config file seen by the running container", WAIT, || logs(&c, "app-0").contains("mode=two"));
    let after = replica(&c, "app-0").unwrap();
    assert_eq!((after.status.restarts, &after.template_hash), (before.status.restarts, &before.template_hash));
    assert_eq!(after.status.started_at_ms, before.status.started_at_ms, "the container was not restarted");

    // A secret read through the environment rolls the workload out.
    let out = c.cli(&["create", "secret", "db", "--from-literal", &format!("password={p2}")]);
    assert!(out.status.success(), "update secret: {}", String::from_utf8_lossy(&out.stderr));
    let s2 = sha256_hex(p2.as_bytes());
    c.wait_for("the workload rolled out with the new secret in its environment", WAIT, || {
        running(&c, "app-0") && logs(&c, "app-0").contains(&format!("env={s2}"))
    });
    assert_ne!(replica(&c, "app-0").unwrap().template_hash, before.template_hash);
    let history = c.ok(&["rollout", "history", "app"]);
    assert!(history.contains("secret/db changed"), "{history}");

    // What is shown: keys, sizes, a digest; never a value.
    let shown = [
        c.ok(&["get", "secrets", "-o", "yaml"]),
        c.ok(&["get", "secrets", "-o", "wide"]),
        c.ok(&["describe", "secret", "db"]),
        c.ok(&["get", "workloads", "-o", "yaml"]),
        c.ok(&["describe", "workload", "app"]),
    ]
    .join("\n");
    assert!(shown.contains("password"), "{shown}");
    assert!(!shown.contains(&p1) && !shown.contains(&p2), "a secret value was shown:\n{shown}");

    // Rotating the cluster key seals everything again with a new key; the hub, restarted on
    // the new key file, still serves its readers.
    let rotated = c.ok(&["secrets", "rotate-key"]);
    assert!(rotated.contains("2 configs and secrets"), "{rotated}");
    let key_file = std::fs::read_to_string(c.hub_dir().join("cluster.key")).unwrap();
    assert_eq!(key_file.lines().count(), 2, "the old key stays until every hub has the new file");
    c.restart_hub();
    apply(&c, "apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: app}\ndata: {mode: three}\n");
    c.wait_for("a config sealed under the new key reaches the container", WAIT, || {
        logs(&c, "app-0").contains("mode=three")
    });

    // Nowhere on disk: not the hub's store or logs, not the agents' data dirs (their state,
    // caches, container bundles), not any log file of the cluster.
    for p in [&p1, &p2] {
        let found = cluster::files_holding(c.dir.path(), p.as_bytes());
        assert!(found.is_empty(), "the plaintext of a secret is on disk in {found:?}");
    }
}

/// A Prometheus of the test's own, scraping `targets` every second.
struct Prometheus {
    proc: cluster::Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> Option<Prometheus> {
        let Ok(bin) = which("prometheus") else {
            assert!(std::env::var_os("CI").is_none(), "prometheus missing: CI must run the metrics test");
            eprintln!("skipping: no prometheus binary (Debian's prometheus package)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 900ms}}\nscrape_configs:\n- job_name: flotilla\n  static_configs:\n  - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", cluster::free_tcp_port());
        let args = vec![
            format!("--config.file={}", dir.path().join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={addr}"),
        ];
        let proc = cluster::Proc::spawn_program("prometheus", &bin, &args, dir.path().join("prometheus.log"));
        Some(Prometheus { proc, addr, _dir: dir })
    }

    /// The samples of an instant query, as (labels, value).
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let Some(body) = http_get(&self.addr, &format!("/api/v1/query?query={encoded}")) else { return Vec::new() };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { return Vec::new() };
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter().filter_map(|s| Some((s["metric"].clone(), s["value"][1].as_str()?.parse().ok()?))).collect()
            })
            .unwrap_or_default()
    }
}

fn which(program: &str) -> Result<String, ()> {
    let out =
        std::process::Command::new("sh").args(["-c", &format!("command -v {program}")]).output().map_err(|_| ())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !path.is_empty() { Ok(path) } else { Err(()) }
}

/// A GET on loopback; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn prometheus_scrapes_the_hub_and_agents_replica_restart_and_usage_series() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let hub_metrics = format!("127.0.0.1:{}", cluster::free_tcp_port());
    let mut c = Cluster::start_with(&["--metrics-listen", &hub_metrics]);
    let _janitor = Janitor::new(c.dir.path(), &["m1", "m2"]);
    let agent_metrics: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", cluster::free_tcp_port())).collect();
    c.add_agent("m1", &["--containers", "on", "--label", "site=a", "--metrics-listen", &agent_metrics[0]]);
    c.add_agent("m2", &["--containers", "on", "--label", "site=b", "--metrics-listen", &agent_metrics[1]]);
    c.wait_for("two Ready nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let crash = push_busybox(&reg, c.dir.path(), "busybox:crash", &["sh", "-c", "echo crashing; exit 3"]);
    let burn = push_busybox(&reg, c.dir.path(), "busybox:burn", &["sh", "-c", "while :; do :; done"]);
    apply(&c, &workload("crash", &crash, "  nodeSelector: {site: a}\n"));
    // Its readiness probe never passes (nothing listens on port 9): failed checks to count.
    let probe = "  readinessProbe: {tcpSocket: {port: 9}, period: 500ms}\n";
    apply(
        &c,
        &workload(
            "burn",
            &burn,
            &format!("  nodeSelector: {{site: b}}\n  resources: {{cpu: 250m, memory: 32Mi}}\n{probe}"),
        ),
    );

    let mut targets = vec![hub_metrics.clone()];
    targets.extend(agent_metrics.iter().cloned());
    let Some(prom) = Prometheus::start(&targets) else { return };
    c.wait_for("every target up", WAIT, || prom.query("up").iter().filter(|(_, v)| *v == 1.0).count() == 3);

    // The crash loop's restarts, as the hub and its node count them, against what the hub
    // says through its API at the same time (Prometheus lags by a scrape).
    c.wait_for("the crash loop's restarts in Prometheus", WAIT, || {
        let hub = prom.query("flotilla_hub_replica_restarts_total{replica=\"crash-0\",workload=\"crash\",node=\"m1\"}");
        let agent = prom.query("flotilla_agent_replica_restarts_total{replica=\"crash-0\"}");
        let now = replica(&c, "crash-0").map_or(0, |r| r.status.restarts) as f64;
        matches!((hub.as_slice(), agent.as_slice()), ([(_, h)], [(_, a)]) if *h >= 2.0 && *a >= 2.0 && *h <= now && *a <= now)
    });
    // Nodes and replicas by state and phase.
    c.wait_for("two ready nodes and a running container in Prometheus", WAIT, || {
        let ready = prom.query("flotilla_hub_nodes{state=\"ready\"}");
        let running = prom.query("flotilla_hub_replicas{phase=\"Running\",runtime=\"container\"}");
        matches!(ready.as_slice(), [(_, v)] if *v == 2.0) && matches!(running.as_slice(), [(_, v)] if *v >= 1.0)
    });
    // The burning container's CPU, near its 250m limit, and its memory.
    c.wait_for("the burning container's usage", WAIT, || {
        let cpu = prom.query("rate(flotilla_agent_container_cpu_seconds_total{replica=\"burn-0\"}[5s])");
        let mem = prom.query("flotilla_agent_container_memory_bytes{replica=\"burn-0\"}");
        matches!(cpu.as_slice(), [(_, r)] if *r > 0.1 && *r < 0.4) && matches!(mem.as_slice(), [(_, m)] if *m > 0.0)
    });
    assert!(!prom.query("flotilla_hub_controller_pass_duration_seconds_count").is_empty());
    // Pulls, link traffic both ways on both ends, rollout progress, store latency, probe
    // failures: by now (the CPU rate took several scrapes) all are in.
    c.wait_for("pulls, link bytes, workload replicas, store times and probe failures", WAIT, || {
        let all = |q: &str, n: usize, ok: &dyn Fn(f64) -> bool| {
            let got = prom.query(q);
            got.len() == n && got.iter().all(|(_, v)| ok(*v))
        };
        // Each agent pulled its workload's image.
        all("flotilla_agent_pulls_total{kind=\"image\",result=\"ok\"}", 2, &|v| v >= 1.0)
            && all("flotilla_agent_pulled_bytes_total{kind=\"image\"}", 2, &|v| v > 0.0)
            && all("flotilla_agent_link_bytes_total", 4, &|v| v > 0.0)
            && all("flotilla_hub_link_bytes_total{node=~\"m1|m2\"}", 4, &|v| v > 0.0)
            && all("flotilla_hub_workload_replicas{workload=\"burn\",state=\"desired\"}", 1, &|v| v == 1.0)
            && all("flotilla_hub_workload_replicas{workload=\"burn\",state=\"ready\"}", 1, &|v| v == 0.0)
            && all("flotilla_hub_store_seconds_count{op=~\"status|apply|controller_write\"}", 3, &|v| v > 0.0)
            && all("flotilla_agent_probe_failures_total{replica=\"burn-0\",probe=\"readiness\"}", 1, &|v| v >= 1.0)
    });

    // `flotilla top`: the nodes answer on their own links; the busy container near its limit.
    let top: Vec<proto::messages::NodeUsageView> =
        serde_json::from_str(&c.ok(&["top", "nodes", "-o", "json"])).expect("top as JSON");
    let answered: Vec<&str> = top.iter().filter(|n| n.report.is_some()).map(|n| n.node.as_str()).collect();
    assert_eq!(answered, ["m1", "m2"], "{top:?}");
    let burn = top
        .iter()
        .find_map(|n| n.report.as_ref()?.replicas.get("burn-0"))
        .unwrap_or_else(|| panic!("burn-0 not measured: {top:?}"));
    assert!((100..400).contains(&burn.cpu_millis) && burn.memory_bytes > 0, "{burn:?}");
    let table = c.ok(&["top", "replicas"]);
    assert!(table.lines().any(|l| l.starts_with("burn-0") && l.contains("m2")), "{table}");
    drop(prom.proc);
}

/// A cgroup standing in for a systemd unit's delegated cgroup (`Delegate=yes`): the pids
/// controller's hierarchy on cgroup v1, the unified one on v2. Dropped, it SIGKILLs every
/// process left in it and removes it, even when the test panicked.
struct UnitCgroup(PathBuf);

impl UnitCgroup {
    fn create() -> UnitCgroup {
        let root = if Path::new("/sys/fs/cgroup/pids").is_dir() { "/sys/fs/cgroup/pids" } else { "/sys/fs/cgroup" };
        let path = Path::new(root).join(format!("flotilla-test-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        UnitCgroup(path)
    }

    fn procs(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// A command prefix that moves itself into this cgroup and then execs the agent, as
    /// systemd starts a unit's main process in the unit's cgroup.
    fn exec_prefix(&self) -> Vec<String> {
        let procs = self.0.join("cgroup.procs");
        vec!["sh".into(), "-c".into(), format!("echo $$ > '{}' && exec \"$0\" \"$@\"", procs.display())]
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let procs = self.procs();
            if procs.is_empty() && std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            for pid in procs {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("cannot remove the test cgroup {}", self.0.display());
    }
}

/// What `systemctl restart flotilla-agent` does with the unit's `KillMode=process` and
/// `Delegate=yes` (deploy/systemd/flotilla-agent.service): the agent runs in the unit's cgroup,
/// its containers' shims are spawned into it, and the restart is a SIGTERM to the main process
/// only, a wait for it to exit, and a new main process in the same cgroup. The shims stay in the
/// cgroup throughout, and every container keeps running: same pids, 0 restarts at the hub.
#[test]
fn systemctl_restart_of_the_agent_unit_keeps_every_container_running() {
    if !containers_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    // Dropped after the cluster: kills what the agents left in it (their shims), then removes it.
    let unit = UnitCgroup::create();
    let mut c = Cluster::start();
    let _janitor = Janitor::new(c.dir.path(), &["unit-1"]);
    let image = push_busybox(&reg, c.dir.path(), "busybox:unit", &["sh", "-c", "exec sleep 100000"]);
    let hub = c.hub_addr.clone();
    c.add_agent_via(&unit.exec_prefix(), &hub, "unit-1", &["--containers", "on"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.name == "unit-1" && n.ready));
    apply(&c, &workload("svc", &image, "  replicas: 2\n"));
    let replicas = ["svc-0", "svc-1"];
    c.wait_for("both running", WAIT, || replicas.iter().all(|r| running(&c, r)));
    let before: Vec<Vec<u32>> = replicas.iter().map(|r| container_pids("unit-1", r)).collect();
    assert!(before.iter().all(|p| !p.is_empty()), "no container processes: {before:?}");
    let agent = c.agents[0].child.id();
    let shims: Vec<u32> = before.iter().map(|p| parent_of(p[0]).expect("the container's shim")).collect();
    let in_unit = unit.procs();
    assert!(in_unit.contains(&agent), "the agent {agent} is not in the unit's cgroup: {in_unit:?}");
    for shim in &shims {
        assert!(in_unit.contains(shim), "shim {shim} is not in the unit's cgroup {in_unit:?}");
    }

    // KillMode=process: SIGTERM to the main process only; systemd waits for it to exit and
    // leaves the rest of the cgroup alone.
    assert!(std::process::Command::new("kill").args(["-TERM", &agent.to_string()]).status().unwrap().success());
    let status = c.agents[0].wait_exit(Duration::from_secs(30)).expect("the agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status:?}");
    c.agents.clear();
    let left = unit.procs();
    assert!(shims.iter().all(|s| left.contains(s)), "shims {shims:?} left the unit's cgroup: {left:?}");
    assert_eq!(replicas.iter().map(|r| container_pids("unit-1", r)).collect::<Vec<_>>(), before);

    // The new main process, in the same cgroup, adopts them.
    c.add_agent_via(&unit.exec_prefix(), &hub, "unit-1", &["--containers", "on"]);
    let restarted = c.agents[0].child.id();
    c.wait_for("node back and both running", WAIT, || {
        c.nodes().iter().any(|n| n.name == "unit-1" && n.ready) && replicas.iter().all(|r| running(&c, r))
    });
    assert!(unit.procs().contains(&restarted), "the new agent is not in the unit's cgroup");
    let after: Vec<Vec<u32>> = replicas.iter().map(|r| container_pids("unit-1", r)).collect();
    assert_eq!(after, before, "the restart replaced a container");
    let in_unit = unit.procs();
    for shim in &shims {
        assert!(in_unit.contains(shim), "shim {shim} gone from the unit's cgroup after the restart: {in_unit:?}");
    }
    for r in replicas {
        let st = replica(&c, r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r}: {st:?}");
    }
}

/// The node network, end to end in an agent's own network namespace: containers on the node's
/// bridge reach each other by address, a published port is reached from outside the node, a
/// second workload wanting the same host port is kept off the node with the reason, an agent
/// SIGKILLed and restarted keeps every address, and deleting leaves no namespace, veth,
/// address allocation or port rule behind.
#[test]
fn bridged_containers_reach_each_other_publish_ports_keep_addresses_and_leave_nothing() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some((_janitor, mut site, image)) = httpd_site(&reg, "lan-1", "busybox:net") else { return };
    let site = &mut site;
    let ns_ip = site._ns.agent_ip();
    let doc = workload(
        "web",
        &image,
        "  replicas: 2\n  env: {PAGE: index.html}\n  ports:\n    - {name: http, containerPort: 8080}\n",
    );
    apply(&site.c, &doc);
    let pub_doc = workload("front", &image, "  ports:\n    - {containerPort: 8080, hostPort: 9080}\n");
    apply(&site.c, &pub_doc);
    let all = ["web-0", "web-1", "front-0"];
    site.c.wait_for("three bridged replicas running", WAIT, || all.iter().all(|r| running(&site.c, r)));
    let addr = |c: &Cluster, r: &str| replica(c, r).unwrap().status.address.expect("an address");
    let before: Vec<std::net::IpAddr> = all.iter().map(|r| addr(&site.c, r)).collect();
    assert!(before.iter().all(|a| a.to_string().starts_with("10.")), "{before:?}");

    // Container to container across the bridge: front-0 fetches each web replica's page.
    for (r, a) in all.iter().zip(&before).take(2) {
        let out = site.c.cli(&["exec", "front-0", "--", "wget", "-qO-", &format!("http://{a}:8080/index.html")]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "front-0 -> {r} at {a}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The published port, from outside the node (the test's own namespace, over the link).
    site.c.wait_for("the published port answers from outside the node", WAIT, || {
        http_get(&format!("{ns_ip}:9080"), "/index.html").is_some_and(|b| b.contains("ok"))
    });

    // The same host port again: not placed on the node, and describe says why.
    apply(&site.c, &workload("front2", &image, "  ports:\n    - {containerPort: 8080, hostPort: 9080}\n"));
    site.c.wait_for("front2 unschedulable", WAIT, || {
        replica(&site.c, "front2-0").is_some_and(|r| r.node.is_none() && r.unschedulable.contains("9080/tcp"))
    });
    let describe = site.c.ok(&["describe", "workload", "front2"]);
    assert!(describe.contains("port 9080/tcp in use"), "{describe}");
    site.c.ok(&["delete", "workload", "front2"]);

    // SIGKILL the agent and start it again: every container adopted with its address.
    site.c.agents[0].kill();
    site.c.agents.clear();
    let hub = format!("{}:{}", site._ns.host_ip(), site.c.hub_listen.as_ref().unwrap().rsplit_once(':').unwrap().1);
    let registry = site.fwd.addr.to_string();
    let prefix = site._ns.exec_prefix();
    site.c.add_agent_via(&prefix, &hub, "lan-1", &["--containers", "on", "--insecure-registry", &registry]);
    site.c.wait_for("node back, all running", WAIT, || {
        site.c.nodes().iter().any(|n| n.ready) && all.iter().all(|r| running(&site.c, r))
    });
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<std::net::IpAddr> = all.iter().map(|r| addr(&site.c, r)).collect();
    assert_eq!(after, before, "addresses changed across the agent's restart");
    for r in all {
        assert_eq!(replica(&site.c, r).unwrap().status.restarts, 0, "{r} restarted");
    }
    assert!(http_get(&format!("{ns_ip}:9080"), "/index.html").is_some_and(|b| b.contains("ok")));

    // Delete: nothing of the network stays.
    site.c.ok(&["delete", "workload", "web"]);
    site.c.ok(&["delete", "workload", "front"]);
    site.c.wait_for("replicas gone", WAIT, || site.c.replicas().is_empty());
    site.c.wait_for("no leftovers", WAIT, || all.iter().all(|r| leftovers(&site.c, "lan-1", r).is_empty()));
    let links = site.in_ns(&["ip", "-o", "link", "show", "type", "veth"]);
    // Containers' host-side veths are the ones on a bridge; the site's own link is not.
    let veths: Vec<&str> = links.lines().filter(|l| l.contains("master")).collect();
    assert!(veths.is_empty(), "container veths left: {veths:?}");
    let nat = site.in_ns(&["iptables", "-w", "-t", "nat", "-S"]);
    assert!(!nat.contains("CNI-DN") && !nat.contains("9080"), "port rules left:\n{nat}");
    assert!(http_get(&format!("{ns_ip}:9080"), "/index.html").is_none(), "the port still answers");
}

/// Two nodes of one site, each in its own namespace, joined by their LAN: each routes the
/// other's container subnet to it (host-gw, told by the hub), so a container on one fetches a
/// page from a container on the other by address, with no NAT between them.
#[test]
fn containers_on_two_nodes_of_a_site_reach_each_other_over_the_lan() {
    if !containers_possible() || !netns::netns_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let (ns1, ns2) = (netns::Netns::create(), netns::Netns::create());
    let lan = netns::SiteLan::create(&[&ns1, &ns2]);
    let target: std::net::SocketAddr = reg.addr.parse().unwrap();
    let (fwd1, fwd2) =
        (netns::TcpForward::start(ns1.host_ip(), target), netns::TcpForward::start(ns2.host_ip(), target));
    let port = cluster::free_udp_port();
    let mut c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    let _janitor = Janitor::new(c.dir.path(), &["s1", "s2"]);
    let image = push_busybox(&reg, c.dir.path(), "busybox:lan", &["sh", "-c", HTTPD]);
    for (i, (ns, fwd, name)) in [(&ns1, &fwd1, "s1"), (&ns2, &fwd2, "s2")].into_iter().enumerate() {
        let (registry, node_ip, hub) =
            (fwd.addr.to_string(), netns::SiteLan::ip(i), format!("{}:{port}", ns.host_ip()));
        let label = format!("box={name}");
        c.add_agent_via(
            &ns.exec_prefix(),
            &hub,
            name,
            &[
                "--containers",
                "on",
                "--insecure-registry",
                &registry,
                "--label",
                "site=shop",
                "--label",
                &label,
                "--node-ip",
                &node_ip,
            ],
        );
    }
    c.wait_for("both nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    for (name, fwd) in [("s1", &fwd1), ("s2", &fwd2)] {
        let image = image.replacen(&reg.addr, &fwd.addr.to_string(), 1);
        apply(&c, &workload(&format!("web-{name}"), &image, &format!("  nodeSelector: {{box: {name}}}\n")));
    }
    c.wait_for("both running", WAIT, || running(&c, "web-s1-0") && running(&c, "web-s2-0"));
    let far = replica(&c, "web-s2-0").unwrap().status.address.expect("an address");
    // Each node routes the other's subnet to it over the LAN.
    let routes = |ns: &netns::Netns| {
        let p = ns.exec_prefix();
        let out = std::process::Command::new(&p[0]).args(&p[1..]).args(["ip", "route"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    c.wait_for("site routes in place", WAIT, || {
        routes(&ns1).contains(&format!("via {}", netns::SiteLan::ip(1)))
            && routes(&ns2).contains(&format!("via {}", netns::SiteLan::ip(0)))
    });
    // From web-s1-0's own network namespace (its eth0 and address), with the host's busybox:
    // the image's busybox-static wget, run through `flotilla exec`, crashes here on some
    // attempts (exit 139) while the same request from the namespace succeeds; the crash is
    // the tool's, not the network's, and is left for a later look.
    let ns = c.agent_dir("s1").join("network/netns/web-s1-0");
    let mut last = String::new();
    let reached = cluster::time_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["--", "busybox", "wget", "-qO-", &format!("http://{far}:8080/index.html")])
            .output()
            .unwrap();
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        out.status.success() && last.contains("ok")
    });
    assert!(reached.is_some(), "web-s1-0 cannot reach web-s2-0 at {far} over the LAN: {last}\n{}", routes(&ns1));
    c.ok(&["delete", "workload", "web-s1"]);
    c.ok(&["delete", "workload", "web-s2"]);
    c.wait_for("replicas gone", WAIT, || c.replicas().is_empty());
    drop(c);
    drop(lan);
}

/// A service on the node: its name resolves through the node's name server on the bridge, and
/// connections to its address are spread over its ready replicas by the node's kernel rules.
#[test]
fn a_service_name_resolves_on_the_node_and_spreads_connections_over_its_replicas() {
    let Some(reg) = TestRegistry::start() else { return };
    let Some(mut site) = NsSite::start(&reg, "svc-1") else { return };
    if !containers_possible() {
        return;
    }
    let _janitor = Janitor::new(site.c.dir.path(), &["svc-1"]);
    let who = "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    let image = site.via_link(&reg, &push_busybox(&reg, site.c.dir.path(), "busybox:who", &["sh", "-c", who]));
    site.c.wait_for("node", WAIT, || site.c.nodes().iter().any(|n| n.ready));
    let api = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: api, labels: {{app: api}}}}\nspec:\n  runtime: container\n  image: {image}\n  replicas: 2\n  ports: [{{name: http, containerPort: 8080}}]\n---\napiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{selector: {{app: api}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    );
    apply(&site.c, &api);
    apply(&site.c, &workload("client", &image, ""));
    let all = ["api-0", "api-1", "client-0"];
    site.c.wait_for("replicas running", WAIT, || all.iter().all(|r| running(&site.c, r)));
    let svc: serde_json::Value = serde_json::from_str(&site.c.ok(&["get", "services", "-o", "api-json"])).unwrap();
    let vip = svc[0]["address"].as_str().expect("the service's address").to_string();
    let client_ns = site.c.agent_dir("svc-1").join("network/netns/client-0");
    let in_client = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", client_ns.display()))
            .arg("--")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    // The name, at the node's name server (the client's gateway, as its resolv.conf says).
    let resolv = site.c.ok(&["exec", "client-0", "--", "cat", "/etc/resolv.conf"]);
    let server = resolv.lines().find_map(|l| l.strip_prefix("nameserver ")).expect("a name server").trim().to_string();
    site.c.wait_for("the service name resolves", WAIT, || {
        in_client(&["busybox", "nslookup", "api", &server]).1.contains(&vip)
    });
    assert!(in_client(&["busybox", "nslookup", "api.svc.flotilla.local", &server]).1.contains(&vip));
    // Connections to the service's address reach both replicas.
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    site.c.wait_for("the service answers", WAIT, || {
        in_client(&["busybox", "wget", "-qO-", &format!("http://{vip}/index.html")]).0
    });
    for _ in 0..100 {
        let (ok, page) = in_client(&["busybox", "wget", "-qO-", &format!("http://{vip}/index.html")]);
        assert!(ok, "{page}");
        *seen.entry(page.trim().to_string()).or_default() += 1;
    }
    assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), ["api-0", "api-1"], "{seen:?}");
    // The agent SIGKILLed: the kernel's rules keep serving the address while it is down; back
    // (adopting its containers), it keeps every address, and names resolve and answer again.
    let addr = |c: &Cluster, r: &str| replica(c, r).unwrap().status.address.expect("an address");
    let before: Vec<std::net::IpAddr> = all.iter().map(|r| addr(&site.c, r)).collect();
    site.c.agents[0].kill();
    site.c.agents.clear();
    let (ok, page) = in_client(&["busybox", "wget", "-qO-", &format!("http://{vip}/index.html")]);
    assert!(ok && page.trim().starts_with("api-"), "the service must answer with its agent down: {page}");
    let hub = format!("{}:{}", site._ns.host_ip(), site.c.hub_listen.as_ref().unwrap().rsplit_once(':').unwrap().1);
    let registry = site.fwd.addr.to_string();
    let prefix = site._ns.exec_prefix();
    site.c.add_agent_via(&prefix, &hub, "svc-1", &["--containers", "on", "--insecure-registry", &registry]);
    site.c.wait_for("node back, all running", WAIT, || {
        site.c.nodes().iter().any(|n| n.ready) && all.iter().all(|r| running(&site.c, r))
    });
    let after: Vec<std::net::IpAddr> = all.iter().map(|r| addr(&site.c, r)).collect();
    assert_eq!(after, before, "addresses changed across the agent's restart");
    site.c.wait_for("the name resolves after the restart", WAIT, || {
        in_client(&["busybox", "nslookup", "api", &server]).1.contains(&vip)
    });
    // The first request after the restart is answered, as every one before it. (`timeout`,
    // not wget's `-T`: Debian's busybox wget crashes with it, which once passed for a slow
    // first request here.)
    let (ok, page) = in_client(&["timeout", "10", "busybox", "wget", "-qO-", &format!("http://{vip}/index.html")]);
    assert!(ok && page.trim().starts_with("api-"), "the service right after the restart: {page}");
    let endpoints = site.c.ok(&["get", "endpoints", "api"]);
    for a in &after[..2] {
        assert!(endpoints.contains(&format!("{a}:8080")), "{a}:8080 missing from\n{endpoints}");
    }
    // By name, from inside the container, through its resolv.conf. The hub may still hold the
    // killed agent's session for a moment (until the new one replaces it): an exec sent over it
    // fails with that reason, and the next one goes over the new link.
    let mut by_name = String::new();
    site.c.wait_for("exec over the agent's new link", WAIT, || {
        let out = site.c.cli(&["exec", "client-0", "--", "wget", "-qO-", "http://api/index.html"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() || err.contains("ended before the command started"), "exec: {err}");
        by_name = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(by_name.trim().starts_with("api-"), "{by_name}");
    // A Wasm HTTP component is an endpoint too, served on its node's address.
    let component =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm");
    assert!(component.exists(), "{} is missing: build the examples first (scripts/test.sh does)", component.display());
    let reference = reg.reference("hello-http:svc");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), component.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    let hello = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: hello, labels: {{app: hello}}}}\nspec:\n  runtime: wasm\n  image: {}\n  http: {{port: 8088}}\n---\napiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: hello}}\nspec: {{selector: {{app: hello}}, ports: [{{port: 80}}]}}\n",
        site.via_link(&reg, &reference)
    );
    apply(&site.c, &hello);
    site.c.wait_for("the component running", WAIT, || running(&site.c, "hello-0"));
    let by_name = || site.c.cli(&["exec", "client-0", "--", "wget", "-qO-", "http://hello.svc.flotilla.local/"]);
    let answered = cluster::time_until(WAIT, Duration::from_millis(200), || {
        String::from_utf8_lossy(&by_name().stdout).contains("hello from flotilla")
    });
    assert!(
        answered.is_some(),
        "the component does not answer through its service:\n{}\n{}\n{}",
        site.c.ok(&["describe", "service", "hello"]),
        String::from_utf8_lossy(&by_name().stderr),
        site.in_ns(&["iptables", "-w", "-t", "nat", "-S"])
    );
    site.c.ok(&["delete", "workload", "hello"]);
    site.c.ok(&["delete", "service", "hello"]);
    let describe = site.c.ok(&["describe", "service", "api"]);
    assert!(describe.contains(&vip) && describe.contains("api-0") && describe.contains("ready"), "{describe}");
    // Deleted: the name is gone and nothing answers at the address.
    site.c.ok(&["delete", "service", "api"]);
    site.c.wait_for("the name is gone", WAIT, || !in_client(&["busybox", "nslookup", "api", &server]).1.contains(&vip));
    // And no service rule is left in the node's tables.
    let dnat = || site.in_ns(&["iptables", "-w", "-t", "nat", "-S"]).lines().filter(|l| l.contains("DNAT")).count();
    site.c.wait_for("no DNAT rule left", WAIT, || dnat() == 0);
    let filter = site.in_ns(&["iptables", "-w", "-t", "filter", "-S"]);
    assert!(!filter.contains("REJECT"), "service reject rules left:\n{filter}");
}

/// The site's httpd that answers with its replica's name, ready while `/tmp/www/ready` exists.
const WHO: &str =
    "mkdir -p /tmp/www && hostname > /tmp/www/index.html && touch /tmp/www/ready && exec httpd -f -p 8080 -h /tmp/www";

/// Runs `args` (the host's busybox) in a container's network namespace, named by the agent.
fn in_replica_ns(c: &Cluster, node: &str, replica: &str, args: &[&str]) -> (bool, String) {
    let ns = c.agent_dir(node).join("network/netns").join(replica);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A service across two sites: two nodes of site `shop` joined by their LAN and a node of
/// site `far`, one `api` replica on each, a client on the first. The client's requests go to
/// the replica on its own node; when that one is unready (its probe failing), to the one on
/// the other node of the site, never to the other site's; when it is ready again, back. Then
/// the site is cut off from the hub for 60 s: the name still resolves, requests still succeed,
/// and the local replica killed during the cut is withdrawn by its agent alone.
#[test]
fn a_site_service_follows_readiness_never_leaves_the_site_and_works_cut_off_from_the_hub() {
    if !containers_possible() || !netns::netns_possible() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let (ns1, ns2, ns3) = (netns::Netns::create(), netns::Netns::create(), netns::Netns::create());
    let lan = netns::SiteLan::create(&[&ns1, &ns2]);
    let target: std::net::SocketAddr = reg.addr.parse().unwrap();
    let fwds: Vec<netns::TcpForward> =
        [&ns1, &ns2, &ns3].iter().map(|ns| netns::TcpForward::start(ns.host_ip(), target)).collect();
    let port = cluster::free_udp_port();
    let mut c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    let _janitor = Janitor::new(c.dir.path(), &["near", "peer", "far"]);
    let image = push_busybox(&reg, c.dir.path(), "busybox:who", &["sh", "-c", WHO]);
    for (i, (ns, name, site)) in
        [(&ns1, "near", "shop"), (&ns2, "peer", "shop"), (&ns3, "far", "far")].into_iter().enumerate()
    {
        let (registry, hub) = (fwds[i].addr.to_string(), format!("{}:{port}", ns.host_ip()));
        let (box_label, site_label) = (format!("box={name}"), format!("site={site}"));
        let mut args =
            vec!["--containers", "on", "--insecure-registry", &registry, "--label", &site_label, "--label", &box_label];
        let node_ip = netns::SiteLan::ip(i);
        if site == "shop" {
            args.extend(["--node-ip", &node_ip]);
        }
        c.add_agent_via(&ns.exec_prefix(), &hub, name, &args);
    }
    c.wait_for("three nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 3);
    let probe =
        "  readinessProbe: {httpGet: {path: /ready, port: 8080}, period: 500ms, timeout: 1s, failureThreshold: 1}\n";
    let mut docs = Vec::new();
    for (i, name) in ["near", "peer", "far"].into_iter().enumerate() {
        let image = image.replacen(&reg.addr, &fwds[i].addr.to_string(), 1);
        docs.push(format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: api-{name}, labels: {{app: api}}}}\nspec:\n  runtime: container\n  image: {image}\n  nodeSelector: {{box: {name}}}\n  terminationGracePeriod: 1s\n{probe}"
        ));
    }
    let client_image = image.replacen(&reg.addr, &fwds[0].addr.to_string(), 1);
    docs.push(workload("client", &client_image, "  nodeSelector: {box: near}\n"));
    docs.push("apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: api}\nspec: {selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}\n".into());
    apply(&c, &docs.join("---\n"));
    let ready = |r: &str| replica(&c, r).is_some_and(|v| v.status.ready && v.status.phase == Phase::Running);
    c.wait_for("replicas ready", WAIT, || {
        ["api-near-0", "api-peer-0", "api-far-0"].iter().all(|r| ready(r)) && running(&c, "client-0")
    });
    let svc: serde_json::Value = serde_json::from_str(&c.ok(&["get", "services", "-o", "api-json"])).unwrap();
    let vip = svc[0]["address"].as_str().expect("the service's address").to_string();
    let resolv = c.ok(&["exec", "client-0", "--", "cat", "/etc/resolv.conf"]);
    let server = resolv.lines().find_map(|l| l.strip_prefix("nameserver ")).expect("a name server").trim().to_string();
    let client = |args: &[&str]| in_replica_ns(&c, "near", "client-0", args);
    let resolves = || client(&["busybox", "nslookup", "api", &server]).1.contains(&vip);
    let url = format!("http://{vip}/index.html");
    // Who answers a request through the service (`None`: no answer).
    let ask = || {
        let (ok, page) = client(&["busybox", "wget", "-qO-", &url]);
        ok.then(|| page.trim().to_string())
    };
    c.wait_for("the name resolves", WAIT, resolves);
    c.wait_for("the nearest replica answers", WAIT, || ask().as_deref() == Some("api-near-0"));
    let tally = |n: usize| {
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..n {
            *seen.entry(ask().unwrap_or_else(|| "(no answer)".into())).or_default() += 1;
        }
        seen
    };
    let only = |seen: &std::collections::BTreeMap<String, u32>| seen.keys().cloned().collect::<Vec<_>>();
    // The replica on the client's own node takes every request while it is ready.
    let seen = tally(20);
    assert_eq!(only(&seen), ["api-near-0"], "{seen:?}");

    // Unready: withdrawn within about one probe period; the site's other node takes over.
    c.ok(&["exec", "api-near-0", "--", "rm", "/tmp/www/ready"]);
    let moved = cluster::time_until(Duration::from_secs(10), Duration::from_millis(50), || {
        ask().as_deref() == Some("api-peer-0")
    });
    let moved = moved.expect("requests never moved to the site's other node");
    eprintln!("unready replica withdrawn {moved:?} after its probe began failing");
    assert!(moved < Duration::from_secs(3), "withdrawal took {moved:?} with a 500 ms probe period");
    let seen = tally(30);
    assert_eq!(only(&seen), ["api-peer-0"], "site scope: the far site's replica must never answer: {seen:?}");
    // Ready again: back to the nearest.
    c.ok(&["exec", "api-near-0", "--", "touch", "/tmp/www/ready"]);
    let back = cluster::time_until(Duration::from_secs(10), Duration::from_millis(50), || {
        ask().as_deref() == Some("api-near-0")
    });
    eprintln!("ready replica back in {back:?}");
    assert!(back.is_some(), "the replica ready again never got requests back");

    // The site cut off from the hub.
    ns1.cut();
    ns2.cut();
    let cut = std::time::Instant::now();
    c.wait_for("the hub sees the site gone", Duration::from_secs(30), || {
        c.nodes().iter().filter(|n| n.ready).count() == 1
    });
    let mut asked = 0;
    let mut killed_at = None;
    while cut.elapsed() < Duration::from_secs(60) {
        assert!(resolves(), "the name stopped resolving {:?} into the cut", cut.elapsed());
        if killed_at.is_none() && cut.elapsed() > Duration::from_secs(20) {
            let pids = container_pids("near", "api-near-0");
            assert!(!pids.is_empty(), "no processes of api-near-0");
            for pid in pids {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            // Its agent alone withdraws it: the other node of the site answers.
            let gone = cluster::time_until(Duration::from_secs(10), Duration::from_millis(20), || {
                ask().as_deref() == Some("api-peer-0")
            });
            let gone = gone.expect("a killed replica was not withdrawn while the hub was away");
            eprintln!("killed replica withdrawn locally in {gone:?}");
            assert!(gone < Duration::from_secs(2), "local withdrawal took {gone:?}");
            killed_at = Some(std::time::Instant::now());
            continue;
        }
        let who = ask();
        assert!(
            who.as_deref().is_some_and(|w| w == "api-near-0" || w == "api-peer-0"),
            "{:?} into the cut the service answered {who:?}",
            cut.elapsed()
        );
        asked += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(killed_at.is_some() && asked >= 60, "only {asked} requests during the cut");
    ns1.restore();
    ns2.restore();
    c.wait_for("the site back", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 3);
    c.wait_for("the killed replica ready again", WAIT, || ready("api-near-0"));
    c.wait_for("the nearest replica answers again", WAIT, || ask().as_deref() == Some("api-near-0"));
    for w in ["api-near", "api-peer", "api-far", "client"] {
        c.ok(&["delete", "workload", w]);
    }
    c.wait_for("replicas gone", WAIT, || c.replicas().is_empty());
    drop(c);
    drop(lan);
}
