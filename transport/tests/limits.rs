//! What a peer may make the hub's endpoint hold before and after it authenticates, measured
//! over real QUIC connections.

mod common;

use std::time::Duration;

use common::{Hub, STEP, connect_ok};
use flotilla_transport::limits::{self, Session, UNAUTHENTICATED_WINDOW};
use flotilla_transport::{ALPN_AGENT, ALPN_JOIN, tls};

const BLOCKED: Duration = Duration::from_millis(300);

/// A connection without a client certificate, as a joining agent (or anyone) makes.
async fn stranger(hub: &Hub) -> (quinn::Connection, quinn::Connection) {
    let pin = hub.ca.fingerprint();
    let config = tls::client_config_pinned(&pin, ALPN_JOIN, &tls::Tuning::default()).unwrap();
    connect_ok(hub, config).await
}

/// Writes `total` bytes on `send` until flow control stops it; returns how many went out.
async fn write_until_blocked(send: &mut quinn::SendStream, total: usize) -> usize {
    let chunk = vec![0u8; 16 * 1024];
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(BLOCKED, send.write(&chunk)).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    sent
}

#[tokio::test]
async fn a_stranger_gets_one_bidirectional_stream_and_no_unidirectional_one() {
    let hub = Hub::start();
    let (client, server) = stranger(&hub).await;
    let (mut first, _) = client.open_bi().await.unwrap();
    first.write_all(b"join").await.unwrap();
    let _accepted = tokio::time::timeout(STEP, server.accept_bi()).await.unwrap().unwrap();
    assert!(tokio::time::timeout(BLOCKED, client.open_bi()).await.is_err(), "a second stream opened");
    assert!(tokio::time::timeout(BLOCKED, client.open_uni()).await.is_err(), "a unidirectional stream opened");
    assert!(client.max_datagram_size().is_none(), "datagrams are not offered");

    // Once the hub has authenticated the peer it widens the connection.
    limits::open_for(&server, Session::Agent);
    let (mut second, _) = tokio::time::timeout(STEP, client.open_bi()).await.unwrap().unwrap();
    second.write_all(b"more").await.unwrap();
    assert!(tokio::time::timeout(STEP, server.accept_bi()).await.is_ok());
}

#[tokio::test]
async fn a_stranger_cannot_make_the_hub_buffer_more_than_its_window() {
    let hub = Hub::start();
    let (client, server) = stranger(&hub).await;
    let (mut send, _) = client.open_bi().await.unwrap();
    // Announce a 16 MiB message and push; the hub reads nothing.
    send.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
    let sent = write_until_blocked(&mut send, 16 << 20).await + 4;
    assert!(sent <= UNAUTHENTICATED_WINDOW as usize, "{sent} bytes buffered by a peer that never authenticated");
    assert!(sent >= UNAUTHENTICATED_WINDOW as usize / 2, "only {sent} bytes went out: the window is too small");

    // Authenticated, the same stream may carry its full window.
    limits::open_for(&server, Session::Agent);
    let more = write_until_blocked(&mut send, 16 << 20).await;
    assert!(more > 0, "the connection window was not raised");
    assert!(sent + more <= limits::STREAM_WINDOW as usize + 4, "{} bytes in one stream", sent + more);
}

#[tokio::test]
async fn an_authenticated_agent_is_limited_only_by_its_allowance() {
    let hub = Hub::start();
    let (client, server) = connect_ok(&hub, hub.mtls("node:alpha", ALPN_AGENT)).await;
    limits::open_for(&server, Session::Agent);
    let allowed = Session::Agent.allowance().bi_streams;
    let mut streams = Vec::new();
    for _ in 0..allowed {
        let (mut s, r) =
            tokio::time::timeout(STEP, client.open_bi()).await.expect("stream within the allowance").unwrap();
        s.write_all(b"x").await.unwrap();
        streams.push((s, r));
    }
    assert!(tokio::time::timeout(BLOCKED, client.open_bi()).await.is_err(), "a stream past the allowance opened");
}
