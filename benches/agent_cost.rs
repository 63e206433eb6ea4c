//! What the operations features cost an agent: idle CPU and memory with the Prometheus
//! endpoint on (and scraped) against off, and the link traffic of `flotilla top`.
//!
//! `cargo bench --bench agent_cost` starts a hub and two agents as processes on loopback, one
//! with `--metrics-listen` and one without, side by side in the same run (this machine is
//! shared and noisy: the two see the same noise). Both join and idle with no workloads. Over
//! BENCH_SECS (120) the bench scrapes the metrics agent every BENCH_SCRAPE_SECS (15, a
//! Prometheus default) and samples both agents' RSS every second; it reports each agent's CPU
//! time (utime + stime from /proc) over the window, its RSS (median and max), and the ratio.
//! Then it runs `flotilla top nodes` BENCH_TOPS (20) times and reports the bytes each request
//! cost on one node's link, from the agent's own `flotilla_agent_link_bytes_total` (QUIC
//! packets, headers and acknowledgements included); with no `top`, usage adds no traffic at
//! all (it is asked on demand, never pushed).

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "support/measure.rs"]
mod measure;

use std::time::{Duration, Instant};

use cluster::Cluster;
use measure::cpu_seconds;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of the series `name` with label text `labels` (e.g. `direction="sent"`).
fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().filter(|l| l.starts_with(name) && l.contains(labels)).find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs = env_or("BENCH_SECS", 120);
    let scrape_every = env_or("BENCH_SCRAPE_SECS", 15);
    let tops = env_or("BENCH_TOPS", 20);
    let port = cluster::free_tcp_port();
    let metrics_addr = format!("127.0.0.1:{port}");

    let mut c = Cluster::start();
    c.add_agent("cost-off", &[]);
    c.add_agent("cost-on", &["--metrics-listen", &metrics_addr]);
    c.wait_for("both agents Ready", Duration::from_secs(60), || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let pid = |name: &str| c.agents.iter().find(|a| a.name == format!("agent {name}")).unwrap().child.id();
    let (off, on) = (pid("cost-off"), pid("cost-on"));
    // Past joining and the first sets.
    std::thread::sleep(Duration::from_secs(5));

    let (cpu_off0, cpu_on0) = (cpu_seconds(off), cpu_seconds(on));
    let (mut rss_off, mut rss_on) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut next_scrape = start;
    let mut scrapes = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_scrape {
            assert!(scrape(&metrics_addr).contains("flotilla_agent_hub_connected"), "the metrics endpoint answers");
            scrapes += 1;
            next_scrape += Duration::from_secs(scrape_every);
        }
        rss_off.push(rss_kib(off));
        rss_on.push(rss_kib(on));
        std::thread::sleep(Duration::from_secs(1));
    }
    let window = start.elapsed().as_secs_f64();
    let (cpu_off, cpu_on) = (cpu_seconds(off) - cpu_off0, cpu_seconds(on) - cpu_on0);
    let (max_off, max_on) = (*rss_off.iter().max().unwrap(), *rss_on.iter().max().unwrap());
    let (med_off, med_on) = (median(&mut rss_off), median(&mut rss_on));
    println!("idle agents, no workloads, {window:.0} s, metrics scraped every {scrape_every} s ({scrapes} scrapes)");
    println!("| agent | CPU over the window | CPU per minute | RSS median | RSS max |");
    println!("|---|---|---|---|---|");
    for (name, cpu, med, max) in [("metrics off", cpu_off, med_off, max_off), ("metrics on", cpu_on, med_on, max_on)] {
        println!(
            "| {name} | {:.2} s ({:.3} % of a core) | {:.0} ms | {:.1} MiB | {:.1} MiB |",
            cpu,
            cpu / window * 100.0,
            cpu / window * 60_000.0,
            med as f64 / 1024.0,
            max as f64 / 1024.0
        );
    }
    println!(
        "on/off: CPU {:.2}×, RSS median {:.2}×",
        cpu_on / cpu_off.max(0.01),
        med_on as f64 / med_off.max(1) as f64
    );

    // The link traffic of `flotilla top`, on the metrics agent's link.
    let bytes = || {
        let t = scrape(&metrics_addr);
        (
            value(&t, "flotilla_agent_link_bytes_total", "direction=\"sent\""),
            value(&t, "flotilla_agent_link_bytes_total", "direction=\"received\""),
        )
    };
    let (s0, r0) = bytes();
    let (Some(s0), Some(r0)) = (s0, r0) else {
        println!("(this agent has no flotilla_agent_link_bytes_total: link traffic not measured)");
        return;
    };
    std::thread::sleep(Duration::from_secs(10));
    let (s1, r1) = bytes();
    let (s1, r1) = (s1.unwrap_or(s0), r1.unwrap_or(r0));
    let (idle_s, idle_r) = ((s1 - s0) / 10.0, (r1 - r0) / 10.0);
    let began = Instant::now();
    for _ in 0..tops {
        c.ok(&["top", "nodes", "-o", "json"]);
    }
    let took = began.elapsed().as_secs_f64();
    let (s2, r2) = bytes();
    let (s2, r2) = (s2.unwrap_or(s1), r2.unwrap_or(r1));
    // Keep-alives went on meanwhile: their share (at the idle rate) is taken out.
    let per_top = |d: f64, idle: f64| (d - idle * took).max(0.0) / tops as f64;
    println!("link of one node, idle: {idle_s:.0} B/s sent, {idle_r:.0} B/s received (keep-alives and acks)");
    println!(
        "each `flotilla top`: {:.0} B sent + {:.0} B received on that link ({tops} requests over {took:.1} s)",
        per_top(s2 - s1, idle_s),
        per_top(r2 - r1, idle_r)
    );
}
