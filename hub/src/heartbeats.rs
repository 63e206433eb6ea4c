//! Node liveness in the store (`nodes.last_seen_ms`), written in batches: the sign by which
//! the other hubs on a shared store see that a node is held by a live session here.
//!
//! A node's session is its sign of life: the QUIC connection ends after the idle timeout
//! without the agent's keep-alives. So on a shared store (PostgreSQL, where other hubs read
//! these records) every [`LIVE_EVERY`] [`flush_loop`] records each session this hub holds, and
//! agents are told (`AssignmentSet::connection_liveness`) that they need send no heartbeat
//! frames, which halves an idle node's traffic and the hub's packets (BENCHMARKS.md, "Fleet
//! scale"). On a store of its own (SQLite) no other hub reads them, and writing every
//! session's record every 5 s cost a hub of 10,000 idle nodes a transaction of 10,000 updates
//! each time, so they are not written: a node's presence is its session here (its start and
//! end are written), and the API shows a node this hub holds as seen now. Agents that predate
//! `connection_liveness` still send a heartbeat every 5 s:
//! sessions [`Heartbeats::record`] them. Either way one transaction a second writes what was
//! recorded (written one by one they cost the store 2,000 transactions a second at 10,000
//! nodes), then wakes the sessions whose node is gone or no longer admits their certificate
//! (another hub's delete or re-join), so they check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use crate::cluster::Shared;
use crate::now_ms;

/// How often the heartbeats received meanwhile are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often every session this hub holds is recorded as alive: well within
/// [`crate::controller::time::REMOTE_STALE_MS`], after which other hubs stop counting a node
/// as held here.
const LIVE_EVERY: u32 = 5;

/// Heartbeats received since the last flush: node → the certificate its session holds. At
/// most one entry per node. std Mutex: map operations only.
#[derive(Default)]
pub(crate) struct Heartbeats(Mutex<HashMap<String, String>>);

impl Heartbeats {
    pub(crate) fn record(&self, node: &str, cert: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(node.to_string(), cert.to_string());
    }

    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect()
    }
}

/// Writes the recorded heartbeats every [`FLUSH_EVERY`] until the hub stops.
pub(crate) async fn flush_loop(shared: Arc<Shared>) {
    let mut tick = 0u32;
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        tick = tick.wrapping_add(1);
        if tick.is_multiple_of(LIVE_EVERY) && shared.store.is_shared() {
            let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            for (node, session) in sessions.iter() {
                shared.heartbeats.record(node, &session.cert);
            }
        }
        let beats = shared.heartbeats.take();
        if beats.is_empty() {
            continue;
        }
        match shared.store.touch_nodes_as(&beats, now_ms()).await {
            Ok(stale) => shared.wake_nodes(&stale),
            Err(e) => warn!(error = %e, heartbeats = beats.len(), "cannot record heartbeats"),
        }
    }
}
