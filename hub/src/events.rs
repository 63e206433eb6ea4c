//! `flotilla events`: one ordered list merged from where events live. Replica events are
//! recorded by agents in each replica's status (so a node's offline period is there once it
//! reconnects, at the agent's timestamps), rollouts are the workloads' template revisions,
//! and the hub records each node's link coming up and going (`Store::record_event`).

use proto::messages::{ApiResponse, ClusterEvent};

use crate::cluster::Shared;
use crate::store::{EventRow, StoreError};

/// Records what the hub saw of a node's link; a store that cannot take it loses the event
/// (logged), never the session.
pub(crate) async fn node(shared: &Shared, node: &str, reason: &str, message: String) {
    let row = EventRow { at_ms: crate::now_ms(), object: format!("node/{node}"), reason: reason.into(), message };
    if let Err(e) = shared.store.record_event(&row).await {
        tracing::warn!(%node, error = %e, "node event not recorded");
    }
}

/// The events at or after `since_ms` about `object` (all when `None`), oldest first.
pub(crate) async fn list(shared: &Shared, since_ms: u64, object: Option<&str>) -> Result<ApiResponse, StoreError> {
    let (kind, name) = match object.map(|o| o.split_once('/')) {
        None => (None, ""),
        Some(Some((k, n))) if matches!(k, "node" | "workload" | "replica") => (Some(k), n),
        Some(_) => {
            return Ok(ApiResponse::Error { message: "--for takes node/NAME, workload/NAME or replica/NAME".into() });
        }
    };
    let mut items = Vec::new();
    for r in shared.store.replicas().await? {
        let wanted = match kind {
            None => true,
            Some("replica") => r.name == name,
            Some("workload") => r.workload == name,
            Some(_) => r.node.as_deref() == Some(name),
        };
        if !wanted {
            continue;
        }
        for e in r.status.events.iter().filter(|e| e.at_ms >= since_ms) {
            items.push(ClusterEvent {
                at_ms: e.at_ms,
                object: format!("replica/{}", r.name),
                reason: e.reason.to_string(),
                message: e.message.clone(),
            });
        }
    }
    if matches!(kind, None | Some("workload")) {
        for w in shared.store.workloads().await? {
            let workload = w.manifest.metadata.name;
            if kind.is_some() && workload != name {
                continue;
            }
            for rev in shared.store.revisions(&workload).await?.into_iter().filter(|r| r.created_at_ms >= since_ms) {
                items.push(ClusterEvent {
                    at_ms: rev.created_at_ms,
                    object: format!("workload/{workload}"),
                    reason: "Rollout".into(),
                    message: format!("revision {} ({}): template {}", rev.revision, rev.cause, rev.template_hash),
                });
            }
        }
    }
    if matches!(kind, None | Some("node")) {
        let object = format!("node/{name}");
        for e in shared.store.events(since_ms).await? {
            if kind.is_none() || e.object == object {
                items.push(ClusterEvent { at_ms: e.at_ms, object: e.object, reason: e.reason, message: e.message });
            }
        }
    }
    items.sort();
    Ok(ApiResponse::Events { items })
}
