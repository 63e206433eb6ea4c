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
//! connection statistics. Then, each when asked for, in this order:
//! - `--update`: apply a second manifest (a rolling update of the first) and time it until
//!   every replica runs the new template;
//! - `--drop-links N`: cut the links of N nodes at once (their packets are dropped both ways,
//!   as a cut cable would), time until the hub shows all N NotReady, restore the links after
//!   `--drop-for`, time until it shows them all Ready again;
//! - `--restart-hub CMD`: SIGKILL the hub (`--hub-pid`), start it again with CMD, and time
//!   until every node is connected and Ready, with the restarted hub's peak CPU and memory
//!   and the replicas the hub had started again (0 expected).
//!
//! Each node has a socket and an endpoint of its own, set up as an agent's link endpoint
//! ([`tls::link_endpoint_config`]), so the bytes are an agent's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Nodes sharing one source address (each with its own port).
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
    /// A manifest to apply after `--apply` has run everywhere, a new template of the same
    /// workload (e.g. a new image, with `strategy: {maxUnavailable: 10%}`): the simulator
    /// times the rolling update until every replica runs the new template.
    #[arg(long, requires = "apply")]
    update: Option<PathBuf>,
    /// Cut the links of this many nodes (spread over the fleet) at once, then restore them.
    #[arg(long, default_value_t = 0)]
    drop_links: u32,
    /// How long the links of `--drop-links` stay cut, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drop_for: Duration,
    /// SIGKILL the hub (`--hub-pid`) at the end and start it again with this shell command,
    /// which must `exec` the hub (its pid is then the one measured); the restarted hub is
    /// stopped when the simulator ends.
    #[arg(long, requires = "hub_pid")]
    restart_hub: Option<String>,
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
    /// Session handshakes the hub refused (over its handshake rate).
    refusals: AtomicU64,
    /// Bytes of connections that ended.
    closed_tx: AtomicU64,
    closed_rx: AtomicU64,
    /// Live connections, for their byte counts.
    live: Mutex<Vec<Option<quinn::Connection>>>,
    /// When each replica was first reported Running.
    running: Mutex<Vec<Instant>>,
    /// Replicas the hub asked a node to start (a new name, or a new template for one).
    starts: AtomicU64,
    /// When each node's latest session began.
    sessions_from: Mutex<Vec<Option<Instant>>>,
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

    /// Nodes connected in a session that began after `t`.
    fn connected_since(&self, t: Instant) -> u64 {
        let from = self.sessions_from.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        from.iter().zip(live.iter()).filter(|(f, l)| l.is_some() && f.is_some_and(|f| f > t)).count() as u64
    }

    fn running_count(&self) -> u64 {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
}

/// One simulated node.
struct Node {
    index: usize,
    name: String,
    /// The node's source address (its port chosen per endpoint).
    bind: SocketAddr,
    /// Set while the node's link is cut.
    cut: Arc<AtomicBool>,
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
    stats.sessions_from.lock().unwrap_or_else(|e| e.into_inner()).resize(args.agents as usize, None);
    let groups = args.agents.div_ceil(args.per_address);
    let cpu = Cpu::new(args.hub_pid);
    let started = Instant::now();
    println!(
        "sim: {} nodes from {} addresses starting at {}, {} per second",
        args.agents, groups, args.first_address, args.connect_rate
    );
    let pace = Duration::from_secs(1) / args.connect_rate;
    let mut cuts = Vec::with_capacity(args.agents as usize);
    for i in 0..args.agents as usize {
        let mut labels = BTreeMap::new();
        labels.insert("site".to_string(), format!("store-{}", i as u32 % args.sites.max(1)));
        let ip = Ipv4Addr::from(u32::from(args.first_address).wrapping_add(i as u32 / args.per_address));
        let cut = Arc::new(AtomicBool::new(false));
        cuts.push(cut.clone());
        let node = Node {
            index: i,
            name: format!("{}-{i}", args.name_prefix),
            bind: SocketAddr::new(IpAddr::V4(ip), 0),
            cut,
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
        apply_and_time("apply", manifest, &args, &stats, &cpu).await?;
    }
    if let Some(manifest) = &args.update {
        apply_and_time("rolling update", manifest, &args, &stats, &cpu).await?;
    }
    if args.drop_links > 0 {
        drop_links(&args, &cuts, &stats).await?;
    }
    if let Some(command) = &args.restart_hub {
        restart_hub(command, hub, &args, &stats).await?;
    }
    println!(
        "sim: done: {} joined, {} join failures, {} sessions lost, {} session handshakes refused",
        stats.joined.load(Ordering::Relaxed),
        stats.join_failures.load(Ordering::Relaxed),
        stats.session_losses.load(Ordering::Relaxed),
        stats.refusals.load(Ordering::Relaxed)
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

/// As the agent's link.
const HEARTBEAT: Duration = Duration::from_secs(5);

impl Node {
    async fn run(self) {
        let tuning = tls::Tuning::default();
        // The agent's retry policy, jitter and all.
        let mut backoff = agent::link::Backoff::default();
        let id = loop {
            // As the agent: a join has an endpoint of its own, each session another.
            let joined = match sim_endpoint(self.bind, quinn::EndpointConfig::default(), self.cut.clone()) {
                Ok(endpoint) => agent::identity::join_via(&endpoint, self.hub, &self.token, &self.name, &tuning).await,
                Err(e) => Err(agent::identity::IdentityError::Unreachable(e.to_string())),
            };
            match joined {
                Ok(id) => break id,
                Err(e) => {
                    self.stats.join_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = %self.name, error = %e, "join failed; retrying");
                    tokio::time::sleep(backoff.delay(false, rand::random())).await;
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
        backoff.reset();
        loop {
            let endpoint = match sim_endpoint(self.bind, tls::link_endpoint_config(), self.cut.clone()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(node = %self.name, error = %e, "no endpoint");
                    return;
                }
            };
            let mut refused = false;
            match tls::connect_answered_within(&endpoint, config.clone(), self.hub, agent::link::FIRST_ANSWER).await {
                Ok(conn) => {
                    backoff.reset();
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
                Err(e) => {
                    refused = e.is_refused();
                    if refused {
                        self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(node = %self.name, error = %e, "connect failed");
                }
            }
            tokio::time::sleep(backoff.delay(refused, rand::random())).await;
        }
    }

    fn slot(&self, conn: Option<quinn::Connection>) {
        if conn.is_some()
            && let Some(at) = self.stats.sessions_from.lock().unwrap_or_else(|e| e.into_inner()).get_mut(self.index)
        {
            *at = Some(Instant::now());
        }
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
        let why = loop {
            let next = state.due.iter().map(|d| d.0).min();
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
                    state.due.retain(|d| wanted.get(&d.1) == Some(&d.2));
                    for (name, hash) in wanted {
                        if state.statuses.get(&name).is_none_or(|s| s.template_hash != hash)
                            && !state.due.iter().any(|d| d.1 == name)
                        {
                            self.stats.starts.fetch_add(1, Ordering::Relaxed);
                            state.due.push((at, name, hash));
                        }
                    }
                    if let Err(e) = frame::write(&mut send, &AgentMsg::Ack { generation: state.generation }).await {
                        break e.to_string();
                    }
                }
                _ = sleep_until(next) => {
                    let now = tokio::time::Instant::now();
                    let (ready, later): (Vec<_>, Vec<_>) = state.due.drain(..).partition(|d| d.0 <= now);
                    state.due = later;
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
    /// Replicas to report Running, when, and their template.
    due: Vec<(tokio::time::Instant, String, String)>,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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

/// Applies `manifest` through the CLI and waits until every replica it assigns (or
/// `--expect-replicas`) is reported Running with its template; prints how long each took.
async fn apply_and_time(
    what: &str,
    manifest: &std::path::Path,
    args: &SimArgs,
    stats: &Stats,
    cpu: &Cpu,
) -> Result<()> {
    let config = args.config.as_ref().context("--apply needs --config")?;
    let expect = args.expect_replicas.unwrap_or(u64::from(args.agents));
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
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let applied = t0.elapsed();
    wait_for("running", args.wait, || stats.running_count(), expect, stats).await?;
    let mut times: Vec<Duration> = {
        let running = stats.running.lock().unwrap_or_else(|e| e.into_inner());
        running.iter().map(|t| t.saturating_duration_since(t0)).collect()
    };
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
    println!(
        "sim: {what} answered in {:.2}s; {} replicas reported Running: p50 {:.2}s, p99 {:.2}s, last {:.2}s after the apply (run delay {:?})",
        applied.as_secs_f64(),
        times.len(),
        pct(0.50).as_secs_f64(),
        pct(0.99).as_secs_f64(),
        pct(1.0).as_secs_f64(),
        args.run_delay
    );
    let took = t0.elapsed();
    println!("sim: CPU from the {what} to the last Running: {}", cpu0.since(&cpu.sample(), took));
    if let Some(rss) = cpu.hub_rss() {
        println!("sim: hub RSS {} MiB", rss >> 20);
    }
    Ok(())
}

/// How often the hub's view of the nodes is asked for while a phase waits on it.
const VIEW_POLL: Duration = Duration::from_millis(500);

/// The hub's view of the nodes, through its client API with the admin config.
struct HubView {
    config: PathBuf,
    client: Option<crate::client::Client>,
}

impl HubView {
    fn new(args: &SimArgs) -> Result<HubView> {
        let config = args.config.clone().context("--drop-links and --restart-hub need --config")?;
        Ok(HubView { config, client: None })
    }

    /// Names of the nodes the hub shows Ready, or None if it cannot be asked right now.
    async fn ready(&mut self) -> Option<std::collections::HashSet<String>> {
        if self.client.is_none() {
            let target = crate::client::Target { config: Some(&self.config), context: None };
            self.client = crate::client::Client::connect(target).await.ok();
        }
        let req = proto::messages::ApiRequest::Get { kind: proto::messages::ResourceKind::Node };
        match self.client.as_ref()?.request(&req).await {
            Ok(proto::messages::ApiResponse::Nodes { items }) => {
                Some(items.into_iter().filter(|n| n.ready).map(|n| n.name).collect())
            }
            Ok(other) => {
                tracing::warn!(answer = ?other, "unexpected answer to a node list");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "node list failed; reconnecting");
                self.client = None;
                None
            }
        }
    }

    /// Waits until `done(ready nodes)` holds; how long that took from `since`.
    async fn until(
        &mut self,
        what: &str,
        since: Instant,
        limit: Duration,
        mut done: impl FnMut(&std::collections::HashSet<String>) -> bool,
    ) -> Result<Duration> {
        let mut next_report = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(ready) = self.ready().await
                && done(&ready)
            {
                return Ok(since.elapsed());
            }
            if since.elapsed() > limit {
                bail!("{what}: not within {limit:?}");
            }
            if Instant::now() >= next_report {
                println!("sim: waiting: {what} ({:.0}s)", since.elapsed().as_secs_f64());
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(VIEW_POLL).await;
        }
    }
}

/// Cuts the links of `--drop-links` nodes spread over the fleet, waits for the hub to show
/// them NotReady (and the others still Ready), restores them after `--drop-for` and waits for
/// the hub to show them Ready again.
async fn drop_links(args: &SimArgs, cuts: &[Arc<AtomicBool>], stats: &Stats) -> Result<()> {
    let all = cuts.len();
    let n = (args.drop_links as usize).min(all);
    let chosen: Vec<usize> = (0..n).map(|k| k * all / n).collect();
    let names: std::collections::HashSet<String> = chosen.iter().map(|i| format!("{}-{i}", args.name_prefix)).collect();
    let mut view = HubView::new(args)?;
    let losses0 = stats.session_losses.load(Ordering::Relaxed);
    println!("sim: cutting the links of {n} nodes for {:?}", args.drop_for);
    let cut_at = Instant::now();
    for &i in &chosen {
        cuts[i].store(true, Ordering::Relaxed);
    }
    let mut others_lost = 0usize;
    let not_ready = view
        .until("the cut nodes NotReady", cut_at, args.wait, |ready| {
            others_lost = others_lost.max(all - n - ready.iter().filter(|r| !names.contains(*r)).count());
            ready.iter().all(|r| !names.contains(r))
        })
        .await?;
    println!(
        "sim: all {n} cut nodes NotReady at the hub {:.1}s after the cut ({} other nodes not Ready at worst)",
        not_ready.as_secs_f64(),
        others_lost
    );
    tokio::time::sleep_until((cut_at + args.drop_for).into()).await;
    let back_at = Instant::now();
    for &i in &chosen {
        cuts[i].store(false, Ordering::Relaxed);
    }
    let ready = view.until("the cut nodes Ready again", back_at, args.wait, |ready| names.is_subset(ready)).await?;
    println!(
        "sim: all {n} nodes Ready again {:.1}s after their links came back ({} sessions ended meanwhile)",
        ready.as_secs_f64(),
        stats.session_losses.load(Ordering::Relaxed) - losses0
    );
    Ok(())
}

/// SIGKILLs the hub, starts it again with `command`, and times the reconnect storm: every
/// node connected, every node Ready at the hub, the restarted hub's CPU and memory (peak of
/// one-second samples, and the mean), and the replicas the hub asked nodes to start again.
async fn restart_hub(command: &str, hub_addr: SocketAddr, args: &SimArgs, stats: &Stats) -> Result<()> {
    let old = args.hub_pid.context("--restart-hub needs --hub-pid")?;
    let all = args.agents as usize;
    let starts0 = stats.starts.load(Ordering::Relaxed);
    let refusals0 = stats.refusals.load(Ordering::Relaxed);
    let mut view = HubView::new(args)?;
    let killed = std::process::Command::new("kill").args(["-KILL", &old.to_string()]).status()?;
    if !killed.success() {
        bail!("kill -KILL {old} failed");
    }
    let t0 = Instant::now();
    // The old process must have closed its socket before the new one binds. Its main thread
    // shows as a zombie before the last of its threads has closed the process's files, so
    // what is waited for is the port itself.
    while std::net::UdpSocket::bind(hub_addr).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the killed hub's port {hub_addr} is still in use after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut hub = tokio::process::Command::new("sh").args(["-c", command]).kill_on_drop(true).spawn()?;
    let pid = hub.id().context("the restarted hub exited at once")?;
    println!("sim: hub {old} SIGKILLed; restarted as {pid}");
    let peaks = Arc::new(Mutex::new((0.0f64, 0u64)));
    let sampler = {
        let peaks = peaks.clone();
        tokio::spawn(async move {
            let cpu = Cpu::new(Some(pid));
            let (mut last, mut at) = (cpu.sample(), Instant::now());
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = cpu.sample();
                // Ticks are hundredths of a second: per second of wall time, a percentage of
                // a core (the sleep may run long when the simulator is busy).
                let secs = at.elapsed().as_secs_f64().max(0.001);
                at = Instant::now();
                let pct = match (last.hub, now.hub) {
                    (Some(a), Some(b)) => b.saturating_sub(a) as f64 / secs,
                    _ => 0.0,
                };
                let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
                p.0 = p.0.max(pct);
                p.1 = p.1.max(cpu.hub_rss().unwrap_or(0));
                last = now;
            }
        })
    };
    let cpu = Cpu::new(Some(pid));
    let cpu0 = cpu.sample();
    let storm = async {
        wait_for("reconnected", args.wait, || stats.connected_since(t0), all as u64, stats).await?;
        let connected = t0.elapsed();
        let ready = view.until("every node Ready", t0, args.wait, |ready| ready.len() >= all).await?;
        Ok::<_, anyhow::Error>((connected, ready))
    };
    let result = tokio::select! {
        r = storm => r,
        status = hub.wait() => Err(anyhow::anyhow!("the restarted hub exited: {status:?}")),
    };
    sampler.abort();
    let (connected, ready) = result?;
    let (peak_cpu, peak_rss) = *peaks.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "sim: hub restart: all {all} reconnected {:.1}s and Ready {:.1}s after the SIGKILL; {} replicas started again; {} handshakes refused meanwhile",
        connected.as_secs_f64(),
        ready.as_secs_f64(),
        stats.starts.load(Ordering::Relaxed) - starts0,
        stats.refusals.load(Ordering::Relaxed) - refusals0
    );
    println!(
        "sim: restarted hub: CPU {} until all Ready, peak {peak_cpu:.0} % of a core in a second; peak RSS {} MiB",
        cpu0.since(&cpu.sample(), ready),
        peak_rss >> 20
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(hub);
    Ok(())
}

/// A simulated node's endpoint for a join or a session (`config`: an agent's link endpoint
/// for sessions) on `bind`, its socket wrapped so the link can be cut (`cut` set) and restored.
fn sim_endpoint(bind: SocketAddr, config: quinn::EndpointConfig, cut: Arc<AtomicBool>) -> Result<quinn::Endpoint> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    let same = socket.try_clone()?;
    let inner = runtime.wrap_udp_socket(socket)?;
    // quinn turns UDP GRO on; off again, since the wrapper receives one datagram at a time.
    nix::sys::socket::setsockopt(&same, nix::sys::socket::sockopt::UdpGroSegment, &false)?;
    let socket = Arc::new(Cuttable { inner, cut });
    Ok(quinn::Endpoint::new_with_abstract_socket(config, None, socket, runtime)?)
}

/// A UDP socket whose datagrams, both ways, are dropped while `cut` is set: a link cut
/// between the node and the hub, with nothing said to either.
#[derive(Debug)]
struct Cuttable {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    cut: Arc<AtomicBool>,
}

impl quinn::AsyncUdpSocket for Cuttable {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        if self.cut.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                std::task::Poll::Ready(Ok(_)) if self.cut.load(Ordering::Relaxed) => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    /// One datagram per receive (GRO is off on the socket), not the 64 of UDP GRO: quinn sizes
    /// an endpoint's receive buffer by this (1,472 bytes × segments × a batch of 32), and at
    /// 64 ten thousand simulated nodes' buffers alone would take 30 GB. What goes on the wire
    /// is the same.
    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
