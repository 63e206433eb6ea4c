//! Leader election among hubs sharing one store: a lease row taken and renewed with one
//! compare-and-swap statement ([`Store::try_acquire_lease`]) whose expiry is computed by the
//! DATABASE's clock, so skew between hub clocks cannot make two leaders. It owns the renewal
//! loop and publishes "am I leader" on a `watch` channel; it never runs controllers itself.
//!
//! Safety: a hub counts itself leader only until `sent + ttl - margin` by its own monotonic
//! clock, where `sent` is when it sent the renewal that succeeded. The database granted the
//! lease until (its now at execution) + ttl, which is later in real time, so the hub steps
//! down before anyone else can take over, whatever the wall clocks say. Leader-only writes are
//! fenced in the store as well ([`crate::store::Fence`]), for a leader paused past its lease.
//!
//! On SQLite the same loop runs; with one hub it always wins.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::store::Store;

/// The lease whose holder runs the scheduler and controllers.
pub const CONTROLLER_LEASE: &str = "controller";

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease: String,
    /// This hub's identity in the lease row; unique per hub process or data dir.
    pub holder: String,
    /// How long a lease lasts without renewal: a dead leader is replaced within about this.
    pub ttl: Duration,
    /// How often the holder renews and the others try to take over.
    pub renew_every: Duration,
}

impl LeaderConfig {
    /// The controller lease with a 5 s TTL renewed every second.
    pub fn controller(holder: String) -> LeaderConfig {
        LeaderConfig {
            lease: CONTROLLER_LEASE.into(),
            holder,
            ttl: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
        }
    }

    /// How long before the lease's expiry the holder stops acting as leader.
    fn margin(&self) -> Duration {
        self.ttl / 5
    }
}

/// Runs the election until the returned receiver's last clone is dropped; the receiver reads
/// `true` while this hub leads.
pub fn spawn(store: Store, config: LeaderConfig) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(run(store, config, tx));
    (rx, task)
}

async fn run(store: Store, config: LeaderConfig, tx: watch::Sender<bool>) {
    let mut valid_until: Option<Instant> = None;
    let set = |leader: bool| {
        tx.send_if_modified(|v| {
            let changed = *v != leader;
            *v = leader;
            changed
        })
    };
    loop {
        if tx.is_closed() {
            return;
        }
        let sent = Instant::now();
        // Bounded: a store that hangs must not keep a stale leader acting past its lease.
        let attempt =
            tokio::time::timeout(config.ttl / 2, store.try_acquire_lease(&config.lease, &config.holder, config.ttl))
                .await;
        match attempt {
            Ok(Ok(Some(term))) => {
                valid_until = Some(sent + config.ttl.saturating_sub(config.margin()));
                if set(true) {
                    info!(lease = %config.lease, holder = %config.holder, term, "became leader");
                }
            }
            Ok(Ok(None)) => {
                valid_until = None;
                if set(false) {
                    warn!(lease = %config.lease, holder = %config.holder, "lost the lease to another hub");
                }
            }
            Ok(Err(e)) => warn!(lease = %config.lease, error = %e, "cannot renew the lease"),
            Err(_) => warn!(lease = %config.lease, "renewing the lease timed out"),
        }
        let next = sent + config.renew_every;
        let wake = match valid_until {
            Some(until) => next.min(until),
            None => next,
        };
        tokio::time::sleep_until(wake).await;
        if valid_until.is_some_and(|until| Instant::now() >= until) {
            valid_until = None;
            if set(false) {
                warn!(lease = %config.lease, "stepped down: the lease could not be renewed in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("hub.db")).await.unwrap();
        (dir, s)
    }

    fn config(holder: &str) -> LeaderConfig {
        LeaderConfig {
            lease: "controller".into(),
            holder: holder.into(),
            ttl: Duration::from_millis(800),
            renew_every: Duration::from_millis(100),
        }
    }

    async fn wait_for(rx: &mut watch::Receiver<bool>, want: bool) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| *v == want)).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_and_a_fast_takeover_when_it_dies() {
        let (_d, s) = store().await;
        let (mut a, task_a) = spawn(s.clone(), config("a"));
        wait_for(&mut a, true).await;
        let (mut b, task_b) = spawn(s.clone(), config("b"));
        // b keeps trying but never leads while a renews.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!*b.borrow());
        assert!(*a.borrow());
        // a dies without releasing: b leads within about one TTL.
        task_a.abort();
        let died = std::time::Instant::now();
        wait_for(&mut b, true).await;
        assert!(died.elapsed() < Duration::from_millis(1500), "takeover took {:?}", died.elapsed());
        assert_eq!(s.lease("controller").await.unwrap().unwrap().term, 2);
        task_b.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_cannot_renew_steps_down() {
        let (_d, s) = store().await;
        let (mut a, _task) = spawn(s.clone(), config("a"));
        wait_for(&mut a, true).await;
        // Another holder takes the lease by force (as if a's renewals were lost): a notices at
        // its next renewal.
        loop {
            s.release_lease("controller", "a").await.unwrap();
            if s.try_acquire_lease("controller", "b", Duration::from_secs(10)).await.unwrap().is_some() {
                break;
            }
        }
        wait_for(&mut a, false).await;
    }
}
