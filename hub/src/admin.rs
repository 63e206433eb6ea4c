//! The admin's requests about who may be a node: join tokens (`flotilla token
//! create|list|revoke`), node deletion (which revokes the node's certificate), re-join
//! permissions, and the labels and taints that are the hub's to set (`flotilla label|taint
//! node`). The rules are in [`crate::tokens`] and [`crate::identity`]; this module is their
//! I/O shell over the store and the live sessions.

use std::fmt::Write as _;

use proto::messages::{ApiRequest, ApiResponse, NodeView};
use tracing::info;

use crate::cluster::Shared;
use crate::identity::{EditError, edit_labels, edit_taints};
use crate::now_ms;
use crate::store::{NewToken, StoreError};
use crate::tokens::{self, TokenSpec};

/// The default time an `allow-rejoin` permission lasts.
pub const REJOIN_DEFAULT_MS: u64 = 3_600_000;

/// Answers the token and node-identity requests; `None` for any other request.
pub(crate) async fn answer(shared: &Shared, req: &ApiRequest) -> Option<Result<ApiResponse, StoreError>> {
    Some(match req {
        ApiRequest::TokenCreate { ttl_ms, uses, name_pattern, labels } => {
            let spec =
                TokenSpec { ttl_ms: *ttl_ms, uses: *uses, name_pattern: name_pattern.clone(), labels: labels.clone() };
            create_token(shared, spec).await
        }
        ApiRequest::TokenList => list_tokens(shared).await,
        ApiRequest::TokenRevoke { id } => revoke_token(shared, id).await,
        ApiRequest::LabelNode { node, set, remove } => {
            edit_node(shared, node, |labels, taints| Ok((edit_labels(labels, set, remove)?, taints.to_vec()))).await
        }
        ApiRequest::TaintNode { node, set, remove } => {
            edit_node(shared, node, |labels, taints| Ok((labels.clone(), edit_taints(taints, set, remove)?))).await
        }
        ApiRequest::AllowRejoin { node, for_ms } => allow_rejoin(shared, node, *for_ms).await,
        _ => return None,
    })
}

async fn create_token(shared: &Shared, spec: TokenSpec) -> Result<ApiResponse, StoreError> {
    if let Err(e) = spec.validate() {
        return Ok(ApiResponse::Error { message: e.to_string() });
    }
    let now = now_ms();
    let minted = tokens::mint(&shared.ca.fingerprint(), &mut rand::rng());
    let row = NewToken {
        id: minted.id.clone(),
        secret_sha256: minted.secret_sha256,
        expires_at_ms: spec.ttl_ms.map(|ttl| now.saturating_add(ttl)),
        max_uses: spec.uses.map(u64::from),
        name_pattern: spec.name_pattern.unwrap_or_else(|| "*".into()),
        labels: spec.labels,
    };
    shared.store.create_token(&row, now).await?;
    info!(token = %row.id, expires_at_ms = ?row.expires_at_ms, max_uses = ?row.max_uses, names = %row.name_pattern, "join token created");
    let stored = shared.store.tokens().await?.into_iter().find(|t| t.id == row.id);
    match stored {
        Some(t) => Ok(ApiResponse::Token { token: minted.token.to_string(), view: tokens::view(&t, now) }),
        None => Ok(ApiResponse::Error { message: "the token was not stored".into() }),
    }
}

async fn list_tokens(shared: &Shared) -> Result<ApiResponse, StoreError> {
    let now = now_ms();
    let items = shared.store.tokens().await?.iter().map(|t| tokens::view(t, now)).collect();
    Ok(ApiResponse::Tokens { items })
}

async fn revoke_token(shared: &Shared, id: &str) -> Result<ApiResponse, StoreError> {
    match shared.store.revoke_token(id, now_ms()).await? {
        Some(t) => {
            info!(token = %id, "join token revoked");
            Ok(ApiResponse::Tokens { items: vec![tokens::view(&t, now_ms())] })
        }
        None => Ok(ApiResponse::Error { message: format!("join token {id:?} not found") }),
    }
}

async fn edit_node(
    shared: &Shared,
    node: &str,
    edit: impl FnOnce(
        &std::collections::BTreeMap<String, String>,
        &[proto::manifest::Taint],
    ) -> Result<(std::collections::BTreeMap<String, String>, Vec<proto::manifest::Taint>), EditError>,
) -> Result<ApiResponse, StoreError> {
    match shared.store.edit_node_admin(node, edit).await? {
        None => Ok(ApiResponse::Error { message: format!("node {node:?} not found") }),
        Some(Err(e)) => Ok(ApiResponse::Error { message: e.to_string() }),
        Some(Ok(())) => {
            info!(%node, "node labels or taints set by an admin");
            shared.trigger_reconcile();
            node_answer(shared, node).await
        }
    }
}

async fn allow_rejoin(shared: &Shared, node: &str, for_ms: u64) -> Result<ApiResponse, StoreError> {
    let until = now_ms().saturating_add(if for_ms == 0 { REJOIN_DEFAULT_MS } else { for_ms });
    if !shared.store.allow_rejoin(node, until).await? {
        return Ok(ApiResponse::Error { message: format!("node {node:?} not found") });
    }
    info!(%node, until_ms = until, "a re-join under this node's name is allowed");
    node_answer(shared, node).await
}

/// Deletes a node: its certificate is revoked (its session, if any, is told to stop its
/// replicas and closed), and the controller places its replicas elsewhere.
pub(crate) async fn delete_node(shared: &Shared, node: &str) -> Result<ApiResponse, StoreError> {
    if !shared.store.delete_node(node, now_ms()).await? {
        return Ok(ApiResponse::Error { message: format!("node {node:?} not found") });
    }
    info!(%node, "node deleted; its certificate is revoked");
    shared.wake_nodes([&node.to_string()]);
    shared.trigger_reconcile();
    Ok(ApiResponse::Deleted { names: vec![node.to_string()] })
}

async fn node_answer(shared: &Shared, node: &str) -> Result<ApiResponse, StoreError> {
    let items = crate::api::node_views(shared).await?.into_iter().filter(|n| n.name == node).collect();
    Ok(ApiResponse::Nodes { items })
}

/// The identity part of `describe node`: who set which label, what the agent claimed that
/// the hub did not take, and what keeps the node from its set.
pub(crate) fn describe_identity(s: &mut String, n: &NodeView) {
    for (k, v) in &n.admin_labels {
        let _ = writeln!(s, "Admin label:  {k}={v}");
    }
    for t in &n.admin_taints {
        let _ = writeln!(s, "Admin taint:  {t}");
    }
    if let Some(c) = &n.claimed {
        for (k, v) in &c.labels {
            let _ = writeln!(s, "Claimed:      {k}={v}");
        }
        for t in &c.taints {
            let _ = writeln!(s, "Claimed:      taint {t}");
        }
    }
    for notice in &n.notices {
        let _ = writeln!(s, "Warning:      {notice}");
    }
    if !n.joined_with.is_empty() {
        let _ = writeln!(s, "Joined with:  token {}", n.joined_with);
    }
    if let Some(expires) = n.cert_expires_ms {
        let now = now_ms();
        let when = if expires > now {
            format!("expires in {}", crate::identity::span(std::time::Duration::from_millis(expires - now)))
        } else {
            format!("expired {} ago", crate::identity::span(std::time::Duration::from_millis(now - expires)))
        };
        let _ = writeln!(s, "Certificate:  {when} (renewed by the agent two thirds into its life)");
    }
    if !n.problem.is_empty() {
        let _ = writeln!(s, "Problem:      {}", n.problem);
    }
}
