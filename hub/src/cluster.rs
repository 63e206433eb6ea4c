//! What one hub process knows of the cluster beyond the store: its agent sessions, which
//! nodes other hubs hold, when it last heard of each node, and its clocks. Shared by the
//! session tasks ([`crate::server`]), the controller's shell ([`crate::control`]) and the API
//! ([`crate::api`]); it decides nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, watch};
use transport::pki::Ca;

use crate::controller::time::{ClusterClock, Presence};
use crate::store::Store;

/// A connected agent.
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) conn: quinn::Connection,
    /// The certificate the session speaks with (the handshake's, then each renewal's): what
    /// [`crate::heartbeats`] records the node's liveness as.
    pub(crate) cert: String,
    /// Woken when the node's assignment set may have changed.
    pub(crate) wake: Arc<Notify>,
}

pub(crate) struct Shared {
    pub(crate) store: Store,
    /// This hub's name in leases and node sessions.
    pub(crate) hub_id: String,
    /// True while this hub holds the controller lease.
    pub(crate) leader: watch::Receiver<bool>,
    /// Nodes whose agent session another hub holds (shared stores only). std Mutex: set
    /// operations only, never held across an await.
    pub(crate) remote_connected: Mutex<HashSet<String>>,
    pub(crate) ca: Ca,
    /// Node certificate lifetime and renewal grace.
    pub(crate) certs: crate::identity::CertPolicy,
    /// Which host paths and whether the host network workloads may be given.
    pub(crate) host_policy: crate::access::HostPolicy,
    /// The cluster network in force (the store's record wins over this hub's flags).
    pub(crate) network: crate::network::ClusterNetwork,
    /// Service addresses, the cluster domain and the site label.
    pub(crate) services: crate::services_shell::ServiceConfig,
    /// std Mutex: held only for map operations, never across an await. Lock order: a holder
    /// of `sessions` may take `presence` (a session records its end there), never the other
    /// way round; `remote_connected` is taken alone or inside `sessions` ([`Shared::is_connected`]).
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    pub(crate) next_session: AtomicU64,
    pub(crate) reconcile: Notify,
    /// Ticks at each [`Shared::trigger_reconcile`], the hub's "something changed" (an apply,
    /// a delete, a node coming or going, a replica's status): what `get -w` streams wake on
    /// ([`crate::watch`]).
    pub(crate) changes: watch::Sender<u64>,
    /// The monotonic clock, anchored once at start: every timer and deadline of this hub
    /// reads it through [`Shared::mono_ms`], never the wall clock.
    started: Instant,
    /// This process's reading of cluster time (see [`crate::controller::time`]).
    pub(crate) clock: ClusterClock,
    /// When each node was last heard of. std Mutex: map operations only, and nothing else
    /// taken while it is held (see `sessions` for the order).
    pub(crate) presence: Mutex<Presence>,
    /// The scheduler's warnings of the last pass, so each is logged once. std Mutex: set
    /// operations only.
    pub(crate) warned: Mutex<HashSet<String>>,
    /// The agent version each node was last refused for (version skew), so the refusal is
    /// logged and recorded once per node and version. One entry per node at most. std Mutex:
    /// map operations only.
    pub(crate) skew_refused: Mutex<HashMap<String, String>>,
    /// Heartbeats received since the last flush (see [`crate::heartbeats`]).
    pub(crate) heartbeats: crate::heartbeats::Heartbeats,
    /// Sessions' hellos, written together (a group commit).
    pub(crate) check_ins: crate::checkins::CheckIns,
    /// Wakes the agent upgrade loop ([`crate::upgrade::shell`]) before its next tick.
    pub(crate) upgrades: Notify,
    /// Seals configs and secrets in the store ([`crate::objects`]): the cluster key ring,
    /// replaced whole when it is rotated or read again. std RwLock: never held across an
    /// await.
    objects_key: std::sync::RwLock<Arc<crate::sealed::ClusterKey>>,
    /// The cluster key file.
    pub(crate) key_path: std::path::PathBuf,
    /// One key rotation at a time.
    pub(crate) rotation: tokio::sync::Mutex<()>,
    /// Prometheus metrics ([`crate::metrics`]).
    pub(crate) metrics: crate::metrics::HubMetrics,
}

impl Shared {
    // Each argument is a part of the hub's configuration the shared state is made of, passed
    // once at start.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        hub_id: String,
        leader: watch::Receiver<bool>,
        ca: Ca,
        certs: crate::identity::CertPolicy,
        host_policy: crate::access::HostPolicy,
        (objects_key, key_path): (crate::sealed::ClusterKey, std::path::PathBuf),
        (network, services): (crate::network::ClusterNetwork, crate::services_shell::ServiceConfig),
    ) -> Shared {
        let mut nonce = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        Shared {
            clock: ClusterClock::new(format!("{hub_id}/{}", hex::encode(nonce))),
            store,
            hub_id,
            leader,
            remote_connected: Mutex::new(HashSet::new()),
            ca,
            certs,
            host_policy,
            network,
            services,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            reconcile: Notify::new(),
            changes: watch::Sender::new(0),
            started: Instant::now(),
            presence: Mutex::new(Presence::new(0)),
            warned: Mutex::new(HashSet::new()),
            skew_refused: Mutex::new(HashMap::new()),
            upgrades: Notify::new(),
            heartbeats: Default::default(),
            check_ins: Default::default(),
            objects_key: std::sync::RwLock::new(Arc::new(objects_key)),
            key_path,
            rotation: tokio::sync::Mutex::new(()),
            metrics: Default::default(),
        }
    }

    /// The cluster key ring as it is now.
    pub(crate) fn objects_key(&self) -> Arc<crate::sealed::ClusterKey> {
        self.objects_key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the cluster key ring (after a rotation, or the file read again).
    pub(crate) fn set_objects_key(&self, key: crate::sealed::ClusterKey) {
        *self.objects_key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// Milliseconds on this process's monotonic clock since the hub started.
    pub(crate) fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the node's agent is connected to this hub or, on a shared store, to another.
    pub(crate) fn is_connected(&self, node: &str) -> bool {
        self.sessions.lock().unwrap().contains_key(node) || self.remote_connected.lock().unwrap().contains(node)
    }

    /// Whether this hub holds a session with `node` (not another hub on the shared store).
    pub(crate) fn holds_session(&self, node: &str) -> bool {
        self.sessions.lock().unwrap().contains_key(node)
    }

    pub(crate) fn connection(&self, node: &str) -> Option<quinn::Connection> {
        self.sessions.lock().unwrap().get(node).map(|s| s.conn.clone())
    }

    /// The node's session on this hub: its id (new at each connect) and connection.
    pub(crate) fn session(&self, node: &str) -> Option<(u64, quinn::Connection)> {
        self.sessions.lock().unwrap().get(node).map(|s| (s.id, s.conn.clone()))
    }

    pub(crate) fn trigger_reconcile(&self) {
        self.reconcile.notify_one();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
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
