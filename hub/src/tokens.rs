//! Join tokens and the rule that decides a join, as pure functions.
//!
//! A token is `FLT1::<CA sha256>::<secret>` (the first part pins the cluster CA for the agent;
//! see [`proto::token`]). The hub keeps only the SHA-256 of the secret, with the token's
//! limits: an expiry, a number of uses, a glob of node names it admits, and labels that become
//! the admin labels of the nodes that join with it. The cluster token printed at the hub's
//! first start is the token [`CLUSTER_TOKEN_ID`], with no limits, kept for compatibility; it
//! can be revoked like any other.
//!
//! A join never takes over an existing node: [`admit`] refuses a name the store already has,
//! unless an admin let that node re-join (`flotilla node allow-rejoin`) and the permission has
//! not run out. A deleted node's name is free again. The store calls [`admit`] inside the
//! write-locked transaction that then counts the use, so two joins racing for a token's last
//! use or for one name cannot both win.

use std::collections::BTreeMap;

use proto::messages::TokenView;
use proto::token::JoinToken;
use sha2::{Digest, Sha256};

use crate::store::TokenRow;

/// The id under which the cluster token (the hub's `token` file) is kept.
pub const CLUSTER_TOKEN_ID: &str = "cluster";

/// Longest name pattern a token may carry.
const MAX_PATTERN_LEN: usize = 253;

/// Why a join was refused. The text goes back to the joiner and into the hub's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No token has this secret. Worded as before tokens had ids, so a guesser learns nothing.
    #[error("invalid join token")]
    UnknownToken,
    #[error("join token {id} was revoked")]
    Revoked { id: String },
    #[error("join token {id} expired")]
    Expired { id: String },
    #[error("join token {id} was used {uses} times, its limit")]
    UsedUp { id: String, uses: u64 },
    #[error("join token {id} admits node names matching {pattern:?}, not {name:?}")]
    NameNotAllowed { id: String, pattern: String, name: String },
    #[error(
        "node {name:?} already exists; a join cannot take over an existing node's name (delete the node with `flotilla delete node {name}`, or let it re-join with `flotilla node allow-rejoin {name}`)"
    )]
    NodeExists { name: String },
    #[error("invalid node name: {0}")]
    InvalidName(String),
}

/// A token's limits as an admin asks for them (`flotilla token create`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSpec {
    pub ttl_ms: Option<u64>,
    pub uses: Option<u32>,
    pub name_pattern: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("--uses must be at least 1")]
    NoUses,
    #[error("invalid name pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("invalid label: {0}")]
    Label(String),
}

impl TokenSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.uses == Some(0) {
            return Err(SpecError::NoUses);
        }
        if let Some(p) = &self.name_pattern {
            if p.is_empty() || p.len() > MAX_PATTERN_LEN {
                return Err(SpecError::Pattern {
                    pattern: p.clone(),
                    reason: format!("must be 1 to {MAX_PATTERN_LEN} characters"),
                });
            }
            glob::Pattern::new(p).map_err(|e| SpecError::Pattern { pattern: p.clone(), reason: e.to_string() })?;
        }
        for (k, v) in &self.labels {
            proto::manifest::validate_node_label(k, v).map_err(|e| SpecError::Label(e.to_string()))?;
        }
        Ok(())
    }
}

/// A token made by [`mint`]: the string to hand out once, and what the store keeps.
pub struct Minted {
    pub token: JoinToken,
    pub id: String,
    pub secret_sha256: String,
}

/// A new token pinning the CA with `ca_fingerprint`: 32 random bytes of secret and a 6-byte id
/// (for `token list` and `token revoke`), from `rng`.
pub fn mint(ca_fingerprint: &str, rng: &mut impl rand::RngCore) -> Minted {
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let mut id = [0u8; 6];
    rng.fill_bytes(&mut id);
    let secret = hex::encode(secret);
    Minted {
        secret_sha256: secret_sha256(&secret),
        id: hex::encode(id),
        token: JoinToken { ca_fingerprint: ca_fingerprint.to_string(), secret },
    }
}

/// What the store keeps of a secret. The secret is random (24 or 32 bytes), so a plain
/// SHA-256 is enough: there is nothing to brute-force.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Where a token stands at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Active,
    Expired,
    UsedUp,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::UsedUp => "used up",
            TokenState::Revoked => "revoked",
        }
    }
}

pub fn state(t: &TokenRow, now_ms: u64) -> TokenState {
    if t.revoked_at_ms.is_some() {
        TokenState::Revoked
    } else if t.expires_at_ms.is_some_and(|at| at <= now_ms) {
        TokenState::Expired
    } else if t.max_uses.is_some_and(|max| t.uses >= max) {
        TokenState::UsedUp
    } else {
        TokenState::Active
    }
}

/// Whether `name` matches a token's glob. A pattern that does not parse (it was validated
/// when stored) matches nothing.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name))
}

/// What the store knows of a node that already has the name a joiner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    /// An admin let the next join under this name through until then.
    pub rejoin_until_ms: Option<u64>,
}

/// What a join that is let through does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A new node.
    New,
    /// The existing node, under a new certificate (the old one is revoked).
    Rejoin,
}

/// The join rule: `token` is the stored token whose secret the joiner gave (if any),
/// `existing` the node already holding `name` (if any).
pub fn admit(
    token: Option<&TokenRow>,
    existing: Option<Existing>,
    name: &str,
    now_ms: u64,
) -> Result<Admit, JoinRefusal> {
    let t = token.ok_or(JoinRefusal::UnknownToken)?;
    let id = t.id.clone();
    match state(t, now_ms) {
        TokenState::Active => {}
        TokenState::Revoked => return Err(JoinRefusal::Revoked { id }),
        TokenState::Expired => return Err(JoinRefusal::Expired { id }),
        TokenState::UsedUp => return Err(JoinRefusal::UsedUp { id, uses: t.uses }),
    }
    proto::manifest::validate_name(name).map_err(|e| JoinRefusal::InvalidName(e.to_string()))?;
    if !name_matches(&t.name_pattern, name) {
        return Err(JoinRefusal::NameNotAllowed { id, pattern: t.name_pattern.clone(), name: name.to_string() });
    }
    match existing {
        None => Ok(Admit::New),
        Some(e) if e.rejoin_until_ms.is_some_and(|until| until > now_ms) => Ok(Admit::Rejoin),
        Some(_) => Err(JoinRefusal::NodeExists { name: name.to_string() }),
    }
}

pub fn view(t: &TokenRow, now_ms: u64) -> TokenView {
    TokenView {
        id: t.id.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        max_uses: t.max_uses,
        uses: t.uses,
        name_pattern: t.name_pattern.clone(),
        labels: t.labels.clone(),
        revoked_at_ms: t.revoked_at_ms,
        state: state(t, now_ms).as_str().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenRow {
        TokenRow {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: Some(1_000),
            max_uses: Some(2),
            uses: 0,
            name_pattern: "store-*".into(),
            labels: BTreeMap::new(),
            revoked_at_ms: None,
        }
    }

    #[test]
    fn a_token_admits_new_matching_names_until_it_expires_runs_out_or_is_revoked() {
        let t = token();
        assert_eq!(admit(Some(&t), None, "store-12", 10), Ok(Admit::New));
        assert_eq!(admit(None, None, "store-12", 10), Err(JoinRefusal::UnknownToken));
        assert_eq!(admit(Some(&t), None, "store-12", 1_000), Err(JoinRefusal::Expired { id: "t1".into() }));
        let used = TokenRow { uses: 2, ..t.clone() };
        assert_eq!(admit(Some(&used), None, "store-12", 10), Err(JoinRefusal::UsedUp { id: "t1".into(), uses: 2 }));
        let revoked = TokenRow { revoked_at_ms: Some(5), ..t.clone() };
        assert_eq!(admit(Some(&revoked), None, "store-12", 10), Err(JoinRefusal::Revoked { id: "t1".into() }));
        assert!(matches!(admit(Some(&t), None, "vault-1", 10), Err(JoinRefusal::NameNotAllowed { .. })));
        assert!(matches!(admit(Some(&t), None, "store-X", 10), Err(JoinRefusal::InvalidName(_))));
        let unlimited = TokenRow { expires_at_ms: None, max_uses: None, name_pattern: "*".into(), ..t };
        assert_eq!(admit(Some(&unlimited), None, "anything", u64::MAX), Ok(Admit::New));
    }

    #[test]
    fn an_existing_name_is_taken_only_with_an_admins_permission_in_time() {
        let t = TokenRow { name_pattern: "*".into(), ..token() };
        let exists = |until| Some(Existing { rejoin_until_ms: until });
        assert_eq!(admit(Some(&t), exists(None), "edge-1", 10), Err(JoinRefusal::NodeExists { name: "edge-1".into() }));
        assert_eq!(admit(Some(&t), exists(Some(20)), "edge-1", 10), Ok(Admit::Rejoin));
        assert!(matches!(admit(Some(&t), exists(Some(10)), "edge-1", 10), Err(JoinRefusal::NodeExists { .. })));
        // The token's own limits still apply to a re-join.
        assert!(matches!(admit(Some(&t), exists(Some(5_000)), "edge-1", 2_000), Err(JoinRefusal::Expired { .. })));
    }

    #[test]
    fn specs_are_checked_and_tokens_minted_apart() {
        assert_eq!(TokenSpec { uses: Some(0), ..Default::default() }.validate(), Err(SpecError::NoUses));
        assert!(TokenSpec { name_pattern: Some("[".into()), ..Default::default() }.validate().is_err());
        let bad_label = TokenSpec { labels: [("a b".into(), "c".into())].into(), ..Default::default() };
        assert!(matches!(bad_label.validate(), Err(SpecError::Label(_))));
        assert!(TokenSpec { name_pattern: Some("site-[0-9]*".into()), ..Default::default() }.validate().is_ok());
        assert!(name_matches("site-[0-9]*", "site-7a") && !name_matches("site-[0-9]*", "vault"));
        let mut rng = rand::rng();
        let (a, b) = (mint(&"0".repeat(64), &mut rng), mint(&"0".repeat(64), &mut rng));
        assert_ne!(a.token.secret, b.token.secret);
        assert_ne!(a.id, b.id);
        assert_eq!(a.secret_sha256, secret_sha256(&a.token.secret));
        // What is handed out parses as a token and pins the CA.
        let parsed: JoinToken = a.token.to_string().parse().unwrap();
        assert_eq!(parsed, a.token);
    }
}
