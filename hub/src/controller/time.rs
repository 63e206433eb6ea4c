//! The controller's time, and what the shell observes about nodes over time. Pure: the shell
//! passes its monotonic clock in (milliseconds since the process anchored it, once, at start)
//! and the persisted anchor out of the store; nothing here reads a clock.
//!
//! **Cluster time.** Every deadline the controller keeps (failover, rollout progress, Job
//! back-off) is an instant of *cluster time*: milliseconds counted by the monotonic clocks of
//! the hubs that led, one after another. The leader keeps an anchor in the store (cluster
//! time, the id of its own clock, its monotonic reading) and reads cluster time as
//! `anchor.cluster_ms + (mono − anchor.mono_ms)` while the anchor is its own. A hub that
//! takes over (another process, or the same hub restarted, with a new clock id) cannot read
//! another process's monotonic clock, so it continues from `anchor.cluster_ms` and writes its
//! own anchor at once. The anchor is written with every pass that writes anything, and at
//! least every [`ANCHOR_EVERY_MS`] while leading.
//!
//! Why this and not wall clocks or the database clock: a wall clock (the hub's, or SQLite's,
//! which is the same) can jump, and a jump would fire a failover or a rollback early or hold
//! it back. Monotonic readings never jump but mean nothing to another process; carried
//! forward through the anchor they give every hub the same time line, which never goes back
//! and never leaps. What it does not count is time when no hub led (a hub restart, a lease
//! handover) and at most [`ANCHOR_EVERY_MS`] before it: deadlines are postponed by an outage
//! of the control plane, never fired by one, the same rule as "a hub that was down did not
//! see its nodes, so failover counts from its start".
//!
//! **Presence.** When a node was last heard of, by this hub's monotonic clock: its session
//! here ended, or (on a shared store) the heartbeat the hubs record for it last changed. A
//! node that is not connected has been NotReady since then, but never since before this hub
//! started. Recorded heartbeats are compared by value, not against this hub's wall clock:
//! "it changed less than [`REMOTE_STALE_MS`] ago by my clock" needs no agreement between hub
//! clocks.

use std::collections::HashMap;

/// The leader writes its anchor at least this often, which bounds the cluster time a
/// leader change can lose.
pub const ANCHOR_EVERY_MS: u64 = 5_000;

/// A node whose session another hub holds counts as connected while the heartbeat that hub
/// records changed less than this long ago (three agent heartbeats).
pub const REMOTE_STALE_MS: u64 = 15_000;

/// Where cluster time stood when the leader last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockAnchor {
    pub cluster_ms: u64,
    /// The process clock that measured `mono_ms` (random per hub process).
    pub clock: String,
    pub mono_ms: u64,
}

/// One hub process's reading of cluster time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterClock {
    id: String,
}

impl ClusterClock {
    /// `id` must differ for every hub process (a restarted hub is a new clock).
    pub fn new(id: impl Into<String>) -> ClusterClock {
        ClusterClock { id: id.into() }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Cluster time at this process's monotonic reading `mono_ms`.
    pub fn now(&self, anchor: Option<&ClockAnchor>, mono_ms: u64) -> u64 {
        match anchor {
            None => 0,
            Some(a) if a.clock == self.id => a.cluster_ms.saturating_add(mono_ms.saturating_sub(a.mono_ms)),
            Some(a) => a.cluster_ms,
        }
    }

    /// Whether a pass at `mono_ms` must write the anchor even when it writes nothing else:
    /// there is none, it is another clock's, or it is [`ANCHOR_EVERY_MS`] old.
    pub fn anchor_due(&self, anchor: Option<&ClockAnchor>, mono_ms: u64) -> bool {
        anchor.is_none_or(|a| a.clock != self.id || mono_ms.saturating_sub(a.mono_ms) >= ANCHOR_EVERY_MS)
    }

    /// The anchor for cluster time `cluster_ms` read at `mono_ms`.
    pub fn anchor(&self, cluster_ms: u64, mono_ms: u64) -> ClockAnchor {
        ClockAnchor { cluster_ms, clock: self.id.clone(), mono_ms }
    }
}

/// When this hub last heard of each node (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Presence {
    started_ms: u64,
    /// Sessions on this hub that ended: when.
    lost: HashMap<String, u64>,
    /// The heartbeat value the store holds for a node, and when it last changed.
    heard: HashMap<String, (u64, u64)>,
}

impl Presence {
    /// A hub whose monotonic clock read `started_ms` when it started.
    pub fn new(started_ms: u64) -> Presence {
        Presence { started_ms, ..Presence::default() }
    }

    /// The node's session on this hub ended at `mono_ms`.
    pub fn session_ended(&mut self, node: &str, mono_ms: u64) {
        self.lost.insert(node.to_string(), mono_ms);
    }

    /// A poll of the store at `mono_ms` found heartbeat `last_seen` recorded for `node` (by
    /// whichever hub holds its session; any unit, only changes count). Returns whether it
    /// changed less than [`REMOTE_STALE_MS`] ago; a value seen for the first time counts as
    /// a change now.
    pub fn heartbeat(&mut self, node: &str, last_seen: u64, mono_ms: u64) -> bool {
        let entry = self.heard.entry(node.to_string()).or_insert((last_seen, mono_ms));
        if entry.0 != last_seen {
            *entry = (last_seen, mono_ms);
        }
        mono_ms.saturating_sub(entry.1) < REMOTE_STALE_MS
    }

    /// Since when (monotonic) a node that is not connected counts as NotReady: the last
    /// time this hub heard of it, but not before this hub started.
    pub fn not_ready_since(&self, node: &str) -> u64 {
        let lost = self.lost.get(node).copied().unwrap_or(0);
        let heard = self.heard.get(node).map_or(0, |h| h.1);
        lost.max(heard).max(self.started_ms)
    }
}

/// A monotonic instant `mono_ms` as cluster time, given that `mono_now` reads as `cluster_now`.
pub fn to_cluster(mono_ms: u64, mono_now: u64, cluster_now: u64) -> u64 {
    cluster_now.saturating_sub(mono_now.saturating_sub(mono_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_time_runs_with_the_leaders_clock_and_carries_over_to_the_next() {
        let a = ClusterClock::new("a");
        // A fresh store: time 0, and the anchor is due.
        assert_eq!(a.now(None, 500), 0);
        assert!(a.anchor_due(None, 500));
        let anchor = a.anchor(0, 500);
        assert_eq!(a.now(Some(&anchor), 2_500), 2_000);
        assert!(!a.anchor_due(Some(&anchor), 2_500));
        assert!(a.anchor_due(Some(&anchor), 500 + ANCHOR_EVERY_MS));
        // Another hub (or this one restarted) goes on from the anchor, not from its own clock
        // (whose readings mean nothing here), and anchors at once.
        let b = ClusterClock::new("b");
        assert_eq!(b.now(Some(&anchor), 9_999_999), 0);
        assert!(b.anchor_due(Some(&anchor), 9_999_999));
        let anchor = b.anchor(0, 7);
        assert_eq!(b.now(Some(&anchor), 1_007), 1_000);
        // A clock that reads less than its anchor (impossible for one process) stays put.
        assert_eq!(b.now(Some(&anchor), 3), 0);
    }

    #[test]
    fn presence_counts_from_the_last_sign_of_life_but_not_before_the_hub_started() {
        let mut p = Presence::new(1_000);
        assert_eq!(p.not_ready_since("never-seen"), 1_000);
        p.session_ended("local", 500);
        assert_eq!(p.not_ready_since("local"), 1_000);
        p.session_ended("local", 4_000);
        assert_eq!(p.not_ready_since("local"), 4_000);
        // Recorded heartbeats: fresh while they change, stale 15 s after the last change,
        // whatever the wall clocks that wrote them say.
        assert!(p.heartbeat("far", 77, 2_000));
        assert!(p.heartbeat("far", 78, 6_000));
        assert!(p.heartbeat("far", 78, 6_000 + REMOTE_STALE_MS - 1));
        assert!(!p.heartbeat("far", 78, 6_000 + REMOTE_STALE_MS));
        assert_eq!(p.not_ready_since("far"), 6_000);
        // A heartbeat value that goes back (another hub's clock) is a change all the same.
        assert!(p.heartbeat("far", 12, 30_000));
        assert_eq!(p.not_ready_since("far"), 30_000);
    }

    #[test]
    fn monotonic_instants_map_onto_cluster_time() {
        assert_eq!(to_cluster(7_000, 10_000, 50_000), 47_000);
        assert_eq!(to_cluster(0, 10_000, 4_000), 0);
    }
}
