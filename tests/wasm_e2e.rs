//! End-to-end tests of the Wasm runtime through hub and agents: each kind of artifact users
//! ship (Rust wasip1 module, C with wasi-libc, wasip2 component, wasi:http component) and each
//! way a guest can go wrong, reported with its reason while the agent's other replicas keep
//! running. Needs the registry and the examples (`scripts/test.sh` builds them).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::Cluster;
use proto::messages::{Phase, ReplicaView};
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(60);

fn example(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    assert!(p.exists(), "{} is missing: build the examples first (scripts/test.sh does)", p.display());
    p
}

fn push_file(reg: &TestRegistry, path: &Path, name: &str) -> String {
    let reference = reg.reference(name);
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), path.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    reference
}

fn push_bytes(reg: &TestRegistry, dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(format!("{}.wasm", name.replace(':', "-")));
    std::fs::write(&path, bytes).unwrap();
    push_file(reg, &path, name)
}

fn workload(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: wasm\n  image: {image}\n{extra}"
    )
}

fn apply(c: &Cluster, docs: &[String]) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&docs.join("---\n")));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn replica(c: &Cluster, name: &str) -> Option<ReplicaView> {
    c.replicas().into_iter().find(|r| r.name == name)
}

fn phase_is(c: &Cluster, name: &str, phase: Phase) -> bool {
    replica(c, name).is_some_and(|r| r.status.phase == phase && r.status.template_hash == r.template_hash)
}

/// A minimal HTTP/1.1 GET on loopback; returns (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_host(port, "localhost", path)
}

/// [`http_get`] with a `Host` header of its own (the gateway routes by it).
fn http_get_host(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

#[test]
fn every_kind_of_wasm_artifact_runs_through_the_cluster() {
    let Some(reg) = TestRegistry::start() else { return };
    let rust = push_file(&reg, &example("examples/hello/target/wasm32-wasip1/release/hello.wasm"), "hello:v1");
    let c_prog = push_file(&reg, &example("examples/hello-c/build/hello.wasm"), "hello-c:v1");
    let component = push_file(
        &reg,
        &example("examples/hello-component/target/wasm32-wasip2/release/hello-component.wasm"),
        "hello-component:v1",
    );
    let http =
        push_file(&reg, &example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm"), "hello-http:v1");
    let port = cluster::free_tcp_port();

    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let args = "  args: [\"--interval-ms\", \"200\"]\n";
    apply(
        &c,
        &[
            workload("rust", &rust, &format!("{args}  env: {{GREETING: from-rust}}\n")),
            workload("clang", &c_prog, &format!("{args}  env: {{GREETING: from-c}}\n")),
            workload("comp", &component, &format!("{args}  env: {{GREETING: from-component}}\n")),
            workload("web", &http, &format!("  http: {{port: {port}, maxConcurrency: 8}}\n  env: {{COLOR: teal}}\n")),
        ],
    );
    for (name, greeting) in [("rust", "from-rust #"), ("clang", "from-c #"), ("comp", "from-component #")] {
        c.wait_for(&format!("{name} logs"), WAIT, || c.ok(&["logs", name, "--tail", "500"]).contains(greeting));
        // The status report may trail the first log line; what matters is that the replica
        // runs and never had to be restarted.
        c.wait_for(&format!("{name} Running"), WAIT, || phase_is(&c, &format!("{name}-0"), Phase::Running));
        let r = replica(&c, &format!("{name}-0")).unwrap();
        assert_eq!(r.status.restarts, 0, "{r:?}");
    }
    c.wait_for("web Running", WAIT, || phase_is(&c, "web-0", Phase::Running));
    c.wait_for("web answers", WAIT, || http_get(port, "/").is_some_and(|(s, _)| s == 200));
    let (status, body) = http_get(port, "/").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from flotilla over wasi:http\n"));
    assert_eq!(http_get(port, "/env/COLOR").unwrap(), (200, "teal".to_string()));
    assert_eq!(http_get(port, "/nowhere").unwrap().0, 404);
    // Many requests in parallel, beyond maxConcurrency: all answered.
    let handles: Vec<_> = (0..32).map(|_| std::thread::spawn(move || http_get(port, "/").map(|(s, _)| s))).collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap() == Some(200)));

    // A second HTTP workload on the same port has no node to go to, and says why.
    apply(&c, &[workload("web2", &http, &format!("  http: {{port: {port}}}\n"))]);
    c.wait_for("web2 unschedulable", WAIT, || {
        replica(&c, "web2-0").is_some_and(|r| r.unschedulable.contains("in use"))
    });

    // Deleting the HTTP workload frees the port.
    c.ok(&["delete", "workload", "web"]);
    c.wait_for("port closed", WAIT, || {
        TcpStream::connect(("127.0.0.1", port)).is_err() || phase_is(&c, "web2-0", Phase::Running)
    });
}

#[test]
fn misbehaving_guests_fail_with_their_reason_and_nothing_else_stops() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let steady = push_file(&reg, &example("examples/hello/target/wasm32-wasip1/release/hello.wasm"), "hello:v1");
    let wat = |w: &str| wat::parse_str(w).unwrap();
    let spin = push_bytes(
        &reg,
        dir.path(),
        "spin:v1",
        &wat(r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#),
    );
    let bomb = push_bytes(
        &reg,
        dir.path(),
        "bomb:v1",
        &wat(r#"(module (memory (export "memory") 1)
            (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#),
    );
    let trap = push_bytes(
        &reg,
        dir.path(),
        "trap:v1",
        &wat(r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#),
    );
    let deep = push_bytes(
        &reg,
        dir.path(),
        "deep:v1",
        &wat(r#"(module (memory (export "memory") 1)
            (func $down (param i64) (result i64) (call $down (i64.add (local.get 0) (i64.const 1))))
            (func (export "_start") (drop (call $down (i64.const 0)))))"#),
    );
    let garbage = push_bytes(&reg, dir.path(), "garbage:v1", b"\0asm\x01\0\0\0\xff\xff\xff\xff");
    let missing = push_bytes(
        &reg,
        dir.path(),
        "missing-import:v1",
        &wat(
            r#"(module (import "env" "launch_rockets" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
        ),
    );

    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &[workload("steady", &steady, "  args: [\"--interval-ms\", \"100\"]\n")]);
    c.wait_for("steady Running", WAIT, || phase_is(&c, "steady-0", Phase::Running));
    let started = replica(&c, "steady-0").unwrap().status.started_at_ms;

    let never = "  restartPolicy: Never\n";
    apply(
        &c,
        &[
            workload("spin", &spin, &format!("{never}  resources: {{cpuTime: 1s}}\n")),
            workload("bomb", &bomb, &format!("{never}  resources: {{memory: 16Mi}}\n")),
            workload("trap", &trap, never),
            workload("deep", &deep, never),
            workload("garbage", &garbage, never),
            workload("missing", &missing, never),
        ],
    );
    let reason = |name: &str| {
        let r = replica(&c, name).unwrap();
        format!("{} {}", r.status.message, r.status.last_termination.map(|t| t.to_string()).unwrap_or_default())
    };
    for (name, phase, expect) in [
        ("spin-0", Phase::Failed, "cpu time limit"),
        ("bomb-0", Phase::Failed, "memory limit"),
        ("trap-0", Phase::Failed, "unreachable"),
        ("deep-0", Phase::Failed, "call stack exhausted"),
        // Start failures are retried with backoff whatever the policy; they stay Pending.
        ("garbage-0", Phase::Pending, "invalid wasm module"),
        ("missing-0", Phase::Pending, "launch_rockets"),
    ] {
        c.wait_for(&format!("{name} reported"), WAIT, || phase_is(&c, name, phase) && reason(name).contains(expect));
        let d = c.ok(&["describe", "replica", name]);
        assert!(d.contains(expect), "describe {name} lacks {expect:?}:\n{d}");
    }
    // The well-behaved replica never noticed.
    let s = replica(&c, "steady-0").unwrap();
    assert_eq!((s.status.phase, s.status.restarts, s.status.started_at_ms), (Phase::Running, 0, started));
    let before = c.ok(&["logs", "steady"]).lines().count();
    std::thread::sleep(Duration::from_millis(600));
    assert!(c.ok(&["logs", "steady"]).lines().count() > before, "steady kept printing");
    assert!(c.nodes()[0].ready);
}

#[test]
fn http_probes_gate_readiness_and_restart_an_unhealthy_component() {
    let Some(reg) = TestRegistry::start() else { return };
    let http =
        push_file(&reg, &example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm"), "hello-http:v1");
    let (good_port, sick_port) = (cluster::free_tcp_port(), cluster::free_tcp_port());

    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let probe = |kind: &str, path: &str| format!("  {kind}: {{httpGet: {{path: {path}}}, period: 200ms}}\n");
    apply(
        &c,
        &[
            // Readiness on a path that answers 200: ready, counted in the workload's READY.
            workload("good", &http, &format!("  http: {{port: {good_port}}}\n{}", probe("readinessProbe", "/"))),
            // Liveness on a path that answers 404: killed after three failures and restarted.
            workload(
                "sick",
                &http,
                &format!(
                    "  http: {{port: {sick_port}}}\n{}{}",
                    probe("readinessProbe", "/"),
                    probe("livenessProbe", "/healthz")
                ),
            ),
        ],
    );
    c.wait_for("good ready", WAIT, || replica(&c, "good-0").is_some_and(|r| r.status.ready));
    let w = c.workloads().into_iter().find(|w| w.manifest.metadata.name == "good").unwrap();
    assert_eq!(w.ready_replicas, 1);
    assert!(c.ok(&["describe", "replica", "good-0"]).contains("Ready:         true"));

    c.wait_for("sick restarted", WAIT, || replica(&c, "sick-0").is_some_and(|r| r.status.restarts >= 1));
    let r = replica(&c, "sick-0").unwrap();
    match &r.status.last_termination {
        Some(proto::messages::Termination::Unhealthy { message }) => {
            assert_eq!(message, "liveness probe failed 3 times in a row: GET /healthz: HTTP 404")
        }
        other => panic!("expected an unhealthy kill, got {other:?}"),
    }
    let text = c.ok(&["describe", "replica", "sick-0"]);
    assert!(text.contains("Unhealthy") && text.contains("liveness probe failed"), "{text}");
    // Readiness was reached between kills, and the good replica never restarted.
    assert!(text.contains("readiness probe passed"), "{text}");
    assert_eq!(replica(&c, "good-0").unwrap().status.restarts, 0);
}

/// Autonomy scenario 6, first part: a replica that crash-loops backs off 1 s, 2 s, 4 s (doubling
/// up to 30 s), and `describe replica` shows why, exit by exit.
#[test]
fn a_crash_loop_backs_off_doubling_and_describe_shows_why() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let crash = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const 3))))"#,
    )
    .unwrap();
    let image = push_bytes(&reg, dir.path(), "crash:v1", &crash);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &[workload("crash", &image, "")]);
    c.wait_for("three restarts", WAIT, || replica(&c, "crash-0").is_some_and(|r| r.status.restarts >= 3));
    let r = replica(&c, "crash-0").unwrap();
    assert_eq!(r.status.last_termination, Some(proto::messages::Termination::Exited { code: 3 }));
    let text = c.ok(&["describe", "replica", "crash-0"]);
    let events = text.split_once("Events:").map(|(_, e)| e.to_string()).unwrap_or_default();
    // Each exit is followed by its back-off, doubling.
    let delays = cluster::backoff_delays(&text);
    let found = delays.windows(3).any(|w| w == ["1s", "2s", "4s"]);
    assert!(found, "expected back-offs 1s, 2s, 4s in order, got {delays:?}:\n{text}");
    assert!(events.contains("exited with code 3"), "{text}");
}

/// What a client loop saw while the agent restarted.
#[derive(Debug, Default)]
struct ClientLoop {
    ok: u32,
    refused: u32,
    /// Requests that connected but got no proper answer (reset, timeout, bad status).
    failed: Vec<String>,
    /// The longest time from one answered request to the next.
    longest_gap: Duration,
    /// The longest single request, connect to last byte.
    longest_request: Duration,
}

/// Requests `/` of `host` on a fresh connection each time until `stop`, as fast as answers
/// come.
fn client_loop(port: u16, host: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> ClientLoop {
    use std::sync::atomic::Ordering;
    let mut seen = ClientLoop::default();
    let mut last_ok = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let start = std::time::Instant::now();
        let result = (|| -> std::io::Result<u16> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0))
        })();
        let took = start.elapsed();
        seen.longest_request = seen.longest_request.max(took);
        match result {
            Ok(200) => {
                seen.ok += 1;
                seen.longest_gap = seen.longest_gap.max(last_ok.elapsed());
                last_ok = std::time::Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => seen.refused += 1,
            Ok(code) => seen.failed.push(format!("HTTP {code}")),
            Err(e) => seen.failed.push(e.to_string()),
        }
    }
    seen
}

/// An agent restarted as `systemctl restart` does it (SIGTERM to the main pid, wait for the
/// exit, start again) refuses no connection to a Wasm HTTP component, on its own port or
/// through the node's gateway: the listening sockets go from one agent process to the next
/// through the socket holder, and connections that arrive in between wait in their backlogs.
/// The component itself restarts with the agent (it lives in its process), which shows as a
/// counted restart and an event.
#[test]
fn a_wasm_http_component_refuses_no_connection_while_its_agent_restarts() {
    let Some(reg) = TestRegistry::start() else { return };
    let http =
        push_file(&reg, &example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm"), "hello-http:v1");
    let (port, gateway) = (cluster::free_tcp_port(), cluster::free_tcp_port());
    let agent_args = ["--gateway-port".to_string(), gateway.to_string()];
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let mut c = Cluster::start();
    c.add_agent("edge-1", &agent_args);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let mut web = workload("web", &http, &format!("  http: {{port: {port}}}\n"));
    web = web.replacen("  name: web\n", "  name: web\n  labels: {app: web}\n", 1);
    assert!(web.contains("app: web"), "{web}");
    let route = "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n---\napiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: web}\nspec: {host: web.test, service: web}\n";
    apply(&c, &[web, route.to_string()]);
    c.wait_for("web answers", WAIT, || http_get(port, "/").is_some_and(|(s, _)| s == 200));
    c.wait_for("the gateway routes web.test", WAIT, || {
        http_get_host(gateway, "web.test", "/").is_some_and(|(s, _)| s == 200)
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = std::thread::spawn({
        let stop = stop.clone();
        move || client_loop(port, "localhost", stop)
    });
    let through_gateway = std::thread::spawn({
        let stop = stop.clone();
        move || client_loop(gateway, "web.test", stop)
    });
    std::thread::sleep(Duration::from_millis(500));
    let restart = std::time::Instant::now();
    let pid = c.agents[0].child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = c.agents[0].wait_exit(WAIT).expect("the agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status:?}");
    let exited = restart.elapsed();
    c.agents.clear();
    c.add_agent("edge-1", &agent_args);
    c.wait_for("node Ready again", WAIT, || c.nodes().iter().any(|n| n.ready));
    c.wait_for("web Running again", WAIT, || phase_is(&c, "web-0", Phase::Running));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (what, seen) in [("own port", client.join().unwrap()), ("gateway", through_gateway.join().unwrap())] {
        eprintln!(
            "agent restart (exit after {exited:?}), {what}: {} requests answered, {} refused, {} failed; longest gap between answers {:?}, longest request {:?}",
            seen.ok,
            seen.refused,
            seen.failed.len(),
            seen.longest_gap,
            seen.longest_request
        );
        assert_eq!(seen.refused, 0, "{what}: connections were refused during the restart: {seen:?}");
        assert!(seen.failed.is_empty(), "{what}: requests failed during the restart: {seen:?}");
        assert!(seen.ok > 10, "{what}: {seen:?}");
    }
    let log = c.agents[0].log_text();
    assert!(log.contains("took over listening sockets from the previous agent process"), "{log}");
    assert!(log.contains("HTTP gateway: listening socket handed over"), "{log}");
    // The component restarted with the agent: counted, and said so.
    let r = replica(&c, "web-0").unwrap();
    assert_eq!(r.status.restarts, 1, "{r:?}");
    let text = c.ok(&["describe", "replica", "web-0"]);
    assert!(text.contains("AgentRestarted") && text.contains("started again"), "{text}");
}

/// Asks the hub for `object` over a session made with the node identity in `data_dir`, as a
/// hostile agent would: hello first (claiming the node's `site` label and the Wasm runtime,
/// as its real agent does, so the hub keeps its replicas there), then the request on a
/// stream of its own.
fn ask_for_object(
    hub: &str,
    (node, site): (&str, &str),
    data_dir: &Path,
    object: proto::objects::ObjectRef,
) -> proto::ObjectAnswer {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tuning = transport::tls::Tuning::default();
    let id = rt.block_on(agent::identity::load_or_join(&data_dir.join("identity"), hub, None, node, &tuning)).unwrap();
    // The node's real agent, displaced by this session, comes back and displaces it in
    // turn: a session lost before the answer is made again (a few times at most).
    for _ in 0..5 {
        let answer = rt.block_on(async {
            let config = transport::tls::client_config_mtls(
                &id.ca_pem,
                &id.cert_pem,
                &id.key_pem,
                transport::ALPN_AGENT,
                &tuning,
            )
            .ok()?;
            let endpoint = transport::tls::client_endpoint().ok()?;
            let addr = transport::tls::resolve(hub).await.ok()?;
            let conn = transport::tls::connect(&endpoint, config, addr).await.ok()?;
            let (mut control, _control_recv) = conn.open_bi().await.ok()?;
            let facts = proto::NodeFacts {
                agent_version: proto::version::VERSION.to_string(),
                labels: [("site".to_string(), site.to_string())].into(),
                runtimes: vec![proto::Runtime::Wasm],
                ..Default::default()
            };
            let hello = proto::AgentMsg::Hello { facts, generation: 0, statuses: Default::default() };
            transport::frame::write(&mut control, &hello).await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            transport::frame::write(&mut send, &proto::AgentRequest::Object { object: object.clone() }).await.ok()?;
            let _ = send.finish();
            let answer = transport::frame::read::<proto::ObjectAnswer>(&mut recv).await.ok().flatten();
            conn.close(0u32.into(), b"done");
            answer
        });
        if let Some(a) = answer {
            return a;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no answer from the hub in 5 sessions");
}

#[test]
fn a_wasm_component_reads_secrets_as_env_and_files_offline_too_and_only_its_node_gets_them() {
    let Some(reg) = TestRegistry::start() else { return };
    let http =
        push_file(&reg, &example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm"), "hello-http:obj");
    let port = cluster::free_tcp_port();
    let mut c = Cluster::start();
    c.add_agent("edge-1", &["--label", "site=a"]);
    c.add_agent("edge-2", &["--label", "site=b"]);
    c.wait_for("two Ready nodes", WAIT, || c.nodes().iter().filter(|n| n.ready).count() == 2);
    let suffix: u64 = rand::random();
    let secret = format!("wasm-secret-{suffix:x}");
    let out = c.cli(&["create", "secret", "db", "--from-literal", &format!("password={secret}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = |mode: &str| {
        format!("apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {{name: app}}\ndata: {{mode: {mode}}}\n")
    };
    apply(
        &c,
        &[
            config("one"),
            workload(
                "web",
                &http,
                &format!(
                    "  http: {{port: {port}}}\n  nodeSelector: {{site: a}}\n  env: {{DB_PASS: {{valueFrom: {{secret: db, key: password}}}}}}\n  volumes:\n  - {{name: creds, mountPath: /run/secrets, secret: db}}\n  - {{name: settings, mountPath: /etc/app, config: app, items: [{{key: mode, path: conf/mode}}]}}\n"
                ),
            ),
        ],
    );
    c.wait_for("web answers", WAIT, || http_get(port, "/env/DB_PASS").is_some_and(|(s, _)| s == 200));
    assert_eq!(http_get(port, "/env/DB_PASS").unwrap(), (200, secret.clone()));
    assert_eq!(http_get(port, "/file/run/secrets/password").unwrap(), (200, secret.clone()));
    assert_eq!(http_get(port, "/file/etc/app/conf/mode").unwrap(), (200, "one".to_string()));

    // A config change is seen by the running component, which is not restarted.
    apply(&c, &[config("two")]);
    c.wait_for("the new config file", WAIT, || {
        http_get(port, "/file/etc/app/conf/mode").is_some_and(|(_, b)| b == "two")
    });
    assert_eq!(replica(&c, "web-0").unwrap().status.restarts, 0);

    // edge-2 runs no reader: on its own authenticated link, a hand-made request is refused,
    // and the hub logs the attempt.
    let idx = c.agents.iter().position(|a| a.name == "agent edge-2").unwrap();
    c.agents[idx].kill();
    let db = proto::objects::ObjectRef::new(proto::objects::ObjectKind::Secret, "db");
    match ask_for_object(&c.hub_addr, ("edge-2", "b"), &c.agent_dir("edge-2"), db.clone()) {
        proto::ObjectAnswer::Refused { message } => assert!(message.contains("reads secret/db"), "{message}"),
        proto::ObjectAnswer::Found { .. } => panic!("a node running no reader obtained the secret"),
    }
    c.wait_for("the refusal logged", WAIT, || c.hub.log_text().contains("refused an object to a node"));
    // The reader's node gets it the same way.
    assert!(matches!(
        ask_for_object(&c.hub_addr, ("edge-1", "a"), &c.agent_dir("edge-1"), db),
        proto::ObjectAnswer::Found { .. }
    ));

    // Offline restart: with the hub down, edge-1's agent is killed (its component dies with
    // it) and started again; the component comes back from the node's sealed copy.
    c.hub.kill();
    let idx = c.agents.iter().position(|a| a.name == "agent edge-1").unwrap();
    c.agents[idx].kill();
    drop(c.agents.remove(idx));
    assert!(http_get(port, "/env/DB_PASS").is_none(), "the component still answers after its agent died");
    c.add_agent("edge-1", &["--label", "site=a"]);
    c.wait_for("web answers again without the hub", WAIT, || {
        http_get(port, "/env/DB_PASS").is_some_and(|(s, b)| s == 200 && b == secret)
    });
    assert_eq!(http_get(port, "/file/run/secrets/password").unwrap(), (200, secret.clone()));
    assert_eq!(http_get(port, "/file/etc/app/conf/mode").unwrap(), (200, "two".to_string()));

    // On the node's disk the secret is sealed: not in its data dir, nor in any log.
    let found = cluster::files_holding(c.dir.path(), secret.as_bytes());
    assert!(found.is_empty(), "the plaintext of the secret is on disk in {found:?}");
}

/// What an `events -w -o json` watcher has written to `path` so far.
fn watched_events(path: &std::path::Path) -> Vec<proto::messages::ClusterEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// `flotilla events` as (at_ms, object, reason, message), oldest first.
fn events(c: &Cluster, args: &[&str]) -> Vec<proto::messages::ClusterEvent> {
    let mut all = vec!["events", "-o", "json"];
    all.extend_from_slice(args);
    c.ok(&all).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn events_show_a_crash_loop_a_probe_failure_a_rollout_and_a_node_leaving_and_returning_in_order_offline_ones_too() {
    let Some(reg) = TestRegistry::start() else { return };
    let hello = push_file(&reg, &example("examples/hello/target/wasm32-wasip1/release/hello.wasm"), "hello:events");
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    // `events -w` from the start, through everything below (a hub restart included).
    let watched = c.dir.path().join("events-watch.json");
    // Killed however the test ends: a watcher left running would hold the e2e lock it
    // inherited.
    let mut watcher = cluster::KillOnDrop(
        std::process::Command::new(cluster::bin())
            .arg("--config")
            .arg(c.config_path())
            .args(["events", "-w", "-o", "json", "--since", "1h"])
            .stdout(std::fs::File::create(&watched).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let crash = workload("crash", &hello, "  args: [\"--count\", \"1\", \"--exit-code\", \"3\"]\n");
    let web = |greeting: &str| workload("web", &hello, &format!("  env: {{GREETING: {greeting}}}\n"));
    apply(&c, &[crash, web("one")]);
    c.wait_for("the crash loop backing off", WAIT, || {
        events(&c, &["--for", "replica/crash-0"]).iter().any(|e| e.reason == "BackOff")
    });
    // A liveness probe that cannot pass: the component answers 404 there.
    let http =
        push_file(&reg, &example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm"), "hello-http:ev");
    let port = cluster::free_tcp_port();
    let sick = workload(
        "sick",
        &http,
        &format!("  http: {{port: {port}}}\n  livenessProbe: {{httpGet: {{path: /healthz}}, period: 200ms}}\n"),
    );
    apply(&c, &[sick]);
    c.wait_for("the probe failure", WAIT, || {
        events(&c, &["--for", "replica/sick-0"]).iter().any(|e| e.reason == "Unhealthy")
    });
    // A replica's events go with it: the watcher (polling every second) must have shown
    // this one before the workload is deleted.
    c.wait_for("the watcher to show the probe failure", Duration::from_secs(15), || {
        watched_events(&watched).iter().any(|e| e.object == "replica/sick-0" && e.reason == "Unhealthy")
    });
    c.ok(&["delete", "workload", "sick"]);
    apply(&c, &[web("two")]);
    c.wait_for("the rollout as an event", WAIT, || {
        events(&c, &["--for", "workload/web"]).iter().any(|e| e.reason == "Rollout" && e.message.contains("revision 2"))
    });

    // The hub goes away; the crash loop goes on, its events recorded on the node.
    c.hub.kill();
    let down = now_ms();
    std::thread::sleep(Duration::from_secs(6));
    let up = now_ms();
    c.restart_hub();
    c.wait_for("the node back", WAIT, || c.nodes().iter().any(|n| n.ready));
    c.wait_for("events from the hub's downtime, from the node", WAIT, || {
        events(&c, &["--for", "node/edge-1"])
            .iter()
            .any(|e| e.object == "replica/crash-0" && (down..up).contains(&e.at_ms))
    });

    // The node leaves (killed: its link times out) and returns.
    let idx = c.agents.iter().position(|a| a.name == "agent edge-1").unwrap();
    c.agents[idx].kill();
    drop(c.agents.remove(idx));
    c.wait_for("the node NotReady", WAIT, || c.nodes().iter().any(|n| !n.ready));
    c.add_agent("edge-1", &[]);
    c.wait_for("the node Ready again", WAIT, || c.nodes().iter().any(|n| n.ready));
    c.wait_for("its return as an event", WAIT, || {
        events(&c, &["--for", "node/edge-1"]).iter().filter(|e| e.reason == "Ready").count() >= 3
    });

    // One list, in order: the crash loop's first back-off, the rollout, the node leaving,
    // the node returning.
    let all = events(&c, &["--since", "1h"]);
    let first = |pred: &dyn Fn(&proto::messages::ClusterEvent) -> bool| {
        all.iter().position(pred).unwrap_or_else(|| panic!("missing from {all:#?}"))
    };
    let backoff = first(&|e| e.object == "replica/crash-0" && e.reason == "BackOff");
    let rollout = first(&|e| e.object == "workload/web" && e.message.contains("revision 2"));
    let left = first(&|e| e.object == "node/edge-1" && e.reason == "NotReady" && e.at_ms > up);
    let back = all.iter().rposition(|e| e.object == "node/edge-1" && e.reason == "Ready").unwrap();
    assert!(backoff < rollout && rollout < left && left < back, "{all:#?}");
    assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "ordered by time");
    let text = c.ok(&["events", "--for", "workload/web"]);
    assert!(text.starts_with("TIME") && text.contains("workload/web") && text.contains("Rollout"), "{text}");

    // The watcher saw the same, in the order it happened, the offline period's events
    // included (they arrive with the node's return), the pull and compile of the module too.
    let seen = |all: &[proto::messages::ClusterEvent]| {
        all.iter().any(|e| e.object == "node/edge-1" && e.reason == "Ready" && e.at_ms > up)
            && all.iter().filter(|e| e.object == "node/edge-1" && e.reason == "Ready").count() >= 3
    };
    let read = || watched_events(&watched);
    c.wait_for("the watcher caught up", Duration::from_secs(15), || seen(&read()));
    watcher.stop();
    let w = read();
    let first = |pred: &dyn Fn(&proto::messages::ClusterEvent) -> bool| {
        w.iter().position(pred).unwrap_or_else(|| panic!("missing from the watch: {w:#?}"))
    };
    let pulling = first(&|e| e.reason == "Pulling" && e.message.contains("hello:events"));
    let pulled = first(&|e| e.reason == "Pulled" && e.message.contains(" ms"));
    let compiled = first(&|e| e.reason == "Compiled" && e.message.starts_with("module in "));
    let backoff = first(&|e| e.object == "replica/crash-0" && e.reason == "BackOff");
    let unhealthy = first(&|e| e.object == "replica/sick-0" && e.reason == "Unhealthy");
    let rollout = first(&|e| e.object == "workload/web" && e.message.contains("revision 2"));
    let offline = first(&|e| e.object == "replica/crash-0" && (down..up).contains(&e.at_ms));
    let left = first(&|e| e.object == "node/edge-1" && e.reason == "NotReady" && e.at_ms > up);
    let back = first(&|e| e.object == "node/edge-1" && e.reason == "Ready" && e.at_ms > w[left].at_ms);
    assert!(pulling < pulled && pulled < compiled && compiled < backoff, "{w:#?}");
    assert!(backoff < unhealthy && unhealthy < rollout && rollout < offline && offline < left && left < back, "{w:#?}");
    let mut unique = w.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), w.len(), "the watcher shows each event once");
}

/// `flotilla top replicas` and the agent's metrics measure Wasm replicas too, though they
/// share the agent's process: a guest spinning on one core shows about one CPU and its linear
/// memory, a sleeping one next to no CPU.
#[test]
fn top_shows_a_spinning_wasm_replica_near_one_cpu_and_a_sleeping_one_near_none() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let wat = |w: &str| wat::parse_str(w).unwrap();
    let spin = push_bytes(
        &reg,
        dir.path(),
        "spin:top",
        &wat(r#"(module (memory (export "memory") 4) (func (export "_start") (loop $l (br $l))))"#),
    );
    // Sleeps for an hour (poll_oneoff on a relative monotonic clock).
    let sleep = push_bytes(
        &reg,
        dir.path(),
        "sleep:top",
        &wat(r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 2)
            (func (export "_start")
                (i64.store (i32.const 0) (i64.const 7))
                (i32.store8 (i32.const 8) (i32.const 0))
                (i32.store (i32.const 16) (i32.const 1))
                (i64.store (i32.const 24) (i64.const 3600000000000))
                (i64.store (i32.const 32) (i64.const 0))
                (i32.store16 (i32.const 40) (i32.const 0))
                (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#),
    );
    let mut c = Cluster::start();
    let metrics_port = cluster::free_tcp_port();
    c.add_agent("edge-1", &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &[workload("spin", &spin, ""), workload("sleep", &sleep, "")]);
    c.wait_for("both Running", WAIT, || {
        phase_is(&c, "spin-0", Phase::Running) && phase_is(&c, "sleep-0", Phase::Running)
    });

    let usage = |c: &Cluster| {
        let top: Vec<proto::messages::NodeUsageView> =
            serde_json::from_str(&c.ok(&["top", "replicas", "-o", "json"])).expect("top as JSON");
        top.into_iter().find_map(|n| n.report).map(|r| r.replicas).unwrap_or_default()
    };
    // One core's worth over the agent's 500 ms window; allowed a few tries, as the machine
    // running the tests may be busy with more than this guest.
    let mut last = Default::default();
    let near_one_cpu = cluster::time_until(Duration::from_secs(15), Duration::from_millis(100), || {
        last = usage(&c);
        last.get("spin-0").is_some_and(|u| (500..=1200).contains(&u.cpu_millis))
    });
    assert!(near_one_cpu.is_some(), "spin-0 never measured near one CPU: {last:?}");
    let (spin, sleep) = (last["spin-0"], last["sleep-0"]);
    let wasm = Some(proto::manifest::Runtime::Wasm);
    assert_eq!((spin.memory_bytes, spin.runtime), (4 << 16, wasm), "{last:?}");
    assert!(sleep.cpu_millis < 50, "{last:?}");
    assert_eq!((sleep.memory_bytes, sleep.runtime), (2 << 16, wasm), "{last:?}");
    let table = c.ok(&["top", "replicas"]);
    let row = table.lines().find(|l| l.starts_with("spin-0")).unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[2]), ("edge-1", "wasm"), "{table}");

    // The agent's Prometheus series: the spinner's CPU counter grows, memory is its pages.
    let scrape = || http_get(metrics_port, "/metrics").map(|(_, body)| body).unwrap_or_default();
    let cpu = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("flotilla_agent_wasm_cpu_seconds_total{replica=\"spin-0\"} "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let first = scrape();
    assert!(first.contains("flotilla_agent_wasm_memory_bytes{replica=\"spin-0\"} 262144"), "{first}");
    assert!(first.contains("flotilla_agent_wasm_memory_bytes{replica=\"sleep-0\"} 131072"), "{first}");
    let before = cpu(&first).unwrap_or_else(|| panic!("no CPU series for spin-0: {first}"));
    std::thread::sleep(Duration::from_secs(1));
    let grown = cpu(&scrape()).unwrap() - before;
    assert!((0.5..=1.3).contains(&grown), "spin-0 used {grown} s of CPU in about 1 s");
}
