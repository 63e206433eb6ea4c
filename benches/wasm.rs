//! Wasm runtime benchmark: start latency, HTTP serving and replica density, each beside a peer.
//!
//! `cargo bench --bench wasm` measures, in this order (select with `BENCH_ONLY=warm,cold,http,density`):
//!
//! 1. **warm start** of `examples/hello` (`--count 1 --interval-ms 0`: one line, exit 0), from the
//!    start decision to `_start` returning, at two levels side by side:
//!    (a) `WasmHost::load` (an in-memory hit) + `WasmHost::run` with a null output sink;
//!    (b) the agent's `WasmRuntime` as the agent calls it: open the replica's log sink
//!    (`LogStore::sink`, a real file), build the `RunContext`, `Runtime::run` (image lookup in
//!    the in-process pull cache, `load` on the blocking pool, `run`), spawned as a task and
//!    awaited, with the image pre-pulled from a real `docker-registry`.
//! 2. **cold start**: a new `WasmHost` on an empty cache dir (engine, linkers, epoch thread),
//!    `load` (Cranelift compile + fsynced cache write) and `run`; and the **agent-restart start**:
//!    a new `WasmHost` on a populated cache dir, `load` (mmap of the `.cwasm`, no compile), `run`.
//! 3. (whole-process starts are `scripts/bench/wasm-process.sh`, with hyperfine.)
//! 4. **HTTP**: `examples/hello-http` served by a real agent (registry + hub + agent processes,
//!    workload with `http: {port, maxConcurrency: 64}`) on its own port and through the agent's
//!    gateway (`--gateway-port`, a Service and a Route for host `web.bench`: handled in-process),
//!    by `wasmtime serve -Scli`, and by Debian's nginx reverse-proxying to that `wasmtime serve`
//!    (upstream keep-alive), loaded with `wrk` alternately, round after round; the gateway's
//!    ratio is to nginx, the agent's to `wasmtime serve`; beside them, as a diagnosis, the same component served
//!    in this process by `WasmHost::serve_http` with the default host config and with
//!    `HostConfig::pooling`.
//! 5. **density**: one agent, a workload of `BENCH_DENSITY` (1000) replicas of `examples/hello`
//!    sleeping (`--interval-ms 600000`): time until all are Running, agent RSS minus its idle RSS
//!    per replica, threads, fds, mappings; beside it, the PSS of `wasmtime run` processes of the
//!    same sleeping module (one process per replica).
//!
//! Options (environment): BENCH_ONLY, BENCH_WARM_RUNS (1000), BENCH_COLD_RUNS (20),
//! BENCH_RESTART_RUNS (50), BENCH_HTTP_ROUNDS (3), BENCH_HTTP_SECS (10), BENCH_HTTP_CONNS ("32,1"),
//! BENCH_HTTP_INPROC (1; 0 skips the in-process servers), BENCH_DENSITY (1000),
//! BENCH_DENSITY_TIMEOUT_S (600), BENCH_PEER_PROCS (50; 0 skips the peer),
//! WASMTIME (default /opt/wasmtime-cli/bin/wasmtime, else `wasmtime` on PATH), BENCH_KEEP=1 to
//! keep the cluster dirs and logs, BENCH_HOLD_S=N to pause N seconds with the servers (http) or
//! the loaded agent (density) up, for strace/perf/smaps. Peers that are missing (wasmtime, wrk)
//! are skipped with a note. Needs docker-registry (Debian's package) for everything but 1(a)
//! and 2.

#[path = "../tests/support/api.rs"]
mod api;
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "support/measure.rs"]
mod measure;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::logs::LogStore;
use agent::runtime::{RunContext, RunControl, RunEnd, Runtime, VolumeStore, WasmRuntime};
use api::Api;
use measure::WrkResult;
use proto::messages::{ApiRequest, ApiResponse, Phase, ReplicaView, Termination};
use wasm_runtime::{Exit, HostConfig, OutputSink, RunOptions, WasmHost};

const HELLO_ARGS: [&str; 4] = ["--count", "1", "--interval-ms", "0"];

// ---------------------------------------------------------------------------------------------
// Small helpers

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn selected(section: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(list) => list.split(',').any(|s| s.trim() == section),
        Err(_) => true,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// "p50 .. p90 .. p99 .. min .. max" of a sample set, in microseconds.
fn summary_us(samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "p50 {:8.1} us   p90 {:8.1} us   p99 {:8.1} us   min {:8.1} us   max {:8.1} us",
        us(percentile(samples, 0.5)),
        us(percentile(samples, 0.9)),
        us(percentile(samples, 0.99)),
        us(samples[0]),
        us(*samples.last().unwrap())
    )
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    percentile(&s, 0.5)
}

fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS:")
}

/// CPU time (user + system, all threads) the processes have used, in microseconds.
fn cpu_us(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| measure::cpu_seconds(pid)).sum::<f64>() * 1e6
}

fn threads(pid: u32) -> u64 {
    proc_status_field(pid, "Threads:")
}

fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn count_entries(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn count_lines(path: &str) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// Median of `n` RSS samples taken 500 ms apart.
fn rss_median_kib(pid: u32, n: usize) -> u64 {
    let mut v: Vec<u64> = (0..n)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            rss_kib(pid)
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn wasmtime_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let opt = PathBuf::from("/opt/wasmtime-cli/bin/wasmtime");
    if opt.is_file() {
        return Some(opt);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("wasmtime")).find(|p| p.is_file()))
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
}

fn hello_http_wasm() -> PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm");
    assert!(
        p.exists(),
        "build examples/hello-http first: cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-http/Cargo.toml"
    );
    p
}

struct NullSink;

impl OutputSink for NullSink {
    fn write(&self, _bytes: &[u8]) {}
}

/// Counts the bytes a guest writes, to check that it did print its line.
#[derive(Default)]
struct CountingSink(std::sync::atomic::AtomicUsize);

impl OutputSink for CountingSink {
    fn write(&self, bytes: &[u8]) {
        self.0.fetch_add(bytes.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

fn hello_opts(stdout: Arc<dyn OutputSink>) -> RunOptions {
    let mut o = RunOptions::new("hello.wasm", stdout, Arc::new(NullSink));
    o.args = HELLO_ARGS.iter().map(|s| s.to_string()).collect();
    o
}

fn runtime() -> tokio::runtime::Runtime {
    // The agent's own runtime: two worker threads (src/main.rs).
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn is_running(r: &ReplicaView) -> bool {
    r.status.phase == Phase::Running && r.status.template_hash == r.template_hash
}

/// An agent process with the binary's default log filter (info), as in production; the test
/// harness's `Cluster::add_agent` turns on debug logging.
fn spawn_quiet_agent(c: &mut cluster::Cluster, name: &str, extra: &[&str]) {
    let token = c.token_path();
    let data = c.agent_dir(name);
    let log = c.dir.path().join(format!("agent-{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(cluster::bin())
        .args(["agent", "--hub", &c.hub_addr, "--token-file"])
        .arg(&token)
        .args(["--name", name, "--data-dir"])
        .arg(&data)
        .args(extra)
        .env_remove("FLOTILLA_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    c.agents.push(cluster::Proc { child, log, name: format!("agent {name}") });
    c.wait_for("agent Ready", Duration::from_secs(30), || c.nodes().iter().any(|n| n.name == name && n.ready));
}

fn push(file: &Path, image: &str) {
    let status = Command::new(cluster::bin()).arg("push").arg(file).arg(image).stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "flotilla push {image} failed");
}

fn keep(c: &mut cluster::Cluster, what: &str) {
    if std::env::var_os("BENCH_KEEP").is_some() {
        let dir = std::mem::replace(&mut c.dir, tempfile::tempdir().unwrap()).keep();
        println!("  {what}: cluster data and logs kept in {}", dir.display());
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Warm start

fn warm(hello: &Path, reg: Option<&registry::TestRegistry>) {
    let runs = env_usize("BENCH_WARM_RUNS", 1000);
    let warmup = 50;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(hello).unwrap();
    let digest = wasm_runtime::sha256_digest(&bytes);

    // (a) WasmHost::load (memory hit) + run, null sink.
    let host = WasmHost::new(HostConfig { cache_dir: dir.path().join("cache-a"), ..Default::default() }).unwrap();
    host.load(&digest, hello).unwrap(); // compile once
    let counting = Arc::new(CountingSink::default());
    let (mut host_total, mut host_load, mut host_run) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..warmup + runs {
            let sink: Arc<dyn OutputSink> = if i == 0 { counting.clone() } else { Arc::new(NullSink) };
            let t0 = Instant::now();
            let program = host.load(&digest, hello).unwrap();
            let t1 = Instant::now();
            let exit = host.run(&program, hello_opts(sink)).await.unwrap();
            let t2 = Instant::now();
            assert_eq!(exit, Exit::Code(0));
            if i >= warmup {
                host_total.push(t2 - t0);
                host_load.push(t1 - t0);
                host_run.push(t2 - t1);
            }
        }
    });
    assert!(counting.0.load(std::sync::atomic::Ordering::Relaxed) > 0, "hello printed nothing");
    let stats = host.stats();
    assert_eq!(stats.compiled, 1);
    drop(host);

    println!("warm start, examples/hello --count 1 --interval-ms 0, {runs} runs after {warmup} warm-up:");
    println!("  (a) WasmHost::load (memory hit) + run, null sink");
    println!("      total  {}", summary_us(&mut host_total));
    println!("      load   {}", summary_us(&mut host_load));
    println!("      run    {}", summary_us(&mut host_run));

    // (b) the agent's WasmRuntime, image pulled from a real registry.
    let Some(reg) = reg else {
        println!("  (b) skipped: no docker-registry");
        return;
    };
    let image = reg.reference("bench/hello:v1");
    let rt_b = runtime();
    let host = WasmHost::new(HostConfig { cache_dir: dir.path().join("wasm-cache"), ..Default::default() }).unwrap();
    let registry = oci_runtime::Registry::new(oci_runtime::RegistryConfig { insecure: Vec::new() });
    rt_b.block_on(registry.push_wasm(&image, &bytes)).unwrap();
    let blobs = oci_runtime::BlobStore::open(dir.path().join("images")).unwrap();
    let images = oci_runtime::ImageStore::open(dir.path().join("images"), blobs).unwrap();
    let volumes = VolumeStore::new(dir.path().join("volumes"));
    let registry: Arc<agent::runtime::LazyRegistry> = Arc::new(std::sync::LazyLock::new(Box::new(move || registry)));
    let sockets = Arc::new(agent::handoff::Sockets::default());
    let wasm: Arc<dyn Runtime> = Arc::new(WasmRuntime::new(host, registry, images, volumes, sockets));
    let logs = LogStore::open(dir.path().join("logs"), 4 << 20).unwrap();
    let manifest = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: warm}}\nspec: {{runtime: wasm, image: {image}, restartPolicy: Never, args: [\"--count\", \"1\", \"--interval-ms\", \"0\"]}}\n"
    );
    let template = proto::manifest::parse_manifests(&manifest).unwrap().remove(0).template();
    let replica = "warm-0".to_string();
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut agent_total = Vec::new();
    let first = rt_b.block_on(async {
        let mut first = Duration::ZERO;
        for i in 0..1 + warmup + runs {
            let template = template.clone();
            let (_stop_tx, stop_rx) = tokio::sync::watch::channel(RunControl::Run);
            // The agent's `execute(Action::Start)`: log sink, run context, runtime.run, spawn.
            let t0 = Instant::now();
            let log = logs.sink(&replica).unwrap();
            let ctx = RunContext::new(replica.clone(), i as u64, template, log, stop_rx, events_tx.clone());
            let fut = wasm.run(ctx);
            let how = tokio::spawn(fut).await.unwrap();
            let took = t0.elapsed();
            assert!(matches!(how, RunEnd::Ended(Termination::Exited { code: 0 })), "run {i}: {how:?}");
            while events_rx.try_recv().is_ok() {}
            if i == 0 {
                first = took;
            } else if i > warmup {
                agent_total.push(took);
            }
        }
        first
    });
    let lines = count_lines(logs.path(&replica).to_str().unwrap());
    assert_eq!(lines, 1 + warmup + runs, "log file lines");
    // Where (b) spends its time beyond (a): the pieces it adds, each alone.
    let (sink_open, blocking_hop, task_hop) = rt_b.block_on(async {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let host = WasmHost::new(HostConfig { cache_dir: dir.path().join("cache-a"), ..Default::default() }).unwrap();
        host.load(&digest, hello).unwrap();
        for _ in 0..runs {
            let t0 = Instant::now();
            drop(logs.sink("probe-0").unwrap());
            a.push(t0.elapsed());
            let (h, d, p) = (host.clone(), digest.clone(), hello.to_path_buf());
            let t0 = Instant::now();
            tokio::task::spawn_blocking(move || h.load(&d, &p)).await.unwrap().unwrap();
            b.push(t0.elapsed());
            let t0 = Instant::now();
            tokio::spawn(async {}).await.unwrap();
            c.push(t0.elapsed());
        }
        (a, b, c)
    });
    println!(
        "      pieces (medians): log sink open {:.1} us, load via spawn_blocking {:.1} us, empty task spawn+join {:.1} us",
        us(median(&sink_open)),
        us(median(&blocking_hop)),
        us(median(&task_hop))
    );
    println!(
        "  (b) agent::runtime::WasmRuntime::run (log sink file, pull cache hit, load on blocking pool, run, task)"
    );
    println!("      total  {}", summary_us(&mut agent_total));
    println!("      first run (registry pull + compile): {:.1} ms", ms(first));
    println!(
        "      ratio of medians (b)/(a): {:.2}",
        median(&agent_total).as_secs_f64() / median(&host_total).as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Cold start and agent-restart start

fn cold(hello: &Path) {
    let cold_runs = env_usize("BENCH_COLD_RUNS", 20);
    let restart_runs = env_usize("BENCH_RESTART_RUNS", 50);
    let rt = runtime();
    let bytes = std::fs::read(hello).unwrap();
    let digest = wasm_runtime::sha256_digest(&bytes);
    let run_once = |host: &WasmHost, program: &wasm_runtime::Program| {
        let exit = rt.block_on(host.run(program, hello_opts(Arc::new(NullSink)))).unwrap();
        assert_eq!(exit, Exit::Code(0));
    };

    // Interleave cold and restart samples so that machine noise hits both alike.
    let populated = tempfile::tempdir().unwrap();
    {
        let host =
            WasmHost::new(HostConfig { cache_dir: populated.path().to_path_buf(), ..Default::default() }).unwrap();
        host.load(&digest, hello).unwrap();
    }
    let mut cold = [Vec::new(), Vec::new(), Vec::new(), Vec::new()]; // new, load, run, total
    let mut restart = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let rounds = cold_runs.max(restart_runs) + 1;
    for i in 0..rounds {
        if i <= cold_runs {
            let dir = tempfile::tempdir().unwrap();
            let t0 = Instant::now();
            let host = WasmHost::new(HostConfig { cache_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
            let t1 = Instant::now();
            let program = host.load(&digest, hello).unwrap();
            let t2 = Instant::now();
            run_once(&host, &program);
            let t3 = Instant::now();
            assert_eq!(host.stats().compiled, 1);
            if i > 0 {
                for (v, d) in cold.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t3 - t0]) {
                    v.push(d);
                }
            }
        }
        if i <= restart_runs {
            let t0 = Instant::now();
            let host =
                WasmHost::new(HostConfig { cache_dir: populated.path().to_path_buf(), ..Default::default() }).unwrap();
            let t1 = Instant::now();
            let program = host.load(&digest, hello).unwrap();
            let t2 = Instant::now();
            run_once(&host, &program);
            let t3 = Instant::now();
            let s = host.stats();
            assert_eq!((s.compiled, s.loaded_from_disk), (0, 1));
            if i > 0 {
                for (v, d) in restart.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t3 - t0]) {
                    v.push(d);
                }
            }
        }
    }
    println!("cold start (new WasmHost, empty cache dir: compile + fsynced cache write + run), {cold_runs} runs:");
    for (name, v) in ["WasmHost::new", "load (compile)", "run", "total"].iter().zip(cold.iter_mut()) {
        println!("  {name:<22} {}", summary_us(v));
    }
    println!(
        "agent-restart start (new WasmHost, populated cache dir: mmap .cwasm, no compile + run), {restart_runs} runs:"
    );
    for (name, v) in ["WasmHost::new", "load (from disk)", "run", "total"].iter().zip(restart.iter_mut()) {
        println!("  {name:<22} {}", summary_us(v));
    }
    println!(
        "  ratio of medians cold/restart: {:.1}",
        median(&cold[3]).as_secs_f64() / median(&restart[3]).as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP

/// One `GET /` on a fresh connection; returns the response text.
fn http_get(port: u16, host: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn wait_http(port: u16, what: &str) {
    wait_http_host(port, "localhost", what)
}

fn wait_http_host(port: u16, host: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = http_get(port, host)
            && r.starts_with("HTTP/1.1 200")
            && r.contains("hello from flotilla over wasi:http")
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what} on port {port} never answered 200");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wrk` at `/` of a loopback port, with a `Host` header when the server routes by it.
fn wrk(port: u16, host: Option<&str>, conns: usize, secs: usize) -> WrkResult {
    let header = host.map(|h| format!("Host: {h}"));
    let extra: Vec<&str> = header.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    measure::wrk_with(&[], &format!("http://127.0.0.1:{port}/"), conns, secs, &extra)
}

/// Two in-process `serve_http` servers of one component on a two-worker runtime of their own:
/// the default host and a pooling host. Stopped when dropped.
struct InProc {
    ports: [u16; 2],
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProc {
    fn start(wasm: &Path) -> InProc {
        let wasm = wasm.to_path_buf();
        let (ports_tx, ports_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let bytes = std::fs::read(&wasm).unwrap();
            let default = WasmHost::new(HostConfig { cache_dir: dir.path().join("a"), ..Default::default() }).unwrap();
            // 128 instances of up to 64 MiB linear memory each; the agent's default HTTP
            // concurrency is 64 per workload.
            let pooling = WasmHost::new(HostConfig {
                cache_dir: dir.path().join("b"),
                pooling: Some(wasm_runtime::PoolingConfig {
                    total_instances: 128,
                    total_memory_bytes: 128 << 26,
                    memory_guard_bytes: 0,
                }),
                ..Default::default()
            })
            .unwrap();
            let rt = runtime();
            rt.block_on(async move {
                let mut servers = Vec::new();
                for host in [default, pooling] {
                    let program = host.load_bytes(&bytes).unwrap();
                    let mut o = wasm_runtime::HttpOptions::new(
                        ([127, 0, 0, 1], 0).into(),
                        Arc::new(NullSink),
                        Arc::new(NullSink),
                    );
                    o.max_concurrency = 64;
                    let server = host.serve_http(&program, o).await.unwrap();
                    servers.push(server);
                }
                ports_tx.send([servers[0].local_addr().port(), servers[1].local_addr().port()]).unwrap();
                let (tx, rx) = tokio::sync::watch::channel(false);
                let mut tasks = Vec::new();
                for server in servers {
                    let mut rx = rx.clone();
                    tasks.push(tokio::spawn(server.run(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })));
                }
                let _ = stop_rx.await;
                let _ = tx.send(true);
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        let ports = ports_rx.recv().unwrap();
        for p in ports {
            wait_http(p, "in-process WasmHost::serve_http");
        }
        InProc { ports, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn http(reg: &registry::TestRegistry) {
    if !on_path("wrk") {
        println!("http: skipped, wrk not installed (apt-get install wrk)");
        return;
    }
    let rounds = env_usize("BENCH_HTTP_ROUNDS", 3);
    let secs = env_usize("BENCH_HTTP_SECS", 10);
    let conns: Vec<usize> = std::env::var("BENCH_HTTP_CONNS")
        .unwrap_or_else(|_| "32,1".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let wasm = hello_http_wasm();
    let image = reg.reference("bench/hello-http:v1");
    push(&wasm, &image);

    let mut c = cluster::Cluster::start();
    // The agent's gateway routes `web.bench` to service `web`, whose one endpoint is the
    // component on this node: handled in-process, no proxy hop.
    let gateway_port = cluster::free_tcp_port();
    spawn_quiet_agent(&mut c, "http-1", &["--gateway-port", &gateway_port.to_string()]);
    let port = cluster::free_tcp_port();
    let manifest = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web, labels: {{app: web}}}}\nspec: {{runtime: wasm, image: {image}, http: {{port: {port}, maxConcurrency: 64}}}}\n---\n\
         apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{selector: {{app: web}}, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {{name: web}}\nspec: {{host: {GATEWAY_HOST}, service: web}}\n"
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let api = Api::connect(&c.config_path()).await;
        let r = api.call(&ApiRequest::Apply { source: manifest }).await;
        assert!(matches!(r, ApiResponse::Applied { .. }), "{r:?}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !api.replicas("web").await.iter().any(is_running) {
            assert!(Instant::now() < deadline, "web never reached Running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    wait_http(port, "flotilla agent");
    let agent_pid = c.agents[0].child.id();

    let mut peer = None;
    let peer_port = cluster::free_tcp_port();
    match wasmtime_bin() {
        Some(bin) => {
            let log = c.dir.path().join("wasmtime-serve.log");
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .args(["serve", "-Scli", "--addr", &format!("127.0.0.1:{peer_port}")])
                .arg(&wasm)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            peer = Some(cluster::Proc { child, log, name: "wasmtime serve".into() });
            wait_http(peer_port, "wasmtime serve");
        }
        None => println!("http: wasmtime CLI not found; measuring flotilla alone"),
    }

    if let Ok(hold) = std::env::var("BENCH_HOLD_S") {
        println!("  holding for {hold} s: agent pid {agent_pid} on port {port}, wasmtime serve on port {peer_port}");
        std::thread::sleep(Duration::from_secs(hold.parse().unwrap_or(60)));
    }
    wait_http_host(gateway_port, GATEWAY_HOST, "the agent's gateway");
    // nginx (Debian's) reverse-proxying to `wasmtime serve`, keeping its upstream connections
    // alive: the usual way to put a host-name front on a component served by the wasmtime CLI.
    let nginx = peer.as_ref().and_then(|_| Nginx::start(c.dir.path(), peer_port));
    let agent_rss_before = rss_kib(agent_pid);
    // targets: (name, port, Host header); the ratios are to "wasmtime serve" and, for the
    // gateway, to nginx in front of it.
    let mut targets = vec![("flotilla agent", port, None), ("flotilla gateway", gateway_port, Some(GATEWAY_HOST))];
    if peer.is_some() {
        targets.push(("wasmtime serve", peer_port, None));
    }
    if let Some(n) = &nginx {
        targets.push((NGINX, n.port, Some(GATEWAY_HOST)));
    }
    // Diagnosis (BENCH_HTTP_INPROC=0 to skip): the same component served in this process by
    // `WasmHost::serve_http` (two tokio workers like the agent), with the host's default
    // on-demand instance allocator and with its pooling allocator (`HostConfig::pooling`).
    let inproc = (std::env::var("BENCH_HTTP_INPROC").as_deref() != Ok("0")).then(|| InProc::start(&wasm));
    if let Some(p) = &inproc {
        targets.push(("WasmHost default", p.ports[0], None));
        targets.push(("WasmHost pooling", p.ports[1], None));
    }
    // Short warm-up of each (page faults, allocator arenas, connection setup).
    for (name, p, host) in &targets {
        let r = wrk(*p, *host, 32, 2);
        assert!(r.requests > 0 && r.errors == 0, "{name} does not answer cleanly: {r:?}");
    }
    println!(
        "http GET / of examples/hello-http (one fresh instance per request), wrk -t2 (-t1 for -c1) -d{secs}s, {rounds} rounds, alternating:"
    );
    // Whose CPU each target's requests cost: (the servers, the proxy alone if any). The
    // in-process diagnostics run in this process, beside wrk's bookkeeping: not counted.
    let peer_pid = peer.as_ref().map(|p| p.child.id());
    let nginx_pids = nginx.as_ref().map(Nginx::pids).unwrap_or_default();
    let cpu_of = |name: &str| -> (Vec<u32>, Vec<u32>) {
        match name {
            "flotilla agent" | "flotilla gateway" => (vec![agent_pid], vec![]),
            "wasmtime serve" => (peer_pid.into_iter().collect(), vec![]),
            NGINX => (nginx_pids.iter().copied().chain(peer_pid).collect(), nginx_pids.clone()),
            _ => (vec![], vec![]),
        }
    };
    // Per run: CPU microseconds per request, of the servers and of the proxy alone.
    type CpuRuns<'a> = Vec<(usize, &'a str, Vec<(f64, f64)>)>;
    let mut cpu: CpuRuns = Vec::new();
    let mut results: Vec<(usize, &str, Vec<WrkResult>)> = Vec::new();
    for &c_n in &conns {
        for (name, _, _) in &targets {
            results.push((c_n, name, Vec::new()));
            cpu.push((c_n, name, Vec::new()));
        }
        for round in 0..rounds {
            // Alternate which target goes first.
            // Rotate which target goes first.
            let order: Vec<usize> = (0..targets.len()).map(|k| (k + round) % targets.len()).collect();
            for ti in order {
                let (name, p, host) = targets[ti];
                let (servers, proxy) = cpu_of(name);
                let (servers_before, proxy_before) = (cpu_us(&servers), cpu_us(&proxy));
                let r = wrk(p, host, c_n, secs);
                let n = r.requests.max(1) as f64;
                let per_request = ((cpu_us(&servers) - servers_before) / n, (cpu_us(&proxy) - proxy_before) / n);
                println!(
                    "  -c{c_n:<3} round {round} {name:<15} {:9.0} req/s   p50 {:7.3} ms   p90 {:7.3} ms   p99 {:7.3} ms   errors {}   CPU/request {:.0} us (proxy {:.0} us)",
                    r.rps, r.p50_ms, r.p90_ms, r.p99_ms, r.errors, per_request.0, per_request.1
                );
                results.iter_mut().find(|(cc, n, _)| *cc == c_n && *n == name).unwrap().2.push(r);
                cpu.iter_mut().find(|(cc, n, _)| *cc == c_n && *n == name).unwrap().2.push(per_request);
            }
        }
    }
    println!("http summary (medians over rounds):");
    for &c_n in &conns {
        let med = |name: &str, f: fn(&WrkResult) -> f64| {
            let v: Vec<f64> =
                results.iter().find(|(cc, n, _)| *cc == c_n && *n == name).unwrap().2.iter().map(f).collect();
            median_f64(&v)
        };
        let med_cpu = |name: &str, f: fn(&(f64, f64)) -> f64| {
            let v: Vec<f64> = cpu.iter().find(|(cc, n, _)| *cc == c_n && *n == name).unwrap().2.iter().map(f).collect();
            median_f64(&v)
        };
        for (name, _, _) in &targets {
            println!(
                "  -c{c_n:<3} {name:<15} {:9.0} req/s   p50 {:7.3} ms   p99 {:7.3} ms   server CPU/request {:.0} us (proxy {:.0} us)",
                med(name, |r| r.rps),
                med(name, |r| r.p50_ms),
                med(name, |r| r.p99_ms),
                med_cpu(name, |c| c.0),
                med_cpu(name, |c| c.1)
            );
        }
        if peer.is_some() {
            let base = "wasmtime serve";
            for (name, _, _) in targets.iter().filter(|(n, _, _)| *n != base && *n != NGINX) {
                println!(
                    "  -c{c_n:<3} {name} / {base}: req/s {:.2}   p50 {:.2}   p99 {:.2}",
                    med(name, |r| r.rps) / med(base, |r| r.rps),
                    med(name, |r| r.p50_ms) / med(base, |r| r.p50_ms),
                    med(name, |r| r.p99_ms) / med(base, |r| r.p99_ms)
                );
            }
        }
        if nginx.is_some() {
            println!(
                "  -c{c_n:<3} flotilla gateway / {NGINX}: req/s {:.2}   p50 {:.2}   p99 {:.2}",
                med("flotilla gateway", |r| r.rps) / med(NGINX, |r| r.rps),
                med("flotilla gateway", |r| r.p50_ms) / med(NGINX, |r| r.p50_ms),
                med("flotilla gateway", |r| r.p99_ms) / med(NGINX, |r| r.p99_ms)
            );
        }
    }
    println!(
        "  agent RSS before load {:.1} MiB, after {:.1} MiB; threads {}",
        agent_rss_before as f64 / 1024.0,
        rss_kib(agent_pid) as f64 / 1024.0,
        threads(agent_pid)
    );
    if let Some(p) = &peer {
        let pid = p.child.id();
        println!("  wasmtime serve RSS after load {:.1} MiB; threads {}", rss_kib(pid) as f64 / 1024.0, threads(pid));
    }
    let warnings = c.agents[0].log_text().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count();
    println!("  agent log: {warnings} WARN/ERROR lines");
    if inproc.is_some() {
        println!(
            "  bench process (both in-process servers) RSS {:.1} MiB",
            rss_kib(std::process::id()) as f64 / 1024.0
        );
    }
    if let Some(n) = &nginx {
        let rss: u64 = n.pids().iter().map(|&p| rss_kib(p)).sum();
        println!("  nginx RSS after load {:.1} MiB (master and workers)", rss as f64 / 1024.0);
    }
    drop(inproc);
    drop(nginx);
    drop(peer);
    keep(&mut c, "http");
}

/// The route's host name in the HTTP section.
const GATEWAY_HOST: &str = "web.bench";
const NGINX: &str = "nginx -> wasmtime serve";

/// Debian's nginx as a reverse proxy to a local port, in a prefix dir of its own: as many
/// workers as cores (`auto`, its packaged default), upstream connections kept alive (without
/// `keepalive` every proxied request would open a new connection: not the fair comparison).
/// Stopped when dropped.
struct Nginx {
    port: u16,
    proc: cluster::Proc,
}

impl Nginx {
    fn start(dir: &Path, upstream: u16) -> Option<Nginx> {
        if !on_path("nginx") && !Path::new("/usr/sbin/nginx").exists() {
            println!("http: nginx not installed (apt-get install nginx-light); no gateway comparison");
            return None;
        }
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let port = cluster::free_tcp_port();
        let conf = format!(
            "worker_processes auto;\nuser root;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
             \x20 fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
             \x20 upstream wasm {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    server_name {GATEWAY_HOST};\n\
             \x20   location / {{\n      proxy_pass http://wasm;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
             \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
            p = prefix.display()
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = dir.join("nginx.log");
        let out = std::fs::File::create(&log).unwrap();
        let bin = if on_path("nginx") { "nginx" } else { "/usr/sbin/nginx" };
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let n = Nginx { port, proc: cluster::Proc { child, log, name: "nginx".into() } };
        wait_http_host(port, GATEWAY_HOST, NGINX);
        Some(n)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.proc.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
        std::iter::once(master).chain(children.split_whitespace().filter_map(|p| p.parse().ok())).collect()
    }
}

impl Drop for Nginx {
    /// A fast shutdown through the master (SIGTERM), so no worker outlives it holding the port;
    /// `Proc`'s SIGKILL follows only if it does not exit.
    fn drop(&mut self) {
        let master = nix::unistd::Pid::from_raw(self.proc.child.id() as i32);
        let _ = nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGTERM);
        let _ = self.proc.wait_exit(Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Density

fn density(hello: &Path, reg: &registry::TestRegistry) {
    let n = env_usize("BENCH_DENSITY", 1000);
    let image = reg.reference("bench/hello-dense:v1");
    push(hello, &image);
    println!("density: one agent, workload of {n} replicas of examples/hello --interval-ms 600000 (sleeping):");
    println!("  [as applied] fresh agent; the module is new to it (pull + compile happen during the start)");
    density_run(&image, n, false);
    println!("  [module loaded] fresh agent already running 1 replica of the module; baseline = that agent");
    density_run(&image, n, true);

    // Peer: one `wasmtime run` process per replica, same module sleeping; PSS shares the
    // binary's pages fairly among the processes.
    let procs = env_usize("BENCH_PEER_PROCS", 50);
    if procs == 0 {
        return;
    }
    let Some(bin) = wasmtime_bin() else {
        println!("  peer skipped: wasmtime CLI not found");
        return;
    };
    let mut children: Vec<std::process::Child> = (0..procs)
        .map(|_| {
            Command::new(&bin)
                .arg("run")
                .arg(hello)
                .args(["--interval-ms", "600000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let alive = children.iter_mut().map(|c| c.try_wait().unwrap().is_none()).filter(|alive| *alive).count();
    let pss: u64 = children.iter().map(|c| pss_kib(c.id())).sum();
    let rss: u64 = children.iter().map(|c| rss_kib(c.id())).sum();
    let thr: u64 = children.iter().map(|c| threads(c.id())).sum();
    println!(
        "  peer: {procs} `wasmtime run hello.wasm --interval-ms 600000` processes ({alive} alive): PSS {:.0} KiB each (RSS {:.0} KiB each), {:.1} threads each",
        pss as f64 / procs as f64,
        rss as f64 / procs as f64,
        thr as f64 / procs as f64
    );
    for mut ch in children {
        let _ = ch.kill();
        let _ = ch.wait();
    }
}

/// One agent in a fresh cluster: applies `n` sleeping replicas and reports time and memory.
fn density_run(image: &str, n: usize, prewarm: bool) {
    let timeout = Duration::from_secs(env_usize("BENCH_DENSITY_TIMEOUT_S", 600) as u64);
    let mut c = cluster::Cluster::start();
    spawn_quiet_agent(&mut c, "dense-1", &[]);
    let pid = c.agents[0].child.id();
    let manifest = |name: &str, replicas: usize| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{runtime: wasm, image: {image}, replicas: {replicas}, args: [\"--interval-ms\", \"600000\"]}}\n"
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let config = c.config_path();
    // Applies a workload and waits (bounded) until `n` replicas run; (all running?, time, replicas).
    let apply_and_wait = |name: &str, n: usize, progress: bool| {
        rt.block_on(async {
            // A fresh connection each time: an idle one times out while the agent settles.
            let api = Api::connect(&config).await;
            let t0 = Instant::now();
            let r = api.call(&ApiRequest::Apply { source: manifest(name, n) }).await;
            assert!(matches!(r, ApiResponse::Applied { .. }), "{r:?}");
            let mut next_report = Duration::from_secs(10);
            loop {
                let items = api.replicas(name).await;
                let running = items.iter().filter(|r| is_running(r)).count();
                if running == n {
                    return (true, t0.elapsed(), items);
                }
                if progress && t0.elapsed() > next_report {
                    println!("      t={:>4.0}s running {running}/{n}", t0.elapsed().as_secs_f64());
                    next_report += Duration::from_secs(10);
                }
                if t0.elapsed() > timeout {
                    return (false, t0.elapsed(), items);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    if prewarm {
        let (ok, took, _) = apply_and_wait("dense-warm", 1, false);
        assert!(ok, "warm-up replica never ran");
        println!("    warm-up replica Running after {:.0} ms", ms(took));
        // Let the blocking pool's threads retire (10 s idle) so the baseline is steady.
        std::thread::sleep(Duration::from_secs(12));
    } else {
        std::thread::sleep(Duration::from_secs(3));
    }
    let base_rss = rss_median_kib(pid, 5);
    println!(
        "    baseline agent: RSS {:.1} MiB (median of 5), threads {}, fds {}, mappings {}",
        base_rss as f64 / 1024.0,
        threads(pid),
        count_entries(&format!("/proc/{pid}/fd")),
        count_lines(&format!("/proc/{pid}/maps"))
    );
    let (reached, took, last) = apply_and_wait("dense", n, true);
    let running = last.iter().filter(|r| is_running(r)).count();
    let peak_threads = threads(pid);
    if reached {
        println!(
            "    all {n} Running after {:.2} s (apply -> last replica Running, polled every 200 ms); threads then {peak_threads}",
            took.as_secs_f64()
        );
    } else {
        println!("    NOT all Running after {:.0} s: {running}/{n} Running", took.as_secs_f64());
        let mut phases: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &last {
            *phases.entry(format!("{:?}", r.status.phase)).or_default() += 1;
        }
        println!("    phases: {phases:?}");
        for r in last.iter().filter(|r| !is_running(r)).take(5) {
            println!(
                "    e.g. {}: {:?} {} {:?} {}",
                r.name, r.status.phase, r.status.message, r.status.last_termination, r.unschedulable
            );
        }
    }
    if let Ok(hold) = std::env::var("BENCH_HOLD_S") {
        println!("    holding the cluster for {hold} s: agent pid {pid}");
        std::thread::sleep(Duration::from_secs(hold.parse().unwrap_or(60)));
    }
    // Measure after the blocking pool's threads have retired.
    std::thread::sleep(Duration::from_secs(12));
    let rss = rss_median_kib(pid, 5);
    println!(
        "    agent with {running} more running: RSS {:.1} MiB (median of 5), VmSize {:.0} GiB, threads {}, fds {}, mappings {}",
        rss as f64 / 1024.0,
        proc_status_field(pid, "VmSize:") as f64 / 1024.0 / 1024.0,
        threads(pid),
        count_entries(&format!("/proc/{pid}/fd")),
        count_lines(&format!("/proc/{pid}/maps"))
    );
    if running > 0 {
        println!(
            "    RSS per replica: ({:.1} - {:.1} MiB) / {running} = {:.1} KiB",
            rss as f64 / 1024.0,
            base_rss as f64 / 1024.0,
            (rss.saturating_sub(base_rss)) as f64 / running as f64
        );
    }
    println!("    largest mapping groups by RSS (size x count, perms: RSS):");
    for line in smaps_top(pid, 6) {
        println!("      {line}");
    }
    let compiles = c.agents[0].log_text().lines().filter(|l| l.contains("compiled wasm program")).count();
    println!(
        "    hub RSS {:.1} MiB; agent log: {compiles} \"compiled wasm program\" lines",
        rss_kib(c.hub.child.id()) as f64 / 1024.0
    );
    let logs_dir = c.agent_dir("dense-1").join("logs");
    let printed = std::fs::read_dir(&logs_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("#1 from")))
                .count()
        })
        .unwrap_or(0);
    let warnings: Vec<String> = c.agents[0]
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(String::from)
        .collect();
    println!("    replica logs holding their first line: {printed}; agent log: {} WARN/ERROR lines", warnings.len());
    for w in warnings.iter().take(3) {
        println!("      {w}");
    }
    keep(&mut c, "density");
}

/// The anonymous and file mappings of `pid` grouped by (size, perms, name), largest RSS first.
fn smaps_top(pid: u32, k: usize) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut groups: std::collections::HashMap<String, (usize, u64)> = Default::default();
    let mut key = String::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) && fields.len() >= 5 {
            let (a, b) = fields[0].split_once('-').unwrap();
            let size = u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let name = fields.get(5).map_or("[anon]", |n| n.rsplit('/').next().unwrap_or(n));
            let size = if size >= 1 << 20 { format!("{}M", size >> 20) } else { format!("{}K", size >> 10) };
            key = format!("{size:>5} {} {name}", fields[1]);
            groups.entry(key.clone()).or_default().0 += 1;
        } else if fields.first() == Some(&"Rss:") {
            groups.entry(key.clone()).or_default().1 += fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<_> = groups.into_iter().collect();
    v.sort_by_key(|(_, (_, rss))| std::cmp::Reverse(*rss));
    v.into_iter().take(k).map(|(key, (count, rss))| format!("{key} x{count}: {:.1} MiB", rss as f64 / 1024.0)).collect()
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let hello = cluster::example_wasm();
    let started = Instant::now();
    let reg = registry::TestRegistry::start();
    if reg.is_none() {
        println!("docker-registry missing: the agent-level warm start, http and density are skipped");
    }
    println!(
        "machine: {} CPUs, wasmtime CLI: {}, wrk: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        wasmtime_bin().map_or("absent".into(), |p| p.display().to_string()),
        if on_path("wrk") { "present" } else { "absent" }
    );
    if selected("warm") {
        warm(&hello, reg.as_ref());
    }
    if selected("cold") {
        cold(&hello);
    }
    if let Some(reg) = &reg {
        if selected("http") {
            http(reg);
        }
        if selected("density") {
            density(&hello, reg);
        }
    }
    println!("bench wasm done in {:.0} s", started.elapsed().as_secs_f64());
}
