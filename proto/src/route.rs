//! Routes: HTTP requests arriving at a node's gateway (`agent --gateway-port`), picked by host
//! name and path prefix, sent to a port of a service (`kind: Route`). The hub checks each route
//! against its service and puts every route, its port resolved to a number, into every node's
//! [`crate::service::ServiceTable`] ([`RouteEntry`]), so gateways route offline too.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestError, Metadata, validate_header, validate_name};
use crate::service::{ServiceManifest, ServicePort};

/// Longest `spec.pathPrefix` accepted.
pub const MAX_PATH_PREFIX: usize = 1024;

/// `kind: Route`: HTTP requests arriving at a node's gateway (`agent --gateway-port`), picked
/// by host name and path prefix, sent to a port of a service; every node routes them, also
/// while it is cut off from the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteManifest {
    /// Always `flotilla.dev/v1`.
    #[schemars(extend("const" = crate::manifest::API_VERSION))]
    pub api_version: String,
    /// Always `Route`.
    pub kind: RouteKind,
    /// The route's name and labels.
    pub metadata: Metadata,
    /// Which requests, to which service.
    pub spec: RouteSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RouteKind {
    Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    /// The request's host name, exactly (compared without case and without a port); absent:
    /// any host. A route naming the request's host beats one for any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Requests whose path is this or below it (by path segment: `/api` takes `/api` and
    /// `/api/x`, not `/apix`); the longest matching prefix wins. The path is passed on as it
    /// came. Default `/`.
    #[serde(default = "root", skip_serializing_if = "is_root")]
    pub path_prefix: String,
    /// The service the requests go to.
    pub service: String,
    /// One of the service's ports, by name or number; may be left out when it has only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
}

fn root() -> String {
    "/".to_string()
}

fn is_root(p: &String) -> bool {
    p == "/"
}

/// A service port by name or by number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

/// Why a route cannot go to its service (a missing service, a port it lacks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    #[error("route {route:?} names service {service:?}, which does not exist")]
    NoService { route: String, service: String },
    #[error("route {route:?} names port {port} of service {service:?}, which has only {ports}")]
    NoPort { route: String, service: String, port: PortRef, ports: String },
    #[error("route {route:?} must name one of the ports of service {service:?} ({ports})")]
    PortNeeded { route: String, service: String, ports: String },
    #[error("route {route:?} names port {port} of service {service:?}, which is not TCP")]
    NotTcp { route: String, service: String, port: u16 },
}

impl RouteManifest {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |path: &str, msg: String| Err((path.to_string(), msg));
        validate_header(&self.api_version, &self.metadata.name)?;
        if let Some(host) = &self.spec.host
            && let Err(why) = check_host(host)
        {
            return err("spec.host", why);
        }
        let p = &self.spec.path_prefix;
        if !p.starts_with('/') {
            return err("spec.pathPrefix", format!("{p:?} must start with '/'"));
        }
        if p.len() > MAX_PATH_PREFIX {
            return err("spec.pathPrefix", format!("longer than {MAX_PATH_PREFIX} characters"));
        }
        if p.chars().any(|c| c.is_control() || c.is_whitespace() || c == '?' || c == '#') {
            return err("spec.pathPrefix", format!("{p:?} is not a path (no spaces, control characters, '?' or '#')"));
        }
        if let Err(e) = validate_name(&self.spec.service) {
            return err("spec.service", e.to_string());
        }
        match &self.spec.port {
            Some(PortRef::Number(0)) => err("spec.port", "port must be between 1 and 65535".into()),
            Some(PortRef::Name(n)) if validate_name(n).is_err() => {
                err("spec.port", format!("{n:?} is not a port name (lowercase letters, digits and '-')"))
            }
            _ => Ok(()),
        }
    }

    /// The number of the service port this route goes to, or why it cannot go there.
    pub fn port_of(&self, service: &ServiceManifest) -> Result<u16, RouteRefusal> {
        let (route, name) = (self.metadata.name.clone(), service.metadata.name.clone());
        let ports = &service.spec.ports;
        let list = || ports.iter().map(describe_port).collect::<Vec<_>>().join(", ");
        let found: &ServicePort = match &self.spec.port {
            None if ports.len() == 1 => &ports[0],
            None => return Err(RouteRefusal::PortNeeded { route, service: name, ports: list() }),
            Some(want) => match ports.iter().find(|p| match want {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(n) => p.name.as_ref() == Some(n),
            }) {
                Some(p) => p,
                None => return Err(RouteRefusal::NoPort { route, service: name, port: want.clone(), ports: list() }),
            },
        };
        if !found.protocol.is_tcp() {
            return Err(RouteRefusal::NotTcp { route, service: name, port: found.port });
        }
        Ok(found.port)
    }
}

fn describe_port(p: &ServicePort) -> String {
    match &p.name {
        Some(n) => format!("{n} ({}/{})", p.port, p.protocol),
        None => format!("{}/{}", p.port, p.protocol),
    }
}

/// A host name as a route names it: lowercase DNS labels separated by dots, no port.
fn check_host(host: &str) -> Result<(), String> {
    if host.contains(':') {
        return Err(format!("{host:?}: a host name without a port (routes match any port)"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is not a host name (lowercase letters, digits and '-' in labels separated by '.'; leave it out for any host)"
        ));
    }
    Ok(())
}

/// Reads one `kind: Route` document.
pub fn parse_route(document: usize, value: serde_json::Value) -> Result<RouteManifest, ManifestError> {
    crate::manifest::parse_checked(document, value, RouteManifest::validate)
}

/// A route as a node's gateway gets it, its port resolved to the service port's number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path_prefix: String,
    pub service: String,
    /// The service's port (its `port`, not the backends' target port).
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<RouteManifest, ManifestError> {
        let text = format!("apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {{name: web}}\nspec:\n{spec}");
        let v = crate::yaml::documents(&text, &crate::yaml::Limits::default()).unwrap().remove(0);
        parse_route(1, v)
    }

    fn service(ports: &str) -> ServiceManifest {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{selector: {{app: a}}, ports: {ports}}}\n"
        );
        let v = crate::yaml::documents(&text, &crate::yaml::Limits::default()).unwrap().remove(0);
        crate::service::parse_service(1, v).unwrap()
    }

    #[test]
    fn routes_parse_with_defaults_and_bad_ones_say_where() {
        let r = parse("  service: api\n").unwrap();
        assert_eq!((r.spec.host.as_deref(), r.spec.path_prefix.as_str(), r.spec.port.clone()), (None, "/", None));
        let r = parse("  host: shop.example.com\n  pathPrefix: /api\n  service: api\n  port: http\n").unwrap();
        assert_eq!(r.spec.port, Some(PortRef::Name("http".into())));
        assert_eq!(parse("  service: api\n  port: 8080\n").unwrap().spec.port, Some(PortRef::Number(8080)));
        for (spec, path, says) in [
            ("  service: api\n  pathPrefix: api\n", "spec.pathPrefix", "must start with '/'"),
            ("  service: api\n  pathPrefix: /a b\n", "spec.pathPrefix", "is not a path"),
            ("  service: api\n  pathPrefix: /a?b\n", "spec.pathPrefix", "is not a path"),
            ("  service: api\n  host: shop.example.com:8080\n", "spec.host", "without a port"),
            ("  service: api\n  host: Shop.example.com\n", "spec.host", "is not a host name"),
            ("  service: api\n  host: ''\n", "spec.host", "is not a host name"),
            ("  service: API\n", "spec.service", "lowercase"),
            ("  service: api\n  port: 0\n", "spec.port", "between 1 and 65535"),
            ("  service: api\n  port: Web\n", "spec.port", "not a port name"),
            ("  service: api\n  rewrite: /\n", "spec", "unknown field `rewrite`"),
            ("  pathPrefix: /\n", "spec", "missing field `service`"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.path.starts_with(path) && e.message.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn a_route_resolves_its_port_or_says_what_the_service_has() {
        let one = service("[{port: 80}]");
        let two = service("[{name: http, port: 80}, {name: admin, port: 9000}, {name: dns, port: 53, protocol: udp}]");
        let route = |port: &str| parse(&format!("  service: api\n{port}")).unwrap();
        assert_eq!(route("").port_of(&one), Ok(80));
        assert_eq!(route("  port: 80\n").port_of(&one), Ok(80));
        assert_eq!(route("  port: admin\n").port_of(&two), Ok(9000));
        assert_eq!(route("  port: 9000\n").port_of(&two), Ok(9000));
        let e = route("").port_of(&two).unwrap_err().to_string();
        assert!(e.contains("must name one of the ports of service \"api\" (http (80/tcp), admin (9000/tcp)"), "{e}");
        let e = route("  port: grpc\n").port_of(&two).unwrap_err().to_string();
        assert!(e.contains("names port grpc of service \"api\", which has only http (80/tcp)"), "{e}");
        let e = route("  port: 81\n").port_of(&one).unwrap_err().to_string();
        assert!(e.contains("which has only 80/tcp"), "{e}");
        assert!(matches!(route("  port: dns\n").port_of(&two), Err(RouteRefusal::NotTcp { port: 53, .. })));
    }
}
