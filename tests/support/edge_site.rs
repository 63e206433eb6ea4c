#![allow(dead_code)] // shared by the autonomy tests and benchmark, each using part of it
//! An edge site for autonomy tests: a hub on the root namespace's wildcard address, one agent
//! in its own network namespace (see `netns.rs`) running a Wasm replica that logs every 200 ms
//! and a busybox container replica, with the registry reached over the agent's link, so
//! cutting the link cuts the registry too. Also the local evidence a test reads on the node
//! (log files, container cgroups) and the cleanup of what containers leave behind.
//!
//! Includers declare `cluster`, `netns`, `registry` and `busybox_image` modules next to this one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::messages::{Phase, ReplicaView};

use super::busybox_image;
use super::cluster::{self, Cluster};
use super::netns::{self, Netns, TcpForward};
use super::registry::TestRegistry;

pub const WASM: &str = "tick";
pub const WASM_REPLICA: &str = "tick-0";
pub const BOX: &str = "box";
pub const BOX_REPLICA: &str = "box-0";
/// What the Wasm replica prints, followed by ` #<n>`.
pub const GREETING: &str = "tick";
/// The container's first line at every start.
pub const BOX_START: &str = "box started";
pub const WAIT: Duration = Duration::from_secs(90);

/// Root, network tools, cgroups and busybox, or the reason these tests cannot run here
/// (a panic when `CI` is set).
pub fn possible() -> bool {
    if !netns::netns_possible() {
        return false;
    }
    let why = if !Path::new("/sys/fs/cgroup/pids").is_dir() && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        Some("no cgroup pids controller")
    } else if !Path::new("/bin/busybox").exists() {
        Some("/bin/busybox missing (Debian's busybox-static)")
    } else {
        None
    };
    netns::runnable("autonomy", why)
}

/// The site. Field order is drop order after [`Site::drop`] has stopped the agents and
/// removed container leftovers: cluster (hub, data dir), forwarder, namespace, registry.
pub struct Site {
    pub c: Cluster,
    pub fwd: TcpForward,
    pub ns: Netns,
    pub reg: TestRegistry,
    /// The agent's node name (unique per test: container cgroups are named after it).
    pub node: String,
    /// `HOST:PORT` the agent dials.
    pub hub_for_agent: String,
    pub wasm_image: String,
    pub box_image: String,
}

impl Site {
    /// Everything up, the agent Ready, both replicas Running. `None` when the registry is
    /// missing (and `CI` unset).
    pub fn start(node: &str) -> Option<Site> {
        let reg = TestRegistry::start()?;
        let ns = Netns::create();
        let reg_addr: SocketAddr = reg.addr.parse().unwrap();
        let fwd = TcpForward::start(ns.host_ip(), reg_addr);

        // Pushed to the registry on loopback, pulled by the agent through its link.
        let wasm = cluster::example_wasm();
        let out =
            cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), reg.reference("tick:v1").as_ref()]);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        let port = cluster::free_udp_port();
        let c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
        let layout = c.dir.path().join("box-layout");
        let cmd = ["sh", "-c", &format!("echo {BOX_START} pid $$; exec sleep 100000")];
        assert!(busybox_image::write_busybox_layout(&layout, "box:v1", &cmd), "cannot build the busybox image");
        let out =
            cluster::flotilla(&[std::ffi::OsStr::new("push"), layout.as_os_str(), reg.reference("box:v1").as_ref()]);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));

        let mut site = Site {
            node: node.to_string(),
            hub_for_agent: format!("{}:{port}", ns.host_ip()),
            wasm_image: format!("{}/tick:v1", fwd.addr),
            box_image: format!("{}/box:v1", fwd.addr),
            c,
            fwd,
            ns,
            reg,
        };
        site.start_agent();
        site.c.wait_for("node Ready", WAIT, || site.node_ready());
        let docs = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {WASM}}}\nspec:\n  runtime: wasm\n  image: {}\n  args: [\"--interval-ms\", \"200\"]\n  env: {{GREETING: {GREETING}}}\n---\napiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {BOX}}}\nspec:\n  runtime: container\n  image: {}\n  resources: {{memory: 32Mi, pids: 16}}\n",
            site.wasm_image, site.box_image
        );
        let out = site.c.cli_with_stdin(&["apply", "-f", "-"], Some(&docs));
        assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
        site.c.wait_for("both replicas Running", WAIT, || {
            site.running(WASM_REPLICA) && site.running(BOX_REPLICA) && !site.box_pids().is_empty()
        });
        Some(site)
    }

    /// Starts (or restarts) the agent inside the namespace.
    pub fn start_agent(&mut self) {
        let registry = self.fwd.addr.to_string();
        let prefix = self.ns.exec_prefix();
        let (hub, node) = (self.hub_for_agent.clone(), self.node.clone());
        self.c.add_agent_via(&prefix, &hub, &node, &["--containers", "on", "--insecure-registry", &registry]);
    }

    /// SIGKILLs the running agent (its Wasm replicas die with it; containers keep running
    /// under their shims).
    pub fn kill_agent(&mut self) {
        for a in &mut self.c.agents {
            a.kill();
        }
    }

    /// The current agent process's log.
    pub fn agent_log(&self) -> String {
        self.c.agents.last().map(|a| a.log_text()).unwrap_or_default()
    }

    pub fn node_ready(&self) -> bool {
        self.c.nodes().iter().any(|n| n.name == self.node && n.ready)
    }

    pub fn replica(&self, name: &str) -> Option<ReplicaView> {
        self.c.replicas().into_iter().find(|r| r.name == name)
    }

    pub fn running(&self, name: &str) -> bool {
        self.replica(name)
            .is_some_and(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
    }

    pub fn phase(&self, name: &str) -> Option<Phase> {
        self.replica(name).map(|r| r.status.phase)
    }

    /// A replica's log file on the node.
    pub fn log_path(&self, replica: &str) -> PathBuf {
        self.c.agent_dir(&self.node).join("logs").join(format!("{replica}.log"))
    }

    /// Lines of the Wasm replica's local log that the workload printed (not agent notes).
    pub fn wasm_lines(&self) -> usize {
        count_lines(&self.log_path(WASM_REPLICA), &format!("{GREETING} #"))
    }

    /// Start lines of the container in its local log.
    pub fn box_starts(&self) -> usize {
        count_lines(&self.log_path(BOX_REPLICA), BOX_START)
    }

    /// The pids in the container replica's cgroup.
    pub fn box_pids(&self) -> Vec<u32> {
        container_pids(&self.node, BOX_REPLICA)
    }

    /// SIGKILLs every process of the container (what a power cut does to it).
    pub fn kill_box(&self) {
        for pid in self.box_pids() {
            let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }

    /// Polls `cond` every `every` until it holds or `limit` passes; the time it took.
    pub fn time_until(limit: Duration, every: Duration, cond: impl FnMut() -> bool) -> Option<Duration> {
        cluster::time_until(limit, every, cond)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Agents first, so nothing restarts what the cleanup removes.
        self.kill_agent();
        if std::thread::panicking() {
            // Printed here: the cluster's data dir (with the logs) goes before its processes.
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.c.dir.path())
                .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
                .unwrap_or_default();
            logs.sort();
            for p in logs {
                eprintln!("----- {} -----\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        clean_containers(self.c.dir.path(), &self.node);
    }
}

/// Lines of `path` (with its rotated `.1` and the previous run's `.prev.log`) containing
/// `needle`.
pub fn count_lines(path: &Path, needle: &str) -> usize {
    let mut n = 0;
    // A new run moves the log so far to `.prev.log` (`flotilla logs --previous`).
    for p in [path.with_extension("prev.log"), path.with_extension("log.1"), path.to_path_buf()] {
        if let Ok(text) = std::fs::read_to_string(&p) {
            n += text.lines().filter(|l| l.contains(needle)).count();
        }
    }
    n
}

/// The pids in a replica's container cgroup (any controller hierarchy that has it).
pub fn container_pids(node: &str, replica: &str) -> Vec<u32> {
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

/// Removes what a node's containers may leave behind when a test ends half-way: their
/// processes, overlay mounts under `dir`, and their cgroups.
pub fn clean_containers(dir: &Path, node: &str) {
    let hierarchies: Vec<PathBuf> =
        std::fs::read_dir("/sys/fs/cgroup").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let children = |h: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(h.join("flotilla").join(node))
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default()
    };
    for h in &hierarchies {
        for child in children(h) {
            let procs = std::fs::read_to_string(child.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)) {
        let _ = std::process::Command::new("umount").args(["-l", m]).status();
    }
    for h in &hierarchies {
        for child in children(h) {
            let _ = std::fs::remove_dir(child);
        }
        let _ = std::fs::remove_dir(h.join("flotilla").join(node));
    }
}

/// Unix time (seconds) of a log line's leading RFC 3339 UTC timestamp
/// (`2025-01-02T03:04:05.678901Z ...`), as the binary's tracing output writes it.
pub fn line_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) =
        (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + min * 60) as f64 + sec)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
