//! The store's side of routes ([`crate::routes`]): each route with the service it goes to.
//! Routes are written in the transaction that writes the services of the same file, after
//! them, so a route may name a service applied beside it, and a route to a service or port
//! that does not exist refuses the whole file.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use proto::route::{RouteManifest, RouteRefusal};
use proto::service::ServiceManifest;

use super::db::Tx;
use super::services::{ServiceRefusal, apply_services_in};
use super::{Applied, Result, Store, corrupt, to_json};

/// A stored route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    pub manifest: RouteManifest,
    pub created_at_ms: u64,
}

/// Why a file's services and routes were not stored (nothing of them was).
#[derive(Debug, thiserror::Error)]
pub enum ApplyRefusal {
    #[error(transparent)]
    Service(#[from] ServiceRefusal),
    #[error(transparent)]
    Route(#[from] RouteRefusal),
}

/// What [`Store::apply_services_and_routes`] did with each service and each route, in the
/// order given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedServices {
    pub services: Vec<Applied>,
    pub routes: Vec<Applied>,
}

/// The names of the routes that go to `service`, in name order.
pub(super) async fn routes_to(tx: &mut Tx, service: &str) -> Result<Vec<String>> {
    let rows = tx.fetch("SELECT name FROM routes WHERE service = ? ORDER BY name", &[service.into()]).await?;
    rows.iter().map(|r| Ok(r.text(0)?)).collect()
}

impl Store {
    pub async fn routes(&self) -> Result<Vec<RouteRow>> {
        let rows = self.pool.fetch("SELECT name, manifest, created_at_ms FROM routes ORDER BY name", &[]).await?;
        rows.iter()
            .map(|r| {
                let name = r.text(0)?;
                let manifest = serde_json::from_str(&r.text(1)?).map_err(corrupt("route", &name))?;
                Ok(RouteRow { manifest, created_at_ms: r.u64(2)? })
            })
            .collect()
    }

    /// Creates or updates a file's services, then its routes, in one transaction: each route
    /// must go to a service that exists once the file's services are in (and to one of its
    /// TCP ports), and a changed service must keep the ports the stored routes use, else
    /// nothing is stored and the refusal says which route and why.
    pub async fn apply_services_and_routes(
        &self,
        services: &[ServiceManifest],
        routes: &[RouteManifest],
        cidr: Ipv4Net,
        now_ms: u64,
    ) -> Result<std::result::Result<AppliedServices, ApplyRefusal>> {
        if services.is_empty() && routes.is_empty() {
            return Ok(Ok(AppliedServices::default()));
        }
        let mut tx = self.pool.write_tx().await?;
        let services = match apply_services_in(&mut tx, services, cidr, now_ms).await? {
            Ok(done) => done,
            Err(refused) => return Ok(Err(refused.into())),
        };
        let mut known: BTreeMap<String, ServiceManifest> = BTreeMap::new();
        for r in tx.fetch("SELECT name, manifest FROM services", &[]).await? {
            let name = r.text(0)?;
            let m = serde_json::from_str(&r.text(1)?).map_err(corrupt("service", &name))?;
            known.insert(name, m);
        }
        let existing: BTreeMap<String, String> = tx
            .fetch("SELECT name, manifest FROM routes", &[])
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .collect::<Result<_>>()?;
        // Stored routes this file does not replace must still find their port in the
        // services it changes (a service losing the port a route uses is refused).
        for (name, json) in &existing {
            if routes.iter().any(|r| r.metadata.name == *name) {
                continue;
            }
            let stored: RouteManifest = serde_json::from_str(json).map_err(corrupt("route", name))?;
            if let Some(svc) = known.get(&stored.spec.service)
                && let Err(refused) = stored.port_of(svc)
            {
                return Ok(Err(refused.into()));
            }
        }
        let mut done = Vec::new();
        for route in routes {
            let service = &route.spec.service;
            let Some(svc) = known.get(service) else {
                let refused = RouteRefusal::NoService { route: route.metadata.name.clone(), service: service.clone() };
                return Ok(Err(refused.into()));
            };
            if let Err(refused) = route.port_of(svc) {
                return Ok(Err(refused.into()));
            }
            let mut m = route.clone();
            m.metadata.resource_version = None;
            let json = to_json(&m);
            let name = m.metadata.name.as_str();
            match existing.get(name) {
                Some(old) if *old == json => done.push(Applied::Unchanged),
                Some(_) => {
                    tx.exec(
                        "UPDATE routes SET manifest = ?, service = ? WHERE name = ?",
                        &[json.as_str().into(), service.as_str().into(), name.into()],
                    )
                    .await?;
                    done.push(Applied::Configured);
                }
                None => {
                    tx.exec(
                        "INSERT INTO routes (name, manifest, service, created_at_ms) VALUES (?, ?, ?, ?)",
                        &[name.into(), json.as_str().into(), service.as_str().into(), now_ms.into()],
                    )
                    .await?;
                    done.push(Applied::Created);
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(AppliedServices { services, routes: done }))
    }

    /// Deletes a route; whether it existed.
    pub async fn delete_route(&self, name: &str) -> Result<bool> {
        Ok(self.pool.exec("DELETE FROM routes WHERE name = ?", &[name.into()]).await? > 0)
    }
}
