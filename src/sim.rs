//! `flotilla sim`: a fleet of simulated agents against a real hub, for scale measurements.
//!
//! Each simulated node joins with the token like an agent (its own key and certificate, its
//! own QUIC connection with mutual TLS) and speaks the agent protocol: hello, acks, heartbeats,
//! and a status reporting each assigned replica Running a configurable delay after it
//! arrives. Nothing runs. Nodes come from many source addresses in 127.0.0.0/8 (a group of
//! `--per-address` nodes shares one address and one QUIC endpoint), as a real fleet comes from
//! many addresses, so the hub's per-address caps see what they would see in the field.
//!
//! The scenario: join and connect every node (paced), measure an idle window (bytes on the
//! wire per node, the hub's and the simulator's CPU, the hub's memory), then, with `--apply`,
//! apply a manifest through the CLI and measure how long each replica took to be reported
//! Running. Bytes are QUIC's UDP payload (QUIC and TLS overhead included), from quinn's
//! connection statistics.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use proto::manifest::Runtime;
use proto::messages::{AgentMsg, AssignmentSet, NodeFacts, Phase, ReplicaStatus};
use proto::token::JoinToken;
use tokio::sync::mpsc;
use transport::{ALPN_AGENT, frame, tls};

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// The hub, HOST:PORT.
    #[arg(long)]
    hub: String,
    /// The join token file (the hub's `token`).
    #[arg(long)]
    token_file: PathBuf,
    /// Simulated nodes.
    #[arg(long, default_value_t = 100)]
    agents: u32,
    /// Nodes sharing one source address (and one QUIC endpoint).
    #[arg(long, default_value_t = 25)]
    per_address: u32,
    /// The first source address; the next groups take the addresses after it.
    #[arg(long, default_value = "127.1.0.1")]
    first_address: Ipv4Addr,
    /// Node names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Nodes are spread over this many sites (label `site=store-K`).
    #[arg(long, default_value_t = 100)]
    sites: u32,
    /// Nodes joining and connecting per second, at most.
    #[arg(long, default_value_t = 150)]
    connect_rate: u32,
    /// How long after an assignment arrives its replica is reported Running, e.g. 500ms.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    run_delay: Duration,
    /// The idle window measured once every node is connected, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    idle: Duration,
    /// A manifest to apply after the idle window (through `flotilla apply`); the simulator
    /// then waits for every replica it assigns to be reported Running.
    #[arg(long)]
    apply: Option<PathBuf>,
    /// The admin config for `--apply`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replicas to wait for after `--apply` (default: one per node, as an EveryNode workload).
    #[arg(long)]
    expect_replicas: Option<u64>,
    /// The longest each phase may take, e.g. 120s.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    wait: Duration,
    /// The hub's pid, to report its CPU and memory beside the simulator's.
    #[arg(long)]
    hub_pid: Option<u32>,
}

fn parse_duration(s: &str) -> Result<Duration, proto::manifest::InvalidValue> {
    proto::manifest::parse_duration_ms(s).map(Duration::from_millis)
}

/// What the simulated nodes did, shared by their tasks and the scenario.
#[derive(Default)]
struct Stats {
    joined: AtomicU64,
    connected: AtomicU64,
    join_failures: AtomicU64,
    session_losses: AtomicU64,
    /// Bytes of connections that ended.
    closed_tx: AtomicU64,
    closed_rx: AtomicU64,
    /// Live connections, for their byte counts.
    live: Mutex<Vec<Option<quinn::Connection>>>,
    /// When each replica was first reported Running.
    running: Mutex<Vec<Instant>>,
}

impl Stats {
    /// UDP payload bytes sent and received by every connection so far.
    fn bytes(&self) -> (u64, u64) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let (mut tx, mut rx) = (self.closed_tx.load(Ordering::Relaxed), self.closed_rx.load(Ordering::Relaxed));
        for c in live.iter().flatten() {
            let s = c.stats();
            tx += s.udp_tx.bytes;
            rx += s.udp_rx.bytes;
        }
        (tx, rx)
    }

    fn running_count(&self) -> u64 {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
}

/// One simulated node.
struct Node {
    index: usize,
    name: String,
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    token: JoinToken,
    facts: NodeFacts,
    run_delay: Duration,
    stats: Arc<Stats>,
}

/// Runs the scenario and prints its figures.
pub async fn run(args: SimArgs) -> Result<()> {
    let token: JoinToken = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?
        .trim()
        .parse()?;
    let hub = tls::resolve(&args.hub).await?;
    if args.agents == 0 || args.per_address == 0 || args.connect_rate == 0 {
        bail!("--agents, --per-address and --connect-rate must be at least 1");
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let stats = Arc::new(Stats::default());
    stats.live.lock().unwrap_or_else(|e| e.into_inner()).resize(args.agents as usize, None);
    let groups = args.agents.div_ceil(args.per_address);
    let mut endpoints = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let ip = Ipv4Addr::from(u32::from(args.first_address).wrapping_add(g));
        let bind = SocketAddr::new(IpAddr::V4(ip), 0);
        endpoints.push(quinn::Endpoint::client(bind).with_context(|| format!("binding {bind}"))?);
    }
    let cpu = Cpu::new(args.hub_pid);
    let started = Instant::now();
    println!(
        "sim: {} nodes from {} addresses starting at {}, {} per second",
        args.agents, groups, args.first_address, args.connect_rate
    );
    let pace = Duration::from_secs(1) / args.connect_rate;
    for i in 0..args.agents as usize {
        let mut labels = BTreeMap::new();
        labels.insert("site".to_string(), format!("store-{}", i as u32 % args.sites.max(1)));
        let node = Node {
            index: i,
            name: format!("{}-{i}", args.name_prefix),
            endpoint: endpoints[i / args.per_address as usize].clone(),
            hub,
            token: token.clone(),
            facts: NodeFacts {
                os: "linux".into(),
                arch: std::env::consts::ARCH.into(),
                kernel: "sim".into(),
                cpus: 4,
                memory_bytes: 1 << 30,
                runtimes: vec![Runtime::Wasm, Runtime::Container],
                labels,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                ..NodeFacts::default()
            },
            run_delay: args.run_delay,
            stats: stats.clone(),
        };
        tokio::spawn(node.run());
        tokio::time::sleep(pace).await;
    }
    let all = u64::from(args.agents);
    wait_for("connected", args.wait, || stats.connected.load(Ordering::Relaxed), all, &stats).await?;
    let connect_time = started.elapsed();
    println!("sim: all {all} connected {:.1}s after the start", connect_time.as_secs_f64());

    // Idle: bytes per node, CPU, memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tx0, rx0) = stats.bytes();
    let cpu0 = cpu.sample();
    tokio::time::sleep(args.idle).await;
    let (tx1, rx1) = stats.bytes();
    let cpu1 = cpu.sample();
    let secs = args.idle.as_secs_f64();
    let per_node_kbit = |bytes: u64| bytes as f64 * 8.0 / 1000.0 / secs / all as f64;
    let (up, down) = (per_node_kbit(tx1 - tx0), per_node_kbit(rx1 - rx0));
    println!("sim: idle {secs:.0}s: per node {up:.3} kbit/s up, {down:.3} kbit/s down, {:.3} together", up + down);
    println!("sim: idle CPU: {}", cpu0.since(&cpu1, args.idle));
    if let Some(rss) = cpu.hub_rss() {
        println!("sim: hub RSS {} MiB", rss >> 20);
    }
    println!("sim: simulator RSS {} MiB", rss_of("self").unwrap_or(0) >> 20);

    if let Some(manifest) = &args.apply {
        let config = args.config.as_ref().context("--apply needs --config")?;
        let expect = args.expect_replicas.unwrap_or(all);
        stats.running.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let cpu0 = cpu.sample();
        let t0 = Instant::now();
        let out = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(config)
            .args(["apply", "-f"])
            .arg(manifest)
            .output()
            .await?;
        if !out.status.success() {
            bail!("apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        let applied = t0.elapsed();
        wait_for("running", args.wait, || stats.running_count(), expect, &stats).await?;
        let mut times: Vec<Duration> = {
            let running = stats.running.lock().unwrap_or_else(|e| e.into_inner());
            running.iter().map(|t| t.saturating_duration_since(t0)).collect()
        };
        times.sort();
        let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
        println!(
            "sim: apply answered in {:.2}s; {} replicas reported Running: p50 {:.2}s, p99 {:.2}s, last {:.2}s after the apply (run delay {:?})",
            applied.as_secs_f64(),
            times.len(),
            pct(0.50).as_secs_f64(),
            pct(0.99).as_secs_f64(),
            pct(1.0).as_secs_f64(),
            args.run_delay
        );
        let took = t0.elapsed();
        println!("sim: CPU from the apply to the last Running: {}", cpu0.since(&cpu.sample(), took));
        if let Some(rss) = cpu.hub_rss() {
            println!("sim: hub RSS {} MiB", rss >> 20);
        }
    }
    println!(
        "sim: done: {} joined, {} join failures, {} sessions lost",
        stats.joined.load(Ordering::Relaxed),
        stats.join_failures.load(Ordering::Relaxed),
        stats.session_losses.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn wait_for(what: &str, limit: Duration, count: impl Fn() -> u64, want: u64, stats: &Stats) -> Result<()> {
    let start = Instant::now();
    let mut next_report = start + Duration::from_secs(5);
    loop {
        let n = count();
        if n >= want {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "only {n} of {want} {what} after {limit:?} ({} joined, {} join failures, {} sessions lost)",
                stats.joined.load(Ordering::Relaxed),
                stats.join_failures.load(Ordering::Relaxed),
                stats.session_losses.load(Ordering::Relaxed)
            );
        }
        if Instant::now() >= next_report {
            println!("sim: {n}/{want} {what} after {:.0}s", start.elapsed().as_secs_f64());
            next_report += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bounds of the simulated nodes' retries, as an agent's.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// As the agent's link.
const HEARTBEAT: Duration = Duration::from_secs(5);

impl Node {
    async fn run(self) {
        let tuning = tls::Tuning::default();
        let mut backoff = BACKOFF_MIN;
        let id = loop {
            match agent::identity::join_via(&self.endpoint, self.hub, &self.token, &self.name, &tuning).await {
                Ok(id) => break id,
                Err(e) => {
                    self.stats.join_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = %self.name, error = %e, "join failed; retrying");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        self.stats.joined.fetch_add(1, Ordering::Relaxed);
        let config = match tls::client_config_mtls(&id.ca_pem, &id.cert_pem, &id.key_pem, ALPN_AGENT, &tuning) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(node = %self.name, error = %e, "no client config");
                return;
            }
        };
        let mut state = Session::default();
        backoff = BACKOFF_MIN;
        loop {
            match tls::connect(&self.endpoint, config.clone(), self.hub).await {
                Ok(conn) => {
                    backoff = BACKOFF_MIN;
                    self.stats.connected.fetch_add(1, Ordering::Relaxed);
                    self.slot(Some(conn.clone()));
                    let why = self.session(&conn, &mut state).await;
                    tracing::debug!(node = %self.name, reason = %why, "session ended");
                    self.stats.connected.fetch_sub(1, Ordering::Relaxed);
                    self.stats.session_losses.fetch_add(1, Ordering::Relaxed);
                    self.slot(None);
                    let s = conn.stats();
                    self.stats.closed_tx.fetch_add(s.udp_tx.bytes, Ordering::Relaxed);
                    self.stats.closed_rx.fetch_add(s.udp_rx.bytes, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(node = %self.name, error = %e, "connect failed"),
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn slot(&self, conn: Option<quinn::Connection>) {
        if let Some(s) = self.stats.live.lock().unwrap_or_else(|e| e.into_inner()).get_mut(self.index) {
            *s = conn;
        }
    }

    /// One session, from hello to loss; the reason it ended.
    async fn session(&self, conn: &quinn::Connection, state: &mut Session) -> String {
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        let facts = NodeFacts { clock_ms: Some(wall_ms()), ..self.facts.clone() };
        let hello = AgentMsg::Hello { facts, generation: state.generation, statuses: state.statuses.clone() };
        if let Err(e) = frame::write(&mut send, &hello).await {
            return e.to_string();
        }
        let (sets_tx, mut sets) = mpsc::channel::<AssignmentSet>(4);
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            let mut pieces = proto::pieces::Assembler::default();
            loop {
                let set = match agent::link::next_set(&mut recv, &mut pieces).await {
                    Ok(set) => set,
                    Err(end) => return end.to_string(),
                };
                if sets_tx.send(set).await.is_err() {
                    return "stopped".into();
                }
            }
        });
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        // As the agent: heartbeats only to a hub that wants them.
        let mut connection_liveness = false;
        // Replicas to report Running, and when.
        let mut due: Vec<(tokio::time::Instant, String, String)> = Vec::new();
        let why = loop {
            let next = due.iter().map(|d| d.0).min();
            tokio::select! {
                set = sets.recv() => {
                    let Some(set) = set else { break "the reader ended".to_string() };
                    connection_liveness = set.connection_liveness;
                    if set.generation == state.generation && state.generation != 0 {
                        continue;
                    }
                    state.generation = set.generation;
                    let at = tokio::time::Instant::now() + self.run_delay;
                    let wanted: BTreeMap<String, String> =
                        set.assignments.into_iter().map(|a| (a.name, a.template_hash)).collect();
                    state.statuses.retain(|name, _| wanted.contains_key(name));
                    for (name, hash) in wanted {
                        if state.statuses.get(&name).is_none_or(|s| s.template_hash != hash) {
                            due.push((at, name, hash));
                        }
                    }
                    if let Err(e) = frame::write(&mut send, &AgentMsg::Ack { generation: state.generation }).await {
                        break e.to_string();
                    }
                }
                _ = sleep_until(next) => {
                    let now = tokio::time::Instant::now();
                    let (ready, later): (Vec<_>, Vec<_>) = due.drain(..).partition(|d| d.0 <= now);
                    due = later;
                    let mut report = BTreeMap::new();
                    for (_, name, hash) in ready {
                        let ms = wall_ms();
                        let status = ReplicaStatus {
                            phase: Phase::Running,
                            template_hash: hash,
                            started_at_ms: Some(ms),
                            ready: true,
                            observed_at_ms: ms,
                            ..ReplicaStatus::default()
                        };
                        state.statuses.insert(name.clone(), status.clone());
                        report.insert(name, status);
                    }
                    let n = report.len();
                    if let Err(e) = frame::write(&mut send, &AgentMsg::Status { statuses: report }).await {
                        break e.to_string();
                    }
                    let at = Instant::now();
                    self.stats.running.lock().unwrap_or_else(|e| e.into_inner()).extend(std::iter::repeat_n(at, n));
                }
                _ = heartbeat.tick(), if !connection_liveness => {
                    if let Err(e) = frame::write(&mut send, &AgentMsg::Heartbeat).await {
                        break e.to_string();
                    }
                }
                // Streams the hub opens (logs, upgrades): nothing to serve.
                stream = conn.accept_bi() => {
                    if let Err(e) = stream {
                        break e.to_string();
                    }
                }
            }
        };
        reader.abort();
        conn.close(0u32.into(), b"sim session ends");
        why
    }
}

/// What a simulated node keeps across its sessions.
#[derive(Default)]
struct Session {
    generation: u64,
    statuses: BTreeMap<String, ReplicaStatus>,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..1.0))
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// CPU time of the hub and of this process, from `/proc`.
struct Cpu {
    hub: Option<u32>,
}

struct CpuSample {
    hub: Option<u64>,
    sim: u64,
}

impl Cpu {
    fn new(hub: Option<u32>) -> Cpu {
        Cpu { hub }
    }

    fn sample(&self) -> CpuSample {
        CpuSample { hub: self.hub.and_then(|p| cpu_ticks(&p.to_string())), sim: cpu_ticks("self").unwrap_or(0) }
    }

    fn hub_rss(&self) -> Option<u64> {
        rss_of(&self.hub?.to_string())
    }
}

impl CpuSample {
    /// "hub X % of a core, simulator Y %" over `took`.
    fn since(&self, later: &CpuSample, took: Duration) -> String {
        // Clock ticks are USER_HZ, 100 per second on every Linux this runs on.
        let pct = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 100.0 / took.as_secs_f64() * 100.0;
        let sim = pct(self.sim, later.sim);
        match (self.hub, later.hub) {
            (Some(a), Some(b)) => format!("hub {:.1} % of a core, simulator {sim:.1} %", pct(a, b)),
            _ => format!("simulator {sim:.1} % of a core (no --hub-pid)"),
        }
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the state (field 3).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of a process, in bytes.
fn rss_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
