//! The hub's I/O shell: the QUIC endpoint, one task per connection, the controller loop, and
//! the registry of connected agents.
//!
//! Several hubs may share one PostgreSQL store. Every hub serves agents and the API; only the
//! holder of the controller lease ([`crate::leader`]) runs [`reconcile`], and its placement
//! writes are fenced by that lease. Each hub records in the store which nodes it holds
//! sessions for, and on a shared store polls the nodes' generations (every
//! `CLUSTER_POLL`): a node whose generation moved gets its session woken here, whichever hub
//! wrote it, and nodes connected to other hubs count as ready while their heartbeats are
//! fresh. Polling, not LISTEN/NOTIFY: it needs no dedicated connection, survives store
//! reconnects without re-subscribing, and costs one small query per half second.
//!
//! The controller runs [`reconcile`] on every trigger (an apply, a status, a session that
//! starts or ends), at least every `RESYNC_PERIOD`, and at the next failover deadline or Job
//! retry the scheduler's snapshot implies, so failover needs no outside event.
//!
//! Who may do what is decided here, per ALPN: the join ALPN needs the token's secret, the agent
//! ALPN a `node:<name>` certificate, the API ALPN an `admin:<name>` certificate. A peer that
//! fails is refused with a reason and logged; every other connection keeps being served.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::messages::{AgentMsg, HubMsg, JoinRequest, JoinResponse};
use quinn::VarInt;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::pki::Ca;
use transport::{ALPN_AGENT, ALPN_API, ALPN_JOIN, frame, tls};

use crate::bootstrap::{self, BootstrapError};
use crate::leader::{self, LeaderConfig};
use crate::rollout;
use crate::scheduler::{self, Placement, SchedNode, SchedWorkload};
use crate::store::{Fence, NodeRow, Store, StoreError};
use crate::{HubConfig, now_ms};

/// Application close codes the hub sends.
pub const CLOSE_UNAUTHORIZED: u32 = 0x401;
pub const CLOSE_REPLACED: u32 = 0x409;
pub const CLOSE_PROTOCOL: u32 = 0x400;
/// The node's certificate is revoked (the node was deleted, or a re-join replaced it). The
/// agent stops retrying and says it must join again.
pub const CLOSE_REVOKED: u32 = proto::messages::CLOSE_REVOKED;
/// A join connection over the hub's caps for strangers (see [`crate::guard`]).
pub const CLOSE_BUSY: u32 = 0x429;

const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const HANDSHAKE_MSG_TIMEOUT: Duration = Duration::from_secs(10);
/// The controller re-runs at least this often even without triggers (level-triggered safety).
const RESYNC_PERIOD: Duration = Duration::from_secs(5);
/// Wait past a failover deadline before the pass that acts on it (clock granularity).
const FAILOVER_SLACK: Duration = Duration::from_millis(20);
/// First retry delay after a failed reconcile pass; doubles up to `RESYNC_PERIOD`.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// How often a hub on a shared store looks for generations other hubs wrote.
const CLUSTER_POLL: Duration = Duration::from_millis(500);
/// A node whose session another hub holds counts as connected while its last heartbeat is
/// younger than this (three agent heartbeats). Compares hub clocks: keep them in NTP sync.
const REMOTE_STALE_MS: u64 = 15_000;
/// The cluster-wide record of the CA and join token on a shared store.
const IDENTITY_SECRET: &str = "cluster-identity";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up the QUIC endpoint: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cluster identity: {0}")]
    Identity(String),
}

/// A connected agent.
struct Session {
    id: u64,
    conn: quinn::Connection,
    /// Woken when the node's assignment set may have changed.
    wake: Arc<Notify>,
}

pub(crate) struct Shared {
    pub(crate) store: Store,
    /// This hub's name in leases and node sessions.
    hub_id: String,
    /// True while this hub holds the controller lease.
    leader: watch::Receiver<bool>,
    /// Nodes whose agent session another hub holds (shared stores only). std Mutex: map
    /// operations only.
    remote_connected: Mutex<std::collections::HashSet<String>>,
    pub(crate) ca: Ca,
    /// std Mutex: held only for map operations, never across an await.
    sessions: Mutex<HashMap<String, Session>>,
    next_session: AtomicU64,
    reconcile: Notify,
    /// When this hub started (ms since the epoch): no node counts as NotReady from earlier.
    started_ms: u64,
    /// The scheduler's warnings of the last pass, so each is logged once. std Mutex: map
    /// operations only.
    warned: Mutex<std::collections::HashSet<String>>,
    /// Each workload's rollout progress, for the progress deadline. std Mutex: map
    /// operations only. A new leader starts with none, which only delays a rollback.
    rollouts: Mutex<HashMap<String, rollout::Progress>>,
}

impl Shared {
    /// Whether the node's agent is connected to this hub or, on a shared store, to another.
    pub(crate) fn is_connected(&self, node: &str) -> bool {
        self.sessions.lock().unwrap().contains_key(node) || self.remote_connected.lock().unwrap().contains(node)
    }

    pub(crate) fn connection(&self, node: &str) -> Option<quinn::Connection> {
        self.sessions.lock().unwrap().get(node).map(|s| s.conn.clone())
    }

    pub(crate) fn trigger_reconcile(&self) {
        self.reconcile.notify_one();
    }

    pub(crate) fn wake_nodes<'a>(&self, nodes: impl IntoIterator<Item = &'a String>) {
        let sessions = self.sessions.lock().unwrap();
        for n in nodes {
            if let Some(s) = sessions.get(n) {
                s.wake.notify_one();
            }
        }
    }
}

/// A running hub.
pub struct Hub {
    endpoint: quinn::Endpoint,
    /// Who may connect, how many and how fast.
    gate: Arc<crate::guard::Gate>,
    shared: Arc<Shared>,
    election: tokio::task::JoinHandle<()>,
    admin_config: std::path::PathBuf,
    token: String,
}

impl Hub {
    /// Loads or creates the hub's state and starts listening. Returns once the endpoint is
    /// bound; [`Hub::run`] serves.
    pub async fn start(config: HubConfig) -> Result<Hub, HubError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| BootstrapError::Io {
            action: "create",
            path: config.data_dir.clone(),
            source,
        })?;
        let advertise = config.advertise.clone().unwrap_or_else(|| {
            let mut a = config.listen;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.to_string()
        });
        let mut names = config.tls_names.clone();
        if let Some(host) = advertise.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_string()) {
            names.push(host);
        }
        let store = Store::connect(&config.datastore, &config.data_dir).await?;
        if store.is_shared() {
            share_identity(&store, &config.data_dir).await?;
        }
        let identity = bootstrap::load_or_create(&config.data_dir, &advertise, &names)?;
        // The cluster token keeps working for new names, as the token `cluster`; once revoked it
        // stays revoked (the row is kept).
        store
            .ensure_token(
                &crate::store::NewToken {
                    id: crate::tokens::CLUSTER_TOKEN_ID.into(),
                    secret_sha256: crate::tokens::secret_sha256(&identity.token.secret),
                    expires_at_ms: None,
                    max_uses: None,
                    name_pattern: "*".into(),
                    labels: Default::default(),
                },
                now_ms(),
            )
            .await?;
        let hub_id = hub_id(&config.data_dir)?;
        let (leader, election) = leader::spawn(store.clone(), LeaderConfig::controller(hub_id.clone()));
        let server_config = tls::server_config(
            &identity.server.cert_pem,
            &identity.server.key_pem,
            identity.ca.cert_pem(),
            &tls::Tuning::with_idle_timeout(config.node_grace),
        )?;
        // Stateless resets keyed by the CA key: this hub, restarted, or another hub sharing the
        // identity tells agents at once that a connection they still hold is gone.
        let reset_secret = identity.ca.key_pem();
        let endpoint = tls::server_endpoint(server_config, config.listen, Some(reset_secret.as_bytes()))?;
        info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), data_dir = %config.data_dir.display(), store = store.backend_name(), hub = %hub_id, "hub listening");
        Ok(Hub {
            endpoint,
            gate: crate::guard::Gate::new(config.limits.clone()),
            token: identity.token.to_string(),
            admin_config: identity.admin_config_path,
            election,
            shared: Arc::new(Shared {
                store,
                hub_id,
                leader,
                remote_connected: Mutex::new(Default::default()),
                ca: identity.ca,
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                reconcile: Notify::new(),
                started_ms: now_ms(),
                warned: Mutex::new(Default::default()),
                rollouts: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The node join token (secret: print it only where the operator asked for it).
    pub fn join_token(&self) -> &str {
        &self.token
    }

    pub fn admin_config_path(&self) -> &std::path::Path {
        &self.admin_config
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), HubError> {
        let controller = tokio::spawn(controller_loop(self.shared.clone()));
        let watcher = self.shared.store.is_shared().then(|| tokio::spawn(watch_cluster(self.shared.clone())));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Refused or retried here, before any handshake work, when over a cap.
                    let Some((incoming, permit)) = self.gate.admit(incoming) else { continue };
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => handle_connection(shared, conn, permit).instrument(info_span!("conn", %remote)).await,
                            Err(e) => debug!(%remote, error = %e, "handshake failed"),
                        }
                    });
                }
            }
        }
        controller.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        // A clean stop hands the lease over at once instead of after its TTL.
        self.election.abort();
        if let Err(e) = self.shared.store.release_lease(leader::CONTROLLER_LEASE, &self.shared.hub_id).await {
            warn!(error = %e, "cannot release the controller lease");
        }
        self.endpoint.close(VarInt::from_u32(0), b"hub shutting down");
        self.endpoint.wait_idle().await;
        Ok(())
    }
}

/// Serves one connection until it ends; `permit` holds its place at the gate meanwhile.
async fn handle_connection(shared: Arc<Shared>, conn: quinn::Connection, mut permit: crate::guard::Permit) {
    let alpn = tls::negotiated_alpn(&conn).unwrap_or_default();
    let cn = tls::peer_common_name(&conn);
    permit.handshake_done();
    if alpn == ALPN_JOIN {
        if let Err(why) = permit.join() {
            warn!(reason = %why, "join connection refused");
            conn.close(VarInt::from_u32(CLOSE_BUSY), why.to_string().as_bytes());
            return;
        }
        join(shared, conn).await;
    } else if alpn == ALPN_AGENT {
        match cn.as_deref().and_then(|cn| cn.strip_prefix("node:")) {
            Some(node) => {
                let node = node.to_string();
                permit.authenticated(&conn, transport::limits::Session::Agent);
                agent_session(shared, conn, node.clone()).instrument(info_span!("agent", %node)).await
            }
            None => {
                warn!(peer = ?cn, "agent connection without a node certificate refused");
                conn.close(
                    VarInt::from_u32(CLOSE_UNAUTHORIZED),
                    b"a node certificate is required; join with a token first",
                );
            }
        }
    } else if alpn == ALPN_API {
        match cn.as_deref() {
            Some(cn) if cn.starts_with("admin:") => {
                permit.authenticated(&conn, transport::limits::Session::Api);
                crate::api::serve(shared, conn).await
            }
            _ => {
                warn!(peer = ?cn, "API connection without the admin credential refused");
                conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"the admin credential is required");
            }
        }
    } else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"unknown protocol");
    }
}

// ---------------------------------------------------------------------------------------------
// Join

async fn join(shared: Arc<Shared>, conn: quinn::Connection) {
    let result = tokio::time::timeout(HANDSHAKE_MSG_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        // A stranger's frame: small, and never allocated before it arrives.
        let req: JoinRequest = match frame::read_within(&mut recv, proto::codec::MAX_UNAUTHENTICATED_FRAME).await {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, "malformed join request");
                return None;
            }
        };
        // No answer (a store error): the agent retries later, as when the hub is unreachable.
        let response = decide_join(&shared, &req).await?;
        let _ = frame::write(&mut send, &response).await;
        let _ = send.finish();
        Some(())
    })
    .await;
    if matches!(result, Ok(Some(()))) {
        // Let the agent read the answer and close; bounded so a silent peer costs nothing.
        let _ = tokio::time::timeout(HANDSHAKE_MSG_TIMEOUT, conn.closed()).await;
    } else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"join request expected");
    }
}

/// A join: the token's secret, the name and the hub's rules ([`crate::tokens::admit`]) are
/// checked before the hub signs anything, then again under the store's write lock, which
/// counts the token's use and records the node's certificate. `None` when the store cannot
/// be reached (the agent retries).
async fn decide_join(shared: &Shared, req: &JoinRequest) -> Option<JoinResponse> {
    let name = &req.node_name;
    let refuse = |message: String| {
        warn!(node = %name, reason = %message, "join refused");
        Some(JoinResponse::Refused { message })
    };
    let secret = crate::tokens::secret_sha256(&req.secret);
    let store_failed = |e: StoreError| {
        warn!(node = %name, error = %e, "join not answered: store error");
        None
    };
    // Before signing: strangers without a valid token cost no signature.
    match shared.store.admit_node(&secret, name, None, now_ms()).await {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => {
            if matches!(refusal, crate::tokens::JoinRefusal::NodeExists { .. }) {
                warn!(node = %name, "a join under an existing node's name was refused: its identity is not for the taking");
            }
            return refuse(refusal.to_string());
        }
        Err(e) => return store_failed(e),
    }
    let cert_pem = match shared.ca.sign_csr(&req.csr_pem, &format!("node:{name}"), NODE_CERT_VALIDITY) {
        Ok(cert) => cert,
        Err(e) => return refuse(format!("invalid certificate signing request: {e}")),
    };
    let Ok(fingerprint) = transport::pki::fingerprint_pem(&cert_pem) else {
        return refuse("the hub could not read the certificate it signed".into());
    };
    match shared.store.admit_node(&secret, name, Some(&fingerprint), now_ms()).await {
        Ok(Ok(admitted)) => {
            info!(node = %name, token = %admitted.token, rejoin = admitted.admit == crate::tokens::Admit::Rejoin, "node joined");
            // A re-join revoked the node's previous certificate: a session holding it ends.
            shared.wake_nodes([name]);
            Some(JoinResponse::Accepted { cert_pem, ca_pem: shared.ca.cert_pem().to_string() })
        }
        Ok(Err(refusal)) => refuse(refusal.to_string()),
        Err(e) => store_failed(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Agent sessions

/// `statuses` limited to the replicas in `held`, with a warning for the rest.
fn held_statuses(
    statuses: BTreeMap<String, proto::messages::ReplicaStatus>,
    held: &BTreeSet<String>,
) -> BTreeMap<String, proto::messages::ReplicaStatus> {
    let (kept, dropped) = crate::guard::held_statuses(statuses, held);
    if dropped > 0 {
        warn!(dropped, kept = kept.len(), "status reported for replicas this node does not hold; ignored");
    }
    kept
}

/// The agent's clock minus the hub's: its hello was stamped about half a round trip before
/// the hub read it.
fn clock_skew_ms(agent_ms: u64, hub_ms: u64, rtt: Duration) -> i64 {
    let sent_at_hub = hub_ms as i128 - (rtt.as_millis() / 2) as i128;
    (agent_ms as i128 - sent_at_hub).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

async fn agent_session(shared: Arc<Shared>, conn: quinn::Connection, node: String) {
    // Only the node's current, unrevoked certificate speaks for it (see `crate::identity`).
    let Some(cert) = tls::peer_fingerprint(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"a node certificate is required");
        return;
    };
    match shared.store.certificate_verdict(&node, &cert).await {
        Ok(v) if v.admits() => {}
        Ok(v) => return refuse_certificate(&conn, &node, v),
        Err(e) => {
            warn!(error = %e, "cannot check the node's certificate");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hub store error");
            return;
        }
    }
    let opened = tokio::time::timeout(HANDSHAKE_MSG_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        match frame::read::<AgentMsg>(&mut recv).await {
            Ok(Some(AgentMsg::Hello { facts, generation, statuses })) => {
                Some((send, recv, facts, generation, statuses))
            }
            other => {
                warn!(?other, "agent session did not start with hello");
                None
            }
        }
    })
    .await;
    let Ok(Some((mut send, recv, mut facts, generation, statuses))) = opened else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hello expected on the control stream");
        return;
    };
    let now = now_ms();
    facts.clock_skew_ms = facts.clock_ms.map(|agent| clock_skew_ms(agent, now, conn.rtt()));
    info!(agent_generation = generation, replicas = statuses.len(), skew_ms = ?facts.clock_skew_ms, "agent connected");
    if let Some(skew) = facts.clock_skew_ms.filter(|s| s.abs() > proto::messages::CLOCK_SKEW_WARN_MS) {
        warn!(
            skew_ms = skew,
            "the node's clock is off; it keeps working (timers are monotonic), but its timestamps are skewed"
        );
    }
    match shared.store.check_in(&node, &cert, &facts, now).await {
        Ok((_, Some(row))) => {
            // What the hub will not take from the agent's claims, said once per session.
            for notice in &row.notices {
                warn!(notice = %notice, "node claim not taken");
            }
            // A store restored from an older backup is behind the agent: its next set must
            // not look like a replay of one the agent has.
            if generation > row.generation {
                info!(
                    agent_generation = generation,
                    store_generation = row.generation,
                    "the agent is ahead of the store; raising its generation"
                );
                if let Err(e) = shared.store.raise_generation(&node, generation).await {
                    warn!(error = %e, "cannot raise the node's generation");
                }
            }
        }
        Ok((v, _)) => return refuse_certificate(&conn, &node, v),
        Err(e) => {
            warn!(error = %e, "cannot record node");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hub store error");
            return;
        }
    }
    // Only statuses of replicas the node holds are recorded (see `guard::held_statuses`).
    let mut held: BTreeSet<String> = match shared.store.assignment_set(&node).await {
        Ok(set) => set.assignments.into_iter().map(|a| a.name).collect(),
        Err(e) => {
            warn!(error = %e, "cannot load assignment set");
            BTreeSet::new()
        }
    };
    let statuses = held_statuses(statuses, &held);
    if let Err(e) = shared.store.record_statuses(&node, &statuses).await {
        warn!(error = %e, "cannot record statuses");
    }
    if let Err(e) = shared.store.set_node_session(&node, &shared.hub_id, true, now).await {
        warn!(error = %e, "cannot record the node's session");
    }

    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let wake = Arc::new(Notify::new());
    let old =
        shared.sessions.lock().unwrap().insert(node.clone(), Session { id, conn: conn.clone(), wake: wake.clone() });
    if let Some(old) = old {
        old.conn.close(VarInt::from_u32(CLOSE_REPLACED), b"replaced by a newer session of the same node");
    }
    shared.trigger_reconcile();

    // Frames are read on their own task: `frame::read` is not cancel-safe, so it must not sit
    // in a select! beside the wake-up.
    let (tx, mut rx) = mpsc::channel::<AgentMsg>(64);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        loop {
            match frame::read::<AgentMsg>(&mut recv).await {
                Ok(Some(msg)) => {
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Also how a normal disconnect ends the stream.
                    debug!(error = %e, "control stream ended");
                    break;
                }
            }
        }
    });

    let mut sent_generation: Option<u64> = None;
    // The set this hub could not send, so the failure is logged once and cleared when it goes.
    let mut unsendable: Option<u64> = None;
    let mut revoked = None;
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            // A delete or a re-join revokes the certificate this session holds.
            match shared.store.certificate_verdict(&node, &cert).await {
                Ok(v) if !v.admits() => {
                    revoked = Some(v);
                    break;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot check the node's certificate"),
            }
            match shared.store.assignment_set(&node).await {
                Ok(set) if Some(set.generation) != sent_generation => {
                    let generation = set.generation;
                    let names = set.assignments.iter().map(|a| a.name.clone()).collect();
                    match send_set(&mut send, &set).await {
                        Ok(()) => {
                            held = names;
                            sent_generation = Some(generation);
                            if unsendable.take().is_some() {
                                let _ = shared.store.set_node_problem(&node, "").await;
                            }
                        }
                        Err(SendError::Stream(_)) => break,
                        Err(SendError::Pieces(e)) => {
                            if unsendable != Some(generation) {
                                let problem = format!("assignment set generation {generation} cannot be sent: {e}");
                                tracing::error!(generation, error = %e, "assignment set cannot be sent; the node keeps its previous set");
                                let _ = shared.store.set_node_problem(&node, &problem).await;
                                unsendable = Some(generation);
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot load assignment set"),
            }
        }
        tokio::select! {
            _ = wake.notified() => dirty = true,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let msg = match msg {
                    AgentMsg::Status { statuses } => AgentMsg::Status { statuses: held_statuses(statuses, &held) },
                    other => other,
                };
                if !handle_agent_msg(&shared, &node, &cert, msg).await {
                    // The node is gone or holds another certificate now (another hub's
                    // delete or re-join): check at once.
                    dirty = true;
                }
            }
        }
    }
    if let Some(verdict) = revoked {
        fence_revoked(&conn, &mut send, &mut rx, &node, verdict, shared.store.id()).await;
    }
    reader.abort();
    let ended = {
        let mut sessions = shared.sessions.lock().unwrap();
        let ours = sessions.get(&node).is_some_and(|s| s.id == id);
        if ours {
            sessions.remove(&node);
            info!("agent disconnected");
        }
        ours
    };
    if ended {
        let _ = shared.store.set_node_session(&node, &shared.hub_id, false, now_ms()).await;
        // Starts the node's failover clocks (see `sched_node`).
        shared.trigger_reconcile();
    } else {
        let _ = shared.store.touch_node(&node, now_ms()).await;
    }
}

/// Ends a connection whose certificate may not speak for `node`, with the reason.
fn refuse_certificate(conn: &quinn::Connection, node: &str, verdict: crate::identity::CertVerdict) {
    let reason = verdict.reason(node);
    warn!(reason = %reason, "agent connection with a revoked certificate refused");
    conn.close(VarInt::from_u32(CLOSE_REVOKED), reason.as_bytes());
}

/// How long a revoked node's agent gets to take its empty set before the connection closes.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// A session whose certificate was revoked while it ran: its agent is told to stop what it
/// runs (an empty set; its replicas are placed elsewhere), given a few seconds to persist it,
/// then the connection closes with the reason.
async fn fence_revoked(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<AgentMsg>,
    node: &str,
    verdict: crate::identity::CertVerdict,
    store: &str,
) {
    let empty = proto::messages::AssignmentSet { generation: 0, store: store.to_string(), assignments: Vec::new() };
    if send_set(send, &empty).await.is_ok() {
        let _ = tokio::time::timeout(FENCE_TIMEOUT, async {
            while let Some(msg) = rx.recv().await {
                if matches!(msg, AgentMsg::Ack { generation: 0 }) {
                    break;
                }
            }
        })
        .await;
    }
    refuse_certificate(conn, node, verdict);
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Pieces(#[from] proto::pieces::PieceError),
    #[error(transparent)]
    Stream(#[from] frame::FrameError),
}

/// Sends a set: whole when it fits one piece, else in pieces (see [`proto::pieces`]), so no
/// set outgrows a frame.
async fn send_set(send: &mut quinn::SendStream, set: &proto::messages::AssignmentSet) -> Result<(), SendError> {
    let parts = proto::pieces::split(set)?;
    debug!(
        generation = set.generation,
        assignments = set.assignments.len(),
        pieces = parts.len(),
        "sending assignment set"
    );
    if parts.len() == 1 {
        frame::write(send, &HubMsg::Assign(set.clone())).await?;
        return Ok(());
    }
    for part in parts {
        frame::write(send, &HubMsg::AssignPart(part)).await?;
    }
    Ok(())
}

/// Records one message of a node's session. False when the node's record says this session
/// must be checked again (its heartbeat found the node gone or under another certificate).
async fn handle_agent_msg(shared: &Shared, node: &str, cert: &str, msg: AgentMsg) -> bool {
    let mut current = true;
    let result = match msg {
        AgentMsg::Ack { generation } => shared.store.ack_generation(node, generation).await,
        AgentMsg::Status { statuses } => {
            let r = shared.store.record_statuses(node, &statuses).await.map(|_| ());
            // A replica that became ready (or stopped being) may let a rollout advance.
            shared.trigger_reconcile();
            r
        }
        AgentMsg::Heartbeat => shared.store.touch_node_as(node, cert, now_ms()).await.map(|ok| current = ok),
        AgentMsg::SetRefused { generation, message } => {
            tracing::error!(generation, reason = %message, "the node refused its assignment set and keeps running what it has");
            shared
                .store
                .set_node_problem(node, &format!("refused assignment set generation {generation}: {message}"))
                .await
        }
        AgentMsg::Hello { .. } => {
            warn!("duplicate hello ignored");
            Ok(())
        }
    };
    if let Err(e) = result {
        warn!(error = %e, "cannot record agent message");
    }
    current
}

// ---------------------------------------------------------------------------------------------
// Controller

async fn controller_loop(shared: Arc<Shared>) {
    let mut failures = 0u32;
    let mut leader = shared.leader.clone();
    loop {
        if !*leader.borrow_and_update() {
            debug!("not the leader; controllers idle");
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        // A failed pass is retried soon with backoff, not at the next periodic resync.
        let wait = match reconcile(&shared).await {
            Ok(deadline) => {
                failures = 0;
                // A failover deadline is met to within a few ms, not at the next resync.
                deadline.map_or(RESYNC_PERIOD, |d| (d + FAILOVER_SLACK).min(RESYNC_PERIOD))
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, failures, "reconcile failed; retrying");
                (RETRY_MIN * 2u32.saturating_pow(failures - 1)).min(RESYNC_PERIOD)
            }
        };
        tokio::select! {
            _ = shared.reconcile.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = leader.changed() => {}
        }
    }
}

/// On a shared store: wakes this hub's sessions whose node generation another hub moved,
/// keeps the set of nodes connected to other hubs, and asks for a reconcile when workloads or
/// that set changed (an apply served by another hub, a node that moved).
async fn watch_cluster(shared: Arc<Shared>) {
    let mut generations: HashMap<String, u64> = HashMap::new();
    let mut revisions = BTreeMap::new();
    loop {
        match shared.store.nodes().await {
            Ok(nodes) => {
                let moved: Vec<String> = nodes
                    .iter()
                    .filter(|n| generations.insert(n.name.clone(), n.generation) != Some(n.generation))
                    .map(|n| n.name.clone())
                    .collect();
                shared.wake_nodes(&moved);
                let remote = remote_connected(&shared.hub_id, &nodes, now_ms());
                let changed = {
                    let mut current = shared.remote_connected.lock().unwrap();
                    let changed = *current != remote;
                    *current = remote;
                    changed
                };
                if changed {
                    shared.trigger_reconcile();
                }
            }
            Err(e) => warn!(error = %e, "cannot poll node generations"),
        }
        match shared.store.workload_revisions().await {
            Ok(r) if r != revisions => {
                revisions = r;
                shared.trigger_reconcile();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot poll workload revisions"),
        }
        tokio::time::sleep(CLUSTER_POLL).await;
    }
}

/// Nodes whose session another hub holds, with a heartbeat younger than `REMOTE_STALE_MS`.
fn remote_connected(hub_id: &str, nodes: &[NodeRow], now_ms: u64) -> std::collections::HashSet<String> {
    nodes
        .iter()
        .filter(|n| n.connected_via.as_deref().is_some_and(|h| h != hub_id))
        .filter(|n| n.last_seen_ms.is_some_and(|seen| now_ms.saturating_sub(seen) < REMOTE_STALE_MS))
        .map(|n| n.name.clone())
        .collect()
}

/// This hub's stable name: made once per data dir (so a restarted hub renews its own lease at
/// once) and unique across data dirs. One hub process per data dir.
fn hub_id(data_dir: &std::path::Path) -> Result<String, HubError> {
    let path = data_dir.join("hub-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let mut bytes = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let id = format!("hub-{}", hex::encode(bytes));
    bootstrap::write_private(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// The CA and join token as shared through the store.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedIdentity {
    ca_cert_pem: String,
    ca_key_pem: String,
    token: String,
}

/// On a shared store every hub must have the same CA and join token, so agents trust and join
/// any of them. The first hub stores its own (or new ones) in the store; every hub then writes
/// the stored ones into its data dir, where [`bootstrap::load_or_create`] loads them. A data
/// dir that already has a different CA is refused rather than silently replaced.
async fn share_identity(store: &Store, data_dir: &std::path::Path) -> Result<(), HubError> {
    let tls_dir = data_dir.join("tls");
    std::fs::create_dir_all(&tls_dir).map_err(|source| BootstrapError::Io {
        action: "create",
        path: tls_dir.clone(),
        source,
    })?;
    let (ca_cert, ca_key, token_path) = (tls_dir.join("ca.pem"), tls_dir.join("ca.key"), data_dir.join("token"));
    let local = match (
        std::fs::read_to_string(&ca_cert),
        std::fs::read_to_string(&ca_key),
        std::fs::read_to_string(&token_path),
    ) {
        (Ok(cert), Ok(key), Ok(token)) => {
            Some(SharedIdentity { ca_cert_pem: cert, ca_key_pem: key, token: token.trim().to_string() })
        }
        _ => None,
    };
    let candidate = match &local {
        Some(l) => SharedIdentity {
            ca_cert_pem: l.ca_cert_pem.clone(),
            ca_key_pem: l.ca_key_pem.clone(),
            token: l.token.clone(),
        },
        None => {
            let ca = Ca::generate("flotilla cluster CA")
                .map_err(|source| BootstrapError::Pki { path: ca_cert.clone(), source })?;
            let mut secret = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
            let token = proto::token::JoinToken { ca_fingerprint: ca.fingerprint(), secret: hex::encode(secret) };
            SharedIdentity {
                ca_cert_pem: ca.cert_pem().to_string(),
                ca_key_pem: ca.key_pem().to_string(),
                token: token.to_string(),
            }
        }
    };
    let candidate_json = serde_json::to_string(&candidate).expect("identity serializes");
    let stored = store.get_or_insert_secret(IDENTITY_SECRET, &candidate_json).await?;
    let stored: SharedIdentity = serde_json::from_str(&stored)
        .map_err(|e| HubError::Identity(format!("the store's {IDENTITY_SECRET} record is unreadable: {e}")))?;
    if let Some(l) = &local {
        if l.ca_cert_pem != stored.ca_cert_pem {
            return Err(HubError::Identity(format!(
                "{} holds a different cluster CA than the shared store; move the data dir's tls/ and token aside to join this cluster",
                data_dir.display()
            )));
        }
        if l.token == stored.token {
            return Ok(());
        }
    }
    bootstrap::write_private(&ca_key, stored.ca_key_pem.as_bytes())?;
    bootstrap::write_private(&ca_cert, stored.ca_cert_pem.as_bytes())?;
    bootstrap::write_private(&token_path, format!("{}\n", stored.token).as_bytes())?;
    info!("cluster identity loaded from the shared store");
    Ok(())
}

/// Built-in labels every node carries, usable in node selectors.
pub(crate) fn node_labels(name: &str, facts: &proto::messages::NodeFacts) -> BTreeMap<String, String> {
    let mut labels = facts.labels.clone();
    labels.insert("flotilla.dev/node".into(), name.to_string());
    labels.insert("flotilla.dev/os".into(), facts.os.clone());
    labels.insert("flotilla.dev/arch".into(), facts.arch.clone());
    labels
}

/// Replicas that keep their old template this pass: each workload's rolling update advances
/// only as its updated replicas become available (see [`rollout`]).
/// What the rollouts want this pass.
struct Rollouts {
    /// Replicas that keep their old template.
    hold: BTreeSet<String>,
    /// Workloads whose rollout made no progress within `strategy.progressDeadline`: the
    /// caller rolls them back.
    stalled: Vec<String>,
    /// Extra replicas each workload runs during its rollout (`maxSurge`).
    surge: HashMap<String, u32>,
}

fn rollout_holds(
    shared: &Shared,
    workloads: &[crate::store::WorkloadRow],
    templates: &BTreeMap<String, proto::manifest::ReplicaTemplate>,
    replicas: &[crate::store::ReplicaRow],
    now: u64,
) -> Rollouts {
    let mut hold = BTreeSet::new();
    let mut stalled = Vec::new();
    let mut surge = HashMap::new();
    let mut progress = shared.rollouts.lock().unwrap();
    progress.retain(|name, _| workloads.iter().any(|w| &w.manifest.metadata.name == name));
    for w in workloads {
        let name = &w.manifest.metadata.name;
        // A Job's attempts run to their end; a template change reaches the next attempts.
        if w.manifest.spec.kind == proto::manifest::WorkloadKind::Job {
            continue;
        }
        let Some(current) = templates.get(name).map(|t| t.hash()) else { continue };
        let members: Vec<rollout::RolloutReplica> = replicas
            .iter()
            .filter(|r| &r.workload == name)
            .map(|r| rollout::RolloutReplica {
                name: r.name.clone(),
                index: r.index,
                template_hash: r.template_hash.clone(),
                available: crate::api::is_available(shared, r),
            })
            .collect();
        let limits = rollout_limits(&w.manifest, members.len() as u32);
        let desired = limits.desired;
        let plan = rollout::plan(&current, &members, limits);
        if plan.surge > 0 {
            surge.insert(name.clone(), plan.surge);
        }
        let deadline = w.manifest.spec.strategy.progress_deadline_ms();
        let (p, verdict) = rollout::track(progress.get(name), &current, &plan, desired, now, deadline);
        progress.insert(name.clone(), p);
        if verdict == rollout::Verdict::Stalled {
            stalled.push(name.clone());
        }
        hold.extend(plan.held);
    }
    Rollouts { hold, stalled, surge }
}

/// A workload's rollout limits. An EveryNode workload wants as many replicas as it has (one
/// per matching node), so its batches are a quarter of those by default, never all at once.
fn rollout_limits(m: &proto::manifest::Manifest, current_replicas: u32) -> rollout::Limits {
    let replicated = m.spec.kind == proto::manifest::WorkloadKind::Replicated;
    let desired = if replicated { m.spec.replicas() } else { current_replicas };
    let strategy = &m.spec.strategy;
    rollout::Limits {
        desired,
        max_unavailable: strategy.max_unavailable(desired),
        max_surge: if replicated { strategy.max_surge.unwrap_or(0) } else { 0 },
    }
}

/// Rolls back a workload whose rollout stopped progressing, unless its current template is
/// itself a rollback (no ping-pong between two bad templates) or there is nothing to go back
/// to. Either way the rollout is not looked at again until its template changes.
async fn roll_back_stalled(shared: &Shared, name: &str, now: u64) -> Result<(), StoreError> {
    let deadline = {
        let mut progress = shared.rollouts.lock().unwrap();
        let Some(p) = progress.get_mut(name) else { return Ok(()) };
        p.done = true;
        now.saturating_sub(p.since_ms)
    };
    let revisions = shared.store.revisions(name).await?;
    let Some(w) = shared.store.workload(name).await? else {
        return Ok(());
    };
    let current = w.manifest.template().hash();
    if revisions.iter().rev().find(|r| r.template_hash == current).is_some_and(|r| r.cause.starts_with("rollback")) {
        warn!(workload = %name, "rollout made no progress, and its template is already a rollback: left as it is");
        return Ok(());
    }
    let cause = format!("rollback: template {current} made no progress in {}s", deadline / 1000);
    match crate::revisions::rollback(&shared.store, name, None, &cause, now).await? {
        Ok((to, _)) => {
            warn!(workload = %name, to_revision = to, "rollout made no progress within its deadline; rolled back");
            shared.trigger_reconcile();
        }
        Err(why) => {
            warn!(workload = %name, reason = %why, "rollout made no progress within its deadline; cannot roll back")
        }
    }
    Ok(())
}

/// A Job's progress: the outcomes the store recorded, and which indexes have an attempt on a
/// node now.
pub(crate) fn job_progress(
    workload: &str,
    recorded: &[crate::store::JobIndexRow],
    replicas: &[crate::store::ReplicaRow],
) -> scheduler::JobProgress {
    let mut progress = scheduler::JobProgress::default();
    for r in recorded.iter().filter(|r| r.workload == workload) {
        progress.indexes.insert(
            r.index,
            scheduler::IndexOutcome {
                succeeded: r.succeeded,
                failures: r.failures,
                running: false,
                last_failure_ms: r.last_failure_ms,
            },
        );
    }
    for r in replicas.iter().filter(|r| r.workload == workload && r.node.is_some()) {
        progress.indexes.entry(r.index).or_default().running = true;
    }
    progress
}

/// The scheduler's form of a manifest's `spec.job`.
pub(crate) fn job_spec(m: &proto::manifest::Manifest) -> scheduler::JobSpec {
    let j = m.spec.job.unwrap_or_default();
    scheduler::JobSpec {
        completions: j.completions(),
        parallelism: j.parallelism(),
        backoff_limit: j.backoff_limit(),
        ..Default::default()
    }
}

/// What the scheduler needs of a manifest: everything but the replica template. A Job's
/// progress is filled in by the caller.
pub(crate) fn sched_workload(m: &proto::manifest::Manifest) -> SchedWorkload {
    use proto::manifest as pm;
    let s = &m.spec;
    let effect = |e: pm::TaintEffect| match e {
        pm::TaintEffect::NoSchedule => scheduler::TaintEffect::NoSchedule,
        pm::TaintEffect::NoExecute => scheduler::TaintEffect::NoExecute,
    };
    let (cpu_millis, memory_bytes) = s.resources.requests.as_ref().map(|r| r.parsed()).unwrap_or_default();
    SchedWorkload {
        name: m.metadata.name.clone(),
        replicas: s.replicas(),
        runtime: s.runtime,
        node_selector: s.node_selector.clone(),
        host_ports: s.http.iter().map(|h| h.port).collect(),
        kind: match s.kind {
            pm::WorkloadKind::Replicated => scheduler::WorkloadKind::Replicated,
            pm::WorkloadKind::EveryNode => scheduler::WorkloadKind::EveryNode,
            pm::WorkloadKind::Job => scheduler::WorkloadKind::Job(job_spec(m)),
        },
        os: s.os.clone(),
        arch: s.arch.clone(),
        match_expressions: s
            .node_affinity
            .iter()
            .map(|r| scheduler::SelectorRequirement {
                key: r.key.clone(),
                operator: match r.operator {
                    pm::SelectorOperator::In => scheduler::SelectorOperator::In,
                    pm::SelectorOperator::NotIn => scheduler::SelectorOperator::NotIn,
                    pm::SelectorOperator::Exists => scheduler::SelectorOperator::Exists,
                    pm::SelectorOperator::DoesNotExist => scheduler::SelectorOperator::DoesNotExist,
                },
                values: r.values.clone(),
            })
            .collect(),
        tolerations: s
            .tolerations
            .iter()
            .map(|t| scheduler::Toleration {
                key: t.key.clone(),
                operator: match t.operator {
                    pm::TolerationOperator::Equal => scheduler::TolerationOperator::Equal,
                    pm::TolerationOperator::Exists => scheduler::TolerationOperator::Exists,
                },
                value: t.value.clone(),
                effect: t.effect.map(effect),
            })
            .collect(),
        requests: scheduler::Resources { cpu_millis, memory_bytes },
        spread_by: s.spread_by.clone(),
        packing: match s.packing {
            pm::Packing::LeastAllocated => scheduler::Packing::LeastAllocated,
            pm::Packing::BinPack => scheduler::Packing::BinPack,
        },
        failover: match s.failover.after_ms() {
            None => scheduler::Failover::Never,
            Some(ms) => scheduler::Failover::After(ms),
        },
        // A drain moves replicas one way only (no surge): it needs room for one at least.
        max_unavailable: s.strategy.max_unavailable(s.replicas()).max(1),
        job_progress: Default::default(),
    }
}

/// The scheduler's view of a node. A node that is not connected has been NotReady since its
/// last sign of life (`last_seen_ms`: the end of its session on this hub, else its last
/// heartbeat), but never since before this hub started: a hub that was down did not see its
/// nodes, so failover deadlines count from its start, giving agents time to reconnect.
fn sched_node(shared: &Shared, n: &NodeRow) -> SchedNode {
    let ready = shared.is_connected(&n.name);
    let unknown_is_unlimited = |v: u64| if v == 0 { u64::MAX } else { v };
    SchedNode {
        name: n.name.clone(),
        ready,
        runtimes: n.facts.runtimes.clone(),
        labels: node_labels(&n.name, &n.facts),
        taints: n
            .facts
            .taints
            .iter()
            .map(|t| scheduler::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: match t.effect {
                    proto::manifest::TaintEffect::NoSchedule => scheduler::TaintEffect::NoSchedule,
                    proto::manifest::TaintEffect::NoExecute => scheduler::TaintEffect::NoExecute,
                },
            })
            .collect(),
        cordoned: n.cordoned || n.draining,
        draining: n.draining,
        allocatable: (n.facts.cpus > 0 || n.facts.memory_bytes > 0).then(|| scheduler::Resources {
            cpu_millis: unknown_is_unlimited(u64::from(n.facts.cpus) * 1000),
            memory_bytes: unknown_is_unlimited(n.facts.memory_bytes),
        }),
        not_ready_since_ms: (!ready).then(|| n.last_seen_ms.unwrap_or(n.joined_at_ms).max(shared.started_ms)),
    }
}

/// How long until the next failover deadline (a NotReady node holding a replica whose
/// workload fails over), so the controller wakes for it rather than at the next resync.
fn next_failover(
    nodes: &[SchedNode],
    workloads: &[SchedWorkload],
    replicas: &[crate::store::ReplicaRow],
    now_ms: u64,
) -> Option<Duration> {
    let since: HashMap<&str, u64> =
        nodes.iter().filter_map(|n| Some((n.name.as_str(), n.not_ready_since_ms?))).collect();
    let after: HashMap<&str, u64> = workloads
        .iter()
        .filter_map(|w| match w.failover {
            scheduler::Failover::After(ms) => Some((w.name.as_str(), ms)),
            scheduler::Failover::Never => None,
        })
        .collect();
    replicas
        .iter()
        .filter_map(|r| {
            let deadline = since.get(r.node.as_deref()?)?.saturating_add(*after.get(r.workload.as_str())?);
            (deadline > now_ms).then(|| Duration::from_millis(deadline - now_ms))
        })
        .min()
}

/// One pass: record finished Job attempts, snapshot the store, run the scheduler, write its
/// decisions, wake the nodes whose assignment sets changed. Idempotent. Returns when the next
/// failover deadline or Job retry falls, if any.
async fn reconcile(shared: &Shared) -> Result<Option<Duration>, StoreError> {
    let workloads = shared.store.workloads().await?;
    let nodes = shared.store.nodes().await?;
    let mut replicas = shared.store.replicas().await?;
    let now = now_ms();
    let fence = Fence { lease: leader::CONTROLLER_LEASE, holder: &shared.hub_id };

    // Job attempts that ended on their node are recorded (and leave the node) first.
    let jobs: BTreeSet<&str> = workloads
        .iter()
        .filter(|w| w.manifest.spec.kind == proto::manifest::WorkloadKind::Job)
        .map(|w| w.manifest.metadata.name.as_str())
        .collect();
    let attempts: Vec<crate::store::JobAttempt> = replicas
        .iter()
        .filter(|r| jobs.contains(r.workload.as_str()) && r.status.template_hash == r.template_hash)
        .filter_map(|r| {
            let succeeded = match r.status.phase {
                proto::messages::Phase::Succeeded => true,
                proto::messages::Phase::Failed => false,
                _ => return None,
            };
            Some(crate::store::JobAttempt {
                replica: r.name.clone(),
                workload: r.workload.clone(),
                index: r.index,
                node: r.node.clone()?,
                succeeded,
            })
        })
        .collect();
    if !attempts.is_empty() {
        for a in &attempts {
            info!(job = %a.workload, index = a.index, node = %a.node, succeeded = a.succeeded, "job attempt finished");
        }
        let changed = shared.store.record_job_attempts(fence, &attempts, now).await?;
        shared.wake_nodes(&changed);
        let done: BTreeSet<&str> = attempts.iter().map(|a| a.replica.as_str()).collect();
        replicas.retain(|r| !done.contains(r.name.as_str()));
    }
    let recorded = if jobs.is_empty() { Vec::new() } else { shared.store.job_indexes().await? };

    // Rollouts first: they decide which replicas keep their old template and how many
    // surge replicas each workload runs on top of its desired count.
    let templates: BTreeMap<String, proto::manifest::ReplicaTemplate> =
        workloads.iter().map(|w| (w.manifest.metadata.name.clone(), w.manifest.template())).collect();
    let rollouts = rollout_holds(shared, &workloads, &templates, &replicas, now);
    let sched_nodes: Vec<SchedNode> = nodes.iter().map(|n| sched_node(shared, n)).collect();
    let sched_workloads: Vec<SchedWorkload> = workloads
        .iter()
        .map(|w| {
            let mut sw = sched_workload(&w.manifest);
            if matches!(sw.kind, scheduler::WorkloadKind::Job(_)) {
                sw.job_progress = job_progress(&sw.name, &recorded, &replicas);
            }
            if sw.kind == scheduler::WorkloadKind::Replicated {
                sw.replicas += rollouts.surge.get(&sw.name).copied().unwrap_or(0);
            }
            sw
        })
        .collect();
    let current: Vec<Placement> = replicas
        .iter()
        .map(|r| Placement {
            replica: r.name.clone(),
            workload: r.workload.clone(),
            index: r.index,
            node: r.node.clone(),
        })
        .collect();
    let ready: HashMap<String, String> = replicas
        .iter()
        .filter(|r| crate::api::is_available(shared, r))
        .filter_map(|r| Some((r.name.clone(), r.node.clone()?)))
        .collect();
    let decisions =
        scheduler::schedule_at(&sched_nodes, &sched_workloads, &current, &scheduler::Observed { now_ms: now, ready });
    {
        // Logged once each, not on every pass.
        let mut seen = shared.warned.lock().unwrap();
        for w in decisions.warnings.iter().filter(|w| !seen.contains(*w)) {
            warn!(warning = %w, "scheduler input ignored");
        }
        *seen = decisions.warnings.iter().cloned().collect();
    }
    for (node, left) in &decisions.drains {
        debug!(%node, left, "draining");
    }
    let Rollouts { hold, stalled, .. } = rollouts;
    // Fenced: if another hub took the lease since this pass started, nothing is written.
    let changed = shared
        .store
        .write_placements_fenced(fence, &decisions.placements, &templates, &hold, &decisions.unschedulable)
        .await?;
    if !changed.is_empty() {
        debug!(nodes = ?changed, "assignment sets changed");
        shared.wake_nodes(&changed);
    }
    for name in &stalled {
        roll_back_stalled(shared, name, now).await?;
    }
    let decided: HashMap<&str, Option<&str>> =
        decisions.placements.iter().map(|p| (p.replica.as_str(), p.node.as_deref())).collect();
    for r in &replicas {
        if let (Some(from), Some(to)) = (r.node.as_deref(), decided.get(r.name.as_str()))
            && Some(from) != *to
        {
            info!(replica = %r.name, from, to = ?to, "replica moved");
        }
    }
    // Replicas still on the node they were on: those a failover deadline may apply to.
    let after_write: Vec<crate::store::ReplicaRow> = replicas
        .into_iter()
        .filter(|r| decided.get(r.name.as_str()).is_some_and(|n| *n == r.node.as_deref()))
        .collect();
    let failover = next_failover(&sched_nodes, &sched_workloads, &after_write, now);
    let job_retry = decisions
        .jobs
        .values()
        .filter_map(|j| j.retry_at_ms)
        .map(|at| Duration::from_millis(at.saturating_sub(now)))
        .min();
    Ok(failover.into_iter().chain(job_retry).min())
}

#[cfg(test)]
mod tests {
    use super::clock_skew_ms;
    use crate::scheduler::{self, Failover, Packing, WorkloadKind};
    use std::time::Duration;

    #[test]
    fn the_controller_wakes_for_the_next_failover_deadline() {
        use crate::scheduler::{SchedNode, SchedWorkload};
        let down = SchedNode { name: "down".into(), not_ready_since_ms: Some(1_000), ..Default::default() };
        let up = SchedNode { name: "up".into(), ready: true, ..Default::default() };
        let moves = SchedWorkload { name: "moves".into(), failover: Failover::After(10_000), ..Default::default() };
        let stays = SchedWorkload { name: "stays".into(), ..Default::default() };
        let row = |name: &str, workload: &str, node: &str| {
            crate::store::ReplicaRow {
            name: name.into(),
            workload: workload.into(),
            index: 0,
            node: Some(node.into()),
            template: proto::manifest::parse_manifests(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: x}\nspec: {runtime: wasm, image: r/x:1}\n",
            )
            .unwrap()[0]
                .template(),
            template_hash: String::new(),
            status: Default::default(),
            unschedulable: String::new(),
        }
        };
        let nodes = [down, up];
        let workloads = [moves, stays];
        let next = |rows: &[crate::store::ReplicaRow], now| super::next_failover(&nodes, &workloads, rows, now);
        assert_eq!(next(&[row("moves-0", "moves", "down")], 4_000), Some(Duration::from_millis(7_000)));
        // Past the deadline (the pass just moved it), on a Ready node, or never failing over: no wake.
        assert_eq!(next(&[row("moves-0", "moves", "down")], 11_000), None);
        assert_eq!(next(&[row("moves-0", "moves", "up")], 4_000), None);
        assert_eq!(next(&[row("stays-0", "stays", "down")], 4_000), None);
    }

    #[test]
    fn manifests_map_to_scheduler_workloads() {
        let yaml = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec:\n  runtime: wasm\n  image: r/w:1\n  kind: EveryNode\n  nodeSelector: {site: a}\n  nodeAffinity: [{key: tier, operator: NotIn, values: [lab]}]\n  tolerations: [{key: k, value: v, effect: NoExecute}]\n  os: linux\n  arch: x86_64\n  resources: {requests: {cpu: 250m, memory: 64Mi}}\n  spreadBy: site\n  packing: binPack\n  failover: {after: 10s}\n  strategy: {maxUnavailable: 3}\n";
        let m = proto::manifest::parse_manifests(yaml).unwrap().remove(0);
        let w = super::sched_workload(&m);
        assert_eq!(w.kind, WorkloadKind::EveryNode);
        assert_eq!(w.node_selector.get("site").map(String::as_str), Some("a"));
        assert_eq!(w.match_expressions[0].operator, scheduler::SelectorOperator::NotIn);
        assert_eq!(w.tolerations[0].effect, Some(scheduler::TaintEffect::NoExecute));
        assert_eq!((w.os.as_deref(), w.arch.as_deref()), (Some("linux"), Some("x86_64")));
        assert_eq!(w.requests, scheduler::Resources { cpu_millis: 250, memory_bytes: 64 << 20 });
        assert_eq!(w.spread_by.as_deref(), Some("site"));
        assert_eq!(w.packing, Packing::BinPack);
        assert_eq!(w.failover, Failover::After(10_000));
        assert_eq!(w.max_unavailable, 3);
        let plain = proto::manifest::parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: p}\nspec: {runtime: wasm, image: r/p:1, replicas: 8}\n",
        )
        .unwrap()
        .remove(0);
        let w = super::sched_workload(&plain);
        assert_eq!(
            (w.kind, w.replicas, w.failover, w.max_unavailable),
            (WorkloadKind::Replicated, 8, Failover::Never, 2)
        );
    }

    #[test]
    fn every_node_rollouts_go_in_batches_of_their_own_size() {
        let m = |spec: &str| {
            proto::manifest::parse_manifests(&format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: w}}\nspec: {{runtime: wasm, image: r/w:1, {spec}}}\n"
            ))
            .unwrap()
            .remove(0)
        };
        // Eight gateways: two at a time by default, not all eight.
        let l = super::rollout_limits(&m("kind: EveryNode"), 8);
        assert_eq!((l.desired, l.max_unavailable, l.max_surge), (8, 2, 0));
        let l = super::rollout_limits(&m("kind: EveryNode, strategy: {maxUnavailable: 1}"), 8);
        assert_eq!(l.max_unavailable, 1);
        // Replicated: the manifest's count, whatever runs now (surge replicas included).
        let l = super::rollout_limits(&m("replicas: 4, strategy: {maxUnavailable: 0, maxSurge: 1}"), 5);
        assert_eq!((l.desired, l.max_unavailable, l.max_surge), (4, 0, 1));
    }

    #[test]
    fn clock_skew_allows_for_half_the_round_trip() {
        // Stamped 100 ms (half of a 200 ms round trip) before the hub read it: no skew.
        assert_eq!(clock_skew_ms(1_000_000, 1_000_100, Duration::from_millis(200)), 0);
        assert_eq!(clock_skew_ms(1_005_000, 1_000_000, Duration::ZERO), 5_000);
        // A board that booted at the epoch: hugely behind, and no overflow.
        assert_eq!(clock_skew_ms(0, 1_700_000_000_000, Duration::ZERO), -1_700_000_000_000);
        assert_eq!(clock_skew_ms(u64::MAX, 0, Duration::ZERO), i64::MAX);
    }
}
