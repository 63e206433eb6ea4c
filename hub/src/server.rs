//! The hub's I/O shell for connections: the QUIC endpoint, one task per connection, the
//! per-ALPN authorization and joins; each connected agent's session is in
//! [`crate::session`]. It decides nothing
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::messages::{JoinRequest, JoinResponse};
use quinn::VarInt;
use tracing::{Instrument, debug, info, info_span, warn};
use transport::{ALPN_AGENT, ALPN_API, ALPN_JOIN, frame, tls};

use crate::bootstrap::{self, BootstrapError};
use crate::cluster::Shared;
use crate::leader::{self, LeaderConfig};
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
/// How long a joining or connecting peer has to send its first message.
pub(crate) const HANDSHAKE_MSG_TIMEOUT: Duration = Duration::from_secs(10);
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
        let network = store.cluster_network(config.network).await?;
        if network != config.network {
            warn!(
                recorded = %network.cidr,
                recorded_mask = network.node_prefix,
                flag = %config.network.cidr,
                flag_mask = config.network.node_prefix,
                "the store records another cluster network; using the recorded one (nodes keep their subnets)"
            );
        }
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
                (network, config.services.clone()),
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
        let services = tokio::spawn(crate::services_shell::services_loop(self.shared.clone()));
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
                    let Some((incoming, permit, wait)) = self.gate.admit(incoming) else { continue };
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        // Paced: past the burst, a validated peer's handshake starts when its
                        // token comes (see `guard`); its packets wait in quinn's buffer.
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
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
        services.abort();
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
                crate::session::agent_session(shared, conn, node.clone()).instrument(info_span!("agent", %node)).await
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
