//! The hub's port as an attacker sees it: the real `flotilla hub` binary on loopback, real
//! agents beside it, and hostile peers driven from this process with quinn.
//!
//! - Strangers (no certificate) opening many streams and announcing huge join messages leave
//!   the hub's memory small, are capped per source address and in total, and do not keep a
//!   real agent from joining, nor a node that holds a certificate from reconnecting.
//! - Manifests built to stall the parser (deep nesting, alias expansion) are refused in
//!   milliseconds while the agents stay Ready.
//! - A node reporting status for replicas it does not hold costs the store nothing.
//! - A node outside the version window is closed with the reason, held back first.
//!
//! Attackers use source addresses 127.0.0.2 and up (all of 127/8 is loopback on Linux), so
//! the per-address caps can be told from the total ones. Run under the e2e lock:
//! `flock /tmp/flotilla-e2e.lock cargo test --test hostile_e2e`.

#[path = "support/api.rs"]
mod api;
#[path = "support/cluster.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cluster::Cluster;
use proto::messages::{AgentMsg, ApiRequest, ApiResponse, NodeFacts, ReplicaStatus};
use transport::{ALPN_AGENT, ALPN_JOIN, frame, tls};

const WAIT: Duration = Duration::from_secs(30);
/// The hub's close code for a join connection over its caps.
const CLOSE_BUSY: u32 = 0x429;
const MIB: u64 = 1024 * 1024;

/// Resident memory of process `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn token(c: &Cluster) -> proto::JoinToken {
    std::fs::read_to_string(c.token_path()).unwrap().trim().parse().unwrap()
}

/// A join connection from `source` (no client certificate), or the error of its handshake.
async fn stranger(c: &Cluster, source: IpAddr) -> Result<(quinn::Connection, quinn::Endpoint), quinn::ConnectionError> {
    let config = tls::client_config_pinned(&token(c).ca_fingerprint, ALPN_JOIN, &tls::Tuning::default()).unwrap();
    let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
    let hub: SocketAddr = c.hub_addr.parse().unwrap();
    let conn = endpoint.connect_with(config, hub, transport::HUB_SERVER_NAME).unwrap().await?;
    Ok((conn, endpoint))
}

/// Whether the hub closed `conn` with `code` within `within`.
async fn closed_with(conn: &quinn::Connection, code: u32, within: Duration) -> bool {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => close.error_code == quinn::VarInt::from_u32(code),
        _ => false,
    }
}

/// What one attacking connection managed.
#[derive(Debug, Default)]
struct Attack {
    bi_opened: usize,
    uni_opened: usize,
}

/// Opens 200 bidirectional and 200 unidirectional streams on `conn` (each given 20 ms to
/// open), announcing a 16 MiB join message on each and pushing bytes the hub never asked for.
/// Writers keep pushing on spawned tasks until the connection ends.
async fn attack(conn: quinn::Connection) -> Attack {
    let mut result = Attack::default();
    let header = (16u32 << 20).to_be_bytes();
    let push = |mut send: quinn::SendStream| {
        tokio::spawn(async move {
            let junk = vec![b'x'; 64 * 1024];
            if send.write_all(&header).await.is_err() {
                return;
            }
            while send.write_all(&junk).await.is_ok() {}
        })
    };
    for _ in 0..200 {
        if let Ok(Ok((send, _recv))) = tokio::time::timeout(Duration::from_millis(20), conn.open_bi()).await {
            result.bi_opened += 1;
            push(send);
        }
        if let Ok(Ok(send)) = tokio::time::timeout(Duration::from_millis(20), conn.open_uni()).await {
            result.uni_opened += 1;
            push(send);
        }
    }
    result
}

#[test]
fn strangers_cannot_exhaust_the_hub_and_agents_still_join() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Cluster::start();
    let hub_pid = c.hub.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let baseline = rss(hub_pid);

    // Twenty strangers from five addresses, four each.
    let attackers: Vec<_> = rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..20u8 {
            let (conn, endpoint) =
                stranger(&c, loopback(2 + i / 4)).await.expect("a stranger within the caps connects");
            conns.push((conn, endpoint));
        }
        conns
    });
    // A real agent joins while they attack.
    c.add_agent("edge-1", &["--containers", "off"]);
    let (results, peak) = rt.block_on(async {
        let sampling = tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..40 {
                peak = peak.max(rss(hub_pid));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        });
        let attacks = attackers.iter().map(|(conn, _)| tokio::spawn(attack(conn.clone()))).collect::<Vec<_>>();
        let mut results = Vec::new();
        for a in attacks {
            results.push(a.await.unwrap());
        }
        (results, sampling.await.unwrap())
    });
    eprintln!("hub rss: {} MiB before, {} MiB peak during the attack", baseline / MIB, peak / MIB);
    for r in &results {
        assert!(r.bi_opened <= 1, "a stranger opened {} bidirectional streams", r.bi_opened);
        assert_eq!(r.uni_opened, 0, "a stranger opened unidirectional streams");
    }
    assert!(peak < 100 * MIB, "hub rss reached {} MiB under attack", peak / MIB);
    // The announced 16 MiB join messages were refused: the hub closed every attacker.
    rt.block_on(async {
        for (conn, _) in &attackers {
            assert!(tokio::time::timeout(WAIT, conn.closed()).await.is_ok(), "an attacker is still connected");
        }
    });
    c.wait_for("edge-1 to join and be Ready during the attack", WAIT, || {
        c.nodes().iter().any(|n| n.name == "edge-1" && n.ready)
    });

    // A node with its certificate is no stranger: below, it reconnects while every join slot
    // is taken. It is stopped first, because slow joiners hold their slots only until the
    // hub's 10 s join timeout.
    c.agents[0].kill();
    c.wait_for("edge-1 to be NotReady", WAIT, || c.nodes().iter().any(|n| n.name == "edge-1" && !n.ready));

    // Slow joiners (a stream, then silence) hold join slots: four per address, then refused.
    let slow = |from: IpAddr| {
        let c = &c;
        async move {
            let (conn, endpoint) = stranger(c, from).await.ok()?;
            let (mut send, _recv) = conn.open_bi().await.ok()?;
            send.write_all(&[0, 0]).await.ok()?;
            Some((conn, endpoint, send))
        }
    };
    let mut held = Vec::new();
    let filling = Instant::now();
    rt.block_on(async {
        for _ in 0..4 {
            held.push(slow(loopback(40)).await.expect("a join within the per-address cap"));
        }
        let (over, _endpoint) = stranger(&c, loopback(40)).await.expect("the handshake itself is allowed");
        assert!(closed_with(&over, CLOSE_BUSY, WAIT).await, "a fifth join from one address was not refused");
        // Then the total: 64 join slots, from as many addresses as it takes.
        for addr in 41..56u8 {
            for _ in 0..4 {
                held.push(slow(loopback(addr)).await.expect("a join within the total cap"));
            }
        }
        let (over, _endpoint) = stranger(&c, loopback(61)).await.expect("the handshake itself is allowed");
        assert!(closed_with(&over, CLOSE_BUSY, WAIT).await, "a join past the total cap was not refused");
        let open = held.iter().filter(|(conn, _, _)| conn.close_reason().is_none()).count();
        assert_eq!(open, 64, "join slots held");
    });
    c.add_agent("edge-1", &["--containers", "off"]);
    c.wait_for("edge-1 to reconnect while the join slots are full", WAIT, || {
        c.nodes().iter().any(|n| n.name == "edge-1" && n.ready)
    });
    eprintln!("edge-1 reconnected {:?} after the join slots started filling", filling.elapsed());
    let open = held.iter().filter(|(conn, _, _)| conn.close_reason().is_none()).count();
    assert_eq!(open, 64, "the join slots were not all held while edge-1 reconnected");

    // Everything closes; the hub gives the memory back.
    let during = rss(hub_pid);
    drop(held);
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
    let after = rss(hub_pid);
    eprintln!("hub rss: {} MiB holding 64 joins, {} MiB after they closed", during / MIB, after / MIB);
    assert!(after < 100 * MIB, "hub rss {} MiB after the attack", after / MIB);
    assert!(after <= baseline + 30 * MIB, "hub kept {} MiB after the attack ended", (after - baseline) / MIB);
    // Slots came back: a new stranger may join again.
    rt.block_on(async {
        let (conn, _e) = stranger(&c, loopback(40)).await.unwrap();
        assert!(!closed_with(&conn, CLOSE_BUSY, Duration::from_millis(500)).await, "join slots were not released");
    });
}

fn ready_nodes(c: &Cluster) -> usize {
    c.nodes().iter().filter(|n| n.ready).count()
}

#[test]
fn manifests_built_to_stall_the_hub_are_refused_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Cluster::start();
    c.add_agent("edge-1", &["--containers", "off"]);
    c.add_agent("edge-2", &["--containers", "off"]);
    c.wait_for("both agents Ready", WAIT, || ready_nodes(&c) == 2);
    let hub_pid = c.hub.child.id();
    let baseline = rss(hub_pid);

    // Two 200 KB requests nested 100,000 deep, sent at once; the CLI would refuse them
    // locally, so they go straight to the API as a hostile client would send them.
    let deep = format!("apiVersion: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_map = format!("metadata: {}{}", "{a: ".repeat(50_000), "}".repeat(50_000));
    let took = rt.block_on(async {
        let api = api::Api::connect(&c.config_path()).await;
        let started = Instant::now();
        let (first, second) =
            (ApiRequest::Apply { source: deep.clone() }, ApiRequest::Apply { source: deep_map.clone() });
        let (a, b) = tokio::join!(api.call(&first), api.call(&second));
        let took = started.elapsed();
        for r in [a, b] {
            match r {
                ApiResponse::Error { message } => assert!(message.contains("invalid manifest"), "{message}"),
                other => panic!("a pathological manifest was not refused: {other:?}"),
            }
        }
        took
    });
    eprintln!("two 200 KB nesting requests refused in {took:?}");
    // Milliseconds in a release build; a debug build on a loaded machine takes a few hundred.
    // (serde_yaml took 30 s for the pair, and the hub stalled meanwhile.)
    assert!(took < Duration::from_secs(1), "refusing took {took:?}");

    // A 1 MiB file whose 512 KiB value is repeated by aliases: refused, and the hub's memory
    // does not grow by the expansion (the value is never built past 1.5 MiB).
    let big = "x".repeat(512 * 1024);
    let aliases = vec!["*v"; 1_000].join(", ");
    let bomb = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: bomb}}\nspec:\n  runtime: wasm\n  image: r/x:1\n  env: {{A: &v {big}}}\n  args: [{aliases}]\n"
    );
    rt.block_on(async {
        let api = api::Api::connect(&c.config_path()).await;
        match api.call(&ApiRequest::Apply { source: bomb }).await {
            ApiResponse::Error { message } => assert!(message.contains("invalid manifest"), "{message}"),
            other => panic!("an alias bomb was not refused: {other:?}"),
        }
    });
    let after = rss(hub_pid);
    eprintln!("hub rss {} MiB before, {} MiB after the alias bomb", baseline / MIB, after / MIB);
    assert!(after < baseline + 40 * MIB, "the alias bomb cost the hub {} MiB", (after - baseline) / MIB);

    // Both agents stayed connected throughout, and the hub still applies real manifests.
    assert_eq!(ready_nodes(&c), 2);
    let out = c.cli_with_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: fine}\nspec: {runtime: wasm, image: 127.0.0.1:1/none:1}\n"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn status_for_replicas_a_node_does_not_hold_is_ignored() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Cluster::start();
    // A node certificate, as a joined (and perhaps compromised) node holds.
    let hub = c.hub_dir();
    let ca = transport::pki::Ca::load(
        &std::fs::read_to_string(hub.join("tls/ca.pem")).unwrap(),
        &std::fs::read_to_string(hub.join("tls/ca.key")).unwrap(),
    )
    .unwrap();
    let creds = ca.issue_client("node:liar", Duration::from_secs(3600)).unwrap();
    let config =
        tls::client_config_mtls(ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &tls::Tuning::default())
            .unwrap();
    let invented = |n: usize| -> BTreeMap<String, ReplicaStatus> {
        (0..n).map(|i| (format!("invented-{i}"), ReplicaStatus::default())).collect()
    };
    let took = rt.block_on(async {
        let endpoint = tls::client_endpoint().unwrap();
        let conn = tls::connect(&endpoint, config, c.hub_addr.parse().unwrap()).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // A hostile node speaks a version the hub serves: the skew check is no defence here.
        let facts = NodeFacts { agent_version: proto::version::VERSION.into(), ..NodeFacts::default() };
        let hello = AgentMsg::Hello { facts, generation: 0, statuses: invented(20_000) };
        frame::write(&mut send, &hello).await.unwrap();
        for _ in 0..5 {
            frame::write(&mut send, &AgentMsg::Status { statuses: invented(20_000) }).await.unwrap();
        }
        // Store writes are not held up: an apply right behind the reports is answered at once.
        let api = api::Api::connect(&c.config_path()).await;
        let started = Instant::now();
        let answer = api
            .call(&ApiRequest::Apply {
                source: "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec: {runtime: wasm, image: r/w:1}\n"
                    .into(),
            })
            .await;
        assert!(matches!(answer, ApiResponse::Applied { .. }), "{answer:?}");
        let took = started.elapsed();
        drop(conn);
        took
    });
    eprintln!("apply answered {took:?} after 120,000 invented statuses");
    assert!(took < Duration::from_secs(2), "{took:?}");
    c.wait_for("the hub to log the ignored statuses", WAIT, || {
        c.hub.log_text().contains("status reported for replicas this node does not hold")
    });
}

#[test]
fn an_agent_outside_the_version_window_is_told_why_and_held_back() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Cluster::start();
    let hub = c.hub_dir();
    let ca = transport::pki::Ca::load(
        &std::fs::read_to_string(hub.join("tls/ca.pem")).unwrap(),
        &std::fs::read_to_string(hub.join("tls/ca.key")).unwrap(),
    )
    .unwrap();
    let creds = ca.issue_client("node:future", Duration::from_secs(3600)).unwrap();
    let config =
        tls::client_config_mtls(ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &tls::Tuning::default())
            .unwrap();
    let (held, reason) = rt.block_on(async {
        let endpoint = tls::client_endpoint().unwrap();
        let conn = tls::connect(&endpoint, config, c.hub_addr.parse().unwrap()).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let facts = NodeFacts { agent_version: "9.0.0".into(), ..NodeFacts::default() };
        let started = Instant::now();
        frame::write(&mut send, &AgentMsg::Hello { facts, generation: 0, statuses: BTreeMap::new() }).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await.expect("the hub closes it");
        (started.elapsed(), closed)
    });
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(proto::version::CLOSE_VERSION));
            let why = String::from_utf8_lossy(&close.reason);
            assert!(why.contains("agent 9.0.0 is too new for hub") && why.contains("upgrade the hub first"), "{why}");
        }
        other => panic!("closed with {other:?}"),
    }
    // Held before the close, so agents that retry at once cannot make a storm of handshakes.
    assert!(held >= Duration::from_secs(15), "closed after {held:?}");
    assert_eq!(c.hub.log_text().matches("agent session refused: version skew").count(), 1);
}
