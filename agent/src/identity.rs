//! The agent's identity: its private key (generated here, never sent anywhere), the node
//! certificate the hub signed, and the cluster CA. Obtained once by joining with a token and
//! kept in `<data-dir>/identity/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::messages::{JoinRequest, JoinResponse};
use proto::token::JoinToken;
use transport::{ALPN_JOIN, frame, pki, tls};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("this agent has not joined a cluster yet; pass --token")]
    NoToken,
    #[error("the hub refused to let this node join: {0}")]
    Refused(String),
    #[error("cannot reach the hub to join: {0}")]
    Unreachable(String),
    #[error("join failed: {0}")]
    Protocol(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

impl IdentityError {
    /// Whether retrying later may succeed (the hub was unreachable), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, IdentityError::Unreachable(_) | IdentityError::Protocol(_))
    }
}

#[derive(Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn files(dir: &Path) -> [PathBuf; 3] {
    [dir.join("ca.pem"), dir.join("node.pem"), dir.join("node.key")]
}

fn write_private(path: &Path, data: &str) -> Result<(), IdentityError> {
    crate::durable::write_atomic(path, data.as_bytes(), 0o600).map_err(|source| IdentityError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the saved identity if it exists and belongs to the cluster `token` pins (when a
/// token is given); otherwise joins with the token and saves the new identity.
pub async fn load_or_join(
    dir: &Path,
    hub: &str,
    token: Option<&JoinToken>,
    node_name: &str,
    tuning: &tls::Tuning,
) -> Result<Identity, IdentityError> {
    let [ca_path, cert_path, key_path] = files(dir);
    if ca_path.exists() && cert_path.exists() && key_path.exists() {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| IdentityError::Io { action: "read", path: p.to_path_buf(), source })
        };
        let id = Identity { ca_pem: read(&ca_path)?, cert_pem: read(&cert_path)?, key_pem: read(&key_path)? };
        let same_cluster =
            token.is_none_or(|t| pki::fingerprint_pem(&id.ca_pem).is_ok_and(|fp| fp == t.ca_fingerprint));
        if same_cluster {
            return Ok(id);
        }
        tracing::info!("the token pins another cluster; joining it");
    }
    let token = token.ok_or(IdentityError::NoToken)?;
    let id = join(hub, token, node_name, tuning).await?;
    fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    write_private(&key_path, &id.key_pem)?;
    write_private(&cert_path, &id.cert_pem)?;
    write_private(&ca_path, &id.ca_pem)?;
    tracing::info!(node = node_name, "joined the cluster");
    Ok(id)
}

async fn join(hub: &str, token: &JoinToken, node_name: &str, tuning: &tls::Tuning) -> Result<Identity, IdentityError> {
    let (key_pem, csr_pem) = pki::generate_csr(&format!("node:{node_name}"))?;
    let addr = tls::resolve(hub).await.map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let config = tls::client_config_pinned(&token.ca_fingerprint, ALPN_JOIN, tuning)
        .map_err(|e| IdentityError::Protocol(e.to_string()))?;
    let endpoint = tls::client_endpoint().map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let conn = tls::connect(&endpoint, config, addr).await.map_err(|e| {
        // A pin mismatch is not transient: the hub is not the one the token names.
        let msg = e.to_string();
        if msg.contains("fingerprint") { IdentityError::Refused(msg) } else { IdentityError::Unreachable(msg) }
    })?;
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| IdentityError::Unreachable(e.to_string()))?;
        let req = JoinRequest { secret: token.secret.clone(), node_name: node_name.to_string(), csr_pem };
        frame::write(&mut send, &req).await.map_err(|e| IdentityError::Protocol(e.to_string()))?;
        let _ = send.finish();
        frame::read::<JoinResponse>(&mut recv)
            .await
            .map_err(|e| IdentityError::Protocol(e.to_string()))?
            .ok_or_else(|| IdentityError::Protocol("the hub closed the join stream without answering".into()))
    })
    .await
    .map_err(|_| IdentityError::Unreachable("timed out waiting for the hub's answer".into()))?;
    conn.close(0u32.into(), b"joined");
    endpoint.wait_idle().await;
    match result? {
        JoinResponse::Accepted { cert_pem, ca_pem } => {
            // The hub could only have passed the pinned handshake with this CA, but check the
            // CA it hands over is the same one.
            if pki::fingerprint_pem(&ca_pem)? != token.ca_fingerprint {
                return Err(IdentityError::Protocol(
                    "the hub returned a CA that does not match the token's pin".into(),
                ));
            }
            Ok(Identity { ca_pem, cert_pem, key_pem })
        }
        JoinResponse::Refused { message } => Err(IdentityError::Refused(message)),
    }
}
