//! Configs and secrets benchmark: a real registry, hub and agents as processes on loopback,
//! busybox containers under real namespaces and cgroups, and `examples/hello` in the agent's
//! wasmtime.
//!
//! `cargo bench --bench objects` (as root, with Debian's docker-registry and busybox-static)
//! measures
//! 1. **config propagation**: a `kind: Config` is changed by an apply (through the admin API,
//!    the request `flotilla apply` sends) while containers read it as a volume. Each container
//!    runs a busybox loop that reads the file every 5 ms (shell builtins only, no fork) and
//!    prints the value when it changes; the bench reads the replicas' log files on the host
//!    (`<agent data dir>/logs/<replica>.log`, written by the container's shim) every
//!    millisecond. Timed: the apply sent → the new value printed by every reader, for one
//!    reader on one agent and for one reader on each of 4 agents (`kind: EveryNode`), the two
//!    alternating round by round. The 5 ms read loop adds 2.5 ms on average.
//!    Beside it, the time until the new value is in the volume's file on each node's tmpfs
//!    (read from the host every millisecond): the agent's part without the reader's loop.
//! 2. **start cost of a secret**: apply → Running (the hub's replica list, polled every 2 ms)
//!    and apply → first log line (the log file, polled every millisecond) of a new workload
//!    that reads a secret as a file and as an env var, against an otherwise identical one
//!    that has the same value as a literal env var and no volume; a busybox container and
//!    `examples/hello` (Wasm). With and without alternate in pairs, the order swapped every
//!    pair; each workload is deleted (and gone from the node) before the next. The agent
//!    forgets an object once no replica reads it, so every start with the secret fetches it
//!    from the hub again and writes its volume to tmpfs: the full cost.
//!
//! Options (environment): BENCH_ROUNDS (30), BENCH_PAIRS (20), BENCH_AGENTS (4). The whole run
//! takes well under a minute on 2 cores. It cleans up after itself (workloads deleted, then
//! any container processes, cgroups, overlay mounts and tmpfs volumes left swept), also when it
//! fails half-way.

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
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::Api;
use measure::{Tail, env_usize, median, ms};
use proto::messages::{ApiRequest, ApiResponse, ResourceKind};

const LIMIT: Duration = Duration::from_secs(60);

/// Reads a config file every 5 ms with shell builtins (`read -t` on a pipe nobody writes is
/// the sleep) and prints the value when it changes. Exits on SIGTERM.
const WATCHER: &str = "trap 'exit 0' TERM
( old=; sleep 999999 | while true; do v=; read -r v < /etc/app/v; if [ \"$v\" != \"$old\" ]; then echo \"v=$v\"; old=$v; fi; read -t 0.005 x; done ) &
wait";

/// Prints one line saying what it read (lengths only), then sleeps. Exits on SIGTERM.
const STARTER: &str = "trap 'exit 0' TERM
p=; [ -r /run/secrets/password ] && read -r p < /run/secrets/password
echo \"start env=${#DB_PASS} file=${#p}\"
sleep 999999 &
wait";

const PASSWORD: &str = "bench-password-0123456789";
const GREETING: &str = "hi-from-a-secret";

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

fn min(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap_or_default()
}

/// Whether a container of `replica` on `node` still has a cgroup.
fn cgroup_exists(node: &str, replica: &str) -> bool {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else { return false };
    let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|e| e.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    roots.iter().any(|h| h.join("flotilla").join(node).join(replica).exists())
}

fn possible() -> Result<(), &'static str> {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        return Err("not running as root");
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir() && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return Err("no cgroup memory controller");
    }
    if !Path::new("/bin/busybox").exists() {
        return Err("/bin/busybox missing (Debian's busybox-static)");
    }
    Ok(())
}

fn config(name: &str, value: &str) -> String {
    format!("apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {{name: {name}}}\ndata: {{v: {value}}}\n")
}

/// A YAML double-quoted scalar (JSON's escapes are YAML's).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn watcher(name: &str, image: &str, config: &str, placement: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: container\n  image: {image}\n{placement}  terminationGracePeriod: 2s\n  command: [/bin/sh, -c]\n  args: [{}]\n  volumes:\n  - {{name: settings, mountPath: /etc/app, config: {config}}}\n",
        quoted(WATCHER)
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Container,
    Wasm,
}

/// The start-cost workload: `secret` reads `db` as env and file; otherwise the same value is
/// a literal env var and there is no volume.
fn starter(kind: Kind, name: &str, image: &str, secret: bool) -> String {
    let (var, key, value) = match kind {
        Kind::Container => ("DB_PASS", "password", PASSWORD),
        Kind::Wasm => ("GREETING", "greeting", GREETING),
    };
    let env = if secret {
        format!(
            "  env: {{{var}: {{valueFrom: {{secret: db, key: {key}}}}}}}\n  volumes:\n  - {{name: creds, mountPath: /run/secrets, secret: db}}\n"
        )
    } else {
        format!("  env: {{{var}: {value}}}\n")
    };
    let run = match kind {
        Kind::Container => format!(
            "  runtime: container\n  image: {image}\n  terminationGracePeriod: 2s\n  command: [/bin/sh, -c]\n  args: [{}]\n",
            quoted(STARTER)
        ),
        Kind::Wasm => format!("  runtime: wasm\n  image: {image}\n  args: [\"--interval-ms\", \"600000\"]\n"),
    };
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n{run}  nodeSelector: {{idx: \"1\"}}\n{env}"
    )
}

async fn apply(api: &Api, source: &str) {
    let r = api.call(&ApiRequest::Apply { source: source.to_string() }).await;
    assert!(matches!(r, ApiResponse::Applied { .. }), "apply failed: {r:?}\n{source}");
}

async fn delete(api: &Api, name: &str) {
    let r = api.call(&ApiRequest::Delete { kind: ResourceKind::Workload, name: name.into(), force: false }).await;
    assert!(!matches!(r, ApiResponse::Error { .. }), "delete {name}: {r:?}");
}

/// Deletes `name` and waits until its replicas are gone from the hub and their containers
/// from the node.
async fn delete_and_wait(api: &Api, name: &str) {
    let replicas = api.replicas(name).await;
    delete(api, name).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let gone = api.replicas(name).await.is_empty()
            && replicas.iter().all(|r| r.node.as_deref().is_none_or(|n| !cgroup_exists(n, &r.name)));
        if gone {
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not go away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_path(c: &cluster::Cluster, node: &str, replica: &str) -> PathBuf {
    c.agent_dir(node).join("logs").join(format!("{replica}.log"))
}

struct StartSample {
    running: Duration,
    first_line: Duration,
}

/// Applies a start-cost workload and times it to Running and to its first log line.
async fn start_once(api: &Api, c: &cluster::Cluster, kind: Kind, name: &str, image: &str, secret: bool) -> StartSample {
    let source = starter(kind, name, image, secret);
    let replica = format!("{name}-0");
    let log = log_path(c, "obj-1", &replica);
    let _ = std::fs::remove_file(&log);
    let needle = match kind {
        Kind::Container => format!("start env={} file={}", PASSWORD.len(), if secret { PASSWORD.len() } else { 0 }),
        Kind::Wasm => format!("{GREETING} #1 from"),
    };
    let mut tail = Tail::new(log);
    let start = Instant::now();
    apply(api, &source).await;
    let (mut running, mut first_line) = (None, None);
    let mut i = 0u64;
    while running.is_none() || first_line.is_none() {
        if first_line.is_none() && tail.saw(&needle) {
            first_line = Some(start.elapsed());
        }
        if running.is_none() && i.is_multiple_of(2) && api.running(name, 1).await {
            running = Some(start.elapsed());
        }
        if start.elapsed() > LIMIT {
            let replicas = api.replicas(name).await;
            panic!("{name} did not start: {replicas:?}\nlog so far: {}", tail.text);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    StartSample { running: running.unwrap(), first_line: first_line.unwrap() }
}

#[derive(Default)]
struct StartFigures {
    with_running: Vec<Duration>,
    with_line: Vec<Duration>,
    without_running: Vec<Duration>,
    without_line: Vec<Duration>,
}

async fn start_pairs(
    api: &Api,
    c: &cluster::Cluster,
    kind: Kind,
    label: &str,
    image: &str,
    pairs: usize,
) -> StartFigures {
    let mut f = StartFigures::default();
    // Warm-up, not counted: the image is pulled (and the module compiled) on the node.
    for secret in [false, true] {
        let name = format!("{label}-warm-{}", if secret { "s" } else { "p" });
        start_once(api, c, kind, &name, image, secret).await;
        delete_and_wait(api, &name).await;
    }
    for i in 0..pairs {
        let order = if i.is_multiple_of(2) { [true, false] } else { [false, true] };
        let mut line = format!("  {label} pair {i}:");
        for secret in order {
            let name = format!("{label}-{i}-{}", if secret { "s" } else { "p" });
            let s = start_once(api, c, kind, &name, image, secret).await;
            line.push_str(&format!(
                "  {} running {:.1} ms, first line {:.1} ms;",
                if secret { "secret" } else { "plain " },
                ms(s.running),
                ms(s.first_line)
            ));
            if secret {
                f.with_running.push(s.running);
                f.with_line.push(s.first_line);
            } else {
                f.without_running.push(s.running);
                f.without_line.push(s.first_line);
            }
            delete_and_wait(api, &name).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("{line}");
    }
    f
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(why) = possible() {
        eprintln!("objects bench needs containers: {why}; nothing measured");
        return;
    }
    let bench_start = Instant::now();
    let rounds = env_usize("BENCH_ROUNDS", 30);
    let pairs = env_usize("BENCH_PAIRS", 20);
    let agents = env_usize("BENCH_AGENTS", 4).max(1);

    let reg = registry::TestRegistry::start().expect("docker-registry is needed for this benchmark");
    let mut c = cluster::Cluster::start();
    let nodes: Vec<String> = (1..=agents).map(|i| format!("obj-{i}")).collect();
    let secrets = PathBuf::from(format!("/dev/shm/flotilla-bench-objects-{}", std::process::id()));
    let _janitor = janitor::Janitor::new(c.dir.path(), &nodes).removing(secrets.clone());

    // Images: busybox (its command comes from each workload) and the example module.
    let layout = c.dir.path().join("layout-busybox");
    assert!(busybox_image::write_busybox_layout(&layout, "busybox:objects", &["sleep", "999999"]));
    let busybox = reg.reference("busybox:objects");
    let wasm = reg.reference("hello:objects");
    for (src, dst) in [(layout.clone(), &busybox), (cluster::example_wasm(), &wasm)] {
        let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), src.as_os_str(), dst.as_ref()]);
        assert!(out.status.success(), "push {dst}: {}", String::from_utf8_lossy(&out.stderr));
    }

    for (i, node) in nodes.iter().enumerate() {
        let label = format!("idx={}", i + 1);
        let dir = secrets.join(node);
        c.add_agent(node, &["--containers", "on", "--label", &label, "--secrets-dir", dir.to_str().unwrap()]);
    }
    c.wait_for("agents Ready", LIMIT, || c.nodes().iter().filter(|n| n.ready).count() == agents);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = Api::connect(&c.config_path()).await;

        // ---- 1. Config propagation ----------------------------------------------------------
        apply(&api, &config("one", "init")).await;
        apply(&api, &config("all", "init")).await;
        apply(&api, &watcher("watch-one", &busybox, "one", "  nodeSelector: {idx: \"1\"}\n")).await;
        apply(&api, &watcher("watch-all", &busybox, "all", "  kind: EveryNode\n")).await;
        let deadline = Instant::now() + LIMIT;
        while !(api.running("watch-one", 1).await && api.running("watch-all", agents).await) {
            assert!(Instant::now() < deadline, "the watchers never ran: {:?}", api.replicas("watch-all").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // (config name, its readers' log files, their volume files on the nodes' tmpfs)
        let mut scenarios: Vec<(&str, Vec<PathBuf>, Vec<PathBuf>)> = Vec::new();
        for (cfg, wl) in [("one", "watch-one"), ("all", "watch-all")] {
            let replicas = api.replicas(wl).await;
            let logs: Vec<PathBuf> =
                replicas.iter().map(|r| log_path(&c, r.node.as_deref().unwrap(), &r.name)).collect();
            let files: Vec<PathBuf> = replicas
                .iter()
                .map(|r| secrets.join(r.node.as_deref().unwrap()).join(&r.name).join("settings").join("v"))
                .collect();
            for f in &files {
                assert_eq!(std::fs::read_to_string(f).ok().as_deref(), Some("init"), "{}", f.display());
            }
            for l in &logs {
                let mut t = Tail::new(l.clone());
                let deadline = Instant::now() + LIMIT;
                while !t.saw("v=init\n") {
                    assert!(Instant::now() < deadline, "{} never showed the first value: {}", l.display(), t.text);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            scenarios.push((cfg, logs, files));
        }
        let nonce: u32 = rand::random();
        // Per scenario: apply sent → all seen, apply returned → all seen, sent → first seen.
        let mut sent_all: [Vec<Duration>; 2] = Default::default();
        let mut returned_all: [Vec<Duration>; 2] = Default::default();
        let mut sent_first: [Vec<Duration>; 2] = Default::default();
        let mut on_node: [Vec<Duration>; 2] = Default::default();
        let mut applies: Vec<Duration> = Vec::new();
        println!("config change -> new value read in the containers ({rounds} rounds):");
        for round in 0..rounds {
            let order = if round.is_multiple_of(2) { [0, 1] } else { [1, 0] };
            let mut line = format!("  round {round}:");
            for s in order {
                let (cfg, logs, files) = &scenarios[s];
                let value = format!("r{round}x{nonce:x}");
                let needle = format!("v={value}\n");
                let mut tails: Vec<Tail> = logs.iter().map(|l| Tail::at_end(l.clone())).collect();
                let mut seen: Vec<Option<Duration>> = vec![None; tails.len()];
                let mut written: Vec<Option<Duration>> = vec![None; files.len()];
                let start = Instant::now();
                apply(&api, &config(cfg, &value)).await;
                let returned = start.elapsed();
                while seen.iter().chain(&written).any(Option::is_none) {
                    for (f, w) in files.iter().zip(written.iter_mut()) {
                        if w.is_none() && std::fs::read_to_string(f).is_ok_and(|v| v == value) {
                            *w = Some(start.elapsed());
                        }
                    }
                    for (t, s) in tails.iter_mut().zip(seen.iter_mut()) {
                        if s.is_none() && t.saw(&needle) {
                            *s = Some(start.elapsed());
                        }
                    }
                    assert!(start.elapsed() < LIMIT, "config {cfg} round {round} not seen by all: {seen:?}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let seen: Vec<Duration> = seen.into_iter().map(Option::unwrap).collect();
                let written: Vec<Duration> = written.into_iter().map(Option::unwrap).collect();
                on_node[s].push(max(&written));
                let (first, last) = (min(&seen), max(&seen));
                sent_all[s].push(last);
                returned_all[s].push(last.saturating_sub(returned));
                sent_first[s].push(first);
                applies.push(returned);
                line.push_str(&format!(
                    "  {} reader(s) {:.1} ms (first {:.1}, on the nodes {:.1}, apply returned at {:.1});",
                    logs.len(),
                    ms(last),
                    ms(first),
                    ms(max(&written)),
                    ms(returned)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!("{line}");
        }
        let restarts: u32 = api
            .replicas("watch-one")
            .await
            .iter()
            .chain(api.replicas("watch-all").await.iter())
            .map(|r| r.status.restarts)
            .sum();
        delete_and_wait(&api, "watch-one").await;
        delete_and_wait(&api, "watch-all").await;

        // ---- 2. Start cost of a secret --------------------------------------------------------
        apply(
            &api,
            &format!(
                "apiVersion: flotilla.dev/v1\nkind: Secret\nmetadata: {{name: db}}\ndata: {{password: {PASSWORD}, greeting: {GREETING}}}\n"
            ),
        )
        .await;
        println!("start with a secret (env + file) vs without ({pairs} pairs each, on obj-1):");
        let container = start_pairs(&api, &c, Kind::Container, "ctr", &busybox, pairs).await;
        let module = start_pairs(&api, &c, Kind::Wasm, "wasm", &wasm, pairs).await;

        // ---- Summary ---------------------------------------------------------------------
        println!();
        println!("== configs and secrets: medians (max) ==");
        let n = |s: usize| scenarios[s].1.len();
        println!(
            "config change, apply sent -> ... ({rounds} rounds) | {} reader on {} agent | {} readers on {} agents",
            n(0),
            n(0),
            n(1),
            n(1)
        );
        for (what, v) in [
            ("in every node's tmpfs         ", &on_node),
            ("read by the first container   ", &sent_first),
            ("read by every container       ", &sent_all),
            ("read by every, from Applied   ", &returned_all),
        ] {
            println!(
                "  {what} | {:7.1} ms ({:5.1}) | {:7.1} ms ({:5.1})",
                ms(median(&v[0])),
                ms(max(&v[0])),
                ms(median(&v[1])),
                ms(max(&v[1]))
            );
        }
        println!(
            "  the apply itself (request -> Applied): {:.1} ms ({:.1}); restarts of the readers: {restarts}",
            ms(median(&applies)),
            ms(max(&applies))
        );
        println!(
            "start ({pairs} pairs), apply -> ... | without secret   | with secret      | with / without | paired difference"
        );
        for (what, f) in [("container", &container), ("wasm     ", &module)] {
            for (end, w, wo) in [
                ("Running   ", &f.with_running, &f.without_running),
                ("first line", &f.with_line, &f.without_line),
            ] {
                // Each pair's with minus without, in ms: its median is robust to drift.
                let mut diffs: Vec<f64> = w.iter().zip(wo.iter()).map(|(a, b)| ms(*a) - ms(*b)).collect();
                diffs.sort_by(f64::total_cmp);
                let k = diffs.len();
                let paired = if k % 2 == 1 { diffs[k / 2] } else { (diffs[k / 2 - 1] + diffs[k / 2]) / 2.0 };
                println!(
                    "  {what} {end}           | {:7.1} ms ({:5.1}) | {:7.1} ms ({:5.1}) | {:14.2} | {:+.1} ms",
                    ms(median(wo)),
                    ms(max(wo)),
                    ms(median(w)),
                    ms(max(w)),
                    median(w).as_secs_f64() / median(wo).as_secs_f64(),
                    paired
                );
            }
        }
    });
    println!("total bench time {:.0} s", bench_start.elapsed().as_secs_f64());
}
