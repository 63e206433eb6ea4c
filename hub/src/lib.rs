//! Flotilla's control plane: it owns the desired state (the SQLite or PostgreSQL store), the cluster CA, the
//! scheduler, and the one QUIC endpoint that agents and the CLI connect to. It decides what runs
//! where and tells each node its assignment set; it never runs a workload itself and never
//! reaches out to an agent: agents dial in (NAT-friendly) and the hub pushes over that
//! connection.
//!
//! Structure: [`controller`] is the pure controller (a snapshot in, decisions out) and
//! [`scheduler`] the pure placement function it calls; [`store`] is the only module that
//! speaks SQL; [`leader`] elects the one hub (of several on a shared store) that runs the
//! controller; [`control`] is the controller's I/O shell (read, pass, fenced write, wake);
//! [`server`] accepts connections and holds the agent sessions, whose state [`cluster`]
//! keeps; [`guard`] decides how many connections strangers may hold, bounds status reports
//! and parses manifests off the async workers; [`api`] answers CLI requests, [`admin`] those
//! about tokens and node identities, [`users`] those about API users and the audit log (under
//! the pure rules of [`access`]: which role may ask what); [`bootstrap`] owns the data dir and credentials, written
//! through [`fsutil`]. [`tokens`] (who may join) and [`identity`] (which certificate speaks
//! for a node, which of its claims count) are pure rules.

pub mod access;
pub mod admin;
pub mod api;
pub mod backup;
pub mod bootstrap;
mod certs;
mod checkins;
pub(crate) mod cluster;
pub(crate) mod control;
pub mod controller;
mod events;
mod exec;
pub mod fsutil;
pub mod guard;
mod heartbeats;
pub mod identity;
pub mod leader;
pub mod logs;
mod metrics;
pub mod network;
mod objects;
pub mod revisions;
pub mod routes;
pub mod scheduler;
pub mod sealed;
pub mod server;
pub mod services;
pub mod services_shell;
mod session;
pub mod store;
pub mod tokens;
pub mod upgrade;
pub mod users;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use server::{Hub, HubError};
pub use store::Datastore;

/// How the hub is started. Built by the binary from flags; the library reads no environment.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Address clients should dial, written into `admin.yaml`. Defaults to the listen address
    /// (with 127.0.0.1 for an unspecified IP).
    pub advertise: Option<String>,
    /// Extra DNS names or IPs for the serving certificate.
    pub tls_names: Vec<String>,
    /// Where the state lives: the embedded SQLite file in `data_dir` (one hub), or a
    /// PostgreSQL database several hubs share.
    pub datastore: Datastore,
    /// How long a node's link may be silent before the hub marks it NotReady (the hub's QUIC
    /// idle timeout; QUIC uses the smaller of the hub's and the agent's).
    pub node_grace: std::time::Duration,
    /// How many connections strangers and nodes may hold, and how fast they may start.
    pub limits: guard::PeerLimits,
    /// Node certificate lifetime and renewal grace.
    pub certs: identity::CertPolicy,
    /// Which host paths and whether the host network workloads may be given.
    pub host_policy: access::HostPolicy,
    /// The cluster key ring that seals configs and secrets, and in a shared store the CA key
    /// and join token (default `<data dir>/cluster.key`, made by the first hub; see
    /// [`sealed`]).
    pub cluster_key_file: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`, see [`metrics`]) on this TCP address.
    pub metrics_listen: Option<SocketAddr>,
    /// The cluster CIDR and each node's share of it ([`network`]).
    pub network: network::ClusterNetwork,
    /// Service addresses, the cluster domain and the site label ([`services`]).
    pub services: services_shell::ServiceConfig,
}

/// Milliseconds since the Unix epoch, for timestamps shown to users.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
