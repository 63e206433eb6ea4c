//! Edge autonomy benchmark: a hub on the root namespace and one agent in its own network
//! namespace (veth link, registry reached over that link), running a Wasm replica and a
//! busybox container replica, with its link cut and restored and the node "rebooted" offline.
//!
//! `cargo bench --bench autonomy` measures, per round:
//! 1. dead link, hub side: from `ip link set down` to the hub listing the node NotReady
//!    (polled every 20 ms over the admin API);
//! 2. dead link, agent side: from the cut to the agent's `lost the hub connection` log line
//!    (its timestamp against the wall clock at the cut);
//! 3. time to Ready after the link returns, after a short cut (15 s: longer than the 8 to 10 s
//!    the link takes to be declared dead, so the session is really lost) and a long one (40 s);
//! 4. offline reboot: agent and container SIGKILLed with the link down, the agent started
//!    again, time from the agent's start to the Wasm replica's first new log line and to the
//!    container's new process and start line (local evidence only), then time to Ready once
//!    the link returns;
//! 5. hub SIGKILLed and restarted: time from the kill until the hub shows the node Ready and
//!    both replicas Running (no replica restarts).
//!
//! Options (environment): BENCH_ROUNDS (default 5), BENCH_SHORT_CUT_S (15),
//! BENCH_LONG_CUT_S (40). Needs root, iproute2, cgroups, busybox and docker-registry.

#[path = "../tests/support/api.rs"]
mod api;
#[path = "../oci-runtime/tests/support/busybox_image.rs"]
mod busybox_image;
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/edge_site.rs"]
mod edge_site;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::time::{Duration, Instant};

use edge_site::{BOX_REPLICA, Site, WASM_REPLICA, line_time, unix_now};
use proto::messages::{ApiRequest, ApiResponse, ResourceKind};

const POLL: Duration = Duration::from_millis(20);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Samples of one measure, in seconds.
#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, d: Option<Duration>) {
        if let Some(d) = d {
            self.0.push(d.as_secs_f64());
        }
    }

    fn line(&self, what: &str, rounds: usize) {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            println!("  {what:<58} no samples");
            return;
        }
        let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
        let missing = if v.len() < rounds { format!("  ({} of {rounds} rounds)", v.len()) } else { String::new() };
        println!("  {what:<58} median {median:7.2} s   min {:7.2} s   max {:7.2} s{missing}", v[0], v[v.len() - 1]);
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    assert!(edge_site::possible(), "this benchmark needs root, iproute2, cgroups and busybox");
    let rounds = env_u64("BENCH_ROUNDS", 5) as usize;
    let short = Duration::from_secs(env_u64("BENCH_SHORT_CUT_S", 15));
    let long = Duration::from_secs(env_u64("BENCH_LONG_CUT_S", 40));
    let mut site = Site::start("bench-edge").expect("docker-registry is needed for this benchmark");
    // A worker thread keeps the admin connection's keep-alives going between polls (the cuts
    // last longer than the hub's idle timeout).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let api = rt.block_on(api::Api::connect(&site.c.config_path()));
    let node = site.node.clone();
    let ready = || {
        let ApiResponse::Nodes { items } = rt.block_on(api.call(&ApiRequest::Get { kind: ResourceKind::Node })) else {
            panic!("unexpected answer to get nodes")
        };
        items.iter().any(|n| n.name == node && n.ready)
    };

    let (mut hub_detect, mut agent_detect, mut ready_short, mut ready_long) =
        (Series::default(), Series::default(), Series::default(), Series::default());
    let (mut boot_wasm, mut boot_box, mut ready_reboot) = (Series::default(), Series::default(), Series::default());
    let mut agent_notes = Vec::new();

    for round in 0..rounds {
        for (cut_for, ready_series) in [(short, &mut ready_short), (long, &mut ready_long)] {
            assert!(ready(), "round {round}: node not Ready before the cut");
            let log_before = site.agent_log().len();
            let wall = unix_now();
            site.ns.cut();
            let cut = Instant::now();
            let seen = Site::time_until(cut_for, POLL, || !ready());
            hub_detect.push(seen);
            if seen.is_none() {
                agent_notes.push(format!("round {round}: hub still Ready after a {cut_for:?} cut"));
            }
            if let Some(left) = cut_for.checked_sub(cut.elapsed()) {
                std::thread::sleep(left);
            }
            // The agent's own view, from its log line's timestamp.
            let log = site.agent_log();
            let lost = log[log_before.min(log.len())..]
                .lines()
                .find(|l| l.contains("lost the hub connection"))
                .and_then(line_time)
                .map(|t| Duration::from_secs_f64((t - wall).max(0.0)));
            if lost.is_none() {
                agent_notes.push(format!("round {round}: no 'lost the hub connection' line during a {cut_for:?} cut"));
            }
            agent_detect.push(lost);
            site.ns.restore();
            let back = Site::time_until(Duration::from_secs(90), POLL, &ready);
            assert!(back.is_some(), "round {round}: node not Ready 90 s after the link returned");
            ready_series.push(back);
            std::thread::sleep(Duration::from_secs(1));
        }

        // Offline reboot.
        site.c.wait_for("replicas Running before the reboot", Duration::from_secs(60), || {
            site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
        });
        let old_pids = site.box_pids();
        site.ns.cut();
        site.kill_agent();
        site.kill_box();
        site.c.wait_for("container processes gone", Duration::from_secs(10), || site.box_pids().is_empty());
        std::thread::sleep(Duration::from_millis(300));
        let (w0, b0) = (site.wasm_lines(), site.box_starts());
        let boot = Instant::now();
        site.start_agent();
        let (mut wasm_at, mut box_at) = (None, None);
        while (wasm_at.is_none() || box_at.is_none()) && boot.elapsed() < Duration::from_secs(60) {
            if wasm_at.is_none() && site.wasm_lines() > w0 {
                wasm_at = Some(boot.elapsed());
            }
            if box_at.is_none() {
                let pids = site.box_pids();
                if !pids.is_empty() && pids != old_pids && site.box_starts() > b0 {
                    box_at = Some(boot.elapsed());
                }
            }
            std::thread::sleep(POLL);
        }
        assert!(!site.agent_log().contains("connected to hub"), "round {round}: the agent reached the hub offline");
        boot_wasm.push(wasm_at);
        boot_box.push(box_at);
        // Let the hub drop the killed agent's session first, so Ready means the new one.
        Site::time_until(Duration::from_secs(30), POLL, || !ready());
        site.ns.restore();
        let restored = Instant::now();
        let back = Site::time_until(Duration::from_secs(90), POLL, &ready);
        assert!(back.is_some(), "round {round}: node not Ready 90 s after the link returned");
        ready_reboot.push(Some(restored.elapsed()));
        site.c.wait_for("replicas Running after the reboot", Duration::from_secs(60), || {
            site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
        });
        eprintln!(
            "round {round}: hub detect {:?}, agent detect {:?}, Ready after short {:?} long {:?}, boot wasm {wasm_at:?} container {box_at:?}",
            hub_detect.0.last(),
            agent_detect.0.last(),
            ready_short.0.last(),
            ready_long.0.last()
        );
        // Let the restarted container run long enough that the next kill is not a crash loop.
        std::thread::sleep(Duration::from_secs(5));
    }

    // Hub SIGKILLed and restarted (scenario 3): from the kill until the hub shows the node
    // Ready with both replicas Running again. Polled through the CLI, since the admin
    // connection above dies with the hub.
    let mut hub_restart = Series::default();
    let pids = site.box_pids();
    for round in 0..rounds {
        let killed = Instant::now();
        site.c.restart_hub();
        let back = Site::time_until(Duration::from_secs(60), POLL, || {
            site.node_ready() && site.running(WASM_REPLICA) && site.running(BOX_REPLICA)
        });
        assert!(back.is_some(), "round {round}: the hub's view did not converge within 60 s of its restart");
        hub_restart.push(Some(killed.elapsed()));
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(site.box_pids(), pids, "a hub restart replaced the container");

    println!("edge autonomy, {rounds} rounds (one agent in a network namespace, Wasm + container replica):");
    hub_detect.line("dead link: cut -> hub shows node NotReady", rounds * 2);
    agent_detect.line("dead link: cut -> agent logs 'lost the hub connection'", rounds * 2);
    ready_short.line(&format!("link back after {} s cut -> node Ready", short.as_secs()), rounds);
    ready_long.line(&format!("link back after {} s cut -> node Ready", long.as_secs()), rounds);
    boot_wasm.line("offline reboot: agent start -> Wasm replica running", rounds);
    boot_box.line("offline reboot: agent start -> container running", rounds);
    ready_reboot.line("offline reboot: link back -> node Ready", rounds);
    hub_restart.line("hub SIGKILL + restart -> node Ready, replicas Running", rounds);
    for n in agent_notes {
        println!("  note: {n}");
    }
}
