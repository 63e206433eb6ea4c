//! The agent's services task: keeps the kernel rules and the name server in step with the
//! node's service table and with the readiness of this node's own replicas, off the main loop.
//!
//! The main loop sends the latest table (from each applied assignment set, and the persisted
//! one at start) and the local readiness (from every status change) into a `watch`; the task
//! applies the newest pair, so a burst of changes costs one apply. A local replica that stops
//! being ready is withdrawn here at once, before the hub hears of it. The name server binds
//! the bridge's address (the first of the node's subnet) once the bridge exists, retrying
//! until then.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proto::service::ServiceTable;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Iptables, ServicePath};

/// What the task works from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    pub table: ServiceTable,
    /// This node's replicas: running and ready.
    pub local_ready: BTreeMap<String, bool>,
    /// The bridge's address, where the name server listens, once the node has a subnet.
    pub dns: Option<IpAddr>,
}

/// How long a failed apply or a name server that cannot bind yet waits before trying again.
const RETRY: Duration = Duration::from_secs(2);

/// Starts the task, applying `first` before anything sent to the returned channel.
pub fn spawn(first: Wanted) -> watch::Sender<Wanted> {
    let (tx, mut rx) = watch::channel(first);
    tokio::spawn(async move {
        let path = Arc::new(std::sync::Mutex::new(ServicePath::new(Iptables::new())));
        let records = path.lock().unwrap_or_else(|e| e.into_inner()).records();
        let mut dns: Option<(IpAddr, tokio::task::JoinHandle<()>)> = None;
        let mut failed = false;
        loop {
            let wanted = rx.borrow_and_update().clone();
            let p = path.clone();
            let applied = tokio::task::spawn_blocking(move || {
                p.lock().unwrap_or_else(|e| e.into_inner()).update(&wanted.table, &wanted.local_ready)
            })
            .await;
            failed = match applied {
                Ok(Ok(_)) => false,
                Ok(Err(e)) => {
                    if !failed {
                        warn!(error = %e, "cannot apply the service rules; retrying");
                    }
                    true
                }
                Err(_) => true,
            };
            let want_dns = rx.borrow().dns;
            if let Some(ip) = want_dns
                && dns.as_ref().is_none_or(|(at, _)| *at != ip)
            {
                if let Some((_, old)) = dns.take() {
                    old.abort();
                }
                match super::dns::spawn(SocketAddr::new(ip, 53), records.clone()) {
                    Ok(h) => {
                        info!(address = %ip, "serving service names");
                        dns = Some((ip, h));
                    }
                    // The bridge (and so its address) comes with the first bridged container.
                    Err(_) => failed = true,
                }
            }
            if failed {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(RETRY) => {}
                }
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    });
    tx
}
