#![allow(dead_code)] // shared by several test and bench crates, each using part of it
//! Network fault injection for multi-host tests on one machine: each agent gets its own
//! network namespace joined to the root namespace by a veth pair with private addresses, so a
//! test can cut its link, bring it back, change its address or make it lossy, exactly as a
//! flaky site link would.
//!
//! Layout of slot `k` (a number from 0 to 255 held by a lock file, so concurrent test
//! processes never share one): namespace `flt<pid>-<n>`, host side `flt<pid>-<n>h` with
//! 10.231.k.1/30 in the root namespace, peer `flt<pid>-<n>a` inside the namespace with
//! 10.231.k.2/30 and a default route to the host side; `lo` is up inside. An agent in the
//! namespace reaches the hub (listening on the root namespace's wildcard address) at
//! 10.231.k.1. An address change moves the agent to the next /30 of the slot (10.231.k.6,
//! host side 10.231.k.5, ...).
//!
//! Everything is removed on drop, also when the test panics; leftovers of crashed runs (names
//! and lock files whose pid no longer exists) are swept before the first namespace is made.
//! This module only ever touches interfaces, namespaces and addresses it named itself, and only
//! sends traffic to these test addresses and loopback. Every external command is bounded in
//! time.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Names of everything made here start with this.
const PREFIX: &str = "flt";
/// Where slot lock files live (tmpfs, so a reboot clears them).
const LOCK_DIR: &str = "/run/flotilla-test-netns";
/// How long one `ip`/`tc` command may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SWEEP: std::sync::Once = std::sync::Once::new();

/// Whether these tests can run here (root, `ip`, `tc`, `nsenter`); says why not. With `CI`
/// set, a missing requirement panics instead of skipping.
pub fn netns_possible() -> bool {
    let why = if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        Some("not running as root (network namespaces need it)".to_string())
    } else {
        ["ip", "tc", "nsenter"]
            .iter()
            .find(|tool| which(tool).is_none())
            .map(|tool| format!("`{tool}` not found (install iproute2 and util-linux: scripts/install-deps.sh)"))
    };
    runnable("network namespace", why.as_deref())
}

/// Whether the `what` tests can run: yes without a reason `why` they cannot; with one they
/// skip, printing it, or panic under `CI`, which must run them.
pub fn runnable(what: &str, why: Option<&str>) -> bool {
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("{what} tests cannot run: {why}; CI must run them"),
        Some(why) => {
            eprintln!("skipping {what} test: {why}");
            false
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Runs `program args`, bounded in time; returns (success, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, String::new(), format!("cannot run {program}: {e}")),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < CMD_TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return (false, String::new(), format!("{program} {args:?} timed out after {CMD_TIMEOUT:?}"));
            }
        }
    }
    match child.wait_with_output() {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

/// Runs a command that must succeed.
fn must(program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run(program, args);
    assert!(ok, "{program} {} failed: {err}", args.join(" "));
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `flt<pid>-...`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes namespaces, links and slot locks that crashed runs left behind (their pid is gone).
pub fn sweep_stale() {
    let (_, list, _) = run("ip", &["netns", "list"]);
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if owner_pid(ns).is_some_and(|pid| !pid_alive(pid)) {
            let _ = run("ip", &["netns", "delete", ns]);
        }
    }
    let (_, links, _) = run("ip", &["-o", "link", "show"]);
    for l in links.lines() {
        // "7: flt123-0h@if6: <...>"
        let Some(name) = l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) {
            let _ = run("ip", &["link", "delete", name]);
        }
    }
    if let Ok(dir) = std::fs::read_dir(LOCK_DIR) {
        for e in dir.flatten() {
            let pid = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<u32>().ok());
            if pid.is_none_or(|p| !pid_alive(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A /24 of 10.231.0.0/16 held by this process (a lock file with its pid).
struct Slot {
    k: u8,
    lock: PathBuf,
}

impl Slot {
    fn take() -> Slot {
        std::fs::create_dir_all(LOCK_DIR).unwrap_or_else(|e| panic!("cannot create {LOCK_DIR}: {e}"));
        for k in 0..=255u8 {
            let lock = Path::new(LOCK_DIR).join(format!("10.231.{k}"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Slot { k, lock };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", lock.display()),
            }
        }
        panic!("all 256 test subnets of 10.231.0.0/16 are taken (see {LOCK_DIR})");
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// One agent's network namespace and its link to the root namespace.
pub struct Netns {
    /// Namespace name (`ip netns`), also the stem of the veth names.
    pub name: String,
    /// The veth end in the root namespace.
    pub host_if: String,
    /// The veth end inside the namespace.
    pub peer_if: String,
    slot: Slot,
    /// Which /30 of the slot the agent is on (0: .0/30, 1: .4/30, ...).
    subnet: u8,
    lossy: Option<LossMethod>,
}

/// How [`Netns::set_loss`] drops packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMethod {
    /// `tc qdisc ... netem loss` on both veth ends.
    Netem,
    /// iptables `statistic` drops inside the namespace (kernels without netem).
    Iptables,
}

impl Netns {
    /// Creates a namespace with its veth pair, addresses and routes; panics with the failing
    /// command's error.
    pub fn create() -> Netns {
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        let host_if = format!("{name}h");
        let peer_if = format!("{name}a");
        assert!(host_if.len() <= 15, "interface name {host_if} too long");
        let slot = Slot::take();
        // From here on, Drop cleans up whatever part was made.
        let ns = Netns { name, host_if, peer_if, slot, subnet: 0, lossy: None };
        must("ip", &["netns", "add", &ns.name]);
        must("ip", &["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns.peer_if, "netns", &ns.name]);
        must("ip", &["addr", "add", &format!("{}/30", ns.host_ip()), "dev", &ns.host_if]);
        must("ip", &["link", "set", &ns.host_if, "up"]);
        must("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        must("ip", &["-n", &ns.name, "addr", "add", &format!("{}/30", ns.agent_ip()), "dev", &ns.peer_if]);
        must("ip", &["-n", &ns.name, "link", "set", &ns.peer_if, "up"]);
        must("ip", &["-n", &ns.name, "route", "add", "default", "via", &ns.gateway_ip().to_string()]);
        ns
    }

    fn ip_in_subnet(&self, subnet: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.slot.k, subnet * 4 + host)
    }

    /// The root namespace's first address on this link (10.231.k.1): where the agent dials
    /// the hub. It stays valid across address changes (reached through the default route).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.ip_in_subnet(0, 1)
    }

    /// The host side of the agent's current /30, its default gateway.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.ip_in_subnet(self.subnet, 1)
    }

    /// The agent's current address.
    pub fn agent_ip(&self) -> Ipv4Addr {
        self.ip_in_subnet(self.subnet, 2)
    }

    /// The command prefix that runs a program in this namespace. `nsenter --net` switches the
    /// network namespace only; `ip netns exec` would also remount /sys in a private mount
    /// namespace, hiding /sys/fs/cgroup from the agent and its containers.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.name), "--".into()]
    }

    /// Cuts the link: the host side goes down, the agent's side loses carrier. Packets in
    /// either direction are lost, as on a dead uplink.
    pub fn cut(&self) {
        must("ip", &["link", "set", &self.host_if, "down"]);
    }

    /// Brings the link back.
    pub fn restore(&self) {
        must("ip", &["link", "set", &self.host_if, "up"]);
    }

    /// Moves the agent to a new address (the next /30 of the slot): the host side gains the
    /// new gateway address, the agent's old address is deleted, the new one added with its
    /// default route. Returns the new address.
    pub fn change_agent_address(&mut self) -> Ipv4Addr {
        let old = self.agent_ip();
        let next = self.subnet + 1;
        assert!(next < 64, "no more /30s in slot {}", self.slot.k);
        self.subnet = next;
        must("ip", &["addr", "add", &format!("{}/30", self.gateway_ip()), "dev", &self.host_if]);
        must("ip", &["-n", &self.name, "addr", "del", &format!("{old}/30"), "dev", &self.peer_if]);
        must("ip", &["-n", &self.name, "addr", "add", &format!("{}/30", self.agent_ip()), "dev", &self.peer_if]);
        must("ip", &["-n", &self.name, "route", "replace", "default", "via", &self.gateway_ip().to_string()]);
        self.agent_ip()
    }

    /// Drops `percent` % of packets in each direction: `tc netem` on both veth ends, or, on
    /// kernels built without netem (`CONFIG_NET_SCH_NETEM`), random drops by the `statistic`
    /// match of iptables inside the namespace (its INPUT and OUTPUT on the veth, so the root
    /// namespace's firewall is never touched). Returns which was used.
    pub fn set_loss(&mut self, percent: u32) -> LossMethod {
        self.clear_loss();
        let loss = format!("{percent}%");
        let (ok, _, err) = run("tc", &["qdisc", "add", "dev", &self.host_if, "root", "netem", "loss", &loss]);
        if ok {
            must("tc", &["-n", &self.name, "qdisc", "add", "dev", &self.peer_if, "root", "netem", "loss", &loss]);
            self.lossy = Some(LossMethod::Netem);
            return LossMethod::Netem;
        }
        assert!(err.contains("unknown"), "tc netem on {}: {err}", self.host_if);
        let probability = format!("{}", f64::from(percent) / 100.0);
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let args = ["netns", "exec", &self.name, "iptables", "-A", chain, dir, &self.peer_if];
            let matcher = ["-m", "statistic", "--mode", "random", "--probability", &probability, "-j", "DROP"];
            must("ip", &[&args[..], &matcher[..]].concat());
        }
        self.lossy = Some(LossMethod::Iptables);
        LossMethod::Iptables
    }

    /// Removes the loss again.
    pub fn clear_loss(&mut self) {
        match self.lossy.take() {
            Some(LossMethod::Netem) => {
                must("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
                must("tc", &["-n", &self.name, "qdisc", "del", "dev", &self.peer_if, "root"]);
            }
            Some(LossMethod::Iptables) => {
                for chain in ["INPUT", "OUTPUT"] {
                    must("ip", &["netns", "exec", &self.name, "iptables", "-F", chain]);
                }
            }
            None => {}
        }
    }

    /// Whether the namespace and host-side link exist (for tests of this module).
    pub fn exists(&self) -> bool {
        let (_, list, _) = run("ip", &["netns", "list"]);
        list.lines().any(|l| l.split_whitespace().next() == Some(self.name.as_str()))
            && run("ip", &["link", "show", &self.host_if]).0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the host end deletes the pair; the namespace goes when its last process
        // does (ip netns delete only removes its name).
        let _ = run("ip", &["link", "delete", &self.host_if]);
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// Forwards TCP connections made to `listen` (an address in the root namespace, typically a
/// [`Netns::host_ip`]) to a loopback service, so agents in namespaces reach, for example, a
/// registry bound to 127.0.0.1. Cutting the link cuts this path too. Stops on drop.
pub struct TcpForward {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpForward {
    pub fn start(listen: Ipv4Addr, target: SocketAddr) -> TcpForward {
        let listener = TcpListener::bind((listen, 0)).unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // Non-blocking accept, polled: a blocking one could not be woken while the link (and
        // with it the listening address) is down.
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let inbound = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                };
                let (Ok(in2), Ok(out2)) = (inbound.try_clone(), outbound.try_clone()) else { continue };
                std::thread::spawn(move || pipe(inbound, outbound));
                std::thread::spawn(move || pipe(out2, in2));
            }
        });
        TcpForward { addr, stop, thread: Some(thread) }
    }
}

/// Copies `from` to `to` until either side ends, then shuts both down. A read timeout bounds
/// a connection whose peer vanished behind a cut link.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for TcpForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A site's LAN: a bridge in a namespace of its own, with a veth into each member agent's
/// namespace carrying 192.168.250.(i+1)/24. Dropping it deletes the namespace, and with it
/// every veth (their peers in the agents' namespaces go too).
pub struct SiteLan {
    name: String,
}

impl SiteLan {
    pub fn create(members: &[&Netns]) -> SiteLan {
        let pid = std::process::id() % 100_000;
        let lan = SiteLan { name: format!("fltlan{pid}") };
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &lan.name]);
        ip(&["-n", &lan.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.name, "link", "set", "br0", "up"]);
        for (i, ns) in members.iter().enumerate() {
            let agent_ns = ns.exec_prefix()[1].trim_start_matches("--net=/run/netns/").to_string();
            let (here, there) = (format!("lan{i}"), format!("fl{pid}s{i}"));
            ip(&["-n", &lan.name, "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &agent_ns]);
            ip(&["-n", &lan.name, "link", "set", &here, "master", "br0", "up"]);
            ip(&["-n", &agent_ns, "addr", "add", &format!("{}/24", Self::ip(i)), "dev", &there]);
            ip(&["-n", &agent_ns, "link", "set", &there, "up"]);
        }
        lan
    }

    pub fn ip(i: usize) -> String {
        format!("192.168.250.{}", i + 1)
    }
}

impl Drop for SiteLan {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
