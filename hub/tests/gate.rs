//! The hub's gate on real QUIC with mutual TLS: past the burst a validated peer's handshake
//! waits for its token instead of being refused, and past the longest wait it is refused in a
//! way the agent reads as "the hub is up and busy" (`TlsError::is_refused`), which keeps its
//! back-off short.

use std::time::{Duration, Instant};

use flotilla_hub::guard::{Gate, PeerLimits};
use transport::pki::Ca;
use transport::tls::{self, Tuning};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_burst_handshakes_wait_for_their_token_then_are_refused_as_busy() {
    let ca = Ca::generate("gate test ca").unwrap();
    let server = ca.issue_server(&[], HOUR).unwrap();
    let config = tls::server_config(&server.cert_pem, &server.key_pem, ca.cert_pem(), &Tuning::default()).unwrap();
    let endpoint = tls::server_endpoint(config, "127.0.0.1:0".parse().unwrap(), None).unwrap();
    let addr = endpoint.local_addr().unwrap();
    // Two at once, then one a second, each waiting at most 1.5 s for its token.
    let gate = Gate::new(PeerLimits {
        handshakes_per_second: 1,
        handshake_burst: 2,
        max_handshake_wait: Duration::from_millis(1500),
        ..PeerLimits::default()
    });
    // The hub's accept loop, as `Hub::run` has it: admit, wait for the token, handshake.
    let server_side = endpoint.clone();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = server_side.accept().await {
            let Some((incoming, permit, wait)) = gate.admit(incoming) else { continue };
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Ok(conn) = incoming.await {
                    let _permit = permit;
                    conn.closed().await;
                }
            });
        }
    });

    let client = ca.issue_client("node:edge", HOUR).unwrap();
    let config = tls::client_config_mtls(
        ca.cert_pem(),
        &client.cert_pem,
        &client.key_pem,
        transport::ALPN_AGENT,
        &Tuning::default(),
    )
    .unwrap();
    let start = Instant::now();
    let attempts: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let endpoint = tls::link_endpoint().unwrap();
                let result = tls::connect(&endpoint, config, addr).await;
                (start.elapsed(), result, endpoint)
            })
        })
        .collect();
    let mut connected = Vec::new();
    let mut refused = 0;
    let mut held = Vec::new();
    for a in attempts {
        let (took, result, endpoint) = tokio::time::timeout(Duration::from_secs(10), a).await.unwrap().unwrap();
        match result {
            Ok(conn) => {
                connected.push(took);
                held.push((conn, endpoint));
            }
            Err(e) => {
                assert!(e.is_refused(), "a handshake past the wait must be refused as busy, not fail otherwise: {e}");
                refused += 1;
            }
        }
    }
    connected.sort();
    eprintln!("connected after {connected:?}; {refused} refused");
    assert_eq!((connected.len(), refused), (3, 1), "two from the burst, one after waiting for its token, one refused");
    assert!(connected[1] < Duration::from_millis(900), "the burst waited: {connected:?}");
    assert!(connected[2] >= Duration::from_millis(900), "the third did not wait for its token: {connected:?}");
    accept.abort();
    endpoint.close(0u32.into(), b"done");
}
