//! The hub's I/O shell for connections: the QUIC endpoint, one task per connection, the
//! per-ALPN authorization, joins, and one session per connected agent. It decides nothing
//! about placement: the controller ([`crate::control`] around the pure
//! [`crate::controller`]) does, and wakes sessions whose node's assignment set changed.
//!
//! Several hubs may share one PostgreSQL store. Every hub serves agents and the API; only the
//! holder of the controller lease ([`crate::leader`]) runs the controller. Each hub records in
//! the store which nodes it holds sessions for, and on a shared store polls the nodes'
//! generations (every `CLUSTER_POLL`): a node whose generation moved gets its session woken
//! here, whichever hub wrote it, and nodes connected to other hubs count as ready while the
//! heartbeats recorded for them keep changing (by this hub's monotonic clock, see
//! [`crate::controller::time::Presence`]). Polling, not LISTEN/NOTIFY: it needs no dedicated
//! connection, survives store reconnects without re-subscribing, and costs one small query
//! per half second.
//!
//! Who may do what is decided here, per ALPN: the join ALPN needs the token's secret, the agent
//! ALPN a `node:<name>` certificate, the API ALPN a certificate the store recorded for a user
//! not revoked ([`crate::users::identify`]); each API request is then held to the user's role
//! ([`crate::access`]). A peer that fails is refused with a reason and logged; every other
//! connection keeps being served.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::messages::{AgentMsg, HubMsg, JoinRequest, JoinResponse};
use quinn::VarInt;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::{ALPN_AGENT, ALPN_API, ALPN_JOIN, frame, tls};

use crate::bootstrap::{self, BootstrapError};
use crate::cluster::{Session, Shared};
use crate::leader::{self, LeaderConfig};
use crate::metrics::StoreOp;
use crate::store::{Store, StoreError};
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
/// How long a session refused for the agent's version is held before it is closed.
const SKEW_HOLD: Duration = Duration::from_secs(20);

const HANDSHAKE_MSG_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a hub on a shared store looks for generations other hubs wrote.
const CLUSTER_POLL: Duration = Duration::from_millis(500);

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
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics { addr: std::net::SocketAddr, source: std::io::Error },
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
    serving: crate::certs::Serving,
    /// The `/metrics` listener (`--metrics-listen`).
    metrics: Option<tokio::net::TcpListener>,
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
        let key_path =
            config.cluster_key_file.clone().unwrap_or_else(|| bootstrap::default_cluster_key_path(&config.data_dir));
        if store.is_shared() {
            bootstrap::share(&store, &config.data_dir, &key_path).await?;
        }
        // Configs and secrets are sealed with the cluster key on every store.
        let objects_key = bootstrap::cluster_key(&key_path)?;
        let identity = bootstrap::load_or_create(&config.data_dir, &advertise, &names, config.certs.hub_validity)?;
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
        // The admin this hub made (or kept) in admin.yaml is the user `admin`; made once per
        // cluster (a revoked `admin` stays revoked), each hub's admin.yaml recorded as its.
        let admin = transport::pki::leaf_facts(&identity.admin_cert_pem)
            .map_err(|e| HubError::Identity(format!("the admin certificate is unreadable: {e}")))?;
        store
            .ensure_user(
                &crate::store::NewUser {
                    name: crate::users::FIRST_ADMIN.into(),
                    role: proto::messages::Role::Admin,
                    created_by: "hub".into(),
                    cert_validity_ms: config.certs.user_validity.as_millis() as u64,
                },
                &admin.fingerprint,
                admin.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
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
        let serving = crate::certs::Serving {
            data_dir: config.data_dir.clone(),
            names,
            node_grace: config.node_grace,
            cert_pem: identity.server.cert_pem.clone(),
        };
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| HubError::Metrics { addr, source })?)
            }
            None => None,
        };
        Ok(Hub {
            endpoint,
            serving,
            metrics,
            gate: crate::guard::Gate::new(config.limits.clone()),
            token: identity.token.to_string(),
            admin_config: identity.admin_config_path,
            election,
            shared: Arc::new(Shared::new(
                store,
                hub_id,
                leader,
                identity.ca,
                config.certs,
                config.host_policy,
                (objects_key, key_path.clone()),
            )),
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
        let controller = tokio::spawn(crate::control::controller_loop(self.shared.clone()));
        let renewer =
            tokio::spawn(crate::certs::renew_serving(self.endpoint.clone(), self.shared.clone(), self.serving));
        let watcher = self.shared.store.is_shared().then(|| tokio::spawn(watch_cluster(self.shared.clone())));
        let upgrades = tokio::spawn(crate::upgrade::shell::upgrade_loop(self.shared.clone()));
        let heartbeats = tokio::spawn(crate::heartbeats::flush_loop(self.shared.clone()));
        let metrics = self.metrics.map(|listener| {
            let shared = self.shared.clone();
            let render: transport::metrics::Render = Arc::new(move || {
                let shared = shared.clone();
                Box::pin(async move { crate::metrics::render(&shared).await })
            });
            tokio::spawn(transport::metrics::serve(listener, render))
        });
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
        renewer.abort();
        upgrades.abort();
        heartbeats.abort();
        if let Some(m) = metrics {
            m.abort();
        }
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
        let Some(leaf) = tls::peer_leaf(&conn) else {
            conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"a user's credential is required");
            return;
        };
        match crate::users::identify(&shared, &leaf, conn.remote_address().to_string()).await {
            Ok(caller) => {
                permit.authenticated(&conn, transport::limits::Session::Api);
                crate::api::serve(shared, conn, caller, leaf).await
            }
            Err(why) => {
                warn!(peer = ?cn, reason = %why, "API connection refused");
                conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), why.to_string().as_bytes());
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
    if let Some(cert_pem) = &req.renew_cert_pem {
        return crate::certs::renew_expired(shared, name, cert_pem, &req.csr_pem).await;
    }
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
    let cert_pem = match shared.ca.sign_csr(&req.csr_pem, &format!("node:{name}"), shared.certs.node_validity) {
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
    let Some(mut leaf) = tls::peer_leaf(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"a node certificate is required");
        return;
    };
    // The certificate this session speaks with: the handshake's, then each one it renews.
    let mut cert = leaf.fingerprint.clone();
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
    // The version skew policy: outside it the node is told why, and keeps what it runs.
    if let Err(skew) = proto::version::check(proto::version::VERSION, &facts.agent_version) {
        let why = skew.to_string();
        // Said (and recorded) once per node and version, not at every retry of a fleet.
        let version: String = facts.agent_version.chars().take(64).collect();
        let first = shared.skew_refused.lock().unwrap_or_else(|e| e.into_inner()).insert(node.clone(), version.clone())
            != Some(version);
        if first {
            warn!(agent_version = %facts.agent_version, reason = %why, "agent session refused: version skew");
            if let Err(e) = shared.store.set_node_problem(&node, &why).await {
                debug!(error = %e, "cannot record the node's problem");
            }
        }
        // Held a while before the close: an agent that retries at once after a session (one
        // older than this rule) then costs a handshake per node every SKEW_HOLD, not a storm.
        tokio::time::sleep(SKEW_HOLD).await;
        conn.close(VarInt::from_u32(proto::version::CLOSE_VERSION), why.as_bytes());
        return;
    }
    let now = now_ms();
    facts.clock_skew_ms = facts.clock_ms.map(|agent| clock_skew_ms(agent, now, conn.rtt()));
    info!(agent_generation = generation, replicas = statuses.len(), skew_ms = ?facts.clock_skew_ms, "agent connected");
    if let Some(skew) = facts.clock_skew_ms.filter(|s| s.abs() > proto::messages::CLOCK_SKEW_WARN_MS) {
        warn!(
            skew_ms = skew,
            "the node's clock is off; it keeps working (timers are monotonic), but its timestamps are skewed"
        );
    }
    let not_after_ms = leaf.not_after.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64);
    let check_in = shared.store.check_in(&node, &cert, not_after_ms, &facts, now).await;
    if matches!(check_in, Ok((_, Some(_)))) {
        crate::events::node(&shared, &node, "Ready", format!("connected to hub {}", shared.hub_id)).await;
    }
    match check_in {
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
    if let Err(e) = shared.metrics.timed(StoreOp::Status, shared.store.record_statuses(&node, &statuses)).await {
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
    // The node may be back on a new agent binary, or have an order waiting.
    shared.upgrades.notify_one();

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

    let (renewed_tx, mut renewed_rx) = mpsc::channel::<crate::certs::Renewed>(1);
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
            // Streams the agent opens: certificate renewals (see `crate::certs`).
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let task = crate::certs::serve_stream(shared.clone(), node.clone(), leaf.clone(), s, r, renewed_tx.clone());
                    tokio::spawn(task.in_current_span());
                }
                Err(_) => break,
            },
            Some(renewed) = renewed_rx.recv() => {
                cert = renewed.facts.fingerprint.clone();
                leaf = renewed.facts;
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let msg = match msg {
                    AgentMsg::Status { statuses } => AgentMsg::Status { statuses: held_statuses(statuses, &held) },
                    other => other,
                };
                handle_agent_msg(&shared, &node, &cert, msg).await;
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
            // Starts the node's failover clocks, by this hub's monotonic clock.
            shared.presence.lock().unwrap().session_ended(&node, shared.mono_ms());
            info!("agent disconnected");
        }
        ours
    };
    // After the session left the list (see `LinkTraffic`): its last bytes count once.
    shared.metrics.link_ended(&node, &conn);
    if ended {
        let _ = shared.store.set_node_session(&node, &shared.hub_id, false, now_ms()).await;
        crate::events::node(&shared, &node, "NotReady", format!("its link to hub {} ended", shared.hub_id)).await;
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
    let empty = proto::messages::AssignmentSet {
        generation: 0,
        store: store.to_string(),
        assignments: Vec::new(),
        kept_logs: Vec::new(),
        objects: Vec::new(),
    };
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

/// Records one message of a node's session. A heartbeat is queued for
/// [`crate::heartbeats::flush_loop`], which wakes the session when its node is gone or holds another
/// certificate now (another hub's delete or re-join), so it checks at once.
async fn handle_agent_msg(shared: &Shared, node: &str, cert: &str, msg: AgentMsg) {
    let result = match msg {
        AgentMsg::Ack { generation } => shared.store.ack_generation(node, generation).await,
        AgentMsg::Status { statuses } => {
            let r =
                shared.metrics.timed(StoreOp::Status, shared.store.record_statuses(node, &statuses)).await.map(|_| ());
            // A replica that became ready (or stopped being) may let a rollout advance.
            shared.trigger_reconcile();
            r
        }
        AgentMsg::Heartbeat => {
            shared.heartbeats.record(node, cert);
            Ok(())
        }
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
                let mono = shared.mono_ms();
                let remote: HashSet<String> = {
                    let mut presence = shared.presence.lock().unwrap();
                    nodes
                        .iter()
                        .filter(|n| {
                            // Every recorded heartbeat is a sign of life (and a change of it
                            // one by this hub's clock); a node counts as held by another hub
                            // while that hub's heartbeats for it keep changing.
                            let fresh = presence.heartbeat(&n.name, n.last_seen_ms.unwrap_or(0), mono);
                            fresh && n.connected_via.as_deref().is_some_and(|h| h != shared.hub_id)
                        })
                        .map(|n| n.name.clone())
                        .collect()
                };
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
    crate::fsutil::write_private(&path, format!("{id}\n").as_bytes()).map_err(BootstrapError::from)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::clock_skew_ms;
    use std::time::Duration;

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
