//! Readiness for a service manager: `READY=1` and `STOPPING=1` over sd_notify(3), for the
//! `Type=notify` units in `deploy/systemd/`. Lives in the binary because it reads
//! `NOTIFY_SOCKET` from the environment, which the libraries never do; without that variable
//! (not under systemd) every call is a no-op.
//!
//! When each side is ready:
//! - the hub once it listens (its QUIC endpoint bound, its store open);
//! - the agent once its local state has started: the persisted desired state is handed to its
//!   supervisor (containers of the previous process about to be adopted) and its hub link is
//!   started. Not its first hub session: an edge node whose hub is unreachable still runs its
//!   workloads, and `systemctl start` must not wait for (or fail on) the network.
//!
//! `STOPPING=1` is sent only when a SIGTERM or SIGINT starts a stop, never before a fleet
//! upgrade's exec: systemd takes STOPPING=1 from a running service as the start of its stop
//! and would SIGKILL the re-exec'd agent at `TimeoutStopSec`.

use sd_notify::NotifyState;

/// Tells the service manager this process is serving.
pub fn ready() {
    notify(NotifyState::Ready);
}

/// `shutdown`, telling the service manager the stop has begun once it resolves.
pub async fn stopping_on(shutdown: impl std::future::Future<Output = ()>) {
    shutdown.await;
    notify(NotifyState::Stopping);
}

fn notify(state: NotifyState<'_>) {
    // A failed notification is worth a warning, never a failed start: systemd then times the
    // start out by itself and says so.
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
