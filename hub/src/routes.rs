//! Routes, the hub's part: what every node's HTTP gateway is told.
//!
//! Pure: [`entries`] resolves each stored route's port (a name or number of its service's
//! ports) to the service port's number, and [`add_to`] puts the same list into every node's
//! [`ServiceTable`] beside the services the routes go to, so a gateway finds a route's
//! endpoints, scoped and ordered for its node, in the table it already has, offline too.
//! The store refuses a route to a missing service or port ([`crate::store::ApplyRefusal`]) and
//! the deletion of a service a route goes to; a route that cannot be resolved anyway (a
//! store written by another hub version) is left out here rather than sent half-made.

use std::collections::BTreeMap;

use proto::route::{RouteEntry, RouteManifest};
use proto::service::ServiceTable;

use crate::services::Service;

/// Each route that goes to an existing service's TCP port, in name order.
pub fn entries(routes: &[RouteManifest], services: &[Service]) -> Vec<RouteEntry> {
    let mut out: Vec<RouteEntry> = routes
        .iter()
        .filter_map(|r| {
            let svc = services.iter().find(|s| s.manifest.metadata.name == r.spec.service)?;
            let port = r.port_of(&svc.manifest).ok()?;
            Some(RouteEntry {
                name: r.metadata.name.clone(),
                host: r.spec.host.clone(),
                path_prefix: r.spec.path_prefix.clone(),
                service: r.spec.service.clone(),
                port,
            })
        })
        .collect();
    out.sort();
    out
}

/// Gives every node's table the routes (every gateway serves every route; the endpoints each
/// reaches are those of its own table, within the service's scope).
pub fn add_to(tables: &mut BTreeMap<String, ServiceTable>, routes: &[RouteEntry]) {
    for t in tables.values_mut() {
        t.routes = routes.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Document;

    fn docs(text: &str) -> (Vec<RouteManifest>, Vec<Service>) {
        let (mut routes, mut services) = (Vec::new(), Vec::new());
        for (i, d) in proto::manifest::parse_documents(text).unwrap().into_iter().enumerate() {
            match d {
                Document::Route(r) => routes.push(*r),
                Document::Service(s) => {
                    services.push(Service { manifest: *s, address: std::net::Ipv4Addr::new(10, 43, 0, 2 + i as u8) })
                }
                _ => unreachable!(),
            }
        }
        (routes, services)
    }

    #[test]
    fn every_node_gets_every_resolvable_route_with_its_port_number() {
        let (routes, services) = docs(
            "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: api}\nspec: {selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: shop}\nspec: {selector: {app: shop}, ports: [{port: 8080}]}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: web}\nspec: {host: shop.example, service: shop}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: api}\nspec: {pathPrefix: /api, service: api, port: http}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: gone}\nspec: {service: db}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: noport}\nspec: {service: api}\n",
        );
        let got = entries(&routes, &services);
        let want = vec![
            RouteEntry { name: "api".into(), host: None, path_prefix: "/api".into(), service: "api".into(), port: 80 },
            RouteEntry {
                name: "web".into(),
                host: Some("shop.example".into()),
                path_prefix: "/".into(),
                service: "shop".into(),
                port: 8080,
            },
        ];
        assert_eq!(got, want, "a route to a missing service or an ambiguous port is left out");
        let mut tables: BTreeMap<String, ServiceTable> =
            [("n1".to_string(), ServiceTable::default()), ("n2".to_string(), ServiceTable::default())].into();
        add_to(&mut tables, &got);
        assert!(tables.values().all(|t| t.routes == want));
        // A table without routes serializes as before routes existed, and an old one reads.
        let old = serde_json::to_string(&ServiceTable::default()).unwrap();
        assert!(!old.contains("routes"), "{old}");
        let back: ServiceTable = serde_json::from_str(r#"{"domain":"d","services":[]}"#).unwrap();
        assert!(back.routes.is_empty());
    }
}
