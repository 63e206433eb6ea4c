//! The services controller's I/O shell: on the leader, after every change the hub hears of
//! (an apply, a status, a session) and at least every [`RESYNC`] ([`RESYNC_ALONE`] on SQLite), read the services, workloads,
//! replicas and nodes, compute every node's table ([`crate::services::tables`], pure), write
//! the tables that changed (raising those nodes' generations) and wake their sessions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::cluster::Shared;
use crate::services::{self, Backend, Member};
use crate::store::StoreError;

/// Passes run at least this often (level-triggered; other hubs' writes on a shared store)...
const RESYNC: Duration = Duration::from_secs(2);
/// ...and this often alone on SQLite, where every change comes through this hub's triggers (a
/// pass reads every node and replica: see `control::resync_period`).
const RESYNC_ALONE: Duration = Duration::from_secs(120);
/// A burst of changes (statuses of a rollout) is taken in one pass.
const SETTLE: Duration = Duration::from_millis(20);

/// `hub --service-cidr`, `--cluster-domain`, `--site-label`.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub cidr: ipnet::Ipv4Net,
    pub domain: String,
    pub site_label: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            cidr: services::DEFAULT_SERVICE_CIDR.parse().expect("valid CIDR"),
            domain: services::DEFAULT_DOMAIN.into(),
            site_label: services::DEFAULT_SITE_LABEL.into(),
        }
    }
}

pub(crate) async fn services_loop(shared: Arc<Shared>) {
    let mut changes = shared.changes.subscribe();
    let mut leader = shared.leader.clone();
    let resync = crate::control::resync_period(&shared, RESYNC, RESYNC_ALONE);
    loop {
        if !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let started = std::time::Instant::now();
        if let Err(e) = pass(&shared).await {
            warn!(error = %e, "service tables not updated; retrying");
        }
        // Paced as the controller's passes (see `control::pass_gap`), from the pass's end:
        // changes meanwhile are seen by the next pass.
        let paced_until = tokio::time::Instant::now() + crate::control::pass_gap(started.elapsed());
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep_until(paced_until.max(tokio::time::Instant::now() + SETTLE)).await;
            }
            _ = tokio::time::sleep(resync) => {}
            _ = leader.changed() => {}
        }
    }
}

/// What [`services::tables`] reads, from the store.
pub(crate) struct Inputs {
    pub services: Vec<services::Service>,
    pub workloads: BTreeMap<String, Backend>,
    pub members: Vec<Member>,
    pub sites: BTreeMap<String, Option<String>>,
    pub routes: services::Routes,
    /// The HTTP gateways' routes (`kind: Route`).
    pub http_routes: Vec<proto::route::RouteManifest>,
}

pub(crate) async fn inputs(shared: &Shared) -> Result<Inputs, StoreError> {
    let services = shared.store.services().await?.into_iter().map(|r| r.service).collect();
    let workloads: BTreeMap<String, Backend> = shared
        .store
        .workloads()
        .await?
        .iter()
        .map(|w| (w.manifest.metadata.name.clone(), Backend::of(&w.manifest)))
        .collect();
    let nodes = shared.store.nodes().await?;
    let node_ips: BTreeMap<&str, std::net::IpAddr> =
        nodes.iter().filter_map(|n| Some((n.name.as_str(), n.facts.node_ip?))).collect();
    let members = shared
        .store
        .replicas()
        .await?
        .iter()
        .filter_map(|r| {
            let node_ip = r.node.as_deref().and_then(|n| node_ips.get(n).copied());
            Member::of(&r.name, &r.workload, r.node.as_deref(), &r.status, workloads.get(&r.workload), node_ip)
        })
        .collect();
    let http_routes = shared.store.routes().await?.into_iter().map(|r| r.manifest).collect();
    let label = &shared.services.site_label;
    let subnets: BTreeMap<String, ipnet::Ipv4Net> = shared.store.node_subnets().await?.into_iter().collect();
    let routes =
        nodes.iter().filter_map(|n| Some((n.name.clone(), (*subnets.get(&n.name)?, n.facts.node_ip?)))).collect();
    let sites = nodes.into_iter().map(|n| (n.name, n.facts.labels.get(label).cloned())).collect();
    Ok(Inputs { services, workloads, members, sites, routes, http_routes })
}

async fn pass(shared: &Shared) -> Result<(), StoreError> {
    let i = inputs(shared).await?;
    let mut tables =
        services::tables(&i.services, &i.workloads, &i.members, &i.sites, &i.routes, &shared.services.domain);
    crate::routes::add_to(&mut tables, &crate::routes::entries(&i.http_routes, &i.services));
    let changed = shared.store.write_service_tables(&tables).await?;
    if !changed.is_empty() {
        debug!(nodes = ?changed, "service tables changed");
        shared.wake_nodes(&changed);
    }
    Ok(())
}
