//! What the hub lets strangers hold: the gate in front of its internet-facing port.
//!
//! Every connection passes [`Gate::admit`] before its handshake starts (quinn's `Incoming`
//! lets the hub refuse it, or ask it to prove its address with a Retry, before any TLS work).
//! [`Counts`] is the sans-IO core: it takes the source address and `now` and decides.
//!
//! - **Handshakes** in progress are capped per source address and in total, and started at a
//!   bounded rate (a token bucket). When the bucket runs low, a peer whose address is not yet
//!   validated is sent a Retry first (stateless for the hub), so a flood from spoofed addresses
//!   costs no handshakes and cannot drain the bucket for real agents. A validated peer that
//!   finds the bucket empty is not refused at once: the bucket may go into debt by up to
//!   [`PeerLimits::max_handshake_wait`] of its rate, and the peer's handshake starts when its
//!   token would have come ([`Admission::Accept`]'s `wait`; the client's first packet waits in
//!   quinn's incoming buffer meanwhile). A storm of reconnects (a restarted hub, a site's
//!   uplink back) is then served at the full rate in arrival order, instead of being refused
//!   into the agents' growing back-off and served in the gaps it leaves.
//! - Once the handshake is done, a connection with a client certificate the CA signed
//!   ([`Permit::authenticated`]) counts only against [`PeerLimits::max_connections`]; its
//!   window and stream count are then widened for its role (`transport::limits`).
//! - A connection without one (a join, or a peer about to be refused) must take a **join
//!   slot** ([`Permit::join`]): capped per source address and in total, held until the
//!   connection ends (at most the join timeout). Strangers therefore hold a bounded number of
//!   small connections whatever they do, and cannot crowd out agents that hold certificates.
//!
//! Each cap is a count of live [`Permit`]s; dropping a permit gives its slot back.
//!
//! Manifests, which any admin credential may send, are parsed off the async workers on a
//! bounded pool with a time budget ([`parse_manifests`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::manifest::ManifestError;
use proto::messages::ReplicaStatus;
use tokio::sync::Semaphore;

/// Limits on connections before and after authentication. Defaults suit a hub serving
/// thousands of agents, a few of which may share a NAT address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLimits {
    /// Connections of any kind, authenticated or not.
    pub max_connections: usize,
    /// Handshakes in progress, in total and from one address.
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    /// Connections without a client certificate (joins), in total and from one address.
    pub max_joins: usize,
    pub max_joins_per_address: usize,
    /// Handshakes started per second on average, and in a burst.
    pub handshakes_per_second: u32,
    pub handshake_burst: u32,
    /// How long a validated peer's handshake may wait for its token before it is refused
    /// instead: well inside the client's handshake timeout (an agent's idle timeout, 8 s).
    pub max_handshake_wait: Duration,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_connections: 20_000,
            // Handshakes in progress include those waiting for their token (up to
            // `max_handshake_wait` of the rate).
            max_handshakes: 1024,
            max_handshakes_per_address: 16,
            max_joins: 64,
            max_joins_per_address: 4,
            // A full handshake with mutual TLS and the session's start cost the hub about
            // 2 ms of CPU (a profile of 10,000 agents reconnecting to a restarted hub):
            // 300 a second is most of one core, and 10,000 agents back in about 35 s.
            handshakes_per_second: 300,
            handshake_burst: 600,
            max_handshake_wait: Duration::from_secs(2),
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the hub holds its maximum of {0} connections")]
    Connections(usize),
    #[error("{0} handshakes are in progress, the most the hub allows")]
    Handshakes(usize),
    #[error("{0} handshakes are in progress from this address, the most the hub allows")]
    HandshakesFromAddress(usize),
    #[error("handshakes arrive faster than the hub allows")]
    Rate,
    #[error("{0} join connections are open, the most the hub allows")]
    Joins(usize),
    #[error("{0} join connections are open from this address, the most the hub allows")]
    JoinsFromAddress(usize),
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start the handshake after `wait` (zero unless the bucket is in debt).
    Accept {
        wait: Duration,
    },
    /// Ask the peer to prove its address first (a QUIC Retry); it comes back validated.
    Retry,
    Refuse(Refusal),
}

/// The counters behind the gate: pure bookkeeping, time passed in.
#[derive(Debug)]
pub struct Counts {
    limits: PeerLimits,
    connections: usize,
    handshakes: usize,
    joins: usize,
    per_address: HashMap<IpAddr, PerAddress>,
    tokens: f64,
    refilled: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PerAddress {
    handshakes: usize,
    joins: usize,
}

impl Counts {
    pub fn new(limits: PeerLimits) -> Counts {
        let tokens = f64::from(limits.handshake_burst);
        Counts { limits, connections: 0, handshakes: 0, joins: 0, per_address: HashMap::new(), tokens, refilled: None }
    }

    /// A new connection from `ip` whose address is (or is not yet) `validated`. On
    /// [`Admission::Accept`] it holds a handshake slot until [`Counts::handshake_done`].
    pub fn admit(&mut self, ip: IpAddr, validated: bool, now: Instant) -> Admission {
        self.refill(now);
        let l = &self.limits;
        if self.connections >= l.max_connections {
            return Admission::Refuse(Refusal::Connections(l.max_connections));
        }
        // Under pressure, an unproven address costs a Retry, not a token.
        if !validated && self.tokens < f64::from(l.handshake_burst) / 2.0 {
            return Admission::Retry;
        }
        // A token owed: the wait until the bucket has refilled to it.
        let rate = f64::from(l.handshakes_per_second.max(1));
        let wait = Duration::from_secs_f64(((1.0 - self.tokens) / rate).max(0.0));
        if wait > l.max_handshake_wait {
            return Admission::Refuse(Refusal::Rate);
        }
        if self.handshakes >= l.max_handshakes {
            return Admission::Refuse(Refusal::Handshakes(l.max_handshakes));
        }
        let here = self.per_address.get(&ip).copied().unwrap_or_default();
        if here.handshakes >= l.max_handshakes_per_address {
            return Admission::Refuse(Refusal::HandshakesFromAddress(l.max_handshakes_per_address));
        }
        self.tokens -= 1.0;
        self.connections += 1;
        self.handshakes += 1;
        self.per_address.entry(ip).or_default().handshakes += 1;
        Admission::Accept { wait }
    }

    /// The handshake of a connection from `ip` ended (either way): its handshake slot is free.
    pub fn handshake_done(&mut self, ip: IpAddr) {
        self.handshakes = self.handshakes.saturating_sub(1);
        self.at(ip, |a| a.handshakes = a.handshakes.saturating_sub(1));
    }

    /// A connection from `ip` without a client certificate asks for a join slot.
    pub fn join(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.joins >= self.limits.max_joins {
            return Err(Refusal::Joins(self.limits.max_joins));
        }
        let here = self.per_address.get(&ip).copied().unwrap_or_default();
        if here.joins >= self.limits.max_joins_per_address {
            return Err(Refusal::JoinsFromAddress(self.limits.max_joins_per_address));
        }
        self.joins += 1;
        self.per_address.entry(ip).or_default().joins += 1;
        Ok(())
    }

    /// A connection from `ip` ended; `joined` if it held a join slot.
    pub fn closed(&mut self, ip: IpAddr, joined: bool) {
        self.connections = self.connections.saturating_sub(1);
        if joined {
            self.joins = self.joins.saturating_sub(1);
            self.at(ip, |a| a.joins = a.joins.saturating_sub(1));
        }
    }

    /// Connections, handshakes in progress and join slots held.
    pub fn held(&self) -> (usize, usize, usize) {
        (self.connections, self.handshakes, self.joins)
    }

    fn at(&mut self, ip: IpAddr, f: impl FnOnce(&mut PerAddress)) {
        if let Some(a) = self.per_address.get_mut(&ip) {
            f(a);
            if a.handshakes == 0 && a.joins == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.refilled {
            let earned =
                now.saturating_duration_since(last).as_secs_f64() * f64::from(self.limits.handshakes_per_second);
            self.tokens = (self.tokens + earned).min(f64::from(self.limits.handshake_burst));
        }
        self.refilled = Some(now);
    }
}

/// The shared gate: [`Counts`] behind a std Mutex (held for a few map operations, never
/// across an await).
#[derive(Debug)]
pub struct Gate {
    counts: Mutex<Counts>,
}

impl Gate {
    pub fn new(limits: PeerLimits) -> Arc<Gate> {
        Arc::new(Gate { counts: Mutex::new(Counts::new(limits)) })
    }

    /// Decides on a new connection before its handshake. Refused and retried connections
    /// are answered here; an accepted one comes back with its permit and how long its
    /// handshake is to wait for its token.
    pub fn admit(self: &Arc<Self>, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Permit, Duration)> {
        let ip = incoming.remote_address().ip().to_canonical();
        let validated = incoming.remote_address_validated();
        let admission = self.counts.lock().unwrap().admit(ip, validated, Instant::now());
        match admission {
            Admission::Accept { wait } => {
                Some((incoming, Permit { gate: self.clone(), ip, handshaking: true, joined: false }, wait))
            }
            Admission::Retry if incoming.may_retry() => {
                tracing::debug!(remote = %incoming.remote_address(), "address not validated; retry sent");
                let _ = incoming.retry();
                None
            }
            Admission::Retry => {
                // A peer that already came back from a Retry but found no token: refused.
                tracing::debug!(remote = %incoming.remote_address(), "handshake refused: rate");
                incoming.refuse();
                None
            }
            Admission::Refuse(why) => {
                tracing::warn!(remote = %incoming.remote_address(), reason = %why, "connection refused");
                incoming.refuse();
                None
            }
        }
    }

    pub fn held(&self) -> (usize, usize, usize) {
        self.counts.lock().unwrap().held()
    }
}

/// A connection's place at the gate; dropping it gives its slots back.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    ip: IpAddr,
    handshaking: bool,
    joined: bool,
}

impl Permit {
    /// The handshake ended (either way): frees its handshake slot.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.gate.counts.lock().unwrap().handshake_done(self.ip);
        }
    }

    /// The peer presented a certificate the CA signed: widen the connection for `session`.
    pub fn authenticated(&mut self, conn: &quinn::Connection, session: transport::limits::Session) {
        self.handshake_done();
        transport::limits::open_for(conn, session);
    }

    /// The peer has no certificate: it needs a join slot, or it is refused.
    pub fn join(&mut self) -> Result<(), Refusal> {
        self.handshake_done();
        if self.joined {
            return Ok(());
        }
        self.gate.counts.lock().unwrap().join(self.ip)?;
        self.joined = true;
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.gate.counts.lock().unwrap();
        if self.handshaking {
            counts.handshake_done(self.ip);
        }
        counts.closed(self.ip, self.joined);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests

/// How long one request's manifests may take to parse, waiting for the pool included.
pub const PARSE_BUDGET: Duration = Duration::from_secs(2);
/// Manifests parsed at once; more wait (within the budget). The hub has few cores and other
/// work: two parses cannot take them all from the controller and the agents' sessions.
const PARSE_POOL: usize = 2;

static PARSERS: Semaphore = Semaphore::const_new(PARSE_POOL);

/// Why a request's manifests were not parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the manifests were not parsed within {0:?}; the hub is busy or the input is pathological")]
    Budget(Duration),
}

/// Parses `source` on the blocking pool, at most [`PARSE_POOL`] at a time, within
/// [`PARSE_BUDGET`]. The parser's own limits (`proto::yaml`) keep each parse short; the budget
/// is the backstop. A parse that outlives it finishes on its thread and is dropped.
pub async fn parse_documents(source: String) -> Result<Vec<proto::manifest::Document>, ParseError> {
    let work = async {
        let permit = PARSERS.acquire().await.map_err(|_| ParseError::Budget(PARSE_BUDGET))?;
        // The permit goes with the parse: one that outlives the budget still holds its place,
        // so abandoned parses never add up past the pool.
        let parsed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            proto::manifest::parse_documents(&source)
        })
        .await
        .map_err(|_| ParseError::Budget(PARSE_BUDGET))?;
        Ok(parsed?)
    };
    tokio::time::timeout(PARSE_BUDGET, work).await.map_err(|_| ParseError::Budget(PARSE_BUDGET))?
}

// ---------------------------------------------------------------------------------------------
// Status reports

/// Keeps only the statuses of replicas the node holds (`held`: the replica names of the
/// assignment set last sent to it). A node cannot report on replicas it invented or that were
/// never its own, so a hostile report costs the store no more writes than the node's own set.
pub fn held_statuses(
    statuses: BTreeMap<String, ReplicaStatus>,
    held: &std::collections::BTreeSet<String>,
) -> (BTreeMap<String, ReplicaStatus>, usize) {
    let total = statuses.len();
    let kept: BTreeMap<String, ReplicaStatus> = statuses.into_iter().filter(|(name, _)| held.contains(name)).collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted without a wait.
    const NOW: Admission = Admission::Accept { wait: Duration::ZERO };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn limits() -> PeerLimits {
        PeerLimits {
            max_connections: 10,
            max_handshakes: 6,
            max_handshakes_per_address: 3,
            max_joins: 4,
            max_joins_per_address: 2,
            handshakes_per_second: 10,
            handshake_burst: 20,
            max_handshake_wait: Duration::ZERO,
        }
    }

    #[test]
    fn handshakes_are_capped_per_address_and_in_total() {
        let now = Instant::now();
        let mut c = Counts::new(limits());
        for _ in 0..3 {
            assert_eq!(c.admit(ip(1), true, now), NOW);
        }
        assert_eq!(c.admit(ip(1), true, now), Admission::Refuse(Refusal::HandshakesFromAddress(3)));
        for _ in 0..3 {
            assert_eq!(c.admit(ip(2), true, now), NOW);
        }
        assert_eq!(c.admit(ip(3), true, now), Admission::Refuse(Refusal::Handshakes(6)));
        // A finished handshake frees its slot; the connection still counts.
        c.handshake_done(ip(1));
        assert_eq!(c.admit(ip(3), true, now), NOW);
        assert_eq!(c.held(), (7, 6, 0));
    }

    #[test]
    fn joins_are_capped_per_address_and_in_total_and_freed_on_close() {
        let now = Instant::now();
        let mut c = Counts::new(PeerLimits { max_handshakes_per_address: 100, max_handshakes: 100, ..limits() });
        let join = |c: &mut Counts, from| {
            assert_eq!(c.admit(from, true, now), NOW);
            c.handshake_done(from);
            c.join(from)
        };
        assert_eq!(join(&mut c, ip(1)), Ok(()));
        assert_eq!(join(&mut c, ip(1)), Ok(()));
        assert_eq!(join(&mut c, ip(1)), Err(Refusal::JoinsFromAddress(2)));
        c.closed(ip(1), false); // the refused one
        assert_eq!(join(&mut c, ip(2)), Ok(()));
        assert_eq!(join(&mut c, ip(3)), Ok(()));
        assert_eq!(join(&mut c, ip(4)), Err(Refusal::Joins(4)));
        c.closed(ip(4), false);
        c.closed(ip(1), true);
        assert_eq!(join(&mut c, ip(4)), Ok(()));
        assert_eq!(c.held(), (4, 0, 4));
    }

    #[test]
    fn authenticated_connections_count_only_against_the_total() {
        let now = Instant::now();
        let mut c = Counts::new(PeerLimits { max_handshakes_per_address: 100, max_handshakes: 100, ..limits() });
        for _ in 0..10 {
            assert_eq!(c.admit(ip(1), true, now), NOW);
            c.handshake_done(ip(1));
        }
        assert_eq!(c.admit(ip(2), true, now), Admission::Refuse(Refusal::Connections(10)));
        c.closed(ip(1), false);
        assert_eq!(c.admit(ip(2), true, now), NOW);
    }

    #[test]
    fn the_handshake_rate_is_bounded_and_unvalidated_peers_are_retried_under_pressure() {
        let start = Instant::now();
        let mut c = Counts::new(PeerLimits {
            max_handshakes: 1000,
            max_handshakes_per_address: 1000,
            max_connections: 1000,
            ..limits()
        });
        // Half the burst goes to anyone; then unproven addresses must come back validated.
        for _ in 0..11 {
            assert_eq!(c.admit(ip(1), false, start), NOW);
        }
        assert_eq!(c.admit(ip(1), false, start), Admission::Retry);
        for _ in 0..9 {
            assert_eq!(c.admit(ip(1), true, start), NOW);
        }
        assert_eq!(c.admit(ip(1), true, start), Admission::Refuse(Refusal::Rate));
        // Tokens come back at the rate: 10 per second.
        let later = start + Duration::from_millis(500);
        for _ in 0..5 {
            assert_eq!(c.admit(ip(1), true, later), NOW);
        }
        assert_eq!(c.admit(ip(1), true, later), Admission::Refuse(Refusal::Rate));
        // And never more than the burst.
        let much_later = start + Duration::from_secs(3600);
        for _ in 0..20 {
            assert_eq!(c.admit(ip(1), true, much_later), NOW);
        }
        assert_eq!(c.admit(ip(1), true, much_later), Admission::Refuse(Refusal::Rate));
    }

    #[test]
    fn past_the_burst_validated_peers_wait_for_their_token_up_to_the_limit() {
        let start = Instant::now();
        let mut c = Counts::new(PeerLimits {
            max_handshakes: 1000,
            max_handshakes_per_address: 1000,
            max_connections: 1000,
            max_handshake_wait: Duration::from_secs(1),
            ..limits()
        });
        for _ in 0..20 {
            assert_eq!(c.admit(ip(1), true, start), NOW);
        }
        // 10 a second: the next ten wait 0.1 s more each, up to the one-second limit.
        for k in 1..=10u32 {
            match c.admit(ip(1), true, start) {
                Admission::Accept { wait } => {
                    assert!((wait.as_secs_f64() - f64::from(k) * 0.1).abs() < 1e-6, "{k}: {wait:?}")
                }
                other => panic!("{k}: {other:?}"),
            }
        }
        assert_eq!(c.admit(ip(1), true, start), Admission::Refuse(Refusal::Rate));
        // An unproven address is sent a Retry, never queued.
        assert_eq!(c.admit(ip(2), false, start), Admission::Retry);
        // The debt is paid back at the rate: half a second later, five tokens are owed, so
        // the next handshake waits 0.6 s.
        let later = start + Duration::from_millis(500);
        match c.admit(ip(1), true, later) {
            Admission::Accept { wait } => assert!((wait.as_secs_f64() - 0.6).abs() < 1e-6, "{wait:?}"),
            other => panic!("{other:?}"),
        }
        // Waiting handshakes hold their slots like any other in progress.
        assert_eq!(c.held(), (31, 31, 0));
    }

    #[test]
    fn addresses_are_forgotten_when_their_connections_end() {
        let now = Instant::now();
        let mut c = Counts::new(limits());
        assert_eq!(c.admit(ip(9), true, now), NOW);
        c.handshake_done(ip(9));
        c.join(ip(9)).unwrap();
        c.closed(ip(9), true);
        assert!(c.per_address.is_empty());
        assert_eq!(c.held(), (0, 0, 0));
    }

    #[test]
    fn statuses_of_replicas_the_node_does_not_hold_are_dropped() {
        let held: std::collections::BTreeSet<String> = ["w-0".to_string(), "w-1".to_string()].into();
        let statuses: BTreeMap<String, ReplicaStatus> = ["w-0", "w-1", "invented-1", "invented-2", "other-node-0"]
            .iter()
            .map(|n| (n.to_string(), ReplicaStatus::default()))
            .collect();
        let (kept, dropped) = held_statuses(statuses, &held);
        assert_eq!(kept.keys().cloned().collect::<Vec<_>>(), ["w-0", "w-1"]);
        assert_eq!(dropped, 3);
    }

    #[tokio::test]
    async fn manifests_parse_off_the_workers_and_a_deep_one_is_refused_fast() {
        let ok =
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec: {runtime: wasm, image: r/w:1}\n";
        assert_eq!(parse_documents(ok.to_string()).await.unwrap().len(), 1);
        let deep = format!("apiVersion: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = Instant::now();
        let err = parse_documents(deep).await.unwrap_err();
        assert!(matches!(err, ParseError::Manifest(_)), "{err}");
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    }
}
