//! Container networks benchmark: what `network: bridge` adds to a container's start, against
//! `network: none` and against `podman run` with its default bridge network (netavark), on the
//! same busybox image, side by side in one run.
//!
//! `cargo bench --bench networks` (as root) starts a real `docker-registry`, a hub and one
//! agent (`--containers on`) as processes; the agent runs in a network namespace of its own
//! (tests/support/netns.rs), reaching the hub and the registry over its veth link, so its
//! bridge, veths and NAT rules live and die with that namespace. Podman runs in the same
//! network namespace, so netavark's bridge and rules do too. Measured, in rounds whose order
//! rotates (BENCH_RUNS rounds, default 20, after one uncounted warm-up round):
//!
//! - **flotilla none / bridge**: a workload of one busybox container
//!   (`sh -c 'echo started; sleep'`) applied through the admin API (the request `flotilla
//!   apply` sends), timed from the request sent to Running in the hub's replica list (polled
//!   every 2 ms) and to the line `started` in the replica's log file on the host (polled every
//!   millisecond; the agent's shim writes it). The workload is deleted, and gone from the node
//!   (cgroup, network namespace and attachment record), before the next start.
//! - **podman crun / runc**: `podman run -d` of the same image (pulled into a private podman
//!   storage from the same registry beforehand) with the same command, on podman's default
//!   network (`podman`, a netavark bridge), timed from spawning `podman run -d` to its exit
//!   (the container started, as podman reports) and to the line `started` in its `k8s-file`
//!   log (polled every millisecond). Then `podman rm -f`, not timed. crun is podman's default
//!   runtime on Debian but refuses a hybrid cgroup layout, so podman runs in a mount namespace
//!   with /sys/fs/cgroup/unified detached (as benches/oci.rs does for crun); the rlimits of
//!   this machine's sandbox cannot be raised, so podman is told `--ulimit nofile=1024:1024
//!   --ulimit nproc=1024:1024`; no systemd, so `--cgroup-manager cgroupfs --events-backend
//!   file`. Each podman command is run through `nsenter` into that namespace (about 1 ms).
//!
//! Then the network's own share, timed directly in this process on a thread moved into a
//! second network namespace: `agent::network::Networks::attach` of a replica (its namespace
//! made, the record written, CNI ADD through bridge (+ host-local) and portmap) and `detach`
//! (CNI DEL), BENCH_ATTACH times (default 50); beside it a bare namespace made and removed, and
//! each plugin binary run with `CNI_COMMAND=VERSION` (its process start alone).
//!
//! Needs root, busybox-static, docker-registry, iproute2, iptables, containernetworking-plugins,
//! and for the podman columns `apt-get install podman netavark aardvark-dns` (podman, crun and
//! runc; without podman those columns are skipped). Everything it makes is removed on exit,
//! also on failure: podman's containers (`podman rm -af`, then any process left in the bench's
//! podman cgroup parent killed), both network namespaces (with the bridges and rules in them),
//! the agent's containers, cgroups and mounts, and the temporary directories.

#[path = "../tests/support/api.rs"]
mod api;
#[path = "../oci-runtime/tests/support/busybox_image.rs"]
mod busybox_image;
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/janitor.rs"]
mod janitor;
#[path = "support/measure.rs"]
mod measure;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent::network::{NetworkConfig, Networks};
use api::Api;
use measure::{Tail, env_usize, is_root, median, ms, percentile, which};
use proto::manifest::NetworkMode;
use proto::messages::{ApiRequest, ApiResponse, NodeNetwork, ResourceKind};

const LIMIT: Duration = Duration::from_secs(60);
const NODE: &str = "net-1";
/// The container's command, for Flotilla and podman alike: one line, then idle until SIGTERM.
const SCRIPT: &str = "trap 'exit 0' TERM\necho started\nsleep 999999 &\nwait";
const NEEDLE: &str = "started";

/// What this machine lacks for the bench, if anything (a reason to skip, not an error).
fn missing() -> Option<String> {
    if !is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (Debian's busybox-static)".into());
    }
    if let Some(t) = ["ip", "nsenter", "unshare", "iptables"].iter().find(|t| which(t).is_none()) {
        return Some(format!("`{t}` not found"));
    }
    let cni = NetworkConfig::new(PathBuf::new()).cni_bin_dirs;
    ["bridge", "host-local", "portmap"]
        .into_iter()
        .find(|plugin| !cni.iter().any(|d| d.join(plugin).is_file()))
        .map(|plugin| format!("CNI plugin {plugin} not found (Debian's containernetworking-plugins)"))
}

/// Runs `cmd` with its output captured; `None` if it could not run or took longer than
/// `limit` (then it is killed).
fn run_bounded(mut cmd: Command, limit: Duration) -> Option<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().ok()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    Some(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

// ---- Flotilla ------------------------------------------------------------------------------

fn workload(name: &str, image: &str, network: &NetworkMode) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: container\n  image: {image}\n  network: {network}\n  terminationGracePeriod: 2s\n  command: [/bin/sh, -c]\n  args: [{}]\n",
        serde_json::to_string(SCRIPT).unwrap()
    )
}

/// Whether anything of `replica` is still on the node: a cgroup, a network namespace or an
/// attachment record.
fn on_node(c: &cluster::Cluster, replica: &str) -> bool {
    let dir = c.agent_dir(NODE);
    let hierarchies: Vec<PathBuf> =
        std::fs::read_dir("/sys/fs/cgroup").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    hierarchies.iter().any(|h| h.join("flotilla").join(NODE).join(replica).exists())
        || dir.join("network/netns").join(replica).exists()
        || dir.join("network/attachments").join(format!("{replica}.json")).exists()
}

struct Sample {
    running: Duration,
    first_line: Duration,
}

async fn flotilla_once(api: &Api, c: &cluster::Cluster, name: &str, image: &str, network: &NetworkMode) -> Sample {
    let replica = format!("{name}-0");
    let log = c.agent_dir(NODE).join("logs").join(format!("{replica}.log"));
    let _ = std::fs::remove_file(&log);
    let mut tail = Tail::new(log);
    let source = workload(name, image, network);
    let start = Instant::now();
    let r = api.call(&ApiRequest::Apply { source: source.clone() }).await;
    assert!(matches!(r, ApiResponse::Applied { .. }), "apply failed: {r:?}\n{source}");
    let (mut running, mut first_line) = (None, None);
    let mut i = 0u64;
    while running.is_none() || first_line.is_none() {
        if first_line.is_none() && tail.saw(NEEDLE) {
            first_line = Some(start.elapsed());
        }
        if running.is_none() && i.is_multiple_of(2) && api.running(name, 1).await {
            running = Some(start.elapsed());
        }
        if start.elapsed() > LIMIT {
            panic!("{name} did not start: {:?}\nlog so far: {}", api.replicas(name).await, tail.text);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sample = Sample { running: running.unwrap(), first_line: first_line.unwrap() };
    // Not timed: delete, and wait until nothing of it is left on the node.
    let r = api.call(&ApiRequest::Delete { kind: ResourceKind::Workload, name: name.into(), force: false }).await;
    assert!(!matches!(r, ApiResponse::Error { .. }), "delete {name}: {r:?}");
    let deadline = Instant::now() + LIMIT;
    while !api.replicas(name).await.is_empty() || on_node(c, &replica) {
        assert!(Instant::now() < deadline, "{name} did not go away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sample
}

// ---- podman --------------------------------------------------------------------------------

/// Podman with a storage, run dir and cgroup parent of the bench's own, run inside a helper
/// process's namespaces: the agent's network namespace and a private mount namespace with the
/// cgroup v2 mount detached. Removes every container it ran when dropped.
struct Podman {
    helper: Child,
    dir: PathBuf,
    cgroup_parent: String,
}

impl Podman {
    /// `None` (after saying why) when podman is not installed.
    fn start(ns: &netns::Netns, dir: &Path) -> Option<Podman> {
        if which("podman").is_none() {
            eprintln!(
                "podman not found (apt-get install podman netavark aardvark-dns): the podman columns are skipped"
            );
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        // No fork anywhere: the child's pid becomes the `sleep` holding both namespaces.
        let mut helper = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["--", "unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg("umount /sys/fs/cgroup/unified 2>/dev/null; echo ready; exec sleep 86400")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run nsenter/unshare");
        let mut line = String::new();
        std::io::BufReader::new(helper.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the podman namespace helper did not start");
        let cgroup_parent = format!("/flotilla-bench-podman-{}", std::process::id());
        Some(Podman { helper, dir: dir.to_path_buf(), cgroup_parent })
    }

    fn cmd(&self, runtime: Option<&str>) -> Command {
        let pid = self.helper.id();
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{pid}/ns/mnt")).arg(format!("--net=/proc/{pid}/ns/net")).arg("--");
        c.arg("podman");
        for (flag, sub) in [("--root", "storage"), ("--runroot", "run"), ("--tmpdir", "tmp")] {
            c.arg(flag).arg(self.dir.join(sub));
        }
        c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        if let Some(r) = runtime {
            c.args(["--runtime", r]);
        }
        c
    }

    fn must(&self, args: &[&str]) -> String {
        let mut c = self.cmd(None);
        c.args(args);
        let out = run_bounded(c, LIMIT).unwrap_or_else(|| panic!("podman {args:?} did not finish"));
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn once(&self, runtime: &str, name: &str, image: &str) -> Sample {
        let log = self.dir.join(format!("{name}.log"));
        let mut tail = Tail::new(log.clone());
        let mut c = self.cmd(Some(runtime));
        c.args(["run", "-d", "--name", name, "--cgroup-parent", &self.cgroup_parent]);
        c.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]);
        c.args(["--log-driver", "k8s-file", "--log-opt"]).arg(format!("path={}", log.display()));
        c.args([image, "/bin/sh", "-c", SCRIPT]);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = c.spawn().expect("cannot run podman");
        let (mut started, mut first_line) = (None, None);
        while started.is_none() || first_line.is_none() {
            if started.is_none() && child.try_wait().unwrap().is_some() {
                started = Some(start.elapsed());
            }
            if first_line.is_none() && tail.saw(NEEDLE) {
                first_line = Some(start.elapsed());
            }
            let exited_badly = started.is_some() && first_line.is_none() && tail.text.is_empty() && {
                // podman is done; a failed run never writes the line.
                matches!(child.try_wait(), Ok(Some(s)) if !s.success())
            };
            if exited_badly || start.elapsed() > LIMIT {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let status = child.wait().expect("podman run");
        if !status.success() || started.is_none() || first_line.is_none() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("podman run ({runtime}) {name} did not start ({status}): {err}\nlog: {}", tail.text);
        }
        self.must(&["rm", "-f", "-t", "0", name]);
        Sample { running: started.unwrap(), first_line: first_line.unwrap() }
    }

    fn versions(&self) -> String {
        let v = |bin: &str| {
            let out = Command::new(bin).arg("--version").output();
            out.map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string())
                .unwrap_or_else(|e| format!("{bin}: {e}"))
        };
        let netavark = ["/usr/lib/podman/netavark", "/usr/libexec/podman/netavark"]
            .iter()
            .find(|p| Path::new(p).exists())
            .map(|p| v(p))
            .unwrap_or_else(|| "netavark: not found".into());
        format!("{}; {}; {}; {}; {}", v("podman"), netavark, v("conmon"), v("crun"), v("runc"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let mut c = self.cmd(None);
        c.args(["rm", "-a", "-f", "-t", "0"]);
        if run_bounded(c, Duration::from_secs(60)).is_none_or(|o| !o.status.success()) {
            eprintln!("podman rm -af failed; killing what is left in {}", self.cgroup_parent);
        }
        // Whatever is left in the bench's cgroup parent (containers podman could not remove).
        let hierarchies: Vec<PathBuf> =
            std::fs::read_dir("/sys/fs/cgroup").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        let parent = self.cgroup_parent.trim_start_matches('/');
        for h in &hierarchies {
            let Ok(children) = std::fs::read_dir(h.join(parent)) else { continue };
            for child in children.flatten().filter(|e| e.path().is_dir()) {
                let procs = std::fs::read_to_string(child.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for h in &hierarchies {
            if let Ok(children) = std::fs::read_dir(h.join(parent)) {
                for child in children.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(h.join(parent));
        }
        // The helper's mount namespace (podman's overlay mounts) ends with it.
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

// ---- the network's own share, timed directly -------------------------------------------------

#[derive(Default)]
struct Direct {
    attach: Vec<Duration>,
    detach: Vec<Duration>,
    netns: Vec<Duration>,
    /// (plugin, its `VERSION` runs)
    exec: Vec<(&'static str, Vec<Duration>)>,
}

/// `Networks::attach` and `detach` of a replica, a bare namespace, and each plugin's process
/// start, timed on a thread moved into the network namespace `ns` (plugins and iptables run
/// from it inherit it).
fn direct(ns: &str, dir: PathBuf, runs: usize) -> Direct {
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut cfg = NetworkConfig::new(dir.clone());
        cfg.bridge = "fltbench0".into();
        let nets = Networks::new(cfg.clone()).unwrap();
        nets.set_node(Some(&NodeNetwork {
            subnet: "10.254.7.0/24".parse().unwrap(),
            cluster_cidr: "10.254.0.0/16".parse().unwrap(),
        }));
        let plugin = |name: &str| cfg.cni_bin_dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap();
        let version = |bin: &Path| {
            let start = Instant::now();
            let out = Command::new(bin)
                .env_clear()
                .env("CNI_COMMAND", "VERSION")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            let took = start.elapsed();
            assert!(out.status.success(), "{} VERSION: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
            took
        };
        let bare = dir.join("bare-netns");
        // Warm-up, not counted: the bridge and the masquerade rule are made once per node.
        nets.attach("warm-0", &NetworkMode::Bridge, &[]).expect("attach");
        nets.detach("warm-0");
        let mut d = Direct {
            exec: vec![("bridge", Vec::new()), ("host-local", Vec::new()), ("portmap", Vec::new())],
            ..Direct::default()
        };
        for i in 0..runs {
            let replica = format!("direct-{i}");
            let start = Instant::now();
            let a = nets.attach(&replica, &NetworkMode::Bridge, &[]).expect("attach");
            d.attach.push(start.elapsed());
            assert!(a.address.is_some(), "no address: {a:?}");
            let start = Instant::now();
            nets.detach(&replica);
            d.detach.push(start.elapsed());

            let start = Instant::now();
            oci_runtime::container::netns::create(&bare).expect("netns create");
            d.netns.push(start.elapsed());
            oci_runtime::container::netns::remove(&bare).expect("netns remove");

            for (name, samples) in &mut d.exec {
                samples.push(version(&plugin(name)));
            }
        }
        d
    })
    .join()
    .expect("the direct attach thread panicked")
}

/// The agent's own timing of each counted bridge start's attach (`took_ms`, `plugins_ms` of
/// its "network attached" lines; replicas `nb-<round>-bridge-0`, round 0 the warm-up).
fn attach_log(path: &Path) -> Vec<(Duration, Duration)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |line: &str, name: &str| -> Option<Duration> {
        let rest = &line[line.find(name)? + name.len()..];
        let num: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        num.parse::<f64>().ok().map(|v| Duration::from_secs_f64(v / 1e3))
    };
    text.lines()
        .filter(|l| l.contains("network attached") && l.contains("-bridge-0") && !l.contains("nb-0-"))
        .filter_map(|l| Some((field(l, "took_ms=")?, field(l, "plugins_ms=")?)))
        .collect()
}

// ---- main ----------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    None,
    Bridge,
    PodmanCrun,
    PodmanRunc,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::None => "flotilla, network: none",
            Variant::Bridge => "flotilla, network: bridge",
            Variant::PodmanCrun => "podman run -d (crun), netavark bridge",
            Variant::PodmanRunc => "podman run -d (runc), netavark bridge",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Bridge => "bridge",
            Variant::PodmanCrun => "pm-crun",
            Variant::PodmanRunc => "pm-runc",
        }
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Some(why) = missing() {
        eprintln!("networks bench needs containers and network namespaces: {why}; nothing measured");
        return;
    }
    if !netns::netns_possible() {
        return;
    }
    let bench_start = Instant::now();
    let runs = env_usize("BENCH_RUNS", 20).max(1);
    let attach_runs = env_usize("BENCH_ATTACH", 50).max(1);

    // Dropped in reverse: podman's containers, the janitor, the cluster (agent, hub, data
    // dir), the forwarder, the namespaces, the registry.
    let reg = registry::TestRegistry::start().expect("docker-registry is needed for this benchmark");
    let ns = netns::Netns::create();
    let ns_direct = netns::Netns::create();
    let fwd = netns::TcpForward::start(ns.host_ip(), reg.addr.parse().unwrap());
    let port = cluster::free_udp_port();
    let mut c = cluster::Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    let _janitor = janitor::Janitor::new(c.dir.path(), &[NODE]);

    let layout = c.dir.path().join("layout-busybox");
    assert!(busybox_image::write_busybox_layout(&layout, "busybox:networks", &["sleep", "999999"]));
    let pushed = reg.reference("busybox:networks");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), layout.as_os_str(), pushed.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    // The agent and podman pull over the namespace's link.
    let image = pushed.replacen(&reg.addr, &fwd.addr.to_string(), 1);

    let hub = format!("{}:{port}", ns.host_ip());
    let registry = fwd.addr.to_string();
    c.add_agent_via(&ns.exec_prefix(), &hub, NODE, &["--containers", "on", "--insecure-registry", &registry]);
    c.wait_for("the agent Ready", LIMIT, || c.nodes().iter().any(|n| n.ready));

    let podman = Podman::start(&ns, &c.dir.path().join("podman"));
    if let Some(p) = &podman {
        p.must(&["pull", "--tls-verify=false", &image]);
        println!("{}", p.versions());
    }
    let mut variants = vec![Variant::None, Variant::Bridge];
    if podman.is_some() {
        variants.extend([Variant::PodmanCrun, Variant::PodmanRunc]);
    }
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = Api::connect(&c.config_path()).await;
        println!("start of one busybox container, {runs} rounds, order rotated every round (ms: ready / first line):");
        // Round 0 is a warm-up, not counted: the agent pulls the image, caches are filled.
        for round in 0..=runs {
            let mut line = format!("  round {round:2}:");
            for k in 0..variants.len() {
                let v = variants[(k + round) % variants.len()];
                let name = format!("nb-{round}-{}", v.short());
                let s = match v {
                    Variant::None => flotilla_once(&api, &c, &name, &image, &NetworkMode::None).await,
                    Variant::Bridge => flotilla_once(&api, &c, &name, &image, &NetworkMode::Bridge).await,
                    Variant::PodmanCrun => podman.as_ref().unwrap().once("crun", &name, &image),
                    Variant::PodmanRunc => podman.as_ref().unwrap().once("runc", &name, &image),
                };
                line.push_str(&format!("  {} {:.1}/{:.1}", v.short(), ms(s.running), ms(s.first_line)));
                if round > 0 {
                    samples[variants.iter().position(|x| *x == v).unwrap()].push(s);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("{line}{}", if round == 0 { "  (warm-up)" } else { "" });
        }
    });

    let in_agent = attach_log(&c.dir.path().join(format!("agent-{NODE}.log")));
    println!("network attach timed directly ({attach_runs} runs, in a namespace of its own):");
    let d = direct(&ns_direct.name, c.dir.path().join("direct-network"), attach_runs);

    // ---- Summary ---------------------------------------------------------------------------
    println!();
    println!("== container start, {runs} rounds: median / p90 ==");
    println!("  {:40} | {:>17} | {:>17}", "", "ready (ms)", "first line (ms)");
    for (v, s) in variants.iter().zip(&samples) {
        let r: Vec<Duration> = s.iter().map(|x| x.running).collect();
        let l: Vec<Duration> = s.iter().map(|x| x.first_line).collect();
        println!(
            "  {:40} | {:7.1} / {:7.1} | {:7.1} / {:7.1}",
            v.label(),
            ms(median(&r)),
            ms(percentile(&r, 0.9)),
            ms(median(&l)),
            ms(percentile(&l, 0.9))
        );
    }
    println!("  (flotilla ready = apply sent -> Running in the hub; podman ready = `podman run -d` spawned -> exited)");
    let med = |v: Variant, f: fn(&Sample) -> Duration| {
        variants.iter().position(|x| *x == v).map(|i| median(&samples[i].iter().map(f).collect::<Vec<_>>()))
    };
    let ready = |s: &Sample| s.running;
    let line = |s: &Sample| s.first_line;
    for (what, f) in [("ready", ready as fn(&Sample) -> Duration), ("first line", line)] {
        let b = med(Variant::Bridge, f).unwrap();
        let mut out =
            format!("  {what:10}: bridge / none {:.2}", b.as_secs_f64() / med(Variant::None, f).unwrap().as_secs_f64());
        for pv in [Variant::PodmanCrun, Variant::PodmanRunc] {
            if let Some(p) = med(pv, f) {
                out.push_str(&format!(", bridge / {} {:.2}", pv.short(), b.as_secs_f64() / p.as_secs_f64()));
            }
        }
        // Each round's bridge minus none: robust to drift.
        let (ni, bi) = (0, 1);
        let mut diffs: Vec<f64> = samples[bi].iter().zip(&samples[ni]).map(|(b, n)| ms(f(b)) - ms(f(n))).collect();
        diffs.sort_by(f64::total_cmp);
        let k = diffs.len();
        let paired = if k % 2 == 1 { diffs[k / 2] } else { (diffs[k / 2 - 1] + diffs[k / 2]) / 2.0 };
        out.push_str(&format!("; bridge - none, median of the rounds {paired:+.1} ms"));
        println!("{out}");
    }
    println!("== the network's own share, timed directly, {attach_runs} runs: median / p90 ==");
    let row =
        |what: &str, v: &[Duration]| println!("  {what:52} {:6.2} / {:6.2} ms", ms(median(v)), ms(percentile(v, 0.9)));
    row("Networks::attach (netns + CNI ADD bridge, portmap)", &d.attach);
    row("Networks::detach (CNI DEL portmap, bridge; netns)", &d.detach);
    row("a bare network namespace made (loopback up, bound)", &d.netns);
    for (name, v) in &d.exec {
        row(&format!("{name} plugin process, CNI_COMMAND=VERSION"), v);
    }
    let execs: f64 = d.exec.iter().map(|(_, v)| ms(median(v))).sum();
    println!(
        "  three plugin process starts per ADD (bridge, host-local from bridge, portmap): {:.2} ms of the attach's {:.2} ms",
        execs,
        ms(median(&d.attach))
    );
    println!(
        "== the same in the agent, from its log (\"network attached\", the {} counted bridge starts) ==",
        in_agent.len()
    );
    let took: Vec<Duration> = in_agent.iter().map(|a| a.0).collect();
    let plugins: Vec<Duration> = in_agent.iter().map(|a| a.1).collect();
    row("Networks::attach in the agent", &took);
    row("of it, the CNI plugin chain (ADD bridge, portmap)", &plugins);
    println!("total bench time {:.0} s", bench_start.elapsed().as_secs_f64());
    drop(podman);
}
