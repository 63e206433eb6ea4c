//! Certificate renewal: nodes' (the I/O shell around [`crate::identity::check_renewal`]) and
//! the hub's own serving certificate ([`renew_serving`]).
//!
//! An agent renews its certificate two thirds into its life, over its own session (a stream
//! beside the control stream; [`serve_stream`]), so nothing reconnects. An agent whose
//! certificate expired while it was offline cannot make a session (the handshake refuses an
//! expired certificate), so it renews over the join protocol instead, presenting the expired
//! certificate in the request ([`renew_expired`]); there the hub checks the CA's signature
//! itself. Either way the request is for the key the certificate names, which the request's
//! own signature proves the agent holds, and the store must still admit the certificate
//! (not revoked, not replaced by a re-join).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::messages::{AgentRequest, JoinResponse, RenewResponse};
use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::pki::LeafFacts;
use transport::{frame, pki, tls};

use crate::cluster::Shared;
use crate::identity::{RenewRefusal, check_renewal};
use crate::now_ms;

/// How long an agent has to send its request once it opened a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A renewal the hub signed and recorded.
#[derive(Debug, Clone)]
pub(crate) struct Renewed {
    pub(crate) cert_pem: String,
    pub(crate) facts: LeafFacts,
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Renewed(Renewed),
    Refused(String),
    /// The store could not be reached: nothing was recorded, the agent retries.
    StoreDown,
}

/// Renews `presented` (a certificate of this CA) for `node` with the request `csr_pem`.
pub(crate) async fn renew(shared: &Shared, node: &str, presented: &LeafFacts, csr_pem: &str) -> Outcome {
    let refuse = |why: String| {
        warn!(%node, reason = %why, "certificate renewal refused");
        Outcome::Refused(why)
    };
    let csr_key = match pki::csr_public_key(csr_pem) {
        Ok(k) => k,
        Err(e) => return refuse(e.to_string()),
    };
    if let Err(why) = check_renewal(node, presented, &csr_key, SystemTime::now(), shared.certs.grace) {
        return refuse(why.to_string());
    }
    let cert_pem = match shared.ca.sign_csr(csr_pem, &format!("node:{node}"), shared.certs.node_validity) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    let facts = match pki::leaf_facts(&cert_pem) {
        Ok(f) => f,
        Err(e) => return refuse(format!("the hub cannot read the certificate it signed: {e}")),
    };
    let not_after_ms = ms(facts.not_after);
    match shared.store.renew_node_cert(node, &presented.fingerprint, &facts.fingerprint, not_after_ms, now_ms()).await {
        Ok(v) if v.admits() => {
            info!(%node, expires_ms = not_after_ms, previous = ?v, "node certificate renewed");
            Outcome::Renewed(Renewed { cert_pem, facts })
        }
        Ok(v) => refuse(RenewRefusal::Identity(v.reason(node)).to_string()),
        Err(e) => {
            warn!(%node, error = %e, "certificate renewal not recorded: store error");
            Outcome::StoreDown
        }
    }
}

/// A renewal over the join protocol of a certificate that may have expired (`cert_pem`, up to
/// the grace period). `None` when the store is down (the agent retries).
pub(crate) async fn renew_expired(shared: &Shared, node: &str, cert_pem: &str, csr_pem: &str) -> Option<JoinResponse> {
    let presented = match tls::verify_client_cert(shared.ca.cert_pem(), cert_pem) {
        Ok(f) => f,
        Err(e) => {
            let message = RenewRefusal::NotOurs(e.to_string()).to_string();
            warn!(%node, reason = %message, "certificate renewal refused");
            return Some(JoinResponse::Refused { message });
        }
    };
    match renew(shared, node, &presented, csr_pem).await {
        Outcome::Renewed(r) => {
            Some(JoinResponse::Accepted { cert_pem: r.cert_pem, ca_pem: shared.ca.cert_pem().to_string() })
        }
        Outcome::Refused(message) => Some(JoinResponse::Refused { message }),
        Outcome::StoreDown => None,
    }
}

/// A stream an agent opened on its session: one request, one answer. A renewal that went
/// through is sent to `renewed`, so the session checks the new certificate from then on.
pub(crate) async fn serve_stream(
    shared: Arc<Shared>,
    node: String,
    presented: LeafFacts,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    renewed: mpsc::Sender<Renewed>,
) {
    // A request is a CSR: small. Read no more whatever the frame header announces.
    let request = tokio::time::timeout(
        REQUEST_TIMEOUT,
        frame::read_within::<AgentRequest>(&mut recv, proto::codec::MAX_UNAUTHENTICATED_FRAME),
    )
    .await;
    let response = match request {
        Ok(Ok(Some(AgentRequest::Renew { csr_pem }))) => match renew(&shared, &node, &presented, &csr_pem).await {
            Outcome::Renewed(r) => {
                let cert_pem = r.cert_pem.clone();
                let _ = renewed.send(r).await;
                RenewResponse::Renewed { cert_pem }
            }
            Outcome::Refused(message) => RenewResponse::Refused { message },
            Outcome::StoreDown => RenewResponse::Refused { message: "the hub's store is unreachable; retry".into() },
        },
        Ok(Ok(Some(AgentRequest::Object { object }))) => {
            let answer = crate::objects::answer_node(&shared, &node, &object).await;
            let _ = frame::write(&mut send, &answer).await;
            let _ = send.finish();
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!(%node, error = %e, "malformed request from the agent");
            let _ = send.reset(0u32.into());
            return;
        }
        Err(_) => {
            let _ = send.reset(0u32.into());
            return;
        }
    };
    let _ = frame::write(&mut send, &response).await;
    let _ = send.finish();
}

/// What the hub needs to issue its own serving certificate again while it runs.
pub(crate) struct Serving {
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) names: Vec<String>,
    pub(crate) node_grace: Duration,
    pub(crate) cert_pem: String,
}

/// Issues the hub's serving certificate again two thirds into its life and serves new
/// connections with it (`Endpoint::set_server_config`); connections already made keep theirs.
/// The wall clock is looked at least every six hours, so a clock that jumps is followed.
pub(crate) async fn renew_serving(endpoint: quinn::Endpoint, shared: Arc<Shared>, serving: Serving) {
    const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(6 * 3600);
    const RETRY: Duration = Duration::from_secs(60);
    let mut current = serving.cert_pem.clone();
    loop {
        let due = match transport::pki::leaf_facts(&current) {
            Ok(f) => f.renew_after(),
            Err(_) => std::time::SystemTime::now(),
        };
        let wait = due.duration_since(std::time::SystemTime::now()).unwrap_or_default();
        if !wait.is_zero() {
            tokio::time::sleep(wait.min(LOOK_AT_LEAST_EVERY)).await;
            continue;
        }
        let issued =
            crate::bootstrap::issue_serving(&shared.ca, &serving.data_dir, &serving.names, shared.certs.hub_validity)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    let config = tls::server_config(
                        &c.cert_pem,
                        &c.key_pem,
                        shared.ca.cert_pem(),
                        &tls::Tuning::with_idle_timeout(serving.node_grace),
                    )
                    .map_err(|e| e.to_string())?;
                    Ok((c.cert_pem, config))
                });
        match issued {
            Ok((cert_pem, config)) => {
                endpoint.set_server_config(Some(config));
                let expires = transport::pki::leaf_facts(&cert_pem)
                    .map(|f| f.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
                    .unwrap_or(0);
                info!(expires_unix = expires, "hub serving certificate renewed");
                current = cert_pem;
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the hub's serving certificate; retrying in a minute");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
