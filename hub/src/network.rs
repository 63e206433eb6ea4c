//! Container networks, the hub's part: the cluster CIDR and each node's subnet of it.
//!
//! Every node that runs containers gets a subnet of the cluster CIDR (a /24 of 10.42.0.0/16 by
//! default, as K3s hands out), the first time it connects with the container runtime. The
//! subnet is the node's for good: kept across reconnects, hub restarts and failovers, and
//! released only when the node is deleted. The agent builds its bridge and addresses its
//! containers from it, so an agent restarted offline keeps every address.
//!
//! The cluster CIDR the first hub was started with is recorded in the store; a hub started
//! later with another `--cluster-cidr` uses the recorded one and says so (renumbering a
//! running fleet is not something a flag should do).

use std::collections::BTreeSet;

use ipnet::Ipv4Net;

/// `hub --cluster-cidr` and `--node-cidr-mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterNetwork {
    pub cidr: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub node_prefix: u8,
}

impl Default for ClusterNetwork {
    fn default() -> Self {
        ClusterNetwork { cidr: "10.42.0.0/16".parse().expect("valid CIDR"), node_prefix: 24 }
    }
}

/// Why a cluster network cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkConfigError {
    #[error("--node-cidr-mask /{node} must be longer than the cluster CIDR's /{cluster} and at most /28")]
    Mask { cluster: u8, node: u8 },
    #[error("--cluster-cidr {0} has host bits set; did you mean {1}?")]
    HostBits(Ipv4Net, Ipv4Net),
}

impl ClusterNetwork {
    pub fn new(cidr: Ipv4Net, node_prefix: u8) -> Result<Self, NetworkConfigError> {
        if cidr.trunc() != cidr {
            return Err(NetworkConfigError::HostBits(cidr, cidr.trunc()));
        }
        // A /28 leaves 13 containers a node: anything smaller is no network.
        if node_prefix <= cidr.prefix_len() || node_prefix > 28 {
            return Err(NetworkConfigError::Mask { cluster: cidr.prefix_len(), node: node_prefix });
        }
        Ok(ClusterNetwork { cidr, node_prefix })
    }

    /// How many node subnets the CIDR holds.
    pub fn capacity(&self) -> u64 {
        1u64 << (self.node_prefix - self.cidr.prefix_len())
    }

    /// The lowest subnet no node holds, or `None` when every one is taken. Subnets outside
    /// the CIDR (from an earlier, different one) are ignored.
    pub fn next_free(&self, taken: &BTreeSet<Ipv4Net>) -> Option<Ipv4Net> {
        // `subnets` walks in address order; a CIDR of millions of subnets is walked only as
        // far as the first free one, and at most `taken.len() + 1` steps.
        self.cidr.subnets(self.node_prefix).ok()?.find(|s| !taken.contains(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_are_handed_out_lowest_first_and_reused_after_release() {
        let c = ClusterNetwork::default();
        assert_eq!(c.capacity(), 256);
        let mut taken = BTreeSet::new();
        for i in 0..3 {
            let s = c.next_free(&taken).unwrap();
            assert_eq!(s, net(&format!("10.42.{i}.0/24")));
            taken.insert(s);
        }
        taken.remove(&net("10.42.1.0/24"));
        assert_eq!(c.next_free(&taken), Some(net("10.42.1.0/24")));
        // A subnet from another range does not count against this one.
        taken.insert(net("10.99.0.0/24"));
        assert_eq!(c.next_free(&taken), Some(net("10.42.1.0/24")));
    }

    #[test]
    fn an_exhausted_cidr_hands_out_nothing() {
        let c = ClusterNetwork::new(net("10.42.0.0/26"), 28).unwrap();
        assert_eq!(c.capacity(), 4);
        let taken: BTreeSet<Ipv4Net> = net("10.42.0.0/26").subnets(28).unwrap().collect();
        assert_eq!(c.next_free(&taken), None);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let e = ClusterNetwork::new(net("10.42.0.0/16"), 16).unwrap_err();
        assert!(e.to_string().contains("longer than the cluster CIDR's /16"), "{e}");
        assert!(ClusterNetwork::new(net("10.42.0.0/16"), 30).is_err());
        let e = ClusterNetwork::new(net("10.42.7.0/16"), 24).unwrap_err();
        assert!(e.to_string().contains("did you mean 10.42.0.0/16"), "{e}");
    }
}
