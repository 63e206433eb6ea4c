//! Agent heartbeats, written in batches. Each agent sends one every 5 s; written one by one
//! they cost the store 2,000 transactions a second at 10,000 nodes (BENCHMARKS.md, "Fleet
//! scale"). Sessions [`Heartbeats::record`] them instead, and [`flush_loop`] writes all those
//! received in the last second in one transaction, then wakes the sessions whose node is gone
//! or no longer admits their certificate (another hub's delete or re-join), so they check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use crate::cluster::Shared;
use crate::now_ms;

/// How often the heartbeats received meanwhile are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

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
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
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
