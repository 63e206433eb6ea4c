//! Services on the node: the data path that sends a connection for a service's virtual
//! address to one of its ready endpoints, and the name server that gives a service's name its
//! address. Both run from the node's own [`ServiceTable`] (delivered in the assignment set and
//! persisted with it), so they keep working while the hub is unreachable.
//!
//! - [`rules`] (pure): the table and this node's readiness of its own replicas → the
//!   `iptables-restore` input of our chains (DNAT to an endpoint picked uniformly among the
//!   nearest ready ones, REJECT when none is ready).
//! - [`apply`]: puts that into the kernel in one transaction, owning only the `FLOTILLA-*`
//!   chains and the jumps to them.
//! - [`dns`]: the node's DNS server for containers, on the bridge's address.
//!
//! Why kernel NAT and not a proxy in the agent: a connection through the service costs one
//! conntrack lookup and a rewrite per packet in the kernel, with no extra hop, copy or context
//! switch, which the latency bound (≤ 1.1× of going straight to the endpoint) leaves room for;
//! a user-space proxy adds two socket hops per request. The rules are also state the kernel
//! holds on its own: an agent that restarts or stalls leaves traffic flowing.
//!
//! The agent's main loop owns a [`ServicePath`] and calls [`ServicePath::update`] whenever the
//! table or the readiness of a local replica changes, and runs [`dns::spawn`] with
//! [`ServicePath::records`].

pub mod apply;
pub mod dns;
pub mod rules;
pub mod shell;

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::service::ServiceTable;
use tokio::sync::watch;

pub use apply::{ApplyError, DataPath, Iptables};
pub use dns::{DnsConfig, DnsServer, Records};

/// The node's services: kernel rules and the records the name server answers from.
pub struct ServicePath {
    data: DataPath,
    records: watch::Sender<Arc<Records>>,
}

impl ServicePath {
    pub fn new(iptables: Iptables) -> Self {
        ServicePath { data: DataPath::new(iptables), records: watch::Sender::new(Arc::new(Records::default())) }
    }

    /// What the name server answers from; it follows every [`ServicePath::update`].
    pub fn records(&self) -> watch::Receiver<Arc<Records>> {
        self.records.subscribe()
    }

    /// Brings names and rules to `table`, with `local_ready` (replica → ready) for the
    /// replicas of this node. Names change first, and even when the rules fail. Returns whether
    /// the rules changed. Blocks while iptables runs (tens of milliseconds).
    pub fn update(&mut self, table: &ServiceTable, local_ready: &BTreeMap<String, bool>) -> Result<bool, ApplyError> {
        let records = Records::from_table(table);
        self.records.send_if_modified(|r| {
            if **r == records {
                return false;
            }
            *r = Arc::new(records);
            true
        });
        self.data.update(table, local_ready)
    }

    /// Removes every rule of ours; names are left as they are.
    pub fn remove_all(&mut self) -> Result<(), ApplyError> {
        self.data.remove_all()
    }
}
