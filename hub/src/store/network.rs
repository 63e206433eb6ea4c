//! The store's side of container networks ([`crate::network`]): the recorded cluster CIDR and
//! each node's subnet.

use std::collections::BTreeSet;

use ipnet::Ipv4Net;
use proto::messages::NodeNetwork;

use super::db::Tx;
use super::{Result, Store, StoreError};
use crate::network::ClusterNetwork;

/// The one row of `cluster_network`.
const CLUSTER: &str = "cluster";

/// What [`Store::ensure_node_subnet`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubnetOutcome {
    /// The node had its subnet already.
    Held(NodeNetwork),
    /// The node got a subnet now (its generation was raised, so the set carrying it is sent).
    Allocated(NodeNetwork),
    /// Every subnet of the cluster CIDR is taken.
    Exhausted { cidr: Ipv4Net, nodes: u64 },
}

fn bad_net(what: &'static str, name: &str, text: &str) -> StoreError {
    let source = serde_json::Error::io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{text:?} is not an IPv4 network"),
    ));
    StoreError::Corrupt { what, name: name.to_string(), source }
}

/// The recorded cluster network, if a hub recorded one.
async fn recorded(tx: &mut Tx) -> Result<Option<ClusterNetwork>> {
    let Some(r) =
        tx.fetch_optional("SELECT cidr, node_prefix FROM cluster_network WHERE name = ?", &[CLUSTER.into()]).await?
    else {
        return Ok(None);
    };
    let text = r.text(0)?;
    let cidr: Ipv4Net = text.parse().map_err(|_| bad_net("cluster network", CLUSTER, &text))?;
    let node_prefix = u8::try_from(r.u64(1)?).unwrap_or(u8::MAX);
    ClusterNetwork::new(cidr, node_prefix).map(Some).map_err(|_| bad_net("cluster network", CLUSTER, &text))
}

/// The node's network as its assignment set carries it, read inside the set's transaction.
pub(super) async fn node_network(tx: &mut Tx, node: &str) -> Result<Option<NodeNetwork>> {
    let Some(r) = tx.fetch_optional("SELECT subnet FROM nodes WHERE name = ?", &[node.into()]).await? else {
        return Ok(None);
    };
    let Some(text) = r.opt_text(0)? else { return Ok(None) };
    let subnet: Ipv4Net = text.parse().map_err(|_| bad_net("node subnet", node, &text))?;
    let cluster = recorded(tx).await?.map_or(subnet, |c| c.cidr);
    Ok(Some(NodeNetwork { subnet, cluster_cidr: cluster }))
}

impl Store {
    /// Records `want` as the cluster network unless one is recorded; returns the one in force
    /// (the recorded one wins: see [`crate::network`]).
    pub async fn cluster_network(&self, want: ClusterNetwork) -> Result<ClusterNetwork> {
        let mut tx = self.pool.write_tx().await?;
        tx.exec(
            "INSERT INTO cluster_network (name, cidr, node_prefix) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            &[CLUSTER.into(), want.cidr.to_string().as_str().into(), u64::from(want.node_prefix).into()],
        )
        .await?;
        let got = recorded(&mut tx).await?.unwrap_or(want);
        tx.commit().await?;
        Ok(got)
    }

    /// The node's subnet, allocated now (lowest free, generation raised) if it holds none.
    pub async fn ensure_node_subnet(&self, node: &str, net: ClusterNetwork) -> Result<SubnetOutcome> {
        // Every session start asks: a node that holds its subnet costs a read, not a turn at
        // the store's write lock.
        let mut tx = self.pool.read_tx().await?;
        let held = node_network(&mut tx, node).await?;
        tx.commit().await?;
        if let Some(held) = held {
            return Ok(SubnetOutcome::Held(held));
        }
        let mut tx = self.pool.write_tx().await?;
        if let Some(held) = node_network(&mut tx, node).await? {
            tx.commit().await?;
            return Ok(SubnetOutcome::Held(held));
        }
        let taken: BTreeSet<Ipv4Net> = tx
            .fetch("SELECT subnet FROM nodes WHERE subnet IS NOT NULL", &[])
            .await?
            .iter()
            .filter_map(|r| r.text(0).ok()?.parse().ok())
            .collect();
        let Some(subnet) = net.next_free(&taken) else {
            tx.commit().await?;
            return Ok(SubnetOutcome::Exhausted { cidr: net.cidr, nodes: net.capacity() });
        };
        tx.exec(
            "UPDATE nodes SET subnet = ?, generation = generation + 1 WHERE name = ? AND subnet IS NULL",
            &[subnet.to_string().as_str().into(), node.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(SubnetOutcome::Allocated(NodeNetwork { subnet, cluster_cidr: net.cidr }))
    }

    /// Every node's subnet, by node name.
    pub async fn node_subnets(&self) -> Result<Vec<(String, Ipv4Net)>> {
        let rows =
            self.pool.fetch("SELECT name, subnet FROM nodes WHERE subnet IS NOT NULL ORDER BY name", &[]).await?;
        rows.iter()
            .map(|r| {
                let (name, text) = (r.text(0)?, r.text(1)?);
                let subnet = text.parse().map_err(|_| bad_net("node subnet", &name, &text))?;
                Ok((name, subnet))
            })
            .collect()
    }
}
