//! Edge autonomy under injected faults: an agent in its own network namespace, its link cut
//! with `ip link set down`, the agent and its containers SIGKILLed as in a power cut. The
//! scenarios are numbered as in the autonomy requirements (1: a 60 s partition; 2: a reboot
//! while the hub is unreachable). Evidence on the node is local (log files, cgroups), never
//! the hub's word. Needs root, iproute2, cgroups, busybox and the registry; without them the
//! tests say why and skip, unless `CI` is set.

#[path = "../oci-runtime/tests/support/busybox_image.rs"]
mod busybox_image;
#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/edge_site.rs"]
mod edge_site;
#[path = "support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::time::{Duration, Instant};

use edge_site::{BOX_REPLICA, Site, WASM_REPLICA};
use proto::messages::Phase;

const PARTITION: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// The agent's log lines about its hub link, for failure messages.
fn link_lines(site: &Site) -> String {
    site.agent_log()
        .lines()
        .filter(|l| {
            ["hub connection", "reach the hub", "connected to hub", "reconnect", "network", "link"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn netns_harness_cuts_restores_readdresses_and_cleans_up() {
    if !netns::netns_possible() {
        return;
    }
    let ping = |ns: &netns::Netns| {
        let mut args = ns.exec_prefix();
        args.extend(["/bin/busybox", "ping", "-c", "1", "-W", "1"].map(String::from));
        args.push(ns.host_ip().to_string());
        let out = cluster::run_with_stdin(
            {
                let mut cmd = std::process::Command::new(&args[0]);
                cmd.args(&args[1..]);
                cmd
            },
            None,
        );
        out.status.success()
    };
    let (name, host_if);
    {
        let mut ns = netns::Netns::create();
        name = ns.name.clone();
        host_if = ns.host_if.clone();
        assert!(ns.exists());
        assert!(ping(&ns), "the host side is unreachable from {}", ns.name);
        ns.cut();
        assert!(!ping(&ns), "the cut link still carries packets");
        ns.restore();
        assert!(Site::time_until(Duration::from_secs(5), POLL, || ping(&ns)).is_some(), "no traffic after restore");
        let old = ns.agent_ip();
        let new = ns.change_agent_address();
        assert_ne!(old, new);
        assert!(ping(&ns), "the hub address is unreachable from the new agent address {new}");
        let method = ns.set_loss(100);
        assert!(!ping(&ns), "100 % loss ({method:?}) let a ping through");
        ns.clear_loss();
        assert!(ping(&ns));
    }
    // Dropped: namespace and both veth ends are gone.
    let (list, links) = (
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned(),
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["-o", "link"]).output().unwrap().stdout)
            .into_owned(),
    );
    assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(&name)), "namespace {name} left: {list}");
    assert!(!links.contains(&host_if), "link {host_if} left");
}

/// Scenario 1: partitioned for 60 s, every replica keeps running with zero restarts, and the
/// node is Ready within 5 s of the link returning.
#[test]
fn s1_partition_of_60s_keeps_replicas_running_and_node_ready_within_5s_of_link_return() {
    if !edge_site::possible() {
        return;
    }
    let Some(site) = Site::start("edge-s1") else { return };
    let pids = site.box_pids();
    assert!(!pids.is_empty(), "no processes in the container's cgroup");

    site.ns.cut();
    let cut = Instant::now();
    let lines_at_cut = site.wasm_lines();
    let detected = Site::time_until(Duration::from_secs(30), POLL, || !site.node_ready());
    let detected = detected.unwrap_or_else(|| panic!("the hub still shows the node Ready 30 s after the cut"));
    eprintln!("hub saw the node NotReady {detected:?} after the cut");
    site.c.wait_for("replicas Unknown at the hub", Duration::from_secs(10), || {
        site.phase(WASM_REPLICA) == Some(Phase::Unknown) && site.phase(BOX_REPLICA) == Some(Phase::Unknown)
    });

    // On the node, both replicas keep running through the partition.
    let mut last = site.wasm_lines();
    let mut last_growth = Instant::now();
    while cut.elapsed() < PARTITION {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(site.box_pids(), pids, "the container was replaced during the partition");
        let now = site.wasm_lines();
        if now > last {
            last = now;
            last_growth = Instant::now();
        }
        assert!(
            last_growth.elapsed() < Duration::from_secs(3),
            "the Wasm replica stopped logging {:?} into the partition",
            cut.elapsed()
        );
    }
    let printed = site.wasm_lines() - lines_at_cut;
    assert!(printed >= 150, "the Wasm replica printed only {printed} lines in the 60 s partition (every 200 ms)");
    assert!(!site.node_ready(), "the hub saw the node while its link was down");

    site.ns.restore();
    let ready = Site::time_until(Duration::from_secs(60), POLL, || site.node_ready());
    eprintln!("node Ready {ready:?} after the link returned");

    // No churn: the same container, the Wasm replica never restarted, both Running.
    site.c.wait_for("both replicas Running after the partition", Duration::from_secs(30), || {
        site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
    });
    for r in [WASM_REPLICA, BOX_REPLICA] {
        let st = site.replica(r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r} restarted: {st:?}");
    }
    assert_eq!(site.box_pids(), pids, "the container was replaced after the link returned");
    assert_eq!(site.box_starts(), 1, "the container started more than once");

    let ready = ready.unwrap_or_else(|| {
        panic!("node not Ready 60 s after the link returned; agent link log:\n{}", link_lines(&site))
    });
    assert!(
        ready <= Duration::from_secs(5),
        "node Ready {ready:?} after the link returned (required: 5 s); agent link log:\n{}",
        link_lines(&site)
    );
}

/// Scenario 2: a reboot while the hub is unreachable (agent and containers SIGKILLed, agent
/// restarted with the link down): Wasm replicas run again within 2 s and containers within
/// 5 s of the agent's start, before any hub contact; after the link returns, all converges.
#[test]
fn s2_offline_reboot_runs_wasm_within_2s_and_containers_within_5s_before_hub_contact() {
    if !edge_site::possible() {
        return;
    }
    let Some(mut site) = Site::start("edge-s2") else { return };
    let old_pids = site.box_pids();
    assert!(!old_pids.is_empty(), "no processes in the container's cgroup");

    // Power cut: link down, agent and container processes killed.
    site.ns.cut();
    site.kill_agent();
    site.kill_box();
    site.c.wait_for("the container's processes gone", Duration::from_secs(10), || site.box_pids().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let (wasm0, box0) = (site.wasm_lines(), site.box_starts());

    // Boot with the hub unreachable.
    let boot = Instant::now();
    site.start_agent();
    let (mut wasm_at, mut box_at) = (None, None);
    while (wasm_at.is_none() || box_at.is_none()) && boot.elapsed() < Duration::from_secs(60) {
        if wasm_at.is_none() && site.wasm_lines() > wasm0 {
            wasm_at = Some(boot.elapsed());
        }
        if box_at.is_none() {
            let pids = site.box_pids();
            if !pids.is_empty() && pids != old_pids && site.box_starts() > box0 {
                box_at = Some(boot.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("offline reboot: Wasm running after {wasm_at:?}, container after {box_at:?}");
    let log = site.agent_log();
    assert!(!log.contains("connected to hub"), "the agent reached the hub through a cut link:\n{log}");
    // The hub keeps the killed agent's session until its idle timeout; after that it must not
    // see the node again while the link is down.
    site.c.wait_for("the hub to drop the killed agent's session", Duration::from_secs(30), || !site.node_ready());
    assert!(!site.agent_log().contains("connected to hub"), "the agent reached the hub through a cut link");
    let wasm_at =
        wasm_at.unwrap_or_else(|| panic!("the Wasm replica did not run within 60 s of an offline boot:\n{log}"));
    let box_at = box_at.unwrap_or_else(|| panic!("the container did not run within 60 s of an offline boot:\n{log}"));

    // The link returns: the node is Ready and the hub learns the statuses, without a restart
    // of what already runs.
    let new_pids = site.box_pids();
    site.ns.restore();
    site.c.wait_for("node Ready after the link returned", Duration::from_secs(60), || site.node_ready());
    site.c.wait_for("both replicas Running at the hub", Duration::from_secs(30), || {
        site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
    });
    assert_eq!(site.box_pids(), new_pids, "the container was replaced when the link returned");
    assert_eq!(site.box_starts(), box0 + 1, "the container started more than once after the reboot");

    let log = site.agent_log();
    assert!(
        wasm_at <= Duration::from_secs(2),
        "the Wasm replica ran {wasm_at:?} after the agent started (required: 2 s); agent log:\n{log}"
    );
    assert!(
        box_at <= Duration::from_secs(5),
        "the container ran {box_at:?} after the agent started (required: 5 s); agent log:\n{log}"
    );
}

/// Scenario 4: the agent's address changes mid-connection (Wi-Fi to cellular): within 10 s
/// the node is back, proven by a new workload pushed to it reaching Running, and nothing that
/// ran before restarted.
#[test]
fn s4_address_change_mid_connection_is_back_within_10s() {
    if !edge_site::possible() {
        return;
    }
    let Some(mut site) = Site::start("edge-s4") else { return };
    let pids = site.box_pids();
    let new_ip = site.ns.change_agent_address();
    eprintln!("agent address now {new_ip}");
    let doc = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: after-move}}\nspec:\n  runtime: wasm\n  image: {}\n  args: [\"--interval-ms\", \"500\"]\n",
        site.wasm_image
    );
    let out = site.c.cli_with_stdin(&["apply", "-f", "-"], Some(&doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let back = Site::time_until(Duration::from_secs(60), POLL, || site.node_ready() && site.running("after-move-0"));
    eprintln!("after the address change: new workload Running after {back:?}");
    let back = back.unwrap_or_else(|| {
        panic!("the node did not run a new workload within 60 s of its address change:\n{}", link_lines(&site))
    });
    assert!(
        back <= Duration::from_secs(10),
        "new workload Running {back:?} after the address change (required: 10 s); agent link log:\n{}",
        link_lines(&site)
    );
    for r in [WASM_REPLICA, BOX_REPLICA] {
        let st = site.replica(r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r} restarted: {st:?}");
    }
    assert_eq!(site.box_pids(), pids, "the container was replaced");
}

/// Scenario 3: the hub is SIGKILLed and restarted. Nothing restarts on the agent, the agent
/// reconnects by itself, and the hub's view converges to what runs (both replicas Running, a
/// workload applied after the restart runs too).
#[test]
fn s3_hub_killed_and_restarted_restarts_nothing_and_status_converges() {
    if !edge_site::possible() {
        return;
    }
    let Some(mut site) = Site::start("edge-s3") else { return };
    let pids = site.box_pids();
    let lines = site.wasm_lines();

    site.c.restart_hub();
    let killed = Instant::now();
    let back = Site::time_until(Duration::from_secs(60), POLL, || {
        site.node_ready() && site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
    });
    eprintln!("after the hub restart: node Ready, both replicas Running at the hub after {back:?}");
    assert!(back.is_some(), "the hub's view did not converge within 60 s; agent link log:\n{}", link_lines(&site));
    assert!(site.wasm_lines() > lines, "the Wasm replica stopped logging");
    for r in [WASM_REPLICA, BOX_REPLICA] {
        let st = site.replica(r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r} restarted: {st:?}");
    }
    assert_eq!(site.box_pids(), pids, "the container was replaced");
    assert_eq!(site.box_starts(), 1, "the container started more than once");

    let doc = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: after-hub}}\nspec:\n  runtime: wasm\n  image: {}\n  args: [\"--interval-ms\", \"500\"]\n",
        site.wasm_image
    );
    let out = site.c.cli_with_stdin(&["apply", "-f", "-"], Some(&doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    site.c
        .wait_for("a workload applied after the restart runs", Duration::from_secs(30), || site.running("after-hub-0"));
    eprintln!("hub restart to new workload Running: {:?}", killed.elapsed());
    assert_eq!(site.box_pids(), pids, "the container was replaced");
}

/// Scenario 5: with 20 % of packets dropped each way on the agent's link, a new workload
/// whose module the node must first pull through that link still reaches Running, and what
/// already ran is untouched.
#[test]
fn s5_twenty_percent_loss_still_brings_a_new_workload_to_running() {
    if !edge_site::possible() {
        return;
    }
    let Some(mut site) = Site::start("edge-s5") else { return };
    let pids = site.box_pids();
    // A module the node has never pulled: the pull crosses the lossy link too.
    let module = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-c/build/hello.wasm");
    assert!(module.exists(), "{} is missing: build the examples first (scripts/test.sh does)", module.display());
    let out = cluster::flotilla(&[
        std::ffi::OsStr::new("push"),
        module.as_os_str(),
        site.reg.reference("hello-c:v1").as_ref(),
    ]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));

    let method = site.ns.set_loss(20);
    eprintln!("20 % loss by {method:?}");
    let doc = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: lossy}}\nspec:\n  runtime: wasm\n  image: {}/hello-c:v1\n  args: [\"--interval-ms\", \"500\"]\n",
        site.fwd.addr
    );
    let applied = Instant::now();
    let out = site.c.cli_with_stdin(&["apply", "-f", "-"], Some(&doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let running = Site::time_until(Duration::from_secs(120), POLL, || site.running("lossy-0"));
    eprintln!("under 20 % loss: new workload Running after {running:?}");
    let running = running.unwrap_or_else(|| {
        panic!(
            "the new workload did not reach Running within 120 s under 20 % loss: {:?}\nagent link log:\n{}",
            site.replica("lossy-0"),
            link_lines(&site)
        )
    });
    assert!(applied.elapsed() >= running);
    site.ns.clear_loss();
    for r in [WASM_REPLICA, BOX_REPLICA] {
        let st = site.replica(r).unwrap().status;
        assert_eq!(st.restarts, 0, "{r} restarted: {st:?}");
    }
    assert_eq!(site.box_pids(), pids, "the container was replaced");
}

/// Whether a TCP connection from this (the CLI's) namespace reaches `addr` within a second.
fn reachable(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Reads a pseudo-terminal's master on a thread of its own (blocking reads) into a channel.
fn read_terminal(master: std::fs::File) -> std::sync::mpsc::Receiver<Vec<u8>> {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut master = master;
        let mut buf = [0u8; 4096];
        // EIO once every slave is closed: the session is over.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects terminal output into `seen` until it contains `needle` or `limit` passes.
fn read_until(rx: &std::sync::mpsc::Receiver<Vec<u8>>, seen: &mut String, needle: &str, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while !seen.contains(needle) {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => return seen.contains(needle),
        }
    }
    true
}

/// Waits for a child to exit, at most `limit`.
fn wait_child(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(POLL);
    }
    None
}

/// Remote exec: the agent sits in its own network namespace that accepts no inbound
/// connection (as behind a NAT), and `flotilla exec` still runs commands in its container
/// through the hub and the agent's own link: output, stderr, exit code, stdin, an interactive
/// shell on a pseudo-terminal with a window size change, a clear refusal for a Wasm replica,
/// and a killed CLI leaving nothing running in the container.
#[test]
fn exec_reaches_a_container_on_a_node_that_accepts_no_connections() {
    if !edge_site::possible() {
        return;
    }
    let Some(site) = Site::start("edge-exec") else { return };
    let c = &site.c;

    // A listener on the node: reachable from here before the NAT-like rule, not after.
    let port = 7999;
    let mut prefix = site.ns.exec_prefix();
    prefix.extend(["busybox", "nc", "-l", "-p", &port.to_string()].map(String::from));
    let mut listener = cluster::KillOnDrop(std::process::Command::new(&prefix[0]).args(&prefix[1..]).spawn().unwrap());
    let node_addr = std::net::SocketAddr::from((site.ns.agent_ip(), port));
    assert!(
        Site::time_until(Duration::from_secs(5), POLL, || reachable(node_addr)).is_some(),
        "the test listener on the node should be reachable before the rule"
    );
    listener.stop();
    let mut listener = cluster::KillOnDrop(std::process::Command::new(&prefix[0]).args(&prefix[1..]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let ns = &site.ns.name;
    let rule = ["netns", "exec", ns, "iptables", "-I", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"];
    let st = std::process::Command::new("ip").args(rule).status().unwrap();
    assert!(st.success(), "cannot add the no-inbound rule in {ns}");
    assert!(!reachable(node_addr), "the node must accept no connection from the CLI's side now");
    listener.stop();

    // Output, stderr and the exit code.
    let out = c.cli(&["exec", BOX_REPLICA, "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"), "{}", String::from_utf8_lossy(&out.stderr));
    // It runs in the container: its root is the image's, its pid namespace the container's.
    let out = c.cli(&["exec", BOX_REPLICA, "--", "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sleep 100000"), "{}", String::from_utf8_lossy(&out.stdout));

    // Stdin with -i; without it the command reads end-of-file at once.
    let out = c.cli_with_stdin(&["exec", "-i", BOX_REPLICA, "--", "sh", "-c", "tr a-z A-Z"], Some("piped in\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED IN\n");
    let out = c.cli(&["exec", BOX_REPLICA, "--", "cat"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"");

    // Clear refusals: a Wasm replica, a missing program, a missing replica; exec's own
    // failures exit 125-127 as docker's do.
    let out = c.cli(&["exec", WASM_REPLICA, "--", "sh"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("containers only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["exec", BOX_REPLICA, "--", "no-such-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(&["exec", "nothing-0", "--", "sh"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", String::from_utf8_lossy(&out.stderr));

    // -it through a pseudo-terminal: an interactive shell that sees a terminal of the CLI's
    // size, follows a resize, and whose exit code comes back.
    let pty = oci_runtime::container::tty::open_pty(30, 100).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    // Killed however the test ends: a CLI left running would hold the e2e lock it inherited.
    let mut cli = cluster::KillOnDrop(
        std::process::Command::new(cluster::bin())
            .arg("--config")
            .arg(c.config_path())
            .args(["exec", "-i", "-t", BOX_REPLICA, "--", "sh"])
            .stdin(slave())
            .stdout(slave())
            .stderr(slave())
            .spawn()
            .unwrap(),
    );
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    let output = read_terminal(master.try_clone().unwrap());
    use std::io::Write;
    let mut seen = String::new();
    master.write_all(b"[ -t 0 ] && echo TTY-$((6*7)); stty size\n").unwrap();
    assert!(read_until(&output, &mut seen, "TTY-42", Duration::from_secs(20)), "no answer from the shell: {seen:?}");
    assert!(read_until(&output, &mut seen, "30 100", Duration::from_secs(10)), "window size: {seen:?}");
    // The kernel sends SIGWINCH to the terminal's foreground group; the CLI is not in one
    // here (no controlling terminal), so the signal is sent as the kernel would.
    oci_runtime::container::tty::set_window_size(std::os::fd::AsFd::as_fd(&pty.master), 50, 132).unwrap();
    let st = std::process::Command::new("kill").args(["-WINCH", &cli.0.id().to_string()]).status().unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"stty size\n").unwrap();
    assert!(read_until(&output, &mut seen, "50 132", Duration::from_secs(10)), "resized window: {seen:?}");
    master.write_all(b"exit 3\n").unwrap();
    let status = wait_child(&mut cli.0, Duration::from_secs(20)).expect("the CLI did not exit after the shell");
    assert_eq!(status.code(), Some(3), "terminal output: {seen:?}");

    // A CLI killed mid-command: the command and all it started go from the container.
    let before = site.box_pids().len();
    let mut cli = cluster::KillOnDrop(
        std::process::Command::new(cluster::bin())
            .arg("--config")
            .arg(c.config_path())
            .args(["exec", BOX_REPLICA, "--", "sh", "-c", "sleep 1000 & sleep 1000"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        Site::time_until(Duration::from_secs(20), POLL, || site.box_pids().len() >= before + 3).is_some(),
        "the exec'd processes never showed up in the container: {:?}",
        site.box_pids()
    );
    cli.stop();
    assert!(
        Site::time_until(Duration::from_secs(15), POLL, || site.box_pids().len() == before).is_some(),
        "processes left in the container after the CLI died: {:?} (before: {before})",
        site.box_pids()
    );
    assert!(site.running(BOX_REPLICA), "the container itself must keep running");

    // Every exec is in the audit log, with the program but not its arguments.
    let audit = c.ok(&["audit"]);
    assert!(audit.contains(&format!("{BOX_REPLICA}: sh")), "{audit}");
    assert!(!audit.contains("echo out"), "arguments must not reach the audit log: {audit}");
}
