//! The agent's identity: its private key (generated here, never sent anywhere), the node
//! certificate the hub signed, and the cluster CA. Obtained once by joining with a token and
//! kept in `<data-dir>/identity/`.
//!
//! Two more records live beside them:
//! - `revoked`: the hub revoked this node's certificate (the node was deleted, or a re-join
//!   replaced it). The saved identity is then unusable; the agent joins again when given a
//!   token, and otherwise says it must.
//! - `store`: the identity of the hub store this node takes assignment sets from, adopted
//!   from the first set after joining ([`StoreBinding`]). A set from another store (a hub
//!   whose store was reset) is refused, so a reset hub cannot make the node stop everything;
//!   a store restored from a backup keeps its identity and is accepted. To move a node to a
//!   new store on purpose, remove this file (or join again).

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
    /// The hub revoked this node's certificate; the text is the hub's reason.
    #[error("the hub revoked this node's certificate ({0}); start the agent with --token to join again")]
    Revoked(String),
    #[error("the hub refused to let this node join: {0}")]
    Refused(String),
    /// The certificate expired and the hub will not renew it; the text is the hub's reason.
    #[error(
        "this node's certificate expired and the hub will not renew it ({0}); start the agent with --token to join again"
    )]
    Expired(String),
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

fn revoked_marker(dir: &Path) -> PathBuf {
    dir.join("revoked")
}

/// Records that the hub revoked the saved identity (`reason` is the hub's), so the next start
/// joins again instead of retrying a certificate the hub refuses.
pub fn mark_revoked(dir: &Path, reason: &str) -> Result<(), IdentityError> {
    write_private(&revoked_marker(dir), reason)
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
    let revoked = fs::read_to_string(revoked_marker(dir)).ok();
    if let (Some(reason), None) = (&revoked, token) {
        return Err(IdentityError::Revoked(reason.trim().to_string()));
    }
    if revoked.is_none() && ca_path.exists() && cert_path.exists() && key_path.exists() {
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
    // A new identity: whatever store its hub has is this node's from now on.
    for stale in [revoked_marker(dir), StoreBinding::path(dir)] {
        if let Err(source) = fs::remove_file(&stale)
            && source.kind() != std::io::ErrorKind::NotFound
        {
            return Err(IdentityError::Io { action: "remove", path: stale, source });
        }
    }
    tracing::info!(node = node_name, "joined the cluster");
    Ok(id)
}

async fn join(hub: &str, token: &JoinToken, node_name: &str, tuning: &tls::Tuning) -> Result<Identity, IdentityError> {
    let (key_pem, req) = join_request(token, node_name)?;
    let response = exchange(hub, &token.ca_fingerprint, &req, tuning).await?;
    accept_join(token, response, key_pem)
}

/// Joins as `node_name` through the caller's `endpoint` to the hub at `addr`, without saving
/// anything: for the fleet simulator, whose simulated nodes share endpoints bound to
/// addresses of their own.
pub async fn join_via(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    token: &JoinToken,
    node_name: &str,
    tuning: &tls::Tuning,
) -> Result<Identity, IdentityError> {
    let (key_pem, req) = join_request(token, node_name)?;
    let response = exchange_via(endpoint, addr, &token.ca_fingerprint, &req, tuning).await?;
    accept_join(token, response, key_pem)
}

/// A new key, and the join request for a certificate of it.
fn join_request(token: &JoinToken, node_name: &str) -> Result<(String, JoinRequest), IdentityError> {
    let (key_pem, csr_pem) = pki::generate_csr(&format!("node:{node_name}"))?;
    let req =
        JoinRequest { secret: token.secret.clone(), node_name: node_name.to_string(), csr_pem, renew_cert_pem: None };
    Ok((key_pem, req))
}

fn accept_join(token: &JoinToken, response: JoinResponse, key_pem: String) -> Result<Identity, IdentityError> {
    match response {
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

/// The request that renews `id`'s certificate: for the same key, which its signature proves
/// this node holds.
pub fn renewal_csr(id: &Identity, node_name: &str) -> Result<String, IdentityError> {
    Ok(pki::csr_for_key(&id.key_pem, &format!("node:{node_name}"))?)
}

/// Renews a certificate that expired while the node was offline (the hub allows this for a
/// grace period), over the join protocol: a session cannot be made with it. Saves and returns
/// the renewed identity; [`IdentityError::Expired`] when the hub refuses.
pub async fn renew_expired(
    dir: &Path,
    hub: &str,
    id: &Identity,
    node_name: &str,
    tuning: &tls::Tuning,
) -> Result<Identity, IdentityError> {
    let req = JoinRequest {
        secret: String::new(),
        node_name: node_name.to_string(),
        csr_pem: renewal_csr(id, node_name)?,
        renew_cert_pem: Some(id.cert_pem.clone()),
    };
    match exchange(hub, &pki::fingerprint_pem(&id.ca_pem)?, &req, tuning).await? {
        JoinResponse::Accepted { cert_pem, .. } => save_renewed(dir, id, &cert_pem),
        JoinResponse::Refused { message } => Err(IdentityError::Expired(message)),
    }
}

/// Saves `cert_pem`, the hub's renewal of `id`'s certificate, after checking it is for the
/// same name and key (the node's key never changes on renewal, so one file write replaces the
/// certificate atomically and a crash leaves the old or the new one, both usable).
pub fn save_renewed(dir: &Path, id: &Identity, cert_pem: &str) -> Result<Identity, IdentityError> {
    let old = pki::leaf_facts(&id.cert_pem)?;
    let new = pki::leaf_facts(cert_pem)?;
    if new.public_key != old.public_key || new.common_name != old.common_name {
        return Err(IdentityError::Protocol(format!(
            "the renewed certificate is for {:?} with another key; keeping the current one",
            new.common_name
        )));
    }
    let [_, cert_path, _] = files(dir);
    write_private(&cert_path, cert_pem)?;
    let expires = new.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    tracing::info!(expires_unix = expires, "node certificate renewed");
    Ok(Identity { cert_pem: cert_pem.to_string(), ..id.clone() })
}

/// One request and one answer over a join connection to `hub`, whose CA must have the
/// fingerprint `pin`.
async fn exchange(
    hub: &str,
    pin: &str,
    req: &JoinRequest,
    tuning: &tls::Tuning,
) -> Result<JoinResponse, IdentityError> {
    let addr = tls::resolve(hub).await.map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let endpoint = tls::client_endpoint().map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let result = exchange_via(&endpoint, addr, pin, req, tuning).await;
    endpoint.wait_idle().await;
    result
}

async fn exchange_via(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    pin: &str,
    req: &JoinRequest,
    tuning: &tls::Tuning,
) -> Result<JoinResponse, IdentityError> {
    let config =
        tls::client_config_pinned(pin, ALPN_JOIN, tuning).map_err(|e| IdentityError::Protocol(e.to_string()))?;
    let conn = tls::connect(endpoint, config, addr).await.map_err(|e| {
        // A pin mismatch is not transient: the hub is not the one the token names.
        let msg = e.to_string();
        if msg.contains("fingerprint") { IdentityError::Refused(msg) } else { IdentityError::Unreachable(msg) }
    })?;
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| IdentityError::Unreachable(e.to_string()))?;
        frame::write(&mut send, req).await.map_err(|e| IdentityError::Protocol(e.to_string()))?;
        let _ = send.finish();
        frame::read::<JoinResponse>(&mut recv)
            .await
            .map_err(|e| IdentityError::Protocol(e.to_string()))?
            .ok_or_else(|| IdentityError::Protocol("the hub closed the join stream without answering".into()))
    })
    .await
    .map_err(|_| IdentityError::Unreachable("timed out waiting for the hub's answer".into()))?;
    conn.close(0u32.into(), b"joined");
    result
}

/// What to do with an assignment set from store `offered`, for a node bound to `known`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreVerdict {
    /// The node's store (or a hub too old to name its store).
    Same,
    /// The first set since joining: the node is bound to this store from now on.
    Adopt,
    /// Another store than the node's: a hub whose store was reset or replaced.
    Foreign { known: String },
}

pub fn store_verdict(known: Option<&str>, offered: &str) -> StoreVerdict {
    match known {
        _ if offered.is_empty() => StoreVerdict::Same,
        None => StoreVerdict::Adopt,
        Some(k) if k == offered => StoreVerdict::Same,
        Some(k) => StoreVerdict::Foreign { known: k.to_string() },
    }
}

/// The hub store this node takes its sets from, kept in `identity/store`.
#[derive(Debug, Clone)]
pub struct StoreBinding {
    path: PathBuf,
    known: Option<String>,
}

/// A set refused because it comes from another store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the set comes from store {offered}, but this node belongs to store {known}: the hub's store was reset or replaced, so the node keeps running what it has (remove {path} to move it to the new store on purpose)"
)]
pub struct ForeignStore {
    pub known: String,
    pub offered: String,
    pub path: String,
}

impl StoreBinding {
    fn path(dir: &Path) -> PathBuf {
        dir.join("store")
    }

    /// The binding saved in `dir` (none yet is fine: the next set is adopted).
    pub fn load(dir: &Path) -> StoreBinding {
        let path = StoreBinding::path(dir);
        let known = fs::read_to_string(&path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        StoreBinding { path, known }
    }

    /// Whether a set from `offered` may be applied; the first one is adopted (saved before the
    /// set goes on).
    pub fn check(&mut self, offered: &str) -> Result<(), ForeignStore> {
        match store_verdict(self.known.as_deref(), offered) {
            StoreVerdict::Same => Ok(()),
            StoreVerdict::Adopt => {
                if let Err(e) = write_private(&self.path, offered) {
                    // Still applied: refusing the hub's set over a local write error would be
                    // worse. The binding is made again at the next set.
                    tracing::warn!(error = %e, "cannot save the store this node belongs to");
                } else {
                    tracing::info!(store = offered, "this node now takes its sets from this store");
                }
                self.known = Some(offered.to_string());
                Ok(())
            }
            StoreVerdict::Foreign { known } => {
                Err(ForeignStore { known, offered: offered.to_string(), path: self.path.display().to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_takes_sets_from_its_own_store_only() {
        assert_eq!(store_verdict(None, "s1"), StoreVerdict::Adopt);
        assert_eq!(store_verdict(Some("s1"), "s1"), StoreVerdict::Same);
        assert_eq!(store_verdict(Some("s1"), ""), StoreVerdict::Same);
        assert_eq!(store_verdict(Some("s1"), "s2"), StoreVerdict::Foreign { known: "s1".into() });

        let dir = tempfile::tempdir().unwrap();
        let mut b = StoreBinding::load(dir.path());
        b.check("s1").unwrap();
        // Kept across restarts.
        let mut b = StoreBinding::load(dir.path());
        b.check("s1").unwrap();
        let e = b.check("s2").unwrap_err();
        assert_eq!((e.known.as_str(), e.offered.as_str()), ("s1", "s2"));
        assert!(e.to_string().contains("keeps running what it has"), "{e}");
    }

    #[tokio::test]
    async fn a_revoked_identity_needs_a_token_to_join_again() {
        let dir = tempfile::tempdir().unwrap();
        for f in files(dir.path()) {
            fs::write(f, "x").unwrap();
        }
        mark_revoked(dir.path(), "the node was deleted").unwrap();
        let tuning = tls::Tuning::default();
        match load_or_join(dir.path(), "127.0.0.1:1", None, "n", &tuning).await {
            Err(IdentityError::Revoked(reason)) => assert_eq!(reason, "the node was deleted"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
