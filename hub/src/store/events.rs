//! The store's side of `flotilla events`: what the hub itself observes (a node's link coming
//! up or going), newest [`EVENTS_KEPT`] kept.

use super::{Result, Store};

/// Events the store keeps; older ones are deleted as new ones come.
pub const EVENTS_KEPT: u64 = 10_000;

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub at_ms: u64,
    /// `node/NAME`.
    pub object: String,
    pub reason: String,
    pub message: String,
}

impl Store {
    /// Records an event and deletes those past the newest [`EVENTS_KEPT`].
    pub async fn record_event(&self, e: &EventRow) -> Result<()> {
        let mut tx = self.pool.write_tx().await?;
        insert_event(&mut tx, e).await?;
        trim_events(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events at or after `since_ms`, oldest first.
    pub async fn events(&self, since_ms: u64) -> Result<Vec<EventRow>> {
        let rows = self
            .pool
            .fetch(
                "SELECT at_ms, object, reason, message FROM events WHERE at_ms >= ? ORDER BY at_ms",
                &[since_ms.into()],
            )
            .await?;
        rows.iter()
            .map(|r| Ok(EventRow { at_ms: r.u64(0)?, object: r.text(1)?, reason: r.text(2)?, message: r.text(3)? }))
            .collect()
    }
}

impl EventRow {
    /// A node's session started on `hub` at `at_ms`.
    pub fn node_ready(node: &str, hub: &str, at_ms: u64) -> EventRow {
        EventRow {
            at_ms,
            object: format!("node/{node}"),
            reason: "Ready".into(),
            message: format!("connected to hub {hub}"),
        }
    }
}

/// Inserts `e` within `tx` (the caller trims, [`trim_events`]).
pub(super) async fn insert_event(tx: &mut super::db::Tx, e: &EventRow) -> Result<()> {
    tx.exec(
        "INSERT INTO events (at_ms, object, reason, message) VALUES (?, ?, ?, ?)",
        &[e.at_ms.into(), e.object.as_str().into(), e.reason.as_str().into(), e.message.as_str().into()],
    )
    .await?;
    Ok(())
}

/// Deletes the events past the newest [`EVENTS_KEPT`], within `tx`.
pub(super) async fn trim_events(tx: &mut super::db::Tx) -> Result<()> {
    tx.exec(
        "DELETE FROM events WHERE at_ms < (SELECT at_ms FROM events ORDER BY at_ms DESC LIMIT 1 OFFSET ?)",
        &[(EVENTS_KEPT - 1).into()],
    )
    .await?;
    Ok(())
}
