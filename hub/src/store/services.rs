//! The store's side of services ([`crate::services`]): the services with their addresses, and
//! each node's service table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proto::service::{ServiceManifest, ServiceTable};

use super::db::Tx;
use super::{Applied, Result, Store, StoreError, corrupt, to_json};
use crate::services::{Service, next_address};

/// A stored service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub service: Service,
    pub created_at_ms: u64,
}

/// Why a service was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ServiceRefusal {
    #[error("no service address left in {0}")]
    Exhausted(Ipv4Net),
}

/// What [`Store::delete_service`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceDeletion {
    Deleted,
    NotFound,
    /// Not deleted: these routes go to it. (Refused rather than leaving routes that answer
    /// 503 for good, or deleting routes nobody named: the routes go first, by name.)
    Routed(Vec<String>),
}

fn bad_address(name: &str, text: &str) -> StoreError {
    let source = serde_json::Error::io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{text:?} is not an IPv4 address"),
    ));
    StoreError::Corrupt { what: "service", name: name.to_string(), source }
}

/// The node's service table, read inside its assignment set's transaction.
pub(super) async fn node_table(tx: &mut Tx, node: &str) -> Result<Option<ServiceTable>> {
    let Some(r) = tx.fetch_optional("SELECT services FROM nodes WHERE name = ?", &[node.into()]).await? else {
        return Ok(None);
    };
    match r.opt_text(0)? {
        Some(text) => Ok(Some(serde_json::from_str(&text).map_err(corrupt("node service table", node))?)),
        None => Ok(None),
    }
}

/// [`Store::apply_services`] inside the caller's write transaction (which also applies the
/// file's routes, [`Store::apply_services_and_routes`]).
pub(super) async fn apply_services_in(
    tx: &mut Tx,
    services: &[ServiceManifest],
    cidr: Ipv4Net,
    now_ms: u64,
) -> Result<std::result::Result<Vec<Applied>, ServiceRefusal>> {
    let rows = tx.fetch("SELECT name, manifest, address FROM services", &[]).await?;
    let mut taken: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut existing: BTreeMap<String, String> = BTreeMap::new();
    for r in &rows {
        if let Ok(a) = r.text(2)?.parse() {
            taken.insert(a);
        }
        existing.insert(r.text(0)?, r.text(1)?);
    }
    let mut out = Vec::new();
    for s in services {
        let mut m = s.clone();
        m.metadata.resource_version = None;
        let json = to_json(&m);
        let name = m.metadata.name.as_str();
        match existing.get(name) {
            Some(old) if *old == json => out.push(Applied::Unchanged),
            Some(_) => {
                tx.exec("UPDATE services SET manifest = ? WHERE name = ?", &[json.as_str().into(), name.into()])
                    .await?;
                out.push(Applied::Configured);
            }
            None => {
                let Some(address) = next_address(&cidr, &taken) else {
                    return Ok(Err(ServiceRefusal::Exhausted(cidr)));
                };
                taken.insert(address);
                tx.exec(
                    "INSERT INTO services (name, manifest, address, created_at_ms) VALUES (?, ?, ?, ?)",
                    &[name.into(), json.as_str().into(), address.to_string().as_str().into(), now_ms.into()],
                )
                .await?;
                out.push(Applied::Created);
            }
        }
    }
    Ok(Ok(out))
}

impl Store {
    pub async fn services(&self) -> Result<Vec<ServiceRow>> {
        let rows =
            self.pool.fetch("SELECT name, manifest, address, created_at_ms FROM services ORDER BY name", &[]).await?;
        rows.iter()
            .map(|r| {
                let name = r.text(0)?;
                let manifest: ServiceManifest = serde_json::from_str(&r.text(1)?).map_err(corrupt("service", &name))?;
                let text = r.text(2)?;
                let address: Ipv4Addr = text.parse().map_err(|_| bad_address(&name, &text))?;
                Ok(ServiceRow { service: Service { manifest, address }, created_at_ms: r.u64(3)? })
            })
            .collect()
    }

    /// Creates or updates services in one transaction; a new one gets the lowest free address
    /// of `cidr`, an existing one keeps its own.
    pub async fn apply_services(
        &self,
        services: &[ServiceManifest],
        cidr: Ipv4Net,
        now_ms: u64,
    ) -> Result<std::result::Result<Vec<Applied>, ServiceRefusal>> {
        if services.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        let mut tx = self.pool.write_tx().await?;
        let out = match apply_services_in(&mut tx, services, cidr, now_ms).await? {
            Ok(out) => out,
            Err(refused) => return Ok(Err(refused)),
        };
        tx.commit().await?;
        Ok(Ok(out))
    }

    /// Deletes a service, unless a route still goes to it.
    pub async fn delete_service(&self, name: &str) -> Result<ServiceDeletion> {
        let mut tx = self.pool.write_tx().await?;
        let routes = super::routes::routes_to(&mut tx, name).await?;
        if !routes.is_empty() {
            return Ok(ServiceDeletion::Routed(routes));
        }
        let n = tx.exec("DELETE FROM services WHERE name = ?", &[name.into()]).await?;
        tx.commit().await?;
        Ok(if n > 0 { ServiceDeletion::Deleted } else { ServiceDeletion::NotFound })
    }

    /// Writes the nodes' service tables that differ from the stored ones, raising those
    /// nodes' generations; returns the nodes changed. A table with no service is stored as
    /// none, so a cluster without services never touches its nodes' sets.
    pub async fn write_service_tables(&self, tables: &BTreeMap<String, ServiceTable>) -> Result<Vec<String>> {
        let stored: BTreeMap<String, Option<String>> = self
            .pool
            .fetch("SELECT name, services FROM nodes", &[])
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.opt_text(1)?)))
            .collect::<Result<_>>()?;
        let changed: Vec<(&String, Option<String>)> = tables
            .iter()
            .filter_map(|(node, t)| {
                let want = (!t.is_empty()).then(|| to_json(t));
                let old = stored.get(node)?;
                (*old != want).then_some((node, want))
            })
            .collect();
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.write_tx().await?;
        let mut out = Vec::new();
        for (node, want) in changed {
            let n = match &want {
                Some(json) => {
                    tx.exec(
                        "UPDATE nodes SET services = ?, generation = generation + 1 WHERE name = ? \
                         AND (services IS NULL OR services <> ?)",
                        &[json.as_str().into(), node.as_str().into(), json.as_str().into()],
                    )
                    .await?
                }
                None => {
                    tx.exec(
                        "UPDATE nodes SET services = NULL, generation = generation + 1 WHERE name = ? \
                         AND services IS NOT NULL",
                        &[node.as_str().into()],
                    )
                    .await?
                }
            };
            if n > 0 {
                out.push(node.clone());
            }
        }
        tx.commit().await?;
        Ok(out)
    }
}
