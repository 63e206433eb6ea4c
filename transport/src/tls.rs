//! TLS and QUIC settings for every Flotilla endpoint.
//!
//! All configs use the *ring* provider explicitly and TLS 1.3 only (QUIC requires it). Clients
//! always verify the hub as [`HUB_SERVER_NAME`], never as the address they dialled, so the hub's
//! IP may change without reissuing its certificate.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::{ALPN_AGENT, ALPN_API, ALPN_JOIN, HUB_SERVER_NAME};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} is not a valid PEM certificate: {reason}")]
    InvalidCertificate { what: &'static str, reason: String },
    #[error("{what} is not a valid PEM private key: {reason}")]
    InvalidKey { what: &'static str, reason: String },
    #[error("certificate authority fingerprint {0:?} is not 64 hex digits")]
    InvalidPin(String),
    #[error("building the tls configuration failed: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the certificate verifier failed: {0}")]
    Verifier(String),
    #[error("tls configuration is unusable for quic: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("idle timeout of {0:?} is out of range")]
    IdleTimeout(Duration),
    #[error("binding udp socket on {addr} failed: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("resolving {addr:?} failed: {source}")]
    Resolve { addr: String, source: std::io::Error },
    #[error("resolving {0:?} returned no address")]
    NoAddress(String),
    #[error("connecting to hub at {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: quinn::ConnectError },
    #[error("handshake with hub at {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: quinn::ConnectionError },
    #[error("no answer from a hub at {addr} within {waited:?} (is it running, and is UDP port {port} open to you?)", port = .addr.port())]
    NoAnswer { addr: SocketAddr, waited: Duration },
}

impl TlsError {
    /// The peer answered and refused the connection before its handshake (a hub over its
    /// handshake rate or caps): it is up, and busy. Retried soon, unlike a peer that never
    /// answers.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            TlsError::Handshake { source: quinn::ConnectionError::ConnectionClosed(close), .. }
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }
}

/// QUIC liveness settings shared by the hub and its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// How often an idle connection sends a keep-alive (default 5s).
    pub keep_alive: Duration,
    /// How long without any packet before a connection is considered dead (default 8s).
    pub idle_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::with_idle_timeout(DEFAULT_IDLE_TIMEOUT)
    }
}

/// The idle timeout of an agent's link and of the hub (`--link-timeout`, `--node-grace`)
/// unless set otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(8);

/// Of the idle timeout, what is left after a keep-alive for QUIC's loss recovery to resend a
/// lost one (probe timeouts, doubling from a few round trips) before the peer gives up.
const RECOVERY_MARGIN: Duration = Duration::from_secs(3);

/// The keep-alive interval an idle timeout allows on its own: [`RECOVERY_MARGIN`] before it,
/// at least four per timeout, never below 100 ms.
fn keep_alive_for(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).max(idle_timeout.saturating_sub(RECOVERY_MARGIN)).max(Duration::from_millis(100))
}

impl Tuning {
    /// Tuning that declares a connection dead after `idle_timeout` of silence. Keep-alives go
    /// out as rarely as that allows: [`RECOVERY_MARGIN`] before the timeout, but at least four
    /// per timeout when it is short (8 s: every 5 s). An idle link carries a keep-alive and
    /// its acknowledgement per interval and nothing else, so this interval is an idle node's
    /// traffic (BENCHMARKS.md, "Fleet scale").
    ///
    /// QUIC uses the smaller of the two peers' idle timeouts, but each side's keep-alives
    /// follow its own settings. So a timeout longer than [`DEFAULT_IDLE_TIMEOUT`] still sends
    /// keep-alives as often as the default does, which a hub on the default needs; a hub with
    /// a shorter one than its agents sends keep-alives of its own
    /// ([`Tuning::server_liveness`]).
    pub fn with_idle_timeout(idle_timeout: Duration) -> Tuning {
        let keep_alive = keep_alive_for(idle_timeout).min(keep_alive_for(DEFAULT_IDLE_TIMEOUT));
        Tuning { keep_alive, idle_timeout }
    }

    fn transport(&self) -> Result<Arc<quinn::TransportConfig>, TlsError> {
        Ok(Arc::new(self.liveness()?))
    }

    /// Keep-alive and idle timeout, quinn's defaults otherwise.
    fn liveness(&self) -> Result<quinn::TransportConfig, TlsError> {
        let idle =
            quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| TlsError::IdleTimeout(self.idle_timeout))?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(self.keep_alive)).max_idle_timeout(Some(idle));
        Ok(transport)
    }

    /// The hub's side. Clients send the keep-alives (an agent's at least as often as the
    /// default tuning's), and any packet received, an ACK of one included, restarts each
    /// side's idle timer, so pings from both sides would only double the idle traffic of every
    /// connection (measured with `flotilla sim`, BENCHMARKS.md "Fleet scale"). A hub whose
    /// idle timeout is shorter than the default (`--node-grace 3s`) would lose idle agents on
    /// the default between two of their keep-alives, so it sends its own.
    fn server_liveness(&self) -> Result<quinn::TransportConfig, TlsError> {
        let mut transport = self.liveness()?;
        if self.idle_timeout >= DEFAULT_IDLE_TIMEOUT {
            transport.keep_alive_interval(None);
        }
        Ok(transport)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config: leaf + CA chain, optional client auth against the CA, ALPNs [JOIN, AGENT,
/// API], tuning applied, and the limits of an unauthenticated peer on every connection until
/// the hub widens it ([`crate::limits`]).
///
/// The CA is always sent after the leaf: joining agents have only a fingerprint of it and
/// check what the hub presents. Clients may present a certificate signed by the CA (expired or
/// foreign ones fail the handshake) or none; the hub decides per ALPN what it requires.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut chain = parse_certs(cert_pem, "server certificate")?;
    let ca = parse_certs(ca_pem, "certificate authority")?;
    let ca_cert = ca[0].clone();
    if chain.last() != Some(&ca_cert) {
        chain.push(ca_cert.clone());
    }
    let key = parse_key(key_pem, "server key")?;

    let provider = provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(root_store(ca_cert)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_JOIN.to_vec(), ALPN_AGENT.to_vec(), ALPN_API.to_vec()];

    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config
        .transport_config(crate::limits::server_transport(tuning.server_liveness()?))
        .max_incoming(crate::limits::MAX_INCOMING)
        .incoming_buffer_size(crate::limits::INCOMING_BUFFER)
        .incoming_buffer_size_total(crate::limits::INCOMING_BUFFER_TOTAL);
    Ok(config)
}

/// Client config for the join connection: the agent does not have the CA yet, only the
/// fingerprint from its token. The hub must present `[leaf, ca]`; the CA's SHA-256 must equal
/// the pin and the leaf must verify against it as [`HUB_SERVER_NAME`].
///
/// The pin is hex, case-insensitive; colons and a `sha256:` prefix are tolerated.
pub fn client_config_pinned(
    ca_fingerprint: &str,
    alpn: &[u8],
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TlsError> {
    let pin = normalize_pin(ca_fingerprint)?;
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { pin, provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quic_client(tls, tuning)
}

/// Client config for mutual TLS: verifies the hub against `ca_pem` and presents
/// `cert_pem`/`key_pem`.
pub fn client_config_mtls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TlsError> {
    let ca = parse_certs(ca_pem, "certificate authority")?;
    let chain = parse_certs(cert_pem, "client certificate")?;
    let key = parse_key(key_pem, "client key")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SlowClockTolerant(
            WebPkiServerVerifier::builder_with_provider(root_store(ca[0].clone())?, provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?,
        )))
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    quic_client(tls, tuning)
}

/// Verifies the hub like webpki does, except that a node whose clock is behind (a board
/// without a battery-backed clock boots at the epoch, or years late) is not locked out: when
/// the only objection is that the hub's certificate is not valid *yet*, the chain, signature
/// and name are checked again as of the certificate's own start. Expiry is still judged by the
/// node's clock, and the mutual TLS check on the hub side uses the hub's clock.
#[derive(Debug)]
struct SlowClockTolerant(Arc<WebPkiServerVerifier>);

/// Runs `verify` at `now`, and once more at the certificate's start if it was only "not valid
/// yet".
fn tolerate_slow_clock(
    end_entity: &CertificateDer<'_>,
    now: UnixTime,
    verify: impl Fn(UnixTime) -> Result<ServerCertVerified, rustls::Error>,
) -> Result<ServerCertVerified, rustls::Error> {
    use rustls::CertificateError::{NotValidYet, NotValidYetContext};
    let not_before = match verify(now) {
        Err(rustls::Error::InvalidCertificate(NotValidYetContext { not_before, .. })) => not_before,
        Err(rustls::Error::InvalidCertificate(NotValidYet)) => {
            let parsed = x509_parser::parse_x509_certificate(end_entity.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(NotValidYet))?;
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(parsed.1.validity().not_before.timestamp()).unwrap_or(0),
            ))
        }
        other => return other,
    };
    tracing::warn!(
        node_clock = now.as_secs(),
        certificate_start = not_before.as_secs(),
        "this node's clock is behind the hub's certificate; verifying as of the certificate's start"
    );
    verify(UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_before.as_secs() + 1)))
}

impl ServerCertVerifier for SlowClockTolerant {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        tolerate_slow_clock(end_entity, now, |at| {
            self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, at)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn quic_client(tls: rustls::ClientConfig, tuning: &Tuning) -> Result<quinn::ClientConfig, TlsError> {
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(tuning.transport()?);
    Ok(config)
}

/// An endpoint for outgoing connections, bound to `[::]:0` (dual stack) or, where IPv6 is
/// unavailable, `0.0.0.0:0`.
pub fn client_endpoint() -> Result<quinn::Endpoint, TlsError> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    match quinn::Endpoint::client(v6) {
        Ok(endpoint) => Ok(endpoint),
        Err(e) => {
            tracing::debug!(error = %e, "ipv6 client endpoint unavailable, using ipv4");
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
            quinn::Endpoint::client(v4).map_err(|source| TlsError::Bind { addr: v4, source })
        }
    }
}

/// The endpoint of an agent's link to its hub: as [`client_endpoint`], but the connection IDs
/// this side asks the hub to put on its packets are empty. An agent holds one connection to a
/// hub at a time from its own socket, so the socket's address pair identifies the connection
/// and the 8 bytes an ID would take come off every packet the hub sends it: an idle link's
/// acknowledgements are 27 bytes instead of 35 (BENCHMARKS.md, "Fleet scale"). Migration still
/// works the way an agent needs it: the hub's IDs are unchanged, so a NAT rebinding the agent's
/// address keeps its connection. One connection per endpoint: a second one to the same
/// address, even after the first closed (it drains for a while), would take over the routing
/// of the first, and the first's end would take it away from the second; the agent makes an
/// endpoint per session.
pub fn link_endpoint() -> Result<quinn::Endpoint, TlsError> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    let bind = |addr: SocketAddr| {
        let socket = std::net::UdpSocket::bind(addr)?;
        quinn::Endpoint::new(link_endpoint_config(), None, socket, Arc::new(quinn::TokioRuntime))
    };
    bind(v6).or_else(|e| {
        tracing::debug!(error = %e, "ipv6 link endpoint unavailable, using ipv4");
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        bind(v4).map_err(|source| TlsError::Bind { addr: v4, source })
    })
}

/// The endpoint configuration of [`link_endpoint`]: zero-length local connection IDs.
pub fn link_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(0)));
    config
}

/// An endpoint accepting connections on `addr` with `config`.
///
/// `reset_secret` keys the stateless reset tokens the endpoint hands out. Derived from a secret
/// that survives restarts (the hub passes one derived from its CA key), it lets a restarted hub
/// answer the first packet of a connection its previous process held with a stateless reset:
/// the agent learns at once that the connection is gone and reconnects, instead of waiting out
/// its idle timeout. Without it, quinn picks a random key per process.
pub fn server_endpoint(
    config: quinn::ServerConfig,
    addr: SocketAddr,
    reset_secret: Option<&[u8]>,
) -> Result<quinn::Endpoint, TlsError> {
    let bind = |source| TlsError::Bind { addr, source };
    let Some(secret) = reset_secret else {
        return quinn::Endpoint::server(config, addr).map_err(bind);
    };
    let derived = reset_key(secret);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derived);
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    // The connection IDs carry a keyed check that lets an endpoint drop stray packets cheaply;
    // keyed from the same secret, a restarted process still recognizes its predecessor's IDs
    // and answers them with the reset instead of dropping them.
    endpoint_config.cid_generator(move || Box::new(HubConnectionIds::new(derived)));
    quinn::Endpoint::new(endpoint_config, Some(config), socket, Arc::new(quinn::TokioRuntime)).map_err(bind)
}

/// The hub's connection IDs: 4 bytes, 3 random and 1 a keyed check of them. Every packet an
/// agent sends carries one, so they are half the 8 bytes of quinn's keyed IDs
/// (`HashedConnectionIdGenerator`: 3 random, 5 of check): an idle agent's keep-alive is 34
/// bytes instead of 38 (BENCHMARKS.md, "Fleet scale"). 3 random bytes are 16.7 million IDs,
/// the same as quinn's (quinn draws again when one is in use), enough for a few hundred
/// thousand connections with the handful each holds. The 1-byte check lets one stray
/// short-header packet in 256 through to be answered with a stateless reset (never larger than
/// the packet that drew it) instead of being dropped; quinn's, a non-cryptographic hash, could
/// be forged as well, so the check was never a defence, only a cheap filter.
struct HubConnectionIds {
    key: [u8; 32],
    random: ring::rand::SystemRandom,
}

impl HubConnectionIds {
    const RANDOM: usize = 3;

    fn new(key: [u8; 32]) -> HubConnectionIds {
        HubConnectionIds { key, random: ring::rand::SystemRandom::new() }
    }

    fn check(&self, random: &[u8]) -> u8 {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"flotilla quic connection id v1\0");
        h.update(self.key);
        h.update(random);
        h.finalize()[0]
    }
}

impl quinn_proto::ConnectionIdGenerator for HubConnectionIds {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use ring::rand::SecureRandom as _;
        let mut id = [0u8; Self::RANDOM + 1];
        if self.random.fill(&mut id[..Self::RANDOM]).is_err() {
            // The system's random source failing is beyond recovery here; uniqueness is still
            // kept (quinn draws again while an ID is in use), only unpredictability is lost.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            id[..Self::RANDOM].copy_from_slice(&t.subsec_nanos().to_le_bytes()[..Self::RANDOM]);
        }
        id[Self::RANDOM] = self.check(&id[..Self::RANDOM]);
        quinn_proto::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        match cid.len() == Self::RANDOM + 1 && cid[Self::RANDOM] == self.check(&cid[..Self::RANDOM]) {
            true => Ok(()),
            false => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        Self::RANDOM + 1
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The stateless reset key for `secret`: a hash under its own label, so the key reveals
/// nothing about the secret and no other use of the secret yields the same bytes.
fn reset_key(secret: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"flotilla quic stateless reset v1\0");
    h.update(secret);
    h.finalize().into()
}

/// Connects to the hub at `addr`, always verifying it as [`HUB_SERVER_NAME`], and waits for
/// the handshake.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, TlsError> {
    endpoint
        .connect_with(config, addr, HUB_SERVER_NAME)
        .map_err(|source| TlsError::Connect { addr, source })?
        .await
        .map_err(|source| TlsError::Handshake { addr, source })
}

/// Like [`connect`], but gives up when nothing at `addr` has answered the first handshake
/// packet within `first_answer`.
///
/// A hub that is down (or a port that drops UDP) never answers, and QUIC would wait out the
/// whole idle timeout (8 s by default) before saying so; a person at a prompt should know
/// in a second or two. Only the *first* answer is bounded: once the hub's first handshake
/// flight has arrived (the server hello, whose ALPN is the handshake data), the rest of the
/// handshake runs under the usual idle timeout, so a slow but alive link (a long RTT, a lost
/// packet retransmitted) still connects. `first_answer` should cover a round trip plus one
/// retransmission of the client's first packet (quinn resends it after about a second when no
/// RTT is known yet).
pub async fn connect_answered_within(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    first_answer: Duration,
) -> Result<quinn::Connection, TlsError> {
    let mut connecting =
        endpoint.connect_with(config, addr, HUB_SERVER_NAME).map_err(|source| TlsError::Connect { addr, source })?;
    match tokio::time::timeout(first_answer, connecting.handshake_data()).await {
        Err(_elapsed) => return Err(TlsError::NoAnswer { addr, waited: first_answer }),
        Ok(Err(source)) => return Err(TlsError::Handshake { addr, source }),
        Ok(Ok(_)) => {}
    }
    connecting.await.map_err(|source| TlsError::Handshake { addr, source })
}

/// What the peer's leaf certificate says (name, validity, key), if it presented one. The
/// handshake verified it; this only reads it.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<crate::pki::LeafFacts> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    crate::pki::leaf_facts_der(certs.first()?).ok()
}

/// Checks that `cert_pem` is a client certificate the CA `ca_pem` issued, as webpki checks one
/// at a handshake but as of the last second of the certificate's own validity, and returns what
/// it says. For renewing a certificate that has expired: the caller judges the expiry.
pub fn verify_client_cert(ca_pem: &str, cert_pem: &str) -> Result<crate::pki::LeafFacts, TlsError> {
    let invalid = |reason: String| TlsError::InvalidCertificate { what: "the certificate to renew", reason };
    let ca = parse_certs(ca_pem, "certificate authority")?;
    let leaf = parse_certs(cert_pem, "the certificate to renew")?;
    let facts = crate::pki::leaf_facts_der(&leaf[0]).map_err(|e| invalid(e.to_string()))?;
    let at = facts
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| invalid("it expired before 1970".into()))?
        .saturating_sub(Duration::from_secs(1));
    let verifier = WebPkiClientVerifier::builder_with_provider(root_store(ca[0].clone())?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    verifier.verify_client_cert(&leaf[0], &[], UnixTime::since_unix_epoch(at)).map_err(|e| invalid(e.to_string()))?;
    Ok(facts)
}

/// CN of the peer's leaf certificate, if it presented one.
pub fn peer_common_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let cn = x509.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// SHA-256 (lowercase hex) of the peer's leaf certificate (DER), if it presented one: what the
/// hub records as a node's current certificate.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    Some(crate::pki::fingerprint_der(certs.first()?))
}

/// The ALPN negotiated on a connection.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<HandshakeData>().ok()?.protocol
}

/// Resolves "host:port" (DNS or IP) to a SocketAddr.
pub async fn resolve(addr: &str) -> Result<SocketAddr, TlsError> {
    if let Ok(parsed) = addr.parse::<SocketAddr>() {
        return Ok(parsed);
    }
    let mut addrs =
        tokio::net::lookup_host(addr).await.map_err(|source| TlsError::Resolve { addr: addr.to_string(), source })?;
    addrs.next().ok_or_else(|| TlsError::NoAddress(addr.to_string()))
}

fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidCertificate { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::InvalidCertificate { what, reason: "no certificate found".into() });
    }
    Ok(certs)
}

fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::InvalidKey { what, reason: e.to_string() })
}

fn root_store(ca: CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    Ok(Arc::new(roots))
}

fn normalize_pin(pin: &str) -> Result<String, TlsError> {
    let trimmed = pin.trim();
    let hex_part = trimmed.strip_prefix("sha256:").unwrap_or(trimmed);
    let normalized: String = hex_part.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    if normalized.len() != 64 || !normalized.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::InvalidPin(pin.to_string()));
    }
    Ok(normalized)
}

/// Verifies the hub on the join connection, before the agent has the CA: the last certificate
/// the hub presents must hash to the pinned fingerprint, and the leaf must verify against it
/// with webpki (validity, signature, server name).
#[derive(Debug)]
struct PinnedCaVerifier {
    /// Lowercase hex SHA-256 of the CA certificate DER.
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((ca, rest)) = intermediates.split_last() else {
            return Err(rustls::Error::General(
                "hub presented no certificate authority after its certificate, so the token's pin cannot be checked"
                    .into(),
            ));
        };
        let got = crate::pki::fingerprint_der(ca);
        if got != self.pin {
            return Err(rustls::Error::General(format!(
                "hub certificate authority fingerprint {got} does not match the token's pin {}",
                self.pin
            )));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| {
            rustls::Error::General(format!(
                "hub certificate authority matches the pin but is not a usable trust anchor: {e}"
            ))
        })?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("building the hub certificate verifier failed: {e}")))?;
        tolerate_slow_clock(end_entity, now, |at| {
            webpki.verify_server_cert(end_entity, rest, server_name, ocsp_response, at)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn keep_alives_leave_three_seconds_to_recover_a_lost_one_and_come_as_often_as_the_defaults() {
        let t = Tuning::with_idle_timeout(Duration::from_secs(8));
        assert_eq!((t.keep_alive, t.idle_timeout), (Duration::from_secs(5), Duration::from_secs(8)));
        assert_eq!(Tuning::default(), t);
        // Short timeouts: four keep-alives per timeout.
        assert_eq!(Tuning::with_idle_timeout(Duration::from_secs(3)).keep_alive, Duration::from_millis(750));
        assert_eq!(Tuning::with_idle_timeout(Duration::from_secs(2)).keep_alive, Duration::from_millis(500));
        assert_eq!(Tuning::with_idle_timeout(Duration::from_millis(200)).keep_alive, Duration::from_millis(100));
        // Long ones: as often as the default's, which a hub on the default times out by.
        assert_eq!(Tuning::with_idle_timeout(Duration::from_secs(12)).keep_alive, Duration::from_secs(5));
        let t = Tuning::with_idle_timeout(Duration::from_secs(60));
        assert_eq!(t.keep_alive, Duration::from_secs(5));
        assert!(t.transport().is_ok());
    }

    #[test]
    fn hub_connection_ids_are_four_bytes_that_the_same_key_recognizes_and_another_does_not() {
        use quinn_proto::ConnectionIdGenerator as _;
        let mut hub = HubConnectionIds::new([7; 32]);
        let restarted = HubConnectionIds::new([7; 32]);
        let other = HubConnectionIds::new([8; 32]);
        let ids: Vec<_> = (0..1000).map(|_| hub.generate_cid()).collect();
        assert!(ids.iter().all(|id| id.len() == 4 && restarted.validate(id).is_ok()));
        // One in 256 passes another key's check by chance.
        let passed = ids.iter().filter(|id| other.validate(id).is_ok()).count();
        assert!(passed < 20, "{passed} of 1000 passed another key's check");
        let distinct: std::collections::HashSet<_> = ids.iter().map(|id| id.to_vec()).collect();
        assert!(distinct.len() > 990, "{} distinct of 1000", distinct.len());
        assert!(restarted.validate(&quinn_proto::ConnectionId::new(&[1, 2, 3, 4, 5, 6, 7, 8])).is_err());
    }

    #[test]
    fn a_hub_pings_only_when_its_timeout_is_shorter_than_the_agents_default() {
        let pings = |idle| {
            let t = Tuning::with_idle_timeout(Duration::from_secs(idle)).server_liveness().unwrap();
            format!("{t:?}").contains("keep_alive_interval: Some")
        };
        assert!(!pings(8) && !pings(30));
        assert!(pings(3) && pings(7));
    }
    use super::*;

    #[test]
    fn pin_is_normalized() {
        let hex = "AB".repeat(32);
        assert_eq!(normalize_pin(&hex).unwrap(), "ab".repeat(32));
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(normalize_pin(&format!("sha256:{colons}")).unwrap(), "ab".repeat(32));
        assert!(matches!(normalize_pin("abc"), Err(TlsError::InvalidPin(_))));
        assert!(matches!(normalize_pin(&"zz".repeat(32)), Err(TlsError::InvalidPin(_))));
    }

    #[test]
    fn an_expired_certificate_is_verified_as_of_its_own_life_and_only_if_ours() {
        let ca = crate::pki::Ca::generate("test ca").unwrap();
        let expired = ca.issue_client_expired("node:edge-1").unwrap();
        let facts = verify_client_cert(ca.cert_pem(), &expired.cert_pem).unwrap();
        assert_eq!(facts.common_name, "node:edge-1");
        assert!(facts.not_after < std::time::SystemTime::now());
        let other = crate::pki::Ca::generate("another ca").unwrap();
        let foreign = other.issue_client("node:edge-1", Duration::from_secs(600)).unwrap();
        let err = verify_client_cert(ca.cert_pem(), &foreign.cert_pem).unwrap_err();
        assert!(err.to_string().contains("certificate to renew"), "{err}");
        // A server certificate is not a client one.
        let server = ca.issue_server(&[], Duration::from_secs(600)).unwrap();
        assert!(verify_client_cert(ca.cert_pem(), &server.cert_pem).is_err());
    }

    #[test]
    fn bad_pem_is_an_error() {
        let err = server_config("nope", "nope", "nope", &Tuning::default()).unwrap_err();
        assert!(err.to_string().contains("server certificate"), "{err}");
    }
}
