//! API users: who a connection's certificate speaks for ([`identify`], at every connection),
//! adding, listing and revoking users, renewing one's own credential, the audit log and
//! `certs status`. The rules are in [`crate::access`]; this is their I/O shell over the store.
//!
//! A user's certificate names it (`user:<name>`; the admin a hub makes at its first start
//! is `admin:admin`) and is recorded in the store when issued: a certificate of this CA that
//! the store does not know is no credential, and a revoked user's are all refused.
//! Certificates are short-lived (`hub --user-cert-validity`, 30 days by default, or the
//! lifetime given at `user add`), and the CLI renews its own two thirds into that life, for
//! the same key.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::messages::{ApiRequest, ApiResponse, Role};
use tracing::{info, warn};
use transport::pki::{self, LeafFacts};

use crate::access::Caller;
use crate::cluster::Shared;
use crate::now_ms;
use crate::store::{NewUser, StoreError};

/// The shortest and longest lifetime a user's certificate may be given.
pub const USER_VALIDITY_RANGE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(366 * 24 * 3600));

/// The name of the admin a hub makes at its first start.
pub const FIRST_ADMIN: &str = "admin";

/// The subject a user's certificates carry.
pub fn common_name(user: &str) -> String {
    if user == FIRST_ADMIN { format!("admin:{user}") } else { format!("user:{user}") }
}

/// The user a certificate's subject names, if it is a user's subject at all.
pub fn user_of(common_name: &str) -> Option<&str> {
    common_name.strip_prefix("user:").or_else(|| common_name.strip_prefix("admin:"))
}

/// Why an API connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Unknown {
    #[error("a user's credential is required; this certificate names no user")]
    NoUser,
    #[error("this credential is not one the hub issued to a user; ask an admin for one (flotilla user add)")]
    NotRecorded,
    #[error("user {0:?} was revoked")]
    Revoked(String),
    #[error("the hub's store is unreachable: {0}")]
    Store(#[from] StoreError),
}

/// Who `leaf` (the certificate a connection presented, from `peer`) is.
pub(crate) async fn identify(shared: &Shared, leaf: &LeafFacts, peer: String) -> Result<Caller, Unknown> {
    let named = user_of(&leaf.common_name).ok_or(Unknown::NoUser)?;
    let user = shared.store.user_by_cert(&leaf.fingerprint).await?.ok_or(Unknown::NotRecorded)?;
    if user.name != named {
        return Err(Unknown::NotRecorded);
    }
    if user.revoked_at_ms.is_some() {
        return Err(Unknown::Revoked(user.name));
    }
    Ok(Caller { user: user.name, role: user.role, peer })
}

/// Answers the user, audit and certificate requests; `None` for any other request.
pub(crate) async fn answer(
    shared: &Shared,
    caller: &Caller,
    leaf: &LeafFacts,
    req: &ApiRequest,
) -> Option<Result<ApiResponse, StoreError>> {
    Some(match req {
        ApiRequest::UserAdd { name, role, ttl_ms, csr_pem } => add(shared, caller, name, *role, *ttl_ms, csr_pem).await,
        ApiRequest::UserList => {
            shared.store.users().await.map(|rows| ApiResponse::Users { items: rows.iter().map(|u| u.view()).collect() })
        }
        ApiRequest::UserRevoke { name } => match shared.store.revoke_user(name, now_ms()).await {
            Ok(Ok(u)) => {
                info!(user = %name, by = %caller.user, "user revoked");
                Ok(ApiResponse::Users { items: vec![u.view()] })
            }
            Ok(Err(refusal)) => Ok(error(refusal)),
            Err(e) => Err(e),
        },
        ApiRequest::RenewCredential { csr_pem } => renew(shared, caller, leaf, csr_pem).await,
        ApiRequest::Audit { limit, since_ms } => shared
            .store
            .audit((*limit).clamp(1, 10_000), since_ms.unwrap_or(0))
            .await
            .map(|items| ApiResponse::Audit { items }),
        ApiRequest::CertsStatus => certs_status(shared, caller, leaf).await,
        _ => return None,
    })
}

fn error(e: impl std::fmt::Display) -> ApiResponse {
    ApiResponse::Error { message: e.to_string() }
}

async fn add(
    shared: &Shared,
    caller: &Caller,
    name: &str,
    role: Role,
    ttl_ms: Option<u64>,
    csr_pem: &str,
) -> Result<ApiResponse, StoreError> {
    if let Err(e) = proto::manifest::validate_name(name) {
        return Ok(error(format!("invalid user name: {e}")));
    }
    let validity = match ttl_ms {
        None => shared.certs.user_validity,
        Some(ms) => {
            let d = Duration::from_millis(ms);
            let (lo, hi) = USER_VALIDITY_RANGE;
            if d < lo || d > hi {
                return Ok(error(format!(
                    "--ttl must be between {}s and {} days",
                    lo.as_secs(),
                    hi.as_secs() / 86_400
                )));
            }
            d
        }
    };
    let cert_pem = match shared.ca.sign_csr(csr_pem, &common_name(name), validity) {
        Ok(c) => c,
        Err(e) => return Ok(error(format!("invalid certificate signing request: {e}"))),
    };
    let facts = match pki::leaf_facts(&cert_pem) {
        Ok(f) => f,
        Err(e) => return Ok(error(format!("the hub cannot read the certificate it signed: {e}"))),
    };
    let user = NewUser {
        name: name.to_string(),
        role,
        created_by: caller.user.clone(),
        cert_validity_ms: validity.as_millis() as u64,
    };
    match shared.store.add_user(&user, &facts.fingerprint, ms(facts.not_after), now_ms()).await? {
        Ok(row) => {
            info!(user = %name, %role, by = %caller.user, "user added");
            Ok(ApiResponse::UserCreated { cert_pem, view: row.view() })
        }
        Err(refusal) => Ok(error(refusal)),
    }
}

/// A new certificate for the caller's own key, with the lifetime its user was given.
async fn renew(shared: &Shared, caller: &Caller, leaf: &LeafFacts, csr_pem: &str) -> Result<ApiResponse, StoreError> {
    let refuse = |why: String| {
        warn!(user = %caller.user, reason = %why, "credential renewal refused");
        Ok(error(format!("renewal refused: {why}")))
    };
    match pki::csr_public_key(csr_pem) {
        Ok(key) if key == leaf.public_key => {}
        Ok(_) => return refuse("the request is for another key than the credential's".into()),
        Err(e) => return refuse(e.to_string()),
    }
    let Some(user) = shared.store.users().await?.into_iter().find(|u| u.name == caller.user) else {
        return refuse(format!("user {:?} not found", caller.user));
    };
    let validity = Duration::from_millis(user.cert_validity_ms);
    let cert_pem = match shared.ca.sign_csr(csr_pem, &leaf.common_name, validity) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    let facts = match pki::leaf_facts(&cert_pem) {
        Ok(f) => f,
        Err(e) => return refuse(e.to_string()),
    };
    shared.store.add_user_cert(&caller.user, &facts.fingerprint, ms(facts.not_after), now_ms()).await?;
    info!(user = %caller.user, expires_ms = ms(facts.not_after), "credential renewed");
    Ok(ApiResponse::CredentialRenewed { cert_pem })
}

async fn certs_status(shared: &Shared, caller: &Caller, leaf: &LeafFacts) -> Result<ApiResponse, StoreError> {
    let now = SystemTime::now();
    let mut s = String::new();
    let ca = pki::leaf_facts(shared.ca.cert_pem()).ok();
    let _ = writeln!(s, "{:<28} {:<10} EXPIRES", "CERTIFICATE", "ROLE");
    if let Some(ca) = ca {
        let _ = writeln!(s, "{:<28} {:<10} {}", "cluster CA", "-", expiry(ca.not_after, now));
    }
    let _ = writeln!(
        s,
        "{:<28} {:<10} {}",
        format!("you ({})", caller.user),
        caller.role.as_str(),
        expiry(leaf.not_after, now)
    );
    for u in shared.store.users().await? {
        let when = match (u.revoked_at_ms, u.cert_expires_ms) {
            (Some(_), _) => "revoked".to_string(),
            (None, Some(ms)) => expiry(UNIX_EPOCH + Duration::from_millis(ms), now),
            (None, None) => "-".to_string(),
        };
        let _ = writeln!(s, "{:<28} {:<10} {}", format!("user {}", u.name), u.role.as_str(), when);
    }
    let mut nodes = shared.store.nodes().await?;
    nodes.sort_by_key(|n| n.cert_not_after_ms.unwrap_or(u64::MAX));
    for n in nodes {
        let when = n.cert_not_after_ms.map(|ms| expiry(UNIX_EPOCH + Duration::from_millis(ms), now));
        let _ = writeln!(s, "{:<28} {:<10} {}", format!("node {}", n.name), "-", when.as_deref().unwrap_or("-"));
    }
    Ok(ApiResponse::Described { text: s })
}

/// "in 3d 4h" or "EXPIRED 2h ago".
fn expiry(at: SystemTime, now: SystemTime) -> String {
    match at.duration_since(now) {
        Ok(left) => format!("in {}", crate::identity::span(left)),
        Err(e) => format!("EXPIRED {} ago", crate::identity::span(e.duration())),
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_users_and_nothing_else() {
        assert_eq!(common_name("admin"), "admin:admin");
        assert_eq!(common_name("ann"), "user:ann");
        assert_eq!(user_of("user:ann"), Some("ann"));
        assert_eq!(user_of("admin:admin"), Some("admin"));
        assert_eq!(user_of("node:edge-1"), None);
    }
}
