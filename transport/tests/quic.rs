//! Real QUIC handshakes on 127.0.0.1 against the configs the hub, agents and CLI use.

mod common;

use common::{HOUR, Hub, STEP, connect_ok, connect_refused};
use flotilla_transport::pki::{self, Ca};
use flotilla_transport::tls::{self, Tuning};
use flotilla_transport::{ALPN_AGENT, ALPN_API, ALPN_JOIN, HUB_SERVER_NAME, frame};

#[tokio::test]
async fn pinned_join_succeeds_with_the_right_pin() {
    let hub = Hub::start();
    let config = tls::client_config_pinned(&hub.ca.fingerprint(), ALPN_JOIN, &Tuning::default()).unwrap();
    let (client, server) = connect_ok(&hub, config).await;
    assert_eq!(tls::negotiated_alpn(&client).as_deref(), Some(ALPN_JOIN));
    assert_eq!(tls::negotiated_alpn(&server).as_deref(), Some(ALPN_JOIN));
    assert_eq!(tls::peer_common_name(&server), None, "join clients present no certificate");
    assert_eq!(tls::peer_common_name(&client).as_deref(), Some(HUB_SERVER_NAME));
}

#[tokio::test]
async fn pinned_join_accepts_an_uppercase_colon_separated_pin() {
    let hub = Hub::start();
    let fp = hub.ca.fingerprint().to_uppercase();
    let pin = fp.as_bytes().chunks(2).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect::<Vec<_>>().join(":");
    let config = tls::client_config_pinned(&pin, ALPN_JOIN, &Tuning::default()).unwrap();
    connect_ok(&hub, config).await;
}

#[tokio::test]
async fn pinned_join_fails_with_a_wrong_pin_and_says_why() {
    let hub = Hub::start();
    let other = Ca::generate("someone else").unwrap();
    let config = tls::client_config_pinned(&other.fingerprint(), ALPN_JOIN, &Tuning::default()).unwrap();
    let server = hub.accept();
    let endpoint = tls::client_endpoint().unwrap();
    let err = tokio::time::timeout(STEP, tls::connect(&endpoint, config, hub.addr))
        .await
        .expect("client handshake timed out")
        .expect_err("a wrong pin must fail the handshake")
        .to_string();
    eprintln!("wrong pin: {err}");
    assert!(err.contains(&hub.ca.fingerprint()), "error should name the hub's fingerprint: {err}");
    assert!(err.contains(&other.fingerprint()), "error should name the pin: {err}");
    assert!(err.contains("does not match the token's pin"), "{err}");
    let server = tokio::time::timeout(STEP, server).await.unwrap().unwrap();
    assert!(server.is_err(), "server side must not get a connection");
}

#[tokio::test]
async fn pinned_join_checks_the_server_name_too() {
    // A certificate signed by the pinned CA but not for flotilla-hub is refused.
    let ca = Ca::generate("flotilla test ca").unwrap();
    let wrong = ca.issue_client("flotilla-hub", HOUR).unwrap(); // clientAuth only, no SAN
    let config = tls::server_config(&wrong.cert_pem, &wrong.key_pem, ca.cert_pem(), &Tuning::default()).unwrap();
    let endpoint = tls::server_endpoint(config, "127.0.0.1:0".parse().unwrap(), None).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let incoming = endpoint.accept().await.unwrap();
        incoming.await.is_err()
    });
    let client = tls::client_config_pinned(&ca.fingerprint(), ALPN_JOIN, &Tuning::default()).unwrap();
    let result =
        tokio::time::timeout(STEP, tls::connect(&tls::client_endpoint().unwrap(), client, addr)).await.unwrap();
    assert!(result.is_err(), "a leaf that is not a server cert for flotilla-hub must be refused");
    assert!(tokio::time::timeout(STEP, accept).await.unwrap().unwrap());
}

#[tokio::test]
async fn invalid_pin_is_refused_before_connecting() {
    let err = tls::client_config_pinned("not-a-fingerprint", ALPN_JOIN, &Tuning::default()).unwrap_err();
    assert!(matches!(err, tls::TlsError::InvalidPin(_)), "{err}");
}

#[tokio::test]
async fn mtls_exposes_the_client_common_name() {
    let hub = Hub::start();
    let (client, server) = connect_ok(&hub, hub.mtls("node:alpha", ALPN_AGENT)).await;
    assert_eq!(tls::peer_common_name(&server).as_deref(), Some("node:alpha"));
    assert_eq!(tls::negotiated_alpn(&server).as_deref(), Some(ALPN_AGENT));
    assert_eq!(tls::peer_common_name(&client).as_deref(), Some(HUB_SERVER_NAME));

    // And the connection carries frames both ways.
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    frame::write(&mut send, &"ping".to_string()).await.unwrap();
    let (mut ssend, mut srecv) = server.accept_bi().await.unwrap();
    assert_eq!(frame::read::<String>(&mut srecv).await.unwrap().as_deref(), Some("ping"));
    frame::write(&mut ssend, &"pong".to_string()).await.unwrap();
    assert_eq!(frame::read::<String>(&mut recv).await.unwrap().as_deref(), Some("pong"));
}

#[tokio::test]
async fn mtls_with_a_csr_signed_certificate() {
    let hub = Hub::start();
    let (key_pem, csr_pem) = pki::generate_csr("admin:evil").unwrap();
    let cert_pem = hub.ca.sign_csr(&csr_pem, "node:beta", HOUR).unwrap();
    let config =
        tls::client_config_mtls(hub.ca.cert_pem(), &cert_pem, &key_pem, ALPN_AGENT, &Tuning::default()).unwrap();
    let (_client, server) = connect_ok(&hub, config).await;
    assert_eq!(tls::peer_common_name(&server).as_deref(), Some("node:beta"));
}

#[tokio::test]
async fn mtls_works_with_a_reloaded_ca() {
    let ca = Ca::generate("flotilla test ca").unwrap();
    let reloaded = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
    let hub = Hub::start_with(reloaded);
    // A client issued by the original CA object is still trusted by the reloaded hub.
    let creds = ca.issue_client("admin:root", HOUR).unwrap();
    let config =
        tls::client_config_mtls(ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_API, &Tuning::default()).unwrap();
    let (_client, server) = connect_ok(&hub, config).await;
    assert_eq!(tls::peer_common_name(&server).as_deref(), Some("admin:root"));
}

#[tokio::test]
async fn client_cert_from_a_foreign_ca_is_refused() {
    let hub = Hub::start();
    let foreign = Ca::generate("foreign").unwrap();
    let creds = foreign.issue_client("node:intruder", HOUR).unwrap();
    // The client trusts the real hub CA, so only its own certificate is wrong.
    let config =
        tls::client_config_mtls(hub.ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &Tuning::default())
            .unwrap();
    let (server_err, client_err) = connect_refused(&hub, config).await;
    eprintln!("foreign: server {server_err}; client {client_err}");
    let msg = server_err.to_string();
    assert!(msg.to_lowercase().contains("certificate"), "server error should be a certificate failure: {msg}");
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let hub = Hub::start();
    let creds = hub.ca.issue_client_expired("node:stale").unwrap();
    assert!(pki::cert_not_after(&creds.cert_pem).unwrap() < std::time::SystemTime::now());
    let config =
        tls::client_config_mtls(hub.ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &Tuning::default())
            .unwrap();
    let (server_err, client_err) = connect_refused(&hub, config).await;
    eprintln!("expired: server {server_err}; client {client_err}");
    let msg = server_err.to_string();
    assert!(msg.to_lowercase().contains("expired"), "server error should say expired: {msg}");
}

#[tokio::test]
async fn hub_from_another_ca_is_refused_by_mtls_clients() {
    let hub = Hub::start();
    let other = Ca::generate("other").unwrap();
    let creds = other.issue_client("node:alpha", HOUR).unwrap();
    let config =
        tls::client_config_mtls(other.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &Tuning::default())
            .unwrap();
    let server = hub.accept();
    let result =
        tokio::time::timeout(STEP, tls::connect(&tls::client_endpoint().unwrap(), config, hub.addr)).await.unwrap();
    let err = result.expect_err("client must not trust a hub signed by another CA").to_string();
    assert!(err.contains("certificate"), "{err}");
    assert!(tokio::time::timeout(STEP, server).await.unwrap().unwrap().is_err());
}

#[tokio::test]
async fn connection_without_client_cert_is_accepted_at_tls_level() {
    let hub = Hub::start();
    // API ALPN, no client certificate: TLS lets it through, the hub decides what to require.
    let config = tls::client_config_pinned(&hub.ca.fingerprint(), ALPN_API, &Tuning::default()).unwrap();
    let (_client, server) = connect_ok(&hub, config).await;
    assert_eq!(tls::peer_common_name(&server), None);
    assert_eq!(tls::negotiated_alpn(&server).as_deref(), Some(ALPN_API));
}

#[tokio::test]
async fn unknown_alpn_is_refused() {
    let hub = Hub::start();
    let config = tls::client_config_pinned(&hub.ca.fingerprint(), b"something-else/1", &Tuning::default()).unwrap();
    let server = hub.accept();
    let result =
        tokio::time::timeout(STEP, tls::connect(&tls::client_endpoint().unwrap(), config, hub.addr)).await.unwrap();
    assert!(result.is_err());
    assert!(tokio::time::timeout(STEP, server).await.unwrap().unwrap().is_err());
}

#[tokio::test]
async fn resolve_handles_ips_and_names() {
    let addr = tls::resolve("127.0.0.1:4433").await.unwrap();
    assert_eq!(addr, "127.0.0.1:4433".parse().unwrap());
    let addr = tls::resolve("localhost:4433").await.unwrap();
    assert!(addr.ip().is_loopback());
    assert_eq!(addr.port(), 4433);
    assert!(tls::resolve("no-port-here").await.is_err());
}

/// A restarted hub (same address, same reset secret) answers a packet of a connection its
/// previous process held with a stateless reset: the client learns at once that the
/// connection is gone instead of waiting out its idle timeout.
#[test]
fn a_restarted_endpoint_with_the_same_secret_resets_old_connections_at_once() {
    let ca = Ca::generate("flotilla test ca").unwrap();
    let server = ca.issue_server(&["127.0.0.1".to_string()], HOUR).unwrap();
    let secret = ca.key_pem();
    let config = || tls::server_config(&server.cert_pem, &server.key_pem, ca.cert_pem(), &Tuning::default()).unwrap();
    let creds = ca.issue_client("node:alpha", HOUR).unwrap();
    let client_config =
        tls::client_config_mtls(ca.cert_pem(), &creds.cert_pem, &creds.key_pem, ALPN_AGENT, &Tuning::default())
            .unwrap();

    // The first hub lives on its own runtime, which is torn down without running another
    // step: the process dies and sends nothing, as under SIGKILL.
    let hub_rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, accepted) = hub_rt.block_on(async {
        let endpoint = tls::server_endpoint(config(), "127.0.0.1:0".parse().unwrap(), Some(secret.as_bytes())).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            std::future::pending::<()>().await;
            drop((conn, endpoint));
        });
        (addr, accepted)
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let endpoint = tls::client_endpoint().unwrap();
        tokio::time::timeout(STEP, tls::connect(&endpoint, client_config, addr)).await.unwrap().unwrap()
    });
    drop(accepted);
    hub_rt.shutdown_background();

    rt.block_on(async {
        let mut restarted = None;
        for _ in 0..100 {
            match tls::server_endpoint(config(), addr, Some(secret.as_bytes())) {
                Ok(e) => {
                    restarted = Some(e);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        let _restarted = restarted.expect("the dead hub's address was never released");
        // Any packet from the client now draws a reset.
        let started = std::time::Instant::now();
        // (A bidirectional stream: the hub allows a peer no unidirectional ones.)
        if let Ok((mut s, _)) = client.open_bi().await {
            let _ = s.write_all(b"ping").await;
        }
        let err = tokio::time::timeout(STEP, client.closed()).await.expect("the old connection was never reset");
        eprintln!("old connection ended after {:?}: {err}", started.elapsed());
        assert!(matches!(err, quinn::ConnectionError::Reset), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    });
}

/// A hub certificate signed by `ca`, valid from `start` for `days` days.
fn hub_cert_valid_from(ca: &Ca, start: time::OffsetDateTime, days: i64) -> (String, String) {
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(ca.cert_pem(), rcgen::KeyPair::from_pem(&ca.key_pem()).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![HUB_SERVER_NAME.to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = start;
    params.not_after = start + time::Duration::days(days);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A node whose clock is a day behind the hub's (a board without a battery-backed clock)
/// still connects: "not valid yet" is judged as of the certificate's start. An expired hub
/// certificate is still refused.
#[tokio::test]
async fn a_node_clock_behind_the_hub_still_connects_but_expiry_is_enforced() {
    let ca = Ca::generate("flotilla test ca").unwrap();
    let now = time::OffsetDateTime::now_utc();
    for (start, days, ok) in [(now + time::Duration::days(1), 30, true), (now - time::Duration::days(3), 1, false)] {
        let (cert, key) = hub_cert_valid_from(&ca, start, days);
        let config = tls::server_config(&cert, &key, ca.cert_pem(), &Tuning::default()).unwrap();
        let endpoint = tls::server_endpoint(config, "127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let hub = common::Hub { ca: Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap(), endpoint, addr };
        let client = hub.mtls("node:alpha", ALPN_AGENT);
        if ok {
            connect_ok(&hub, client).await;
        } else {
            let _server = hub.accept();
            let err = tokio::time::timeout(STEP, tls::connect(&tls::client_endpoint().unwrap(), client, hub.addr))
                .await
                .expect("handshake timed out")
                .expect_err("an expired hub certificate must be refused")
                .to_string();
            assert!(err.to_lowercase().contains("expired"), "{err}");
        }
    }
}

/// A client that keeps its config between connections resumes its TLS session: the hub sends
/// no certificate chain the second time, so the handshake carries fewer bytes (and needs no
/// signature checks), which matters on slow, metered edge links. The hub's certificate is
/// made large (many names) so that the chain dominates the handshake's size.
#[tokio::test]
async fn a_reused_client_config_resumes_the_tls_session() {
    let ca = Ca::generate("flotilla test ca").unwrap();
    let names: Vec<String> = (0..150).map(|i| format!("gateway-{i:03}.store.example")).collect();
    let server = ca.issue_server(&names, HOUR).unwrap();
    let config = tls::server_config(&server.cert_pem, &server.key_pem, ca.cert_pem(), &Tuning::default()).unwrap();
    let endpoint = tls::server_endpoint(config, "127.0.0.1:0".parse().unwrap(), None).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let hub = common::Hub { ca, endpoint, addr };
    let config = hub.mtls("node:alpha", ALPN_AGENT);
    let mut received = Vec::new();
    for _ in 0..2 {
        let (client, server) = connect_ok(&hub, config.clone()).await;
        // The server's session ticket follows the handshake; give it a moment to arrive.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(tls::peer_common_name(&server).as_deref(), Some("node:alpha"), "the client is still authenticated");
        received.push(client.stats().udp_rx.bytes);
        client.close(0u32.into(), b"done");
    }
    eprintln!("bytes received by the client: full handshake {}, resumed {}", received[0], received[1]);
    assert!(received[1] + 3000 < received[0], "no resumption: {received:?}");
}

/// Two ends of a connection from `endpoint` to `hub`, established.
async fn connect_from(
    hub: &Hub,
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
) -> (quinn::Connection, quinn::Connection) {
    let server = hub.accept();
    let client = tokio::time::timeout(STEP, tls::connect(endpoint, config, hub.addr)).await.unwrap().unwrap();
    let server = tokio::time::timeout(STEP, server).await.unwrap().unwrap().unwrap();
    (client, server)
}

/// Whichever side has the shorter idle timeout, an idle connection stays up: a hub with a
/// short `--node-grace` pings its agents itself, and an agent with a long `--link-timeout`
/// still pings as often as a hub on the default needs.
#[tokio::test]
async fn an_idle_link_outlives_either_sides_idle_timeout_when_the_two_differ() {
    let short_hub = Hub::start_tuned(
        Ca::generate("flotilla test ca").unwrap(),
        &Tuning::with_idle_timeout(std::time::Duration::from_secs(2)),
    );
    let default_hub = Hub::start();
    let long = Tuning::with_idle_timeout(std::time::Duration::from_secs(30));
    let a = connect_from(&short_hub, &tls::link_endpoint().unwrap(), short_hub.mtls("node:a", ALPN_AGENT)).await;
    let b =
        connect_from(&default_hub, &tls::link_endpoint().unwrap(), default_hub.mtls_tuned("node:b", ALPN_AGENT, &long))
            .await;
    // Past the default's 8 s idle timeout, with nothing sent by either application.
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    for (what, (client, server)) in [("2 s hub, default agent", &a), ("default hub, 30 s agent", &b)] {
        assert!(client.close_reason().is_none(), "{what}: the agent's side closed: {:?}", client.close_reason());
        assert!(server.close_reason().is_none(), "{what}: the hub's side closed: {:?}", server.close_reason());
    }
}

/// An agent's link endpoint asks the hub for empty connection IDs, so every packet the hub
/// sends it is 8 bytes shorter than to an ordinary client, through the same exchange.
#[tokio::test]
async fn the_link_endpoint_takes_eight_bytes_off_each_packet_the_hub_sends() {
    let hub = Hub::start();
    async fn bytes_per_packet(hub: &Hub, endpoint: quinn::Endpoint) -> f64 {
        let (client, server) = connect_from(hub, &endpoint, hub.mtls("node:a", ALPN_AGENT)).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (mut send, _) = client.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let (_, mut recv) = tokio::time::timeout(STEP, server.accept_bi()).await.unwrap().unwrap();
        let mut byte = [0u8; 1];
        recv.read_exact(&mut byte).await.unwrap();
        let before = server.stats().udp_tx;
        for _ in 0..20 {
            send.write_all(b"x").await.unwrap();
            tokio::time::timeout(STEP, recv.read_exact(&mut byte)).await.unwrap().unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let after = server.stats().udp_tx;
        assert!(after.datagrams > before.datagrams);
        (after.bytes - before.bytes) as f64 / (after.datagrams - before.datagrams) as f64
    }
    let plain = bytes_per_packet(&hub, tls::client_endpoint().unwrap()).await;
    let link = bytes_per_packet(&hub, tls::link_endpoint().unwrap()).await;
    eprintln!("bytes per packet the hub sends: {plain:.1} to a client endpoint, {link:.1} to a link endpoint");
    // 8 bytes of connection ID; an acknowledgement's delay field may differ by a byte or two.
    assert!((6.0..=10.0).contains(&(plain - link)), "{plain:.1} vs {link:.1}");
}
