//! Shared fixtures: a hub endpoint on 127.0.0.1 with a fresh CA.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_transport::pki::Ca;
use flotilla_transport::tls::{self, Tuning};

pub const HOUR: Duration = Duration::from_secs(3600);
pub const STEP: Duration = Duration::from_secs(10);

pub struct Hub {
    pub ca: Ca,
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
}

impl Hub {
    pub fn start() -> Hub {
        Hub::start_with(Ca::generate("flotilla test ca").unwrap())
    }

    pub fn start_with(ca: Ca) -> Hub {
        Hub::start_tuned(ca, &Tuning::default())
    }

    /// A hub whose connections are tuned with `tuning` (its idle timeout is `--node-grace`).
    pub fn start_tuned(ca: Ca, tuning: &Tuning) -> Hub {
        let server = ca.issue_server(&["127.0.0.1".to_string()], HOUR).unwrap();
        let config = tls::server_config(&server.cert_pem, &server.key_pem, ca.cert_pem(), tuning).unwrap();
        let endpoint = tls::server_endpoint(config, "127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Hub { ca, endpoint, addr }
    }

    /// Accepts the next incoming connection and runs its handshake on a task.
    pub fn accept(&self) -> tokio::task::JoinHandle<Result<quinn::Connection, quinn::ConnectionError>> {
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let incoming = endpoint.accept().await.expect("endpoint closed");
            incoming.await
        })
    }

    pub fn mtls(&self, common_name: &str, alpn: &[u8]) -> quinn::ClientConfig {
        self.mtls_tuned(common_name, alpn, &Tuning::default())
    }

    pub fn mtls_tuned(&self, common_name: &str, alpn: &[u8], tuning: &Tuning) -> quinn::ClientConfig {
        let creds = self.ca.issue_client(common_name, HOUR).unwrap();
        tls::client_config_mtls(self.ca.cert_pem(), &creds.cert_pem, &creds.key_pem, alpn, tuning).unwrap()
    }
}

/// Connects with `config` and returns both ends of the established connection.
pub async fn connect_ok(hub: &Hub, config: quinn::ClientConfig) -> (quinn::Connection, quinn::Connection) {
    let server = hub.accept();
    let endpoint = tls::client_endpoint().unwrap();
    let client = tokio::time::timeout(STEP, tls::connect(&endpoint, config, hub.addr))
        .await
        .expect("client handshake timed out")
        .expect("client handshake failed");
    let server = tokio::time::timeout(STEP, server)
        .await
        .expect("server handshake timed out")
        .unwrap()
        .expect("server handshake failed");
    (client, server)
}

/// Connects with `config`, expecting the server to refuse the handshake. Returns the server's
/// error and the error the client saw (either during its handshake or right after it).
pub async fn connect_refused(hub: &Hub, config: quinn::ClientConfig) -> (quinn::ConnectionError, String) {
    let server = hub.accept();
    let endpoint = tls::client_endpoint().unwrap();
    let client = tokio::time::timeout(STEP, tls::connect(&endpoint, config, hub.addr))
        .await
        .expect("client handshake timed out");
    let server_err = match tokio::time::timeout(STEP, server).await.expect("server timed out").unwrap() {
        Ok(conn) => panic!("server accepted a connection it should refuse (peer {:?})", tls::peer_common_name(&conn)),
        Err(e) => e,
    };
    let client_err = match client {
        Err(e) => e.to_string(),
        // TLS 1.3: the client may finish its side before the server rejects its certificate;
        // the connection must then be closed by the peer, not stay usable.
        Ok(conn) => {
            let reason = tokio::time::timeout(STEP, conn.closed()).await.expect("refused connection was not closed");
            assert!(
                !matches!(reason, quinn::ConnectionError::LocallyClosed | quinn::ConnectionError::TimedOut),
                "unexpected close reason {reason}"
            );
            reason.to_string()
        }
    };
    (server_err, client_err)
}
