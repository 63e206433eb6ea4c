//! `get KIND -w`: the hub streams a kind's changes to the CLI, which never polls.
//!
//! The stream starts with [`StreamStart`] and the whole list, then carries a frame each time
//! items change: an [`ApiResponse`] of the kind's list holding only the items that changed
//! (or appeared), and [`ApiResponse::Deleted`] with the names of those that went away.
//!
//! What wakes a watch is [`Shared::changes`], which ticks wherever this hub triggers a
//! reconcile (applies, deletes, scheduling changes, nodes and replica reports). Some changes
//! wake nothing here: the controller's own writes, and on a shared store what another hub
//! wrote. A short re-read ([`BACKSTOP`]) catches those, so a change shows within about half
//! a second however it was made; each wake-up costs one read of the list, compared here, and
//! sends nothing when nothing changed.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::messages::{ApiResponse, ResourceKind, StreamStart};
use serde_json::Value;
use transport::frame;

use crate::api::StreamError;
use crate::cluster::Shared;

/// The longest a change waits to be seen when nothing woke the watch.
const BACKSTOP: Duration = Duration::from_millis(500);

/// Fields that change without the object changing (a node's heartbeat), left out of the
/// comparison so a watch does not print every node every few seconds.
const VOLATILE: &[&str] = &["lastSeenMs"];

pub(crate) async fn serve(
    shared: &Shared,
    send: &mut quinn::SendStream,
    kind: ResourceKind,
) -> Result<(), StreamError> {
    let mut changes = shared.changes.subscribe();
    let first = match crate::api::list(shared, kind).await {
        Ok(ApiResponse::Error { message }) => Err(message),
        Ok(r) => Ok(r),
        Err(e) => Err(e.to_string()),
    };
    let first = match first {
        Ok(r) => r,
        Err(message) => {
            frame::write(send, &StreamStart::Error { message }).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    frame::write(send, &StreamStart::Ok).await?;
    frame::write(send, &first).await?;
    let mut shown = keyed(&first);
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(BACKSTOP) => {}
            // The CLI went away (Ctrl-C): nothing more to send.
            _ = send.stopped() => return Ok(()),
        }
        let now = match crate::api::list(shared, kind).await {
            Ok(r) => r,
            // A store that fails now may answer at the next wake-up; the CLI keeps what it has.
            Err(e) => {
                tracing::debug!(error = %e, "watch: listing failed");
                continue;
            }
        };
        let current = keyed(&now);
        let changed: Vec<&str> =
            current.iter().filter(|(k, v)| shown.get(*k) != Some(v)).map(|(k, _)| k.as_str()).collect();
        let deleted: Vec<String> = shown.keys().filter(|k| !current.contains_key(*k)).cloned().collect();
        if !changed.is_empty() {
            frame::write(send, &only(&now, &changed)).await?;
        }
        if !deleted.is_empty() {
            frame::write(send, &ApiResponse::Deleted { names: deleted }).await?;
        }
        shown = current;
    }
}

/// Each item of a list by name, as JSON without its [`VOLATILE`] fields.
fn keyed(response: &ApiResponse) -> BTreeMap<String, Value> {
    let Ok(Value::Object(mut whole)) = serde_json::to_value(response) else { return BTreeMap::new() };
    let Some(Value::Array(items)) = whole.remove("items") else { return BTreeMap::new() };
    items
        .into_iter()
        .filter_map(|mut item| {
            let name = item
                .get("name")
                .or_else(|| item.pointer("/manifest/metadata/name"))
                .and_then(Value::as_str)?
                .to_string();
            if let Some(m) = item.as_object_mut() {
                for f in VOLATILE {
                    m.remove(*f);
                }
            }
            Some((name, item))
        })
        .collect()
}

/// `response` with only the items named in `names`.
fn only(response: &ApiResponse, names: &[&str]) -> ApiResponse {
    let name_of = |item: &Value| {
        item.get("name").or_else(|| item.pointer("/manifest/metadata/name")).and_then(Value::as_str).map(String::from)
    };
    let Ok(mut whole) = serde_json::to_value(response) else { return ApiResponse::Deleted { names: Vec::new() } };
    if let Some(Value::Array(items)) = whole.get_mut("items") {
        items.retain(|i| name_of(i).is_some_and(|n| names.contains(&n.as_str())));
    }
    serde_json::from_value(whole).unwrap_or(ApiResponse::Deleted { names: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_keyed_by_name_without_heartbeats_and_narrowed_to_what_changed() {
        let object = |name: &str| proto::objects::ObjectView {
            kind: proto::objects::ObjectKind::Config,
            name: name.into(),
            version: 1,
            digest: "d".into(),
            keys: Default::default(),
            used_by: Vec::new(),
        };
        let nodes = ApiResponse::Objects { items: vec![object("a"), object("b")] };
        let keyed = keyed(&nodes);
        assert_eq!(keyed.keys().collect::<Vec<_>>(), ["a", "b"]);
        let ApiResponse::Objects { items } = only(&nodes, &["b"]) else { panic!("not objects") };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].name, "b");
        let mut item = serde_json::json!({"name": "n", "lastSeenMs": 5, "ready": true});
        if let Some(m) = item.as_object_mut() {
            for f in VOLATILE {
                m.remove(*f);
            }
        }
        assert_eq!(item, serde_json::json!({"name": "n", "ready": true}));
    }
}
