#![allow(dead_code)] // shared by several test crates, each using part of it
//! A real cluster for end-to-end tests: the `flotilla` binary started as separate hub and agent
//! processes on loopback, driven through the CLI exactly as a user would.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use proto::messages::{NodeView, ReplicaView, WorkloadView};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

/// A free loopback UDP port (QUIC). Racy in principle; the OS rarely reuses a port at once.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free loopback TCP port, for HTTP workloads.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when dropped, its output kept in a file for post-mortems.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], log: PathBuf) -> Proc {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Proc::spawn_program(name, bin(), &args, log)
    }

    /// Spawns `program args` (for example `nsenter --net=... -- flotilla agent ...`) with the
    /// same environment and log capture as [`Proc::spawn`].
    pub fn spawn_program(name: &str, program: &str, args: &[String], log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .env("FLOTILLA_LOG", "info,flotilla_agent=debug,flotilla_hub=debug,quinn=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {program}: {e}"));
        Proc { child, log, name: name.to_string() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log ({}) -----\n{}", self.name, self.log.display(), self.log_text());
        }
    }
}

/// Removes the tmpfs directories (`/dev/shm/flotilla-*`) the cluster's agents wrote config
/// and secret volumes and container specs to, once the agents are stopped.
impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return };
        for e in entries.flatten() {
            let is_agent = e.file_name().to_string_lossy().starts_with("agent-") && e.path().is_dir();
            if is_agent {
                let config = agent::AgentConfig::new(String::new(), String::new(), e.path());
                let _ = std::fs::remove_dir_all(config.secrets_dir());
            }
        }
    }
}

/// The bridge an agent in the test process's own network namespace puts its containers on:
/// one per agent (its data dir), so agents and clusters sharing the namespace never share one,
/// and the janitor knows what to remove. Linux interface names hold 15 bytes.
pub fn test_bridge(agent_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    agent_dir.hash(&mut h);
    format!("flt{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// A cluster CIDR of the test's own (from its directory), so clusters running side by side in
/// one network namespace give their nodes different subnets.
pub fn test_cluster_cidr(dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("10.{}.0.0/16", 64 + h.finish() % 128)
}

/// Dropped in field order: the agents, then the hub (each printing its log when the test
/// panicked), and the directory holding those logs last.
pub struct Cluster {
    pub agents: Vec<Proc>,
    pub hub: Proc,
    pub hub_addr: String,
    /// The hub's listen address when it differs from `hub_addr` (see [`Cluster::start_listening`]).
    pub hub_listen: Option<String>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts a hub and waits for its token and admin config.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Starts a hub with `extra` flags and waits for its token and admin config.
    pub fn start_with(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let hub_addr = format!("127.0.0.1:{}", free_udp_port());
        let hub = start_hub(dir.path(), &hub_addr, extra);
        let c = Cluster { dir, hub_addr, hub, agents: Vec::new(), hub_listen: None };
        c.wait_for("hub to write its token and admin config", Duration::from_secs(20), || {
            c.token_path().exists() && c.config_path().exists()
        });
        c
    }

    /// Starts a hub listening on `listen` (for example `0.0.0.0:PORT`, so agents in network
    /// namespaces reach it at their host-side address) while the CLI dials `advertise`.
    pub fn start_listening(listen: &str, advertise: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let hub = start_hub_listening(dir.path(), listen, advertise);
        let c = Cluster {
            dir,
            hub_addr: advertise.to_string(),
            hub,
            agents: Vec::new(),
            hub_listen: Some(listen.to_string()),
        };
        c.wait_for("hub to write its token and admin config", Duration::from_secs(20), || {
            c.token_path().exists() && c.config_path().exists()
        });
        c
    }

    pub fn hub_dir(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    pub fn token_path(&self) -> PathBuf {
        self.hub_dir().join("token")
    }

    pub fn config_path(&self) -> PathBuf {
        self.hub_dir().join("admin.yaml")
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{name}"))
    }

    /// Starts an agent that joins with the hub's token.
    pub fn add_agent(&mut self, name: &str, extra: &[&str]) {
        let token = self.token_path();
        let data = self.agent_dir(name);
        let bridge = test_bridge(&data);
        let mut args = vec![
            "agent",
            "--hub",
            &self.hub_addr,
            "--token-file",
            token.to_str().unwrap(),
            "--name",
            name,
            "--data-dir",
            data.to_str().unwrap(),
            "--bridge",
            &bridge,
        ];
        args.extend_from_slice(extra);
        let log = self.dir.path().join(format!("agent-{name}.log"));
        self.agents.push(Proc::spawn(&format!("agent {name}"), &args, log));
    }

    /// Starts an agent that joins with the hub's token, running the `flotilla` binary at
    /// `program` (a copy of its own, for tests that replace it).
    pub fn add_agent_from(&mut self, program: &Path, name: &str, extra: &[&str]) {
        let token = self.token_path();
        let data = self.agent_dir(name);
        let mut args: Vec<String> =
            ["agent", "--hub", &self.hub_addr, "--token-file", token.to_str().unwrap(), "--name", name]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(["--data-dir".to_string(), data.to_str().unwrap().to_string()]);
        args.extend(["--bridge".to_string(), test_bridge(&data)]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.dir.path().join(format!("agent-{name}.log"));
        self.agents.push(Proc::spawn_program(&format!("agent {name}"), program.to_str().unwrap(), &args, log));
    }

    /// Starts an agent through a command prefix (for example [`nsenter`, `--net=...`, `--`]),
    /// dialling the hub at `hub`. Its log is `agent-<name>.log` in the cluster dir, then
    /// `agent-<name>.2.log`, ... for later starts.
    pub fn add_agent_via(&mut self, prefix: &[String], hub: &str, name: &str, extra: &[&str]) {
        let token = self.token_path();
        let data = self.agent_dir(name);
        let mut args: Vec<String> = prefix[1..].to_vec();
        args.push(bin().to_string());
        for a in ["agent", "--hub", hub, "--token-file", token.to_str().unwrap(), "--name", name, "--data-dir"] {
            args.push(a.to_string());
        }
        args.push(data.to_str().unwrap().to_string());
        args.extend(["--bridge".to_string(), test_bridge(&data)]);
        args.extend(extra.iter().map(|s| s.to_string()));
        // A restarted agent gets a log of its own, so the earlier run's stays for post-mortems.
        let mut log = self.dir.path().join(format!("agent-{name}.log"));
        for k in 2.. {
            if !log.exists() {
                break;
            }
            log = self.dir.path().join(format!("agent-{name}.{k}.log"));
        }
        self.agents.push(Proc::spawn_program(&format!("agent {name}"), &prefix[0], &args, log));
    }

    /// Kills and restarts the hub on the same data dir and address.
    pub fn restart_hub(&mut self) {
        self.hub.kill();
        self.hub = match &self.hub_listen {
            Some(listen) => start_hub_listening(self.dir.path(), listen, &self.hub_addr),
            None => start_hub(self.dir.path(), &self.hub_addr, &[]),
        };
    }

    /// Runs a CLI command with the admin config.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(self.config_path()).args(args);
        run_with_stdin(cmd, stdin)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn replicas(&self) -> Vec<ReplicaView> {
        serde_json::from_str(&self.ok(&["get", "replicas", "-o", "api-json"])).unwrap()
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        serde_json::from_str(&self.ok(&["get", "nodes", "-o", "api-json"])).unwrap()
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        serde_json::from_str(&self.ok(&["get", "workloads", "-o", "api-json"])).unwrap()
    }

    /// [`wait_for`], for a test holding a cluster.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
        wait_for(what, timeout, cond)
    }
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    if time_until(timeout, Duration::from_millis(100), cond).is_none() {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `cond` every `every` until it holds or `limit` passes; the time it took.
pub fn time_until(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// The back-off delays ("1s", "2s", ...) a `describe replica` text lists in its events,
/// oldest first.
pub fn backoff_delays(describe: &str) -> Vec<String> {
    let events = describe.split_once("Events:").map_or("", |(_, e)| e);
    events
        .lines()
        .filter_map(|l| l.split_once("restarting in ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once(' ').map(|(d, _)| d.to_string()))
        .collect()
}

fn start_hub(dir: &Path, addr: &str, extra: &[&str]) -> Proc {
    let data = dir.join("hub");
    let cidr = test_cluster_cidr(dir);
    let mut args = vec!["hub", "--data-dir", data.to_str().unwrap(), "--listen", addr, "--cluster-cidr", &cidr];
    args.extend_from_slice(extra);
    Proc::spawn("hub", &args, dir.join("hub.log"))
}

fn start_hub_listening(dir: &Path, listen: &str, advertise: &str) -> Proc {
    let data = dir.join("hub");
    let cidr = test_cluster_cidr(dir);
    Proc::spawn(
        "hub",
        &[
            "hub",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            listen,
            "--advertise",
            advertise,
            "--cluster-cidr",
            &cidr,
        ],
        dir.join("hub.log"),
    )
}

/// Runs `flotilla` with `args` (no stdin), bounded in time.
pub fn flotilla<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    run_with_stdin(cmd, None)
}

pub fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    // Drained while the command runs, so output larger than a pipe's buffer cannot stall it.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    // The CLI talks to local processes only; a hang here is a bug, so bound it.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!("CLI command timed out: {cmd:?}\n{}", String::from_utf8_lossy(&err));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() }
}

/// The example module built from `examples/hello` for wasm32-wasip1, building it if needed.
pub fn example_wasm() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wasm = root.join("examples/hello/target/wasm32-wasip1/release/hello.wasm");
    if !wasm.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Its own target dir, named: a CARGO_TARGET_DIR in the environment (as the tests'
        // own build may use) would otherwise put the module somewhere else than `wasm`.
        let status = Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("examples/hello/Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("examples/hello/target"))
            .status()
            .unwrap();
        assert!(status.success(), "building examples/hello for wasm32-wasip1 failed (is the target installed?)");
    }
    wasm
}

/// Every file under `dir` (symlinks not followed) that holds `needle`.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if kind.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

/// A child process killed (and reaped) when dropped, so a test that panics leaves none
/// behind: one left running would hold the e2e lock it inherited.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}
