//! Services benchmark: what a service costs a request, and how fast readiness steers traffic.
//!
//! `cargo bench --bench services` (as root) starts a real `docker-registry`, a hub and two
//! agents (`--containers on`, label `site=shop`) as processes, each agent in a network
//! namespace of its own (tests/support/netns.rs) reaching the hub over its veth link, the two
//! joined by a site LAN (`netns::SiteLan`, 192.168.250.0/24, each agent's `--node-ip` on it).
//! On node `svc-a` run: `api` (busybox httpd answering with its replica's name, ready while
//! `/tmp/www/ready` exists; readiness probe `httpGet /ready` every 500 ms), `hello`
//! (`examples/hello-http`, a Wasm HTTP component on port 8088) and `client` (a busybox
//! container, the load's source). Services `api` (80 → 8080) and `hello` (80 → its HTTP port).
//!
//! 1. **Through the service vs straight to the endpoint**: `wrk --latency` run in the client
//!    container's network namespace (nsenter), at `http://<service address>/` and at the
//!    endpoint's own address and port, for both backends, at BENCH_CONNS connections ("32,1"),
//!    BENCH_SECS seconds each (8), BENCH_ROUNDS rounds (3) with the order rotated every round.
//!    Ratios of the medians: service ÷ direct for p50, p99 and requests per second. busybox
//!    httpd closes every connection (one request per TCP connection, so every request is a new
//!    conntrack entry through the service's DNAT rules: the costly case for kernel NAT); the
//!    Wasm component keeps connections alive (the per-packet case).
//! 2. **Withdrawal and return**: BENCH_FLIPS times (10), the ready file of `api-0` is removed on
//!    the host (through its overlay rootfs, at a known instant), then put back; timed from that
//!    instant to the endpoint's DNAT rule (`--to-destination <address>:8080`) gone from, then
//!    back in, the `nat` table of each node of the site (`iptables-save -t nat` in its
//!    namespace, polled every ~10 ms). On `svc-a` the agent's own prober decides; `svc-b` learns
//!    it from the hub (replica status → the hub's service table → the node's assignment).
//!
//! Needs root, busybox-static, docker-registry, iproute2, iptables, nsenter, wrk,
//! containernetworking-plugins, and `examples/hello-http` built for wasm32-wasip2
//! (`cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-http/Cargo.toml`).
//! Everything it makes is removed on exit, also on failure.

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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use measure::{WrkResult, env_usize, is_root, median, median_f64, ms, percentile, which};

const WAIT: Duration = Duration::from_secs(120);
const NODES: [&str; 2] = ["svc-a", "svc-b"];
/// The site's httpd: answers with its replica's name, ready while `/tmp/www/ready` exists.
const WHO: &str =
    "mkdir -p /tmp/www && hostname > /tmp/www/index.html && touch /tmp/www/ready && exec httpd -f -p 8080 -h /tmp/www";
const PROBE_PERIOD: Duration = Duration::from_millis(500);

fn hello_http_wasm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm")
}

/// What this machine lacks for the bench, if anything (a reason to skip, not an error).
fn missing() -> Option<String> {
    if !is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (Debian's busybox-static)".into());
    }
    if let Some(t) = ["ip", "nsenter", "iptables-save", "wrk"].iter().find(|t| which(t).is_none()) {
        return Some(format!("`{t}` not found"));
    }
    if !hello_http_wasm().exists() {
        return Some(format!(
            "{} missing: cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-http/Cargo.toml",
            hello_http_wasm().display()
        ));
    }
    None
}

fn push(reg: &registry::TestRegistry, what: &Path, name: &str) -> String {
    let reference = reg.reference(name);
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), what.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push {name}: {}", String::from_utf8_lossy(&out.stderr));
    reference
}

fn apply(c: &cluster::Cluster, doc: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(doc));
    assert!(out.status.success(), "apply: {}\n{doc}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the `nat` table of the namespace behind `prefix` sends anything to `target`.
fn routes_to(prefix: &[String], target: &str) -> bool {
    let out = Command::new(&prefix[0]).args(&prefix[1..]).args(["iptables-save", "-t", "nat"]).output().unwrap();
    assert!(out.status.success(), "iptables-save: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).contains(&format!("--to-destination {target}"))
}

/// From now until every node's table agrees with `want` (polling each in turn): the time at
/// which each node first did.
fn until_all(prefixes: &[Vec<String>], target: &str, want: bool) -> Vec<Duration> {
    let start = Instant::now();
    let mut seen: Vec<Option<Duration>> = vec![None; prefixes.len()];
    while seen.iter().any(Option::is_none) {
        assert!(start.elapsed() < Duration::from_secs(20), "{target} never became {want} on every node: {seen:?}");
        for (i, p) in prefixes.iter().enumerate() {
            if seen[i].is_none() && routes_to(p, target) == want {
                seen[i] = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    seen.into_iter().map(Option::unwrap).collect()
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Some(why) = missing() {
        eprintln!("services bench: {why}; nothing measured");
        return;
    }
    if !netns::netns_possible() {
        return;
    }
    let bench_start = Instant::now();
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let secs = env_usize("BENCH_SECS", 8).max(1);
    let flips = env_usize("BENCH_FLIPS", 10).max(1);
    let conns: Vec<usize> = std::env::var("BENCH_CONNS")
        .unwrap_or_else(|_| "32,1".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();

    // Dropped in reverse: the janitor, the cluster, the forwarders, the LAN, the namespaces,
    // the registry.
    let reg = registry::TestRegistry::start().expect("docker-registry is needed for this benchmark");
    let nss = [netns::Netns::create(), netns::Netns::create()];
    let _lan = netns::SiteLan::create(&[&nss[0], &nss[1]]);
    let target: std::net::SocketAddr = reg.addr.parse().unwrap();
    let fwds: Vec<netns::TcpForward> = nss.iter().map(|ns| netns::TcpForward::start(ns.host_ip(), target)).collect();
    let port = cluster::free_udp_port();
    let mut c = cluster::Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    let _janitor = janitor::Janitor::new(c.dir.path(), &NODES);

    let layout = c.dir.path().join("layout-who");
    assert!(busybox_image::write_busybox_layout(&layout, "busybox:who", &["sh", "-c", WHO]));
    let image = push(&reg, &layout, "busybox:who");
    let component = push(&reg, &hello_http_wasm(), "hello-http:svc");
    for (i, node) in NODES.iter().enumerate() {
        let (registry, hub, node_ip) =
            (fwds[i].addr.to_string(), format!("{}:{port}", nss[i].host_ip()), netns::SiteLan::ip(i));
        let box_label = format!("box={node}");
        let args = [
            "--containers",
            "on",
            "--insecure-registry",
            &registry,
            "--label",
            "site=shop",
            "--label",
            &box_label,
            "--node-ip",
            &node_ip,
        ];
        c.add_agent_via(&nss[i].exec_prefix(), &hub, node, &args);
    }
    c.wait_for("two nodes Ready", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let via_a = |r: &str| r.replacen(&reg.addr, &fwds[0].addr.to_string(), 1);
    let probe = format!(
        "  readinessProbe: {{httpGet: {{path: /ready, port: 8080}}, period: {}ms, timeout: 1s, failureThreshold: 1}}\n",
        PROBE_PERIOD.as_millis()
    );
    let on_a = "  nodeSelector: {box: svc-a}\n";
    let docs = [
        format!("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: api, labels: {{app: api}}}}\nspec:\n  runtime: container\n  image: {}\n  terminationGracePeriod: 1s\n{on_a}{probe}", via_a(&image)),
        format!("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: client}}\nspec:\n  runtime: container\n  image: {}\n  terminationGracePeriod: 1s\n{on_a}", via_a(&image)),
        format!("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: hello, labels: {{app: hello}}}}\nspec:\n  runtime: wasm\n  image: {}\n  http: {{port: 8088}}\n{on_a}", via_a(&component)),
        "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: api}\nspec: {selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}\n".into(),
        "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: hello}\nspec: {selector: {app: hello}, ports: [{port: 80}]}\n".into(),
    ];
    apply(&c, &docs.join("---\n"));
    c.wait_for("api, client and hello running and ready", WAIT, || {
        let r = c.replicas();
        ["api-0", "client-0", "hello-0"].iter().all(|n| {
            r.iter().any(|v| v.name == *n && v.status.ready && v.status.phase == proto::messages::Phase::Running)
        })
    });
    // Each service's address and its one endpoint, as the hub lists them.
    let mut svc = Vec::new();
    c.wait_for("both services with a ready endpoint", WAIT, || {
        let v: serde_json::Value = serde_json::from_str(&c.ok(&["get", "services", "-o", "api-json"])).unwrap();
        svc = v.as_array().cloned().unwrap_or_default();
        svc.len() == 2
            && svc.iter().all(|s| s["endpoints"][0]["ready"] == true && s["endpoints"][0]["ports"][0].is_u64())
    });
    let find = |replica: &str| -> (String, String) {
        let s = svc.iter().find(|s| s["endpoints"][0]["replica"] == replica).expect("the service");
        let e = &s["endpoints"][0];
        (s["address"].as_str().unwrap().to_string(), format!("{}:{}", e["address"].as_str().unwrap(), e["ports"][0]))
    };
    let (api_vip, api_ep) = find("api-0");
    let (hello_vip, hello_ep) = find("hello-0");
    println!("api: service {api_vip}:80, endpoint {api_ep}; hello: service {hello_vip}:80, endpoint {hello_ep}");
    let client_ns = c.agent_dir(NODES[0]).join("network/netns/client-0");
    let client = vec!["nsenter".to_string(), format!("--net={}", client_ns.display()), "--".into()];

    // ---- 1. through the service vs straight to the endpoint ---------------------------------
    let targets = [
        ("api (busybox httpd), service", format!("http://{api_vip}/index.html")),
        ("api (busybox httpd), direct", format!("http://{api_ep}/index.html")),
        ("hello (Wasm component), service", format!("http://{hello_vip}/")),
        ("hello (Wasm component), direct", format!("http://{hello_ep}/")),
    ];
    for (what, url) in &targets {
        let r = measure::wrk(&client, url, 1, 1);
        assert!(r.requests > 0 && r.errors == 0, "{what} at {url} does not answer cleanly: {r:?}");
    }
    let mut results: Vec<Vec<Vec<WrkResult>>> =
        conns.iter().map(|_| targets.iter().map(|_| Vec::new()).collect()).collect();
    for round in 0..rounds {
        for (ci, &n) in conns.iter().enumerate() {
            let mut line = format!("  round {round} -c{n}:");
            for k in 0..targets.len() {
                let t = (k + round) % targets.len();
                let r = measure::wrk(&client, &targets[t].1, n, secs);
                line.push_str(&format!(
                    "  [{}] {:.0}/s p50 {:.3} p99 {:.3} err {}",
                    t, r.rps, r.p50_ms, r.p99_ms, r.errors
                ));
                results[ci][t].push(r);
            }
            println!("{line}");
        }
    }

    // ---- 2. withdrawal and return -------------------------------------------------------------
    let ready_file = c.agent_dir(NODES[0]).join("containers/bundles/api-0/rootfs/tmp/www/ready");
    assert!(ready_file.exists(), "{} missing: the bench cannot flip readiness", ready_file.display());
    let prefixes: Vec<Vec<String>> = nss.iter().map(|ns| ns.exec_prefix()).collect();
    assert!(until_all(&prefixes, &api_ep, true).len() == 2);
    let (mut gone, mut back): (Vec<Vec<Duration>>, Vec<Vec<Duration>>) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
    for flip in 0..flips {
        // Off the probe's beat: each flip lands at a different point of the period.
        std::thread::sleep(Duration::from_millis(300 + 37 * flip as u64 % 250));
        std::fs::remove_file(&ready_file).unwrap();
        let g = until_all(&prefixes, &api_ep, false);
        std::thread::sleep(Duration::from_millis(300 + 53 * flip as u64 % 250));
        std::fs::write(&ready_file, b"").unwrap();
        let b = until_all(&prefixes, &api_ep, true);
        println!(
            "  flip {flip}: withdrawn {:.0} / {:.0} ms, back {:.0} / {:.0} ms (svc-a / svc-b)",
            ms(g[0]),
            ms(g[1]),
            ms(b[0]),
            ms(b[1])
        );
        for i in 0..2 {
            gone[i].push(g[i]);
            back[i].push(b[i]);
        }
    }

    // ---- Summary -------------------------------------------------------------------------------
    println!();
    println!("== through a service vs straight to the endpoint: medians of {rounds} rounds of {secs} s ==");
    for (ci, n) in conns.iter().enumerate() {
        for (t, (what, _)) in targets.iter().enumerate() {
            let v = &results[ci][t];
            println!(
                "  -c{n:<3} {what:34} {:9.0} req/s  p50 {:7.3} ms  p99 {:7.3} ms  errors {}",
                median_f64(v.iter().map(|r| r.rps)),
                median_f64(v.iter().map(|r| r.p50_ms)),
                median_f64(v.iter().map(|r| r.p99_ms)),
                v.iter().map(|r| r.errors).sum::<u64>()
            );
        }
        for (svc_i, direct_i, what) in [(0, 1, "api"), (2, 3, "hello")] {
            let m = |i: usize, f: fn(&WrkResult) -> f64| median_f64(results[ci][i].iter().map(f));
            println!(
                "  -c{n:<3} {what}: service / direct  p50 {:.2}x  p99 {:.2}x  req/s {:.2}x",
                m(svc_i, |r| r.p50_ms) / m(direct_i, |r| r.p50_ms),
                m(svc_i, |r| r.p99_ms) / m(direct_i, |r| r.p99_ms),
                m(svc_i, |r| r.rps) / m(direct_i, |r| r.rps)
            );
        }
    }
    println!("== readiness, {flips} flips, probe period {} ms: median / p90 / max (ms) ==", PROBE_PERIOD.as_millis());
    for (i, node) in NODES.iter().enumerate() {
        let how = if i == 0 { "its own prober" } else { "told by the hub" };
        for (what, v) in [("unready -> withdrawn", &gone[i]), ("ready -> back in", &back[i])] {
            println!(
                "  {node} ({how:15}) {what:22} {:7.1} / {:7.1} / {:7.1}",
                ms(median(v)),
                ms(percentile(v, 0.9)),
                ms(percentile(v, 1.0))
            );
        }
    }
    let everywhere = |v: &[Vec<Duration>]| -> Vec<Duration> { (0..flips).map(|k| v[0][k].max(v[1][k])).collect() };
    let (g, b) = (everywhere(&gone), everywhere(&back));
    println!(
        "  on every node of the site: withdrawn p50 {:.1} ms ({:+.1} ms beyond the probe period), back p50 {:.1} ms",
        ms(median(&g)),
        ms(median(&g)) - ms(PROBE_PERIOD),
        ms(median(&b))
    );
    println!("total bench time {:.0} s", bench_start.elapsed().as_secs_f64());
}
