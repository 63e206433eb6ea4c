//! Services, the hub's part: which replicas back each service and what every node is told.
//!
//! Pure: [`tables`] takes the services, the workloads' labels and port names, the replicas
//! with their addresses and readiness, and the nodes with their site, and returns each node's
//! [`ServiceTable`]: every service (so every name resolves everywhere), with the backends in
//! the service's scope as seen from that node, nearest first (the node's own, then its
//! site's, then the rest). The shell ([`crate::services_shell`]) writes a node's table into
//! its assignment set when it changed, raising its generation, so agents persist it and keep
//! serving names and traffic while the hub is unreachable.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use proto::manifest::{Manifest, Runtime};
use proto::messages::Phase;
use proto::service::{
    Endpoint, NodePeer, Scope, ServiceEntry, ServiceEntryPort, ServiceManifest, ServiceTable, TargetPort,
};

/// `hub --service-cidr` default: virtual addresses of services (K3s's default range).
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
/// `hub --cluster-domain` default.
pub const DEFAULT_DOMAIN: &str = "flotilla.local";
/// `hub --site-label` default: nodes with the same value of this label are one site.
pub const DEFAULT_SITE_LABEL: &str = "site";

/// A stored service and its virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub manifest: ServiceManifest,
    pub address: Ipv4Addr,
}

/// What [`tables`] needs of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backend {
    pub labels: BTreeMap<String, String>,
    /// Container port names (`ports[].name`) to numbers.
    pub port_names: BTreeMap<String, u16>,
    pub runtime: Option<Runtime>,
    /// A Wasm HTTP component's port (`spec.http.port`): it serves that one port on its node's
    /// address, so every port of a service reaches it there.
    pub http_port: Option<u16>,
}

impl Backend {
    pub fn of(m: &Manifest) -> Backend {
        Backend {
            labels: m.metadata.labels.clone(),
            port_names: m.spec.ports.iter().filter_map(|p| Some((p.name.clone()?, p.container_port))).collect(),
            runtime: Some(m.spec.runtime),
            http_port: m.spec.http.as_ref().filter(|_| m.spec.runtime == Runtime::Wasm).map(|h| h.port),
        }
    }
}

/// What [`tables`] needs of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub replica: String,
    pub workload: String,
    pub node: String,
    pub address: IpAddr,
    pub ready: bool,
}

impl Member {
    /// A replica placed on a node and running where others can reach it: at an address of its
    /// own (a container on the node's network), or, for a Wasm HTTP component (`backend` with
    /// an HTTP port), at its node's address (`node_address`); `None` otherwise.
    pub fn of(
        replica: &str,
        workload: &str,
        node: Option<&str>,
        status: &proto::messages::ReplicaStatus,
        backend: Option<&Backend>,
        node_address: Option<IpAddr>,
    ) -> Option<Member> {
        let served_by_node = backend.is_some_and(|b| b.http_port.is_some());
        let address = status.address.or(node_address.filter(|_| served_by_node))?;
        let node = node?;
        if status.phase != Phase::Running {
            return None;
        }
        Some(Member {
            replica: replica.to_string(),
            workload: workload.to_string(),
            node: node.to_string(),
            address,
            ready: status.ready,
        })
    }
}

/// Whether `labels` hold every key and value of `selector`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The backend port of each service port for a replica of `backend` (`None`: a named target
/// the workload does not name).
fn backend_ports(svc: &ServiceManifest, backend: &Backend) -> Vec<Option<u16>> {
    if let Some(port) = backend.http_port {
        return vec![Some(port); svc.spec.ports.len()];
    }
    svc.spec
        .ports
        .iter()
        .map(|p| match &p.target_port {
            None => Some(p.port),
            Some(TargetPort::Number(n)) => Some(*n),
            Some(TargetPort::Name(name)) => backend.port_names.get(name).copied(),
        })
        .collect()
}

/// A backend replica and its port for each of the service's ports.
pub type Backing<'a> = (&'a Member, Vec<Option<u16>>);
/// Each node's site (the site label's value), if it has one.
pub type Sites = BTreeMap<String, Option<String>>;
/// Nodes with a container subnet and an address peers reach them at.
pub type Routes = BTreeMap<String, (Ipv4Net, IpAddr)>;

/// The service's backends anywhere, with no scope applied (for `describe service`).
pub fn members<'a>(
    svc: &ServiceManifest,
    workloads: &'a BTreeMap<String, Backend>,
    replicas: &'a [Member],
) -> Vec<Backing<'a>> {
    replicas
        .iter()
        .filter_map(|m| {
            let b = workloads.get(&m.workload)?;
            selects(&svc.spec.selector, &b.labels).then(|| (m, backend_ports(svc, b)))
        })
        .collect()
}

/// Every node's table. `sites` maps each node to its site (the value of the site label), if
/// it has one; a node without one is a site of its own.
pub fn tables(
    services: &[Service],
    workloads: &BTreeMap<String, Backend>,
    replicas: &[Member],
    sites: &Sites,
    routes: &Routes,
    domain: &str,
) -> BTreeMap<String, ServiceTable> {
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| a.manifest.metadata.name.cmp(&b.manifest.metadata.name));
    let backends: Vec<Vec<Backing>> = sorted.iter().map(|s| members(&s.manifest, workloads, replicas)).collect();
    let mut out = BTreeMap::new();
    for (node, site) in sites {
        let distance = |other: &str| -> u8 {
            if other == node {
                0
            } else if site.is_some() && sites.get(other).is_some_and(|s| s == site) {
                1
            } else {
                2
            }
        };
        let services = sorted
            .iter()
            .zip(&backends)
            .map(|(s, members)| {
                let limit = match s.manifest.spec.scope {
                    Scope::Node => 0,
                    Scope::Site => 1,
                    Scope::Fleet => 2,
                };
                let mut endpoints: Vec<Endpoint> = members
                    .iter()
                    .filter_map(|(m, ports)| {
                        let d = distance(&m.node);
                        (d <= limit).then(|| Endpoint {
                            replica: m.replica.clone(),
                            node: m.node.clone(),
                            address: m.address,
                            ports: ports.clone(),
                            ready: m.ready,
                            distance: d,
                        })
                    })
                    .collect();
                endpoints.sort_by(|a, b| (a.distance, &a.replica).cmp(&(b.distance, &b.replica)));
                ServiceEntry {
                    name: s.manifest.metadata.name.clone(),
                    address: s.address,
                    ports: s
                        .manifest
                        .spec
                        .ports
                        .iter()
                        .map(|p| ServiceEntryPort { name: p.name.clone(), port: p.port, protocol: p.protocol })
                        .collect(),
                    endpoints,
                }
            })
            .collect();
        // Site peers' subnets, routed over the site's LAN; a node without a site has none.
        let peers = match site {
            Some(site) => routes
                .iter()
                .filter(|(n, _)| *n != node && sites.get(*n).is_some_and(|s| s.as_ref() == Some(site)))
                .map(|(n, (subnet, address))| NodePeer { node: n.clone(), subnet: *subnet, address: *address })
                .collect(),
            None => Vec::new(),
        };
        // Routes are the same on every node: `crate::routes::add_to` fills them in.
        out.insert(node.clone(), ServiceTable { domain: domain.to_string(), services, peers, routes: Vec::new() });
    }
    out
}

/// The lowest address of `cidr` no service holds (network and broadcast addresses, and the
/// first host address, reserved as routers' and DNS's by convention, are never given).
pub fn next_address(cidr: &Ipv4Net, taken: &std::collections::BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    cidr.hosts().skip(1).find(|a| !taken.contains(a))
}

/// Why a service's selector reaches nothing, for `describe service`.
pub fn why_empty(svc: &ServiceManifest, workloads: &BTreeMap<String, Backend>, replicas: &[Member]) -> Option<String> {
    let picked: Vec<&String> =
        workloads.iter().filter(|(_, b)| selects(&svc.spec.selector, &b.labels)).map(|(n, _)| n).collect();
    let selector: Vec<String> = svc.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if picked.is_empty() {
        return Some(format!("no workload has the labels {}", selector.join(",")));
    }
    if !replicas.iter().any(|m| picked.contains(&&m.workload)) {
        let names: Vec<&str> = picked.iter().map(|s| s.as_str()).collect();
        return Some(format!(
            "workloads {} match, but none of their replicas runs with an address (Wasm components without spec.http and containers on network none or host are not backends)",
            names.join(", ")
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Protocol;
    use proto::service::{ServiceKind, ServicePort, ServiceSpec};

    fn svc(name: &str, scope: Scope, target: Option<TargetPort>, last: u8) -> Service {
        Service {
            manifest: ServiceManifest {
                api_version: proto::manifest::API_VERSION.into(),
                kind: ServiceKind::Service,
                metadata: proto::manifest::Metadata { name: name.into(), ..Default::default() },
                spec: ServiceSpec {
                    selector: [("app".to_string(), "api".to_string())].into(),
                    ports: vec![ServicePort { name: None, port: 80, target_port: target, protocol: Protocol::Tcp }],
                    scope,
                },
            },
            address: Ipv4Addr::new(10, 43, 0, last),
        }
    }

    fn member(replica: &str, node: &str, last: u8, ready: bool) -> Member {
        Member {
            replica: replica.into(),
            workload: "api".into(),
            node: node.into(),
            address: IpAddr::V4(Ipv4Addr::new(10, 42, 0, last)),
            ready,
        }
    }

    fn fixture() -> (BTreeMap<String, Backend>, Vec<Member>, Sites) {
        let api = Backend {
            labels: [("app".to_string(), "api".to_string())].into(),
            port_names: [("http".to_string(), 8080)].into(),
            runtime: Some(Runtime::Container),
            http_port: None,
        };
        let other = Backend { labels: [("app".to_string(), "db".to_string())].into(), ..Default::default() };
        let workloads = [("api".to_string(), api), ("db".to_string(), other)].into();
        let replicas = vec![
            member("api-0", "a1", 2, true),
            member("api-1", "a2", 3, false),
            member("api-2", "b1", 4, true),
            Member { workload: "db".into(), ..member("db-0", "a1", 9, true) },
        ];
        let sites = [
            ("a1".to_string(), Some("a".to_string())),
            ("a2".to_string(), Some("a".to_string())),
            ("b1".to_string(), Some("b".to_string())),
            ("lone".to_string(), None),
        ]
        .into();
        (workloads, replicas, sites)
    }

    #[test]
    fn each_node_sees_its_scope_nearest_first() {
        let (w, r, sites) = fixture();
        let services = [
            svc("site", Scope::Site, None, 10),
            svc("node", Scope::Node, None, 11),
            svc("fleet", Scope::Fleet, None, 12),
        ];
        let routes: Routes = [
            ("a1".to_string(), ("10.42.0.0/24".parse().unwrap(), "192.168.1.1".parse().unwrap())),
            ("a2".to_string(), ("10.42.1.0/24".parse().unwrap(), "192.168.1.2".parse().unwrap())),
            ("b1".to_string(), ("10.42.2.0/24".parse().unwrap(), "192.168.2.1".parse().unwrap())),
        ]
        .into();
        let t = tables(&services, &w, &r, &sites, &routes, "flotilla.local");
        // Site peers: a1 routes a2's subnet (and not b1's, another site); b1 and the siteless
        // node route none.
        let peers: Vec<(String, String)> =
            t["a1"].peers.iter().map(|p| (p.node.clone(), format!("{} via {}", p.subnet, p.address))).collect();
        assert_eq!(peers, vec![("a2".to_string(), "10.42.1.0/24 via 192.168.1.2".to_string())]);
        assert!(t["b1"].peers.is_empty() && t["lone"].peers.is_empty());
        assert_eq!(t.len(), 4, "every node gets a table");
        let eps = |node: &str, service: &str| -> Vec<(String, u8)> {
            t[node]
                .services
                .iter()
                .find(|s| s.name == service)
                .unwrap()
                .endpoints
                .iter()
                .map(|e| (e.replica.clone(), e.distance))
                .collect()
        };
        // Site scope: a1 sees its own first, then a2 of its site; never b1.
        assert_eq!(eps("a1", "site"), vec![("api-0".into(), 0), ("api-1".into(), 1)]);
        assert_eq!(eps("b1", "site"), vec![("api-2".into(), 0)]);
        // A node without a site is a site of its own.
        assert!(eps("lone", "site").is_empty());
        assert_eq!(eps("a2", "node"), vec![("api-1".into(), 0)]);
        assert_eq!(eps("lone", "fleet").len(), 3);
        assert_eq!(eps("b1", "fleet")[0], ("api-2".into(), 0));
        // Services sorted by name; the db replica backs none of them; readiness carried.
        let names: Vec<&str> = t["a1"].services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fleet", "node", "site"]);
        let site = t["a1"].services.iter().find(|s| s.name == "site").unwrap();
        assert_eq!((site.endpoints[1].ready, site.endpoints[0].ports.clone()), (false, vec![Some(80)]));
        assert_eq!(site.address, Ipv4Addr::new(10, 43, 0, 10));
    }

    #[test]
    fn named_target_ports_resolve_per_workload() {
        let (w, r, sites) = fixture();
        let named = svc("n", Scope::Fleet, Some(TargetPort::Name("http".into())), 10);
        let missing = svc("m", Scope::Fleet, Some(TargetPort::Name("grpc".into())), 11);
        let t = tables(&[named, missing], &w, &r, &sites, &Routes::new(), "d");
        let ports = |s: &str| t["a1"].services.iter().find(|e| e.name == s).unwrap().endpoints[0].ports.clone();
        assert_eq!(ports("n"), vec![Some(8080)]);
        assert_eq!(ports("m"), vec![None]);
    }

    #[test]
    fn only_running_replicas_with_addresses_are_members() {
        use proto::messages::ReplicaStatus;
        let container = Backend::default();
        let node_ip: Option<IpAddr> = Some("192.168.1.7".parse().unwrap());
        let mut st = ReplicaStatus { phase: Phase::Running, ready: true, ..Default::default() };
        assert!(Member::of("r", "w", Some("n"), &st, Some(&container), node_ip).is_none(), "no address");
        st.address = Some("10.42.0.5".parse().unwrap());
        let m = Member::of("r", "w", Some("n"), &st, Some(&container), node_ip).unwrap();
        assert_eq!(m.address, "10.42.0.5".parse::<IpAddr>().unwrap());
        assert!(Member::of("r", "w", None, &st, Some(&container), node_ip).is_none(), "not placed");
        st.phase = Phase::Pending;
        assert!(Member::of("r", "w", Some("n"), &st, Some(&container), node_ip).is_none());
    }

    #[test]
    fn a_wasm_http_component_is_reached_at_its_node_address_on_its_http_port() {
        use proto::messages::ReplicaStatus;
        let wasm = Backend {
            labels: [("app".to_string(), "api".to_string())].into(),
            runtime: Some(Runtime::Wasm),
            http_port: Some(8088),
            ..Default::default()
        };
        let plain = Backend { http_port: None, ..wasm.clone() };
        let node_ip: IpAddr = "192.168.1.7".parse().unwrap();
        let st = ReplicaStatus { phase: Phase::Running, ready: true, ..Default::default() };
        let m = Member::of("api-0", "api", Some("a1"), &st, Some(&wasm), Some(node_ip)).unwrap();
        assert_eq!(m.address, node_ip);
        assert!(Member::of("r", "w", Some("a1"), &st, Some(&plain), Some(node_ip)).is_none(), "no HTTP port");
        assert!(Member::of("r", "w", Some("a1"), &st, Some(&wasm), None).is_none(), "node address unknown");
        // Every service port, whatever its target, reaches the one port the component serves.
        let workloads: BTreeMap<String, Backend> = [("api".to_string(), wasm)].into();
        let named = svc("n", Scope::Fleet, Some(TargetPort::Name("web".into())), 10);
        let sites: Sites = [("a1".to_string(), None)].into();
        let t = tables(&[named], &workloads, &[m], &sites, &Routes::new(), "d");
        let e = &t["a1"].services[0].endpoints[0];
        assert_eq!((e.address, e.ports.clone()), (node_ip, vec![Some(8088)]));
    }

    #[test]
    fn addresses_are_handed_out_lowest_first_skipping_the_first() {
        let cidr: Ipv4Net = "10.43.0.0/16".parse().unwrap();
        let mut taken = std::collections::BTreeSet::new();
        assert_eq!(next_address(&cidr, &taken), Some(Ipv4Addr::new(10, 43, 0, 2)));
        taken.insert(Ipv4Addr::new(10, 43, 0, 2));
        assert_eq!(next_address(&cidr, &taken), Some(Ipv4Addr::new(10, 43, 0, 3)));
        let tiny: Ipv4Net = "10.43.0.0/30".parse().unwrap();
        taken.insert(Ipv4Addr::new(10, 43, 0, 2));
        assert_eq!(next_address(&tiny, &taken), None);
    }

    #[test]
    fn an_empty_service_says_why() {
        let (w, r, _) = fixture();
        let mut s = svc("x", Scope::Site, None, 10);
        assert_eq!(why_empty(&s.manifest, &w, &r), None);
        s.manifest.spec.selector = [("app".to_string(), "web".to_string())].into();
        assert!(why_empty(&s.manifest, &w, &r).unwrap().contains("no workload has the labels app=web"));
        let only_db: Vec<Member> = r.into_iter().filter(|m| m.workload == "db").collect();
        s.manifest.spec.selector = [("app".to_string(), "api".to_string())].into();
        assert!(why_empty(&s.manifest, &w, &only_db).unwrap().contains("workloads api match"));
    }
}
