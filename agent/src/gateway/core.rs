//! The gateway's decisions, sans I/O: which route a request takes, which endpoint serves it,
//! and the forwarding headers the backend gets. No sockets, clock or randomness: the caller
//! passes the node's view and a counter for round-robin.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use proto::route::RouteEntry;
use proto::service::{Endpoint, ServiceTable};

/// What the gateway routes from: the node's table (routes and services, endpoints nearest
/// first) and this node's own word on its replicas' readiness.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub table: Arc<ServiceTable>,
    /// This node's replicas: running and ready (the agent's word, not the hub's).
    pub local_ready: BTreeMap<String, bool>,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No route takes this host and path: 404.
    NoRoute,
    /// The route's service has no ready endpoint in reach: 503.
    NoEndpoint { route: String, service: String },
    /// To this endpoint.
    Endpoint(Target),
}

impl Decision {
    /// The endpoint, or the refusal that answers a request for `host` and `path`.
    pub fn into_target(self, host: &str, path: &str) -> Result<Target, Refusal> {
        match self {
            Decision::Endpoint(t) => Ok(t),
            Decision::NoRoute => Err(Refusal::NoRoute { host: host.to_string(), path: path.to_string() }),
            Decision::NoEndpoint { route, service } => Err(Refusal::NoEndpoint { route, service }),
        }
    }
}

/// The endpoint chosen for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub route: String,
    pub service: String,
    pub replica: String,
    /// A replica of this node (a Wasm HTTP component of it is served in-process).
    pub local: bool,
    pub addr: SocketAddr,
}

/// The host a request names (its `Host` header, or the authority of an absolute URI):
/// lowercase, without a port or a trailing dot.
pub fn host_of(raw: &str) -> String {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(raw, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `prefix` takes `path`: equal, or `path` goes on below it (by segment: `/api` takes
/// `/api/x`, not `/apix`; a prefix ending in `/` takes whatever starts with it).
pub fn prefix_takes(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// The route for `host` and `path`: among the routes whose prefix takes the path, those
/// naming the host beat those for any host, then the longest prefix wins, then the first
/// name.
pub fn pick_route<'a>(routes: &'a [RouteEntry], host: &str, path: &str) -> Option<&'a RouteEntry> {
    routes
        .iter()
        .filter(|r| prefix_takes(&r.path_prefix, path))
        .filter(|r| r.host.as_deref().is_none_or(|h| h == host))
        .max_by(|a, b| {
            let rank = |r: &RouteEntry| (r.host.is_some(), r.path_prefix.len());
            // Reversed, so the smaller name is the greater.
            rank(a).cmp(&rank(b)).then_with(|| b.name.cmp(&a.name))
        })
}

/// Whether an endpoint takes requests: this node's replicas by the agent's word (a local
/// replica that stops being ready is withdrawn at once), the others by the hub's.
fn ready(e: &Endpoint, local_ready: &BTreeMap<String, bool>) -> bool {
    if e.distance == 0 { local_ready.get(&e.replica).copied().unwrap_or(false) } else { e.ready }
}

/// Where a request for `host` (see [`host_of`]) and `path` goes. Among the route's service's
/// ready endpoints that have the port, only the nearest serve (this node's, else the site's,
/// else the rest, as the kernel rules do); `pick` (a counter the caller advances per request)
/// goes round among them.
pub fn decide(view: &View, host: &str, path: &str, pick: usize) -> Decision {
    let Some(route) = pick_route(&view.table.routes, host, path) else {
        return Decision::NoRoute;
    };
    let no_endpoint = || Decision::NoEndpoint { route: route.name.clone(), service: route.service.clone() };
    let Some(svc) = view.table.services.iter().find(|s| s.name == route.service) else {
        return no_endpoint();
    };
    let Some(index) = svc.ports.iter().position(|p| p.port == route.port && p.protocol.is_tcp()) else {
        return no_endpoint();
    };
    let usable: Vec<(&Endpoint, u16)> = svc
        .endpoints
        .iter()
        .filter(|e| ready(e, &view.local_ready))
        .filter_map(|e| Some((e, (*e.ports.get(index)?)?)))
        .collect();
    let Some(nearest) = usable.iter().map(|(e, _)| e.distance).min() else {
        return no_endpoint();
    };
    let group: Vec<&(&Endpoint, u16)> = usable.iter().filter(|(e, _)| e.distance == nearest).collect();
    let (e, port) = group[pick % group.len()];
    Decision::Endpoint(Target {
        route: route.name.clone(),
        service: route.service.clone(),
        replica: e.replica.clone(),
        local: e.distance == 0,
        addr: SocketAddr::new(e.address, *port),
    })
}

/// What became of a request, as the agent's metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered by a Wasm HTTP component of this node, in-process.
    InProcess,
    /// Answered by an endpoint the gateway proxied to.
    Proxied,
    NoRoute,
    NoEndpoint,
    Unreachable,
    TimedOut,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::InProcess,
        Outcome::Proxied,
        Outcome::NoRoute,
        Outcome::NoEndpoint,
        Outcome::Unreachable,
        Outcome::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InProcess => "in_process",
            Outcome::Proxied => "proxied",
            Outcome::NoRoute => "no_route",
            Outcome::NoEndpoint => "no_endpoint",
            Outcome::Unreachable => "unreachable",
            Outcome::TimedOut => "timeout",
        }
    }
}

/// A request the gateway answers itself, and why: each is a status and a plain-text body that
/// names what is missing, so whoever reads it knows which route, service or endpoint to look
/// at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 404: no route takes the host and path.
    NoRoute { host: String, path: String },
    /// 503: the route's service has no ready endpoint in reach.
    NoEndpoint { route: String, service: String },
    /// 502: the endpoint could not be reached (refused, unroutable, reset before a response).
    Unreachable { target: Box<Target>, why: String },
    /// 504: the endpoint sent no response head within `after`.
    TimedOut { target: Box<Target>, after: Duration },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoRoute { .. } => StatusCode::NOT_FOUND,
            Refusal::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Refusal::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::NoRoute { .. } => Outcome::NoRoute,
            Refusal::NoEndpoint { .. } => Outcome::NoEndpoint,
            Refusal::Unreachable { .. } => Outcome::Unreachable,
            Refusal::TimedOut { .. } => Outcome::TimedOut,
        }
    }

    /// The route the request took, if any (a metric's label).
    pub fn route(&self) -> &str {
        match self {
            Refusal::NoRoute { .. } => "",
            Refusal::NoEndpoint { route, .. } => route,
            Refusal::Unreachable { target, .. } | Refusal::TimedOut { target, .. } => &target.route,
        }
    }

    /// The response body: one line, ending in a newline.
    pub fn body(&self) -> String {
        match self {
            Refusal::NoRoute { host, path } => {
                let host = if host.is_empty() { "(none)" } else { host };
                format!("no route for host {host} path {path}\n")
            }
            Refusal::NoEndpoint { route, service } => {
                format!("no ready endpoint for service {service} (route {route})\n")
            }
            Refusal::Unreachable { target: t, why } => {
                format!("cannot reach endpoint {} of service {} at {}: {why}\n", t.replica, t.service, t.addr)
            }
            Refusal::TimedOut { target: t, after } => format!(
                "endpoint {} of service {} at {} did not answer within {}s\n",
                t.replica,
                t.service,
                t.addr,
                after.as_secs_f64()
            ),
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they concern one connection and are not passed on.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    // The message's framing is hyper's to decide on each side.
    headers.remove(hyper::header::TRANSFER_ENCODING);
}

/// Adds what a backend behind the gateway needs to know of the original request:
/// `X-Forwarded-For` (the client's address appended to any list the request carried),
/// `X-Forwarded-Host` (the host it asked for, unless a proxy in front already said) and
/// `X-Forwarded-Proto: http`.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<&HeaderValue>) {
    let client = client.to_canonical().to_string();
    let prior: Vec<&str> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).map(str::trim).collect();
    let list = if prior.is_empty() { client } else { format!("{}, {client}", prior.join(", ")) };
    if let Ok(v) = HeaderValue::from_str(&list) {
        headers.insert("x-forwarded-for", v);
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(h) = host
    {
        headers.insert("x-forwarded-host", h.clone());
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::service::{ServiceEntry, ServiceEntryPort};

    fn route(name: &str, host: Option<&str>, prefix: &str, service: &str) -> RouteEntry {
        RouteEntry {
            name: name.into(),
            host: host.map(String::from),
            path_prefix: prefix.into(),
            service: service.into(),
            port: 80,
        }
    }

    fn endpoint(replica: &str, distance: u8, ready: bool, last: u8) -> Endpoint {
        Endpoint {
            replica: replica.into(),
            node: if distance == 0 { "me".into() } else { format!("n{distance}") },
            address: IpAddr::from([10, 42, distance, last]),
            ports: vec![Some(8080)],
            ready,
            distance,
        }
    }

    fn view(endpoints: Vec<Endpoint>, local_ready: &[(&str, bool)]) -> View {
        let svc = |name: &str, endpoints: Vec<Endpoint>| ServiceEntry {
            name: name.into(),
            address: [10, 43, 0, 2].into(),
            ports: vec![ServiceEntryPort { name: None, port: 80, protocol: Default::default() }],
            endpoints,
        };
        View {
            table: Arc::new(ServiceTable {
                domain: "flotilla.local".into(),
                services: vec![svc("api", endpoints), svc("empty", vec![])],
                peers: vec![],
                routes: vec![
                    route("any", None, "/", "api"),
                    route("shop", Some("shop.example"), "/", "api"),
                    route("shop-api", Some("shop.example"), "/api", "api"),
                    route("down", Some("down.example"), "/", "empty"),
                    route("gone", Some("gone.example"), "/", "nosuch"),
                ],
            }),
            local_ready: local_ready.iter().map(|(r, ok)| (r.to_string(), *ok)).collect(),
        }
    }

    #[test]
    fn hosts_are_read_without_port_case_or_trailing_dot() {
        assert_eq!(host_of("Shop.Example:8080"), "shop.example");
        assert_eq!(host_of("shop.example."), "shop.example");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn prefixes_match_by_segment() {
        assert!(prefix_takes("/", "/anything"));
        assert!(prefix_takes("/api", "/api") && prefix_takes("/api", "/api/v1"));
        assert!(!prefix_takes("/api", "/apix") && !prefix_takes("/api", "/"));
        assert!(prefix_takes("/api/", "/api/v1") && !prefix_takes("/api/", "/api"));
    }

    #[test]
    fn an_exact_host_beats_any_host_and_the_longest_prefix_wins() {
        let v = view(vec![], &[]);
        let name = |host: &str, path: &str| pick_route(&v.table.routes, host, path).map(|r| r.name.clone());
        assert_eq!(name("shop.example", "/api/cart").as_deref(), Some("shop-api"));
        assert_eq!(name("shop.example", "/apix").as_deref(), Some("shop"));
        assert_eq!(name("shop.example", "/").as_deref(), Some("shop"));
        assert_eq!(name("other.example", "/api").as_deref(), Some("any"), "any host when none names it");
        // Without a route for any host, an unknown host has none.
        let named: Vec<RouteEntry> = v.table.routes.iter().filter(|r| r.host.is_some()).cloned().collect();
        assert_eq!(pick_route(&named, "other.example", "/"), None);
        // Equal host and prefix: the first by name, in any order.
        let twins = [route("b", None, "/x", "api"), route("a", None, "/x", "api")];
        assert_eq!(pick_route(&twins, "h", "/x/y").unwrap().name, "a");
        let sorted = [route("a", None, "/x", "api"), route("b", None, "/x", "api")];
        assert_eq!(pick_route(&sorted, "h", "/x/y").unwrap().name, "a");
    }

    #[test]
    fn the_nearest_ready_endpoints_serve_in_turn() {
        let eps = vec![endpoint("l0", 0, false, 1), endpoint("l1", 0, false, 2), endpoint("s0", 1, true, 3)];
        // Local replicas count by the agent's word: both ready here, whatever the hub said.
        let v = view(eps.clone(), &[("l0", true), ("l1", true)]);
        let picked: Vec<String> = (0..4)
            .map(|i| match decide(&v, "shop.example", "/", i) {
                Decision::Endpoint(t) => {
                    assert!(t.local && t.addr.port() == 8080, "{t:?}");
                    t.replica
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(picked, ["l0", "l1", "l0", "l1"]);
        // A local replica that goes unready is withdrawn at once; none left here: the site's.
        let v = view(eps.clone(), &[("l0", false), ("l1", true)]);
        assert!((0..3).all(|i| matches!(decide(&v, "x", "/", i), Decision::Endpoint(t) if t.replica == "l1")));
        let v = view(eps, &[]);
        let Decision::Endpoint(t) = decide(&v, "x", "/", 0) else { panic!() };
        assert_eq!((t.replica.as_str(), t.local, t.addr.to_string().as_str()), ("s0", false, "10.42.1.3:8080"));
    }

    #[test]
    fn no_route_and_no_ready_endpoint_are_told_apart() {
        let v = view(vec![endpoint("s0", 1, false, 3)], &[]);
        let only_named = View {
            table: Arc::new(ServiceTable {
                routes: v.table.routes.iter().filter(|r| r.host.is_some()).cloned().collect(),
                ..(*v.table).clone()
            }),
            ..v.clone()
        };
        assert_eq!(decide(&only_named, "unknown.example", "/", 0), Decision::NoRoute);
        let unready = Decision::NoEndpoint { route: "shop".into(), service: "api".into() };
        assert_eq!(decide(&v, "shop.example", "/", 0), unready);
        assert!(
            matches!(decide(&v, "down.example", "/", 0), Decision::NoEndpoint { service, .. } if service == "empty")
        );
        assert!(
            matches!(decide(&v, "gone.example", "/", 0), Decision::NoEndpoint { service, .. } if service == "nosuch")
        );
        // An endpoint without the route's port (a named target its workload lacks) is none.
        let mut e = endpoint("s1", 1, true, 4);
        e.ports = vec![None];
        assert!(matches!(decide(&view(vec![e], &[]), "x", "/", 0), Decision::NoEndpoint { .. }));
    }

    #[test]
    fn forwarding_headers_append_the_client_and_drop_hop_by_hop_ones() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        strip_hop_by_hop(&mut h);
        let host = HeaderValue::from_static("shop.example");
        add_forwarded(&mut h, "::ffff:192.0.2.9".parse().unwrap(), Some(&host));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.51.100.1, 192.0.2.9");
        assert_eq!((&h["x-forwarded-host"], &h["x-forwarded-proto"]), (&host, &HeaderValue::from_static("http")));
        assert!(h.get("connection").is_none() && h.get("x-private").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h["x-kept"], "yes");
        // A first proxy: the list starts with the client; a host a proxy before set stays.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", HeaderValue::from_static("outer.example"));
        add_forwarded(&mut h, "192.0.2.9".parse().unwrap(), Some(&host));
        assert_eq!(
            (&h["x-forwarded-for"], &h["x-forwarded-host"]),
            (&HeaderValue::from_static("192.0.2.9"), &HeaderValue::from_static("outer.example"))
        );
    }
    #[test]
    fn refusals_say_what_is_missing_with_their_status() {
        let v = view(vec![endpoint("s0", 1, false, 3)], &[]);
        let no_route = Decision::NoRoute.into_target("", "/x").unwrap_err();
        assert_eq!(
            (no_route.status(), no_route.body().as_str()),
            (StatusCode::NOT_FOUND, "no route for host (none) path /x\n")
        );
        let down = decide(&v, "down.example", "/a", 0).into_target("down.example", "/a").unwrap_err();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.body(), "no ready endpoint for service empty (route down)\n");
        assert_eq!((down.outcome(), down.route()), (Outcome::NoEndpoint, "down"));
        let v = view(vec![endpoint("s0", 1, true, 3)], &[]);
        let Decision::Endpoint(target) = decide(&v, "shop.example", "/", 0) else { panic!() };
        assert_eq!(Decision::Endpoint(target.clone()).into_target("h", "/"), Ok(target.clone()));
        let unreachable = Refusal::Unreachable { target: Box::new(target.clone()), why: "connection refused".into() };
        assert_eq!(unreachable.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            unreachable.body(),
            "cannot reach endpoint s0 of service api at 10.42.1.3:8080: connection refused\n"
        );
        let late = Refusal::TimedOut { target: Box::new(target), after: Duration::from_secs(30) };
        assert_eq!((late.status(), late.route()), (StatusCode::GATEWAY_TIMEOUT, "shop"));
        assert_eq!(late.body(), "endpoint s0 of service api at 10.42.1.3:8080 did not answer within 30s\n");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever a client sends, the core decides without panicking; an endpoint it
            /// picks is ready and none nearer is.
            #[test]
            fn any_request_gets_a_ready_nearest_endpoint_or_a_refusal(
                raw_host in "\\PC{0,40}",
                path in "/[!-~]{0,40}",
                eps in prop::collection::vec((0u8..3, any::<bool>()), 0..6),
                pick in any::<usize>(),
            ) {
                let host = host_of(&raw_host);
                let endpoints: Vec<Endpoint> =
                    eps.iter().enumerate().map(|(i, &(d, ready))| endpoint(&format!("r{i}"), d, ready, i as u8)).collect();
                let local: Vec<(String, bool)> =
                    eps.iter().enumerate().filter(|(_, (d, _))| *d == 0).map(|(i, (_, r))| (format!("r{i}"), *r)).collect();
                let local: Vec<(&str, bool)> = local.iter().map(|(r, ok)| (r.as_str(), *ok)).collect();
                let v = view(endpoints, &local);
                let nearest = eps.iter().filter(|(_, ready)| *ready).map(|(d, _)| *d).min();
                match decide(&v, &host, &path, pick) {
                    Decision::Endpoint(t) => {
                        let i: usize = t.replica[1..].parse().unwrap();
                        prop_assert!(eps[i].1, "{t:?} is not ready");
                        prop_assert_eq!(Some(eps[i].0), nearest);
                        prop_assert_eq!(t.local, eps[i].0 == 0);
                    }
                    Decision::NoEndpoint { .. } => prop_assert_eq!(nearest, None),
                    Decision::NoRoute => prop_assert!(false, "the route for any host takes every path"),
                }
            }
        }
    }
}
