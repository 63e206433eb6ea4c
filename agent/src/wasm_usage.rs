//! What each Wasm replica uses, by replica name. Wasm replicas run inside the agent's own
//! process, so no cgroup separates them: `wasm-runtime` counts each one's CPU time and linear
//! memory into a [`GuestUsage`] (see its `usage` module for how), and this registry is where
//! [`crate::metrics`] (Prometheus, `flotilla top`) finds them.
//!
//! The Wasm runtime takes a [`Metering`] for every run it starts and drops it when the run
//! ends. A replica is listed while at least one of its runs is (a new run may start while the
//! previous one winds down: they share one [`GuestUsage`], so its CPU time only grows while
//! the replica stays on the node). So the registry, and the metric series made from it, never
//! hold more than the replicas that exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasm_runtime::GuestUsage;

use crate::metrics::Usage;

/// The registry; clones share it.
#[derive(Clone, Default)]
pub struct WasmUsage {
    // std Mutex: held only to look up, insert or copy out entries, never across an await.
    replicas: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    usage: Arc<GuestUsage>,
    /// Runs of the replica holding a [`Metering`].
    runs: usize,
}

/// A run's hold on its replica's entry: the replica is listed until every run's `Metering` is
/// dropped.
pub struct Metering {
    registry: WasmUsage,
    replica: String,
    usage: Arc<GuestUsage>,
}

impl Metering {
    /// What the run's guests count into (`RunOptions::usage`, `HttpOptions::usage`).
    pub fn usage(&self) -> Arc<GuestUsage> {
        self.usage.clone()
    }
}

impl Drop for Metering {
    fn drop(&mut self) {
        let mut replicas = self.registry.lock();
        if let Some(entry) = replicas.get_mut(&self.replica) {
            entry.runs = entry.runs.saturating_sub(1);
            if entry.runs == 0 {
                replicas.remove(&self.replica);
            }
        }
    }
}

impl WasmUsage {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map holds no invariant a panicking holder could break.
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists `replica` for as long as the returned [`Metering`] lives, with the usage its runs
    /// share.
    pub fn track(&self, replica: &str) -> Metering {
        let mut replicas = self.lock();
        let entry = replicas.entry(replica.to_string()).or_insert_with(|| Entry { usage: GuestUsage::new(), runs: 0 });
        entry.runs += 1;
        Metering { registry: self.clone(), replica: replica.to_string(), usage: entry.usage.clone() }
    }

    /// Runs live now, over all replicas (an HTTP component's server is one run however many
    /// requests it handles).
    pub fn runs(&self) -> usize {
        self.lock().values().map(|e| e.runs).sum()
    }

    /// Every listed replica's CPU time so far and linear memory now.
    pub fn sample(&self) -> HashMap<String, Usage> {
        self.lock()
            .iter()
            .map(|(name, e)| {
                let usage =
                    Usage { cpu_seconds: e.usage.cpu_time().as_secs_f64(), memory_bytes: e.usage.memory_bytes() };
                (name.clone(), usage)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_listed_while_one_of_its_runs_is() {
        let registry = WasmUsage::default();
        assert!(registry.sample().is_empty());
        let first = registry.track("web-0");
        let other = registry.track("job-0");
        assert_eq!(registry.sample().len(), 2);
        assert_eq!(registry.runs(), 2);
        // A new run while the old one winds down: the same usage, still listed after the old
        // run ends, gone after the new one does.
        let second = registry.track("web-0");
        assert!(Arc::ptr_eq(&first.usage(), &second.usage()));
        assert_eq!(registry.runs(), 3, "each run counts, a replica's too");
        assert!(!Arc::ptr_eq(&first.usage(), &other.usage()));
        drop(first);
        assert!(registry.sample().contains_key("web-0"));
        drop(second);
        assert_eq!(registry.sample().keys().collect::<Vec<_>>(), ["job-0"]);
        drop(other);
        assert!(registry.sample().is_empty());
        assert_eq!(registry.runs(), 0);
        // Listed again later: a fresh count.
        let again = registry.track("web-0");
        assert_eq!(registry.sample()["web-0"], Usage { cpu_seconds: 0.0, memory_bytes: 0 });
        drop(again);
    }
}
