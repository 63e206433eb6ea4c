//! Cluster benchmark: a real registry, hub and agent as processes on loopback.
//!
//! `cargo bench --bench cluster` measures
//! 1. apply -> all replicas Running, for a module already cached on the agent (blob and
//!    compiled artifact): a client on the admin API applies a new workload of the example
//!    module and polls the hub's replica list every millisecond until every replica reports
//!    Running. The time covers the API round trip, the store's durable commit, scheduling, the
//!    push to the agent, the agent's durable persist, its registry manifest check, the start in
//!    wasmtime and the status report back to the hub.
//! 2. the agent's resident memory when idle with no workloads, and the hub's.
//!
//! Options (environment): BENCH_RUNS (default 200), BENCH_REPLICAS (default 3), BENCH_AGENTS
//! (default 1: agents on this machine, the replicas spread over them), BENCH_KEEP=1 to keep
//! the cluster's data dir and logs (printed at the end) for a post-mortem. The control-plane
//! figure "apply of a 1,000-replica workload across the local agents to all Running" is
//! `BENCH_AGENTS=4 BENCH_REPLICAS=1000 BENCH_RUNS=5 cargo bench --bench cluster`.

#[path = "../tests/support/api.rs"]
mod api;
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::time::{Duration, Instant};

use api::Api;
use proto::messages::{ApiRequest, ApiResponse, ResourceKind};

fn manifest(name: &str, image: &str, replicas: usize) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{runtime: wasm, image: {image}, replicas: {replicas}, args: [\"--interval-ms\", \"60000\"]}}\n"
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs = env_usize("BENCH_RUNS", 200);
    let replicas = env_usize("BENCH_REPLICAS", 3);
    let agents = env_usize("BENCH_AGENTS", 1).max(1);
    // Listing 1,000 replicas every millisecond would load the hub more than the work measured.
    let poll = if replicas > 100 { Duration::from_millis(10) } else { Duration::from_millis(1) };
    let reg = registry::TestRegistry::start().expect("docker-registry is needed for this benchmark");
    let image = reg.reference("hello:v1");
    let status = std::process::Command::new(cluster::bin())
        .arg("push")
        .arg(cluster::example_wasm())
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());

    let mut c = cluster::Cluster::start();
    for i in 1..=agents {
        c.add_agent(&format!("bench-{i}"), &[]);
    }
    c.wait_for("agents Ready", Duration::from_secs(60), || c.nodes().iter().filter(|n| n.ready).count() == agents);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = Api::connect(&c.config_path()).await;
        let wait_running = |name: String, n: usize| {
            let api = &api;
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !api.running(&name, n).await {
                    assert!(Instant::now() < deadline, "{name} never reached Running");
                    tokio::time::sleep(poll).await;
                }
            }
        };
        // Warm-up: the first run on each agent pulls the blob and compiles the module (one
        // replica per agent: the scheduler spreads them).
        let cold = Instant::now();
        api.call(&ApiRequest::Apply { source: manifest("warmup", &image, agents) }).await;
        wait_running("warmup".into(), agents).await;
        let cold = cold.elapsed();
        api.call(&ApiRequest::Delete { kind: ResourceKind::Workload, name: "warmup".into(), force: false }).await;

        let mut samples = Vec::with_capacity(runs);
        for i in 0..runs {
            let name = format!("bench-{i}");
            let start = Instant::now();
            let r = api.call(&ApiRequest::Apply { source: manifest(&name, &image, replicas) }).await;
            assert!(matches!(r, ApiResponse::Applied { .. }), "{r:?}");
            wait_running(name.clone(), replicas).await;
            let took = start.elapsed();
            if took > Duration::from_secs(1) {
                eprintln!("slow run {name}: {took:?} (ended at {:?})", std::time::SystemTime::now());
            }
            samples.push(took);
            api.call(&ApiRequest::Delete { kind: ResourceKind::Workload, name, force: false }).await;
        }
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!("apply -> {replicas} replicas Running on {agents} agent(s) (cached module), {runs} runs:");
        println!(
            "  p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   min {:.1} ms   max {:.1} ms",
            ms(percentile(&samples, 0.5)),
            ms(percentile(&samples, 0.9)),
            ms(percentile(&samples, 0.99)),
            ms(samples[0]),
            ms(*samples.last().unwrap())
        );
        println!("  first run (registry pull + compile): {:.1} ms", ms(cold));
    });

    // Idle memory: a fresh agent that joined and holds no workloads.
    c.add_agent("idle-1", &[]);
    c.wait_for("idle agent Ready", Duration::from_secs(30), || c.nodes().iter().any(|n| n.name == "idle-1" && n.ready));
    std::thread::sleep(Duration::from_secs(3));
    let idle = c.agents.last().unwrap().child.id();
    let samples: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            rss_kib(idle)
        })
        .collect();
    println!(
        "idle agent (no workloads) RSS: {:.1} MiB (max of 5 samples over 2.5 s)",
        *samples.iter().max().unwrap() as f64 / 1024.0
    );
    println!(
        "agent after {runs} workload cycles RSS: {:.1} MiB; hub RSS: {:.1} MiB",
        rss_kib(c.agents[0].child.id()) as f64 / 1024.0,
        rss_kib(c.hub.child.id()) as f64 / 1024.0
    );
    if std::env::var_os("BENCH_KEEP").is_some() {
        let dir = std::mem::replace(&mut c.dir, tempfile::tempdir().unwrap()).keep();
        println!("cluster data and logs kept in {}", dir.display());
    }
}
