//! The agent's link to the hub: join if needed, then hold one QUIC connection with mutual TLS,
//! reconnecting with capped exponential backoff and jitter. Over it the agent sends hello,
//! acknowledgements, status changes and (to hubs that want them) heartbeats on the control stream, receives assignment
//! sets, and answers the log streams the hub opens.
//!
//! The link never decides what runs: it forwards assignment sets to the agent's main loop and
//! reads what to report from watch channels the main loop publishes, so a dropped connection
//! loses nothing (the next hello carries the full state). It does check where a set comes
//! from, as it checks the hub's certificate: a set arrives whole or in pieces
//! ([`proto::pieces`]) and is put together here, and a set from a store this node does not
//! belong to ([`identity::StoreBinding`]) is refused and reported to the hub, never forwarded.
//! A hub that revoked this node's certificate closes with [`CLOSE_REVOKED`]: the link then
//! records it and gives up, instead of retrying a certificate that will never be accepted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oci_runtime::logline;
use proto::messages::{
    AgentMsg, AgentRequest, AssignmentSet, CLOSE_REVOKED, HubMsg, HubRequest, NodeFacts, RenewResponse, ReplicaStatus,
    StreamStart, UpgradeAnswer,
};
use proto::token::JoinToken;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use transport::{ALPN_AGENT, frame, pki, tls};

use crate::identity::{self, IdentityError};
use crate::logs::LogStore;

const HEARTBEAT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The back-off's cap while the hub answers but turns the handshake away: it is up and pacing
/// a storm of handshakes (see the hub's `guard`), so a retry costs it one small packet, and
/// retries frequent enough to be served soon after the storm matter more than quiet.
const BUSY_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How long a handshake waits for the hub's first answer before it is abandoned and tried
/// afresh. QUIC resends a first packet that got no answer after 1 s, then 3 s, then 7 s: a
/// link that comes back in that last gap would otherwise wait up to 4 s more to be noticed.
/// It covers the hub's pacing wait (2 s at most) and a slow round trip.
pub const FIRST_ANSWER: Duration = Duration::from_secs(5);

/// The link's delays between attempts: exponential, capped, with full jitter so a fleet that
/// lost its hub does not come back in lockstep. Pure: the jitter's random draw is passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// A session was made, or the network changed: the next failure starts over.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The delay before the next attempt, after one the hub `refused` (it answered, but would
    /// not start a handshake now) or that failed otherwise; `draw` in [0, 1) is the jitter.
    pub fn delay(&mut self, refused: bool, draw: f64) -> Duration {
        let cap = if refused { BUSY_BACKOFF_MAX } else { BACKOFF_MAX };
        let base = self.next.min(cap);
        self.next = (base * 2).min(cap);
        base.mul_f64(0.5 + draw.clamp(0.0, 1.0) / 2.0)
    }
}
/// How long a burst of network change events gets to settle before a reconnect.
const NETWORK_SETTLE: Duration = Duration::from_millis(200);
/// How long a certificate renewal over the session may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Link {
    /// Hub address HOST:PORT, or several separated by commas (hubs sharing one store): the
    /// link dials them in turn, moving to the next after each failed or lost connection.
    pub hub: String,
    pub token: Option<JoinToken>,
    pub node_name: String,
    pub identity_dir: PathBuf,
    pub facts: NodeFacts,
    pub tuning: tls::Tuning,
    pub logs: LogStore,
    /// Generation the agent has persisted.
    pub acked: watch::Receiver<u64>,
    /// Current status of every replica.
    pub statuses: watch::Receiver<BTreeMap<String, ReplicaStatus>>,
    /// Assignment sets from the hub, to the main loop.
    pub assignments: mpsc::Sender<AssignmentSet>,
    /// Connection state for observers (tests, the CLI's local status).
    pub connected: watch::Sender<bool>,
    /// Turns true when the agent stops: the link closes its connection cleanly, so the hub
    /// sees the node leave at once instead of after the idle timeout.
    pub shutdown: watch::Receiver<bool>,
    /// Counts local network changes (`netwatch`): while the link is down, a change means the
    /// network may be back, so the link retries at once instead of finishing its backoff.
    pub network: watch::Receiver<u64>,
    /// Upgrade orders from the hub, to the main loop.
    pub upgrades: mpsc::Sender<UpgradeCall>,
    /// The current connection while a session is up, for requests the agent makes of the
    /// hub on it (configs and secrets, see [`crate::delivery`]).
    pub session: watch::Sender<Option<quinn::Connection>>,
    /// Each replica's runtime, for the usage the hub asks for (`HubRequest::Usage`).
    pub runtimes: watch::Receiver<std::collections::HashMap<String, proto::manifest::Runtime>>,
    /// How `flotilla exec` reaches this node's containers (None: containers disabled).
    pub exec: Option<Arc<crate::exec::Target>>,
    /// What the Wasm replicas use, for the same.
    pub wasm_usage: crate::wasm_usage::WasmUsage,
}

/// An upgrade order from the hub, for the main loop, which answers through `reply` with the
/// answer and a sender the stream fires once the answer is on its way to the hub.
pub struct UpgradeCall {
    pub image: String,
    pub attempt: u64,
    pub deadline_ms: u64,
    pub reply: oneshot::Sender<(UpgradeAnswer, oneshot::Sender<()>)>,
}

/// Why the link gave up for good.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Fatal(#[from] IdentityError);

impl Link {
    /// Runs until shutdown (`None`) or a fatal error (the hub refused this node's join).
    pub async fn run(mut self) -> Option<Fatal> {
        let mut backoff = Backoff::default();
        let hubs: Vec<String> =
            self.hub.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect();
        let hubs = if hubs.is_empty() { vec![self.hub.clone()] } else { hubs };
        let mut turn = 0usize;
        // One TLS client config for as long as the identity is the same: it holds the session
        // tickets, so reconnects resume the TLS session instead of a full handshake.
        let mut tls_cache: Option<(String, quinn::ClientConfig)> = None;
        // Set when a hub refused the handshake because this node's certificate expired (by the
        // hub's clock, which may be ahead of this node's): the next attempt renews it first.
        let mut expired = false;
        loop {
            let hub = hubs[turn % hubs.len()].clone();
            turn = turn.wrapping_add(1);
            let mut refused = false;
            match self.session(&hub, &mut tls_cache, &mut expired).await {
                Ok(was_up) => {
                    if was_up {
                        backoff.reset();
                    }
                }
                Err(SessionError::Fatal(e)) => return Some(Fatal(e)),
                Err(SessionError::Transient(msg)) => warn!(%hub, error = %msg, "cannot reach the hub"),
                Err(SessionError::Busy(msg)) => {
                    refused = true;
                    info!(%hub, error = %msg, "the hub is busy; retrying soon");
                }
                Err(SessionError::NetworkChanged) => {
                    let _ = self.connected.send(false);
                    tokio::time::sleep(NETWORK_SETTLE).await;
                    info!(%hub, "local network changed during the handshake; reconnecting now");
                    backoff.reset();
                    // The same hub again: the change, not the hub, ended the attempt.
                    turn = turn.wrapping_sub(1);
                    continue;
                }
            }
            let _ = self.connected.send(false);
            self.session.send_replace(None);
            if *self.shutdown.borrow() {
                return None;
            }
            let delay = backoff.delay(refused, rand::rng().random_range(0.0..1.0));
            debug!(delay_ms = delay.as_millis() as u64, "reconnecting later");
            // Only changes from now on count: the one that cut the link is old news.
            self.network.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                Ok(()) = self.network.changed() => {
                    // Let the burst settle (link up, then addresses, then routes).
                    tokio::time::sleep(NETWORK_SETTLE).await;
                    info!("local network changed; reconnecting now");
                    backoff.reset();
                }
                _ = stopping(&mut self.shutdown) => return None,
            }
        }
    }

    /// One connection, from dial to loss. `Ok(true)` if the session was established.
    async fn session(
        &mut self,
        hub: &str,
        tls_cache: &mut Option<(String, quinn::ClientConfig)>,
        expired: &mut bool,
    ) -> Result<bool, SessionError> {
        let classify = |e: IdentityError| {
            if e.is_transient() { SessionError::Transient(e.to_string()) } else { SessionError::Fatal(e) }
        };
        let mut id =
            identity::load_or_join(&self.identity_dir, hub, self.token.as_ref(), &self.node_name, &self.tuning)
                .await
                .map_err(classify)?;
        let lapsed = pki::leaf_facts(&id.cert_pem).is_ok_and(|l| l.not_after <= std::time::SystemTime::now());
        if lapsed || *expired {
            // A node back from a long time offline: no session can be made with an expired
            // certificate, so renew it over the join protocol, within the hub's grace period.
            info!(%hub, "this node's certificate has expired; asking the hub to renew it");
            id = identity::renew_expired(&self.identity_dir, hub, &id, &self.node_name, &self.tuning)
                .await
                .map_err(|e| {
                    if let IdentityError::Expired(reason) = &e {
                        tracing::error!(%reason, "the hub will not renew this node's expired certificate; join again with a token");
                    }
                    classify(e)
                })?;
            *expired = false;
        }
        let addr = tls::resolve(hub).await.map_err(|e| SessionError::Transient(e.to_string()))?;
        let config = match tls_cache {
            Some((cert, config)) if *cert == id.cert_pem => config.clone(),
            _ => {
                let config = tls::client_config_mtls(&id.ca_pem, &id.cert_pem, &id.key_pem, ALPN_AGENT, &self.tuning)
                    .map_err(|e| SessionError::Fatal(IdentityError::Protocol(e.to_string())))?;
                *tls_cache = Some((id.cert_pem.clone(), config.clone()));
                config
            }
        };
        let endpoint = tls::link_endpoint().map_err(|e| SessionError::Transient(e.to_string()))?;
        self.network.borrow_and_update();
        let first_answer = FIRST_ANSWER.min(self.tuning.idle_timeout);
        let conn = tokio::select! {
            r = tls::connect_answered_within(&endpoint, config, addr, first_answer) => r.map_err(|e| {
                if e.is_refused() {
                    return SessionError::Busy(e.to_string());
                }
                let msg = e.to_string();
                // The hub's TLS refuses an expired client certificate with alert 45.
                if msg.contains("error 45") || msg.to_ascii_lowercase().contains("expired") {
                    *expired = true;
                }
                SessionError::Transient(msg)
            })?,
            Ok(()) = self.network.changed() => return Err(SessionError::NetworkChanged),
        };
        let result = self.established(hub, &conn, &endpoint, id).await;
        // However the session ended, a hub that revoked this certificate said so in its close.
        if let Some(reason) = revoked(&conn) {
            tracing::error!(%reason, "the hub revoked this node's certificate; not retrying");
            if let Err(e) = identity::mark_revoked(&self.identity_dir, &reason) {
                warn!(error = %e, "cannot record the revocation");
            }
            return Err(SessionError::Fatal(IdentityError::Revoked(reason)));
        }
        // A hub outside this agent's version window: keep running what is assigned, and retry
        // with a growing back-off (one side will be upgraded), not at once as after a session.
        if let Some(reason) = version_refused(&conn) {
            tracing::error!(%reason, "the hub does not serve this agent's version; workloads keep running");
            return Err(SessionError::Transient(format!("version skew: {reason}")));
        }
        result
    }

    /// A session over an established connection, from hello to loss.
    async fn established(
        &mut self,
        hub: &str,
        conn: &quinn::Connection,
        endpoint: &quinn::Endpoint,
        mut id: identity::Identity,
    ) -> Result<bool, SessionError> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| SessionError::Transient(e.to_string()))?;
        // The certificate is renewed over this session two thirds into its life.
        let mut renew_at = renewal_deadline(&id.cert_pem);
        let mut renewal: Option<tokio::task::JoinHandle<Result<String, RenewError>>> = None;

        let mut sent = self.statuses.borrow_and_update().clone();
        let mut acked = *self.acked.borrow_and_update();
        // Unless set (`--node-ip`), peers reach this node at the address its hub link leaves
        // from: on a site, the LAN address its default route uses.
        let node_ip = self
            .facts
            .node_ip
            .or_else(|| conn.local_ip().map(|ip| ip.to_canonical()))
            .or_else(|| source_address(conn.remote_address()));
        let facts = proto::messages::NodeFacts { clock_ms: Some(wall_ms()), node_ip, ..self.facts.clone() };
        let hello = AgentMsg::Hello { facts, generation: acked, statuses: sent.clone() };
        frame::write(&mut send, &hello).await.map_err(|e| SessionError::Transient(e.to_string()))?;
        info!(%hub, "connected to hub");
        let _ = self.connected.send(true);
        self.session.send_replace(Some(conn.clone()));

        // Reads happen on their own task: frame::read is not cancel-safe.
        let assignments = self.assignments.clone();
        let mut binding = identity::StoreBinding::load(&self.identity_dir);
        let (refused_tx, mut refused_rx) = mpsc::channel::<AgentMsg>(4);
        // Whether this session's hub wants heartbeats: yes until a set it sent says otherwise
        // (hubs that take liveness from the connection; see `AssignmentSet::connection_liveness`).
        let (liveness_tx, liveness_rx) = tokio::sync::watch::channel(false);
        let mut reader = tokio::spawn(async move {
            let mut pieces = proto::pieces::Assembler::default();
            loop {
                let set = match next_set(&mut recv, &mut pieces).await {
                    Ok(set) => set,
                    Err(end) => return end.to_string(),
                };
                liveness_tx.send_if_modified(|by_connection| {
                    let changed = *by_connection != set.connection_liveness;
                    *by_connection = set.connection_liveness;
                    changed
                });
                if let Err(foreign) = binding.check(&set.store) {
                    tracing::error!(generation = set.generation, reason = %foreign, "assignment set refused");
                    let report = AgentMsg::SetRefused { generation: set.generation, message: foreign.to_string() };
                    let _ = refused_tx.try_send(report);
                    continue;
                }
                if assignments.send(set).await.is_err() {
                    return "agent shutting down".to_string();
                }
            }
        });

        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let reason = loop {
            tokio::select! {
                _ = stopping(&mut self.shutdown) => {
                    reader.abort();
                    conn.close(0u32.into(), b"agent shutting down");
                    // Bounded: a dead link must not hold up the agent's exit.
                    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                    info!("disconnected from the hub: agent shutting down");
                    return Ok(true);
                }
                r = &mut reader => break r.unwrap_or_else(|e| e.to_string()),
                Some(report) = refused_rx.recv() => {
                    if let Err(e) = frame::write(&mut send, &report).await { break e.to_string() }
                }
                // To a hub that takes liveness from the connection, the QUIC keep-alives are
                // the sign of life.
                _ = heartbeat.tick(), if !*liveness_rx.borrow() => {
                    if let Err(e) = frame::write(&mut send, &AgentMsg::Heartbeat).await { break e.to_string() }
                }
                _ = tokio::time::sleep_until(renew_at.unwrap_or_else(far_future)), if renewal.is_none() && renew_at.is_some() => {
                    match identity::renewal_csr(&id, &self.node_name) {
                        Ok(csr_pem) => {
                            info!("renewing this node's certificate");
                            renewal = Some(tokio::spawn(request_renewal(conn.clone(), csr_pem)));
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot make a certificate renewal request");
                            renew_at = None;
                        }
                    }
                }
                done = async { renewal.as_mut().expect("guarded").await }, if renewal.is_some() => {
                    renewal = None;
                    let saved = done
                        .unwrap_or_else(|e| Err(RenewError::Task(e.to_string())))
                        .and_then(|cert_pem| Ok(identity::save_renewed(&self.identity_dir, &id, &cert_pem)?));
                    match saved {
                        Ok(renewed) => {
                            id = renewed;
                            renew_at = renewal_deadline(&id.cert_pem);
                        }
                        Err(e) => {
                            let retry = renewal_retry(&id.cert_pem);
                            warn!(error = %e, retry_ms = retry.as_millis() as u64, "certificate renewal failed; retrying");
                            renew_at = Some(tokio::time::Instant::now() + retry);
                        }
                    }
                }
                changed = self.acked.changed() => {
                    if changed.is_err() { break "agent shutting down".into() }
                    let g = *self.acked.borrow_and_update();
                    if g != acked {
                        acked = g;
                        if let Err(e) = frame::write(&mut send, &AgentMsg::Ack { generation: g }).await { break e.to_string() }
                    }
                }
                changed = self.statuses.changed() => {
                    if changed.is_err() { break "agent shutting down".into() }
                    let now = self.statuses.borrow_and_update().clone();
                    let delta: BTreeMap<String, ReplicaStatus> =
                        now.iter().filter(|(k, v)| sent.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
                    sent = now;
                    if !delta.is_empty()
                        && let Err(e) = frame::write(&mut send, &AgentMsg::Status { statuses: delta }).await
                    {
                        break e.to_string();
                    }
                }
                stream = conn.accept_bi() => match stream {
                    Ok((s, r)) => {
                        let usage = (self.node_name.clone(), self.runtimes.clone(), self.wasm_usage.clone());
                        let exec = self.exec.clone();
                        tokio::spawn(serve_stream(self.logs.clone(), self.upgrades.clone(), usage, exec, s, r));
                    }
                    Err(e) => break e.to_string(),
                },
            }
        };
        reader.abort();
        if let Some(r) = renewal {
            r.abort();
        }
        warn!(reason = %reason, "lost the hub connection");
        // A connection the hub closed keeps the hub's reason (quinn replaces it with
        // `LocallyClosed` on a local close), so the caller can still read a revocation.
        if conn.close_reason().is_none() {
            conn.close(0u32.into(), b"agent reconnecting");
        }
        Ok(true)
    }
}

/// Why the hub's control stream gave no more sets.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnd {
    #[error("malformed assignment set: {0}")]
    Malformed(#[from] proto::pieces::PieceError),
    #[error("hub refused the session: {0}")]
    Refused(String),
    #[error("hub closed the control stream")]
    Closed,
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
}

/// The next whole assignment set on the hub's control stream, its pieces put together. Used
/// by the link and by the fleet simulator (`flotilla sim`).
pub async fn next_set(
    recv: &mut quinn::RecvStream,
    pieces: &mut proto::pieces::Assembler,
) -> Result<AssignmentSet, ControlEnd> {
    loop {
        match frame::read::<HubMsg>(recv).await? {
            Some(HubMsg::Assign(set)) => return Ok(set),
            Some(HubMsg::AssignPart(part)) => {
                if let Some(set) = pieces.push(part)? {
                    return Ok(set);
                }
            }
            Some(HubMsg::Refused { message }) => return Err(ControlEnd::Refused(message)),
            None => return Err(ControlEnd::Closed),
        }
    }
}

/// When to renew the certificate `cert_pem` (two thirds into its life), on the monotonic
/// clock; `None` if it cannot be read.
fn renewal_deadline(cert_pem: &str) -> Option<tokio::time::Instant> {
    let leaf = pki::leaf_facts(cert_pem).ok()?;
    let wait = leaf.renew_after().duration_since(std::time::SystemTime::now()).unwrap_or_default();
    Some(tokio::time::Instant::now() + wait)
}

/// How long to wait before trying a failed renewal again: a tenth of what is left of the
/// certificate's life, from 1 s to 10 min.
fn renewal_retry(cert_pem: &str) -> Duration {
    let left = pki::leaf_facts(cert_pem)
        .ok()
        .and_then(|l| l.not_after.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or_default();
    (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Why a renewal over the session did not give this node a new certificate.
#[derive(Debug, thiserror::Error)]
enum RenewError {
    #[error(transparent)]
    Stream(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    #[error("the hub refused: {0}")]
    Refused(String),
    #[error("the hub closed the stream without answering")]
    NoAnswer,
    #[error("no answer from the hub (one too old to renew certificates?)")]
    TimedOut,
    #[error("the renewal task ended: {0}")]
    Task(String),
    #[error(transparent)]
    Save(#[from] IdentityError),
}

/// Asks the hub, over the session, to renew the certificate the session was made with.
/// Returns the new certificate (PEM) or why not.
async fn request_renewal(conn: quinn::Connection, csr_pem: String) -> Result<String, RenewError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        frame::write(&mut send, &AgentRequest::Renew { csr_pem }).await?;
        let _ = send.finish();
        match frame::read::<RenewResponse>(&mut recv).await? {
            Some(RenewResponse::Renewed { cert_pem }) => Ok(cert_pem),
            Some(RenewResponse::Refused { message }) => Err(RenewError::Refused(message)),
            None => Err(RenewError::NoAnswer),
        }
    };
    tokio::time::timeout(RENEW_TIMEOUT, exchange).await.unwrap_or(Err(RenewError::TimedOut))
}

/// The hub's reason when it closed `conn` because it revoked this node's certificate.
fn revoked(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(CLOSE_REVOKED) => {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// The hub's reason when it closed `conn` for this agent's version.
fn version_refused(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(proto::version::CLOSE_VERSION) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// Completes when `shutdown` turns true (the guard `wait_for` returns is not `Send`, so it is
/// dropped here rather than held in a select! arm).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

enum SessionError {
    Fatal(IdentityError),
    Transient(String),
    /// The hub answered and turned the handshake away (over its handshake rate): it is up.
    Busy(String),
    /// The local network changed while the handshake was in flight: it may have been sent
    /// from an address that no longer exists, so it is abandoned and retried at once.
    NetworkChanged,
}

/// A stream the hub opened: one request, then the answer.
async fn serve_stream(
    logs: LogStore,
    upgrades: mpsc::Sender<UpgradeCall>,
    (node, runtimes, wasm): (
        String,
        watch::Receiver<std::collections::HashMap<String, proto::manifest::Runtime>>,
        crate::wasm_usage::WasmUsage,
    ),
    exec: Option<Arc<crate::exec::Target>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match frame::read::<HubRequest>(&mut recv).await {
        Ok(Some(req)) => req,
        _ => return,
    };
    match req {
        HubRequest::Logs {
            replica,
            follow,
            tail_lines,
            attempt,
            workload,
            wait_ms,
            since_ms,
            timestamps,
            previous,
        } => {
            let which =
                LogRequest { replica, attempt, workload, follow, tail_lines, wait_ms, since_ms, timestamps, previous };
            if let Err(e) = stream_log(&logs, &mut send, &which).await {
                debug!(replica = %which.replica, error = %e, "log stream ended");
            }
        }
        HubRequest::Upgrade { image, attempt, deadline_ms } => {
            let (reply, answer) = oneshot::channel();
            let call = UpgradeCall { image, attempt, deadline_ms, reply };
            let (answer, delivered) = match upgrades.send(call).await {
                Ok(()) => answer.await.unwrap_or_else(|_| (stopping_answer(), oneshot::channel().0)),
                Err(_) => (stopping_answer(), oneshot::channel().0),
            };
            if frame::write(&mut send, &answer).await.is_ok() && send.finish().is_ok() {
                // The agent may restart next: the answer must reach the hub before the
                // connection closes.
                let _ = tokio::time::timeout(Duration::from_secs(3), send.stopped()).await;
            }
            let _ = delivered.send(());
        }
        HubRequest::Usage => {
            let runtimes = runtimes.borrow().clone();
            let report = crate::metrics::measure(&node, &runtimes, &wasm).await;
            if frame::write(&mut send, &report).await.is_ok() {
                let _ = send.finish();
            }
        }
        HubRequest::Exec(spec) => {
            let runtimes = runtimes.borrow().clone();
            crate::exec::serve(exec, &node, &runtimes, spec, send, recv).await;
        }
    }
}

fn stopping_answer() -> UpgradeAnswer {
    UpgradeAnswer::Refused { message: "the agent is stopping".into() }
}

/// A log the hub asked for.
struct LogRequest {
    replica: String,
    attempt: Option<u32>,
    workload: Option<String>,
    follow: bool,
    tail_lines: Option<u64>,
    wait_ms: u64,
    since_ms: Option<u64>,
    timestamps: bool,
    previous: bool,
}

/// How often a follower looks for new bytes, or for a log that does not exist yet.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The longest a follower waits for a log to appear, whatever the hub asks.
const MAX_LOG_WAIT_MS: u64 = 600_000;

async fn stream_log(
    logs: &LogStore,
    send: &mut quinn::SendStream,
    req: &LogRequest,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The previous run's log no longer grows: it is read once, not followed.
    let (replica, follow) = (req.replica.as_str(), req.follow && !req.previous);
    // The names come from the hub; they become a path, so they must be plain names.
    let path = match log_path(logs, req) {
        Ok(p) => p,
        Err(why) => {
            frame::write(send, &StreamStart::Error { message: why.to_string() }).await?;
            return Ok(());
        }
    };
    let what = match req.attempt {
        Some(n) => format!("attempt {n} of replica {replica}"),
        None => format!("replica {replica}"),
    };
    // The cutoff by this node's clock, the one that stamped the lines.
    let since_ns = req.since_ms.map(|ms| wall_ns().saturating_sub(ms.saturating_mul(1_000_000)));
    let mut decoder = logline::Decoder::new(req.timestamps, since_ns);
    let mut out = Vec::new();
    // Following a run that has not started yet: wait (bounded) for its first output.
    let wait = if follow { req.wait_ms.min(MAX_LOG_WAIT_MS) } else { 0 };
    let wait_until = tokio::time::Instant::now() + Duration::from_millis(wait);
    let mut file = loop {
        match tokio::fs::File::open(&path).await {
            Ok(f) => break f,
            Err(_) if tokio::time::Instant::now() < wait_until => {
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
                    _ = send.stopped() => return Ok(()),
                }
            }
            Err(_) if req.previous => {
                let message = format!("{what} has no previous run on this node (it has not restarted here)");
                frame::write(send, &StreamStart::Error { message }).await?;
                return Ok(());
            }
            Err(_) => {
                let message = format!("no logs yet for {what} on this node");
                frame::write(send, &StreamStart::Error { message }).await?;
                return Ok(());
            }
        }
    };
    frame::write(send, &StreamStart::Ok).await?;
    let mut pos = match req.tail_lines {
        Some(lines) => {
            let std_file = file.try_clone().await?.into_std().await;
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let len = std_file.metadata()?.len();
                logline::tail_offset(|off, buf| std_file.read_at(buf, off), len, lines)
            })
            .await??
        }
        None => 0,
    };
    file.seek(std::io::SeekFrom::Start(pos)).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n > 0 {
            // Records back to the workload's bytes (a record cut by this read waits for the
            // next one).
            decoder.push(&buf[..n], &mut out);
            send.write_all(&out).await?;
            out.clear();
            pos += n as u64;
            continue;
        }
        if !follow {
            decoder.finish(&mut out);
            send.write_all(&out).await?;
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            // The reader went away (the CLI stopped following).
            _ = send.stopped() => return Ok(()),
        }
        // Rotation: the file at `path` is new (shorter than what we read); start it over.
        if let Ok(meta) = tokio::fs::metadata(&path).await
            && meta.len() < pos
        {
            file = tokio::fs::File::open(&path).await?;
            pos = 0;
            decoder.restart();
        }
    }
    send.finish()?;
    Ok(())
}

/// Why a log request names no file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum BadLogRequest {
    #[error("invalid replica name {0:?}")]
    Replica(String),
    #[error("invalid workload name {0:?}")]
    Workload(String),
    #[error("a Job attempt's log needs its workload")]
    NoWorkload,
    #[error("a Job attempt runs once and has no previous run; see --attempt")]
    PreviousAttempt,
}

/// The file a log request names, or why it names none.
fn log_path(logs: &LogStore, req: &LogRequest) -> Result<PathBuf, BadLogRequest> {
    let valid = |name: &str| proto::manifest::validate_name(name).is_ok();
    if !valid(&req.replica) {
        return Err(BadLogRequest::Replica(req.replica.clone()));
    }
    match (req.attempt, req.workload.as_deref()) {
        (None, _) if req.previous => Ok(logs.prev_path(&req.replica)),
        (None, _) => Ok(logs.path(&req.replica)),
        (Some(_), _) if req.previous => Err(BadLogRequest::PreviousAttempt),
        (Some(n), Some(w)) if valid(w) => Ok(logs.attempt_path(w, &req.replica, n)),
        (Some(_), Some(w)) => Err(BadLogRequest::Workload(w.to_string())),
        (Some(_), None) => Err(BadLogRequest::NoWorkload),
    }
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The address this host's routes send packets to `to` from (a connected UDP socket's local
/// address: the kernel picks it, and nothing is sent). quinn knows the local address of a
/// connection only on its server side, so the agent asks the kernel.
fn source_address(to: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    // The endpoint's socket is dual-stack: an IPv4 hub's address comes IPv4-mapped.
    let to = std::net::SocketAddr::new(to.ip().to_canonical(), to.port());
    let any: std::net::SocketAddr = match to {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(to).ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_cap_and_a_busy_hub_keeps_it_short() {
        let mut b = Backoff::default();
        let lows: Vec<f64> = (0..8).map(|_| b.delay(false, 0.0).as_secs_f64()).collect();
        // Full jitter: half the step at the lowest draw, the whole step at the highest.
        assert_eq!(lows, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]);
        assert_eq!(b.delay(false, 1.0), BACKOFF_MAX);
        // A refusal caps it at once, however long the hub was unreachable before.
        assert_eq!(b.delay(true, 1.0), BUSY_BACKOFF_MAX);
        assert_eq!(b.delay(true, 1.0), BUSY_BACKOFF_MAX);
        b.reset();
        assert_eq!(b.delay(true, 1.0), BACKOFF_MIN);
        assert_eq!(b.delay(true, 0.5), BACKOFF_MIN * 2 * 3 / 4);
    }

    #[test]
    fn the_source_address_is_the_one_the_route_to_the_hub_leaves_from() {
        let lo = source_address("127.0.0.1:9".parse().unwrap());
        assert_eq!(lo, Some("127.0.0.1".parse().unwrap()));
        let mapped = source_address("[::ffff:127.0.0.1]:9".parse().unwrap());
        assert_eq!(mapped, Some("127.0.0.1".parse().unwrap()), "an IPv4 hub is reached from an IPv4 address");
    }

    #[test]
    fn a_log_request_names_the_current_previous_or_attempt_log() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path(), 1000).unwrap();
        let req = |replica: &str, attempt, previous| LogRequest {
            replica: replica.into(),
            attempt,
            workload: Some("j".into()),
            follow: false,
            tail_lines: None,
            wait_ms: 0,
            since_ms: None,
            timestamps: false,
            previous,
        };
        assert_eq!(log_path(&logs, &req("w-0", None, false)), Ok(logs.path("w-0")));
        assert_eq!(log_path(&logs, &req("w-0", None, true)), Ok(logs.prev_path("w-0")));
        assert_eq!(log_path(&logs, &req("j-0", Some(2), false)), Ok(logs.attempt_path("j", "j-0", 2)));
        assert_eq!(log_path(&logs, &req("j-0", Some(2), true)), Err(BadLogRequest::PreviousAttempt));
        assert_eq!(log_path(&logs, &req("../x", None, true)), Err(BadLogRequest::Replica("../x".into())));
    }
}
