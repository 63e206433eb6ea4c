//! Flotilla's transport: QUIC endpoints secured by the cluster's own certificate authority,
//! and length-prefixed JSON frames on their streams. It owns every TLS and QUIC decision in
//! the project: the CA and the certificates it issues ([`pki`]), the client and server
//! configurations, the pinned verifier agents use to join before they hold the CA, ALPNs and
//! keep-alive settings ([`tls`]), what a peer may make the hub hold before and after it
//! authenticates ([`limits`]), and reading and writing frames ([`frame`]). The hub, the
//! agent and the CLI build their endpoints only through it. It must never decide who is
//! authorised to do what (it exposes the peer's common name and ALPN; the hub judges them),
//! never trust a certificate that does not chain to the cluster CA or the pinned fingerprint,
//! never rely on a process-wide rustls crypto provider, and never panic on peer input.

pub mod frame;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod tls;

/// The DNS name in the hub's server certificate; clients always verify the hub under this name,
/// whatever address they dialled.
pub const HUB_SERVER_NAME: &str = "flotilla-hub";
/// ALPN of the join connection (pinned CA, no client certificate).
pub const ALPN_JOIN: &[u8] = b"flotilla-join/1";
/// ALPN of an agent's session (mutual TLS, `node:<name>`).
pub const ALPN_AGENT: &[u8] = b"flotilla-agent/1";
/// ALPN of the admin API (mutual TLS, `admin:<name>`).
pub const ALPN_API: &[u8] = b"flotilla-api/1";

#[cfg(test)]
mod tests {
    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::pki::Ca>();
        check::<crate::pki::CertifiedKey>();
        check::<crate::tls::Tuning>();
        check::<crate::tls::TlsError>();
        check::<crate::frame::FrameError>();
        check::<crate::pki::PkiError>();
    }
}
