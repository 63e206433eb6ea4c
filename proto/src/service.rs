//! Services: a stable name and virtual address for the ready replicas of the workloads a
//! label selector picks (`kind: Service`), and the table each node gets of the services its
//! workloads may reach ([`ServiceTable`], carried in its assignment set so it holds offline).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestError, Metadata, Protocol, validate_header, validate_name};

/// `kind: Service`: one name and one virtual address for the ready replicas of the workloads
/// a label selector picks, resolved and balanced by every node, also while it is cut off from
/// the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceManifest {
    /// Always `flotilla.dev/v1`.
    #[schemars(extend("const" = crate::manifest::API_VERSION))]
    pub api_version: String,
    /// Always `Service`.
    pub kind: ServiceKind,
    /// The service's name (a DNS label starting with a letter: the name workloads resolve)
    /// and labels.
    pub metadata: Metadata,
    /// Which workloads serve it, on which ports, within which scope.
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceKind {
    Service,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Workloads whose `metadata.labels` hold every one of these are the service's backends
    /// (at least one label).
    #[schemars(length(min = 1))]
    pub selector: BTreeMap<String, String>,
    /// The ports of the service's address, each forwarded to a port of the backends (at least
    /// one).
    #[schemars(length(min = 1))]
    pub ports: Vec<ServicePort>,
    /// Which backends a node's clients reach: those on the same `node`, the same `site` (the
    /// default: nodes with the same value of the hub's `--site-label`, default `site`), or
    /// anywhere in the `fleet`. Nearer backends are preferred within the scope.
    #[serde(default, skip_serializing_if = "Scope::is_default")]
    #[schemars(extend("default" = "site"))]
    pub scope: Scope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Node,
    #[default]
    Site,
    Fleet,
}

impl Scope {
    pub fn is_default(&self) -> bool {
        *self == Scope::Site
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Node => "node",
            Scope::Site => "site",
            Scope::Fleet => "fleet",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// The port's name, unique in the service; required when it has several ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port on the service's address.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// The backend's port: a number, or the name of a container port (`ports[].name`); the
    /// service port's own number by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    /// The port's protocol (default `tcp`).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    #[schemars(extend("default" = "tcp"))]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TargetPort {
    Number(#[schemars(range(min = 1))] u16),
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(n) => f.write_str(n),
        }
    }
}

impl ServiceManifest {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |path: &str, msg: String| Err((path.to_string(), msg));
        validate_header(&self.api_version, &self.metadata.name)?;
        // A service name is a DNS label.
        if self.metadata.name.len() > 63 || !self.metadata.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return err(
                "metadata.name",
                "a service name is a DNS label: at most 63 characters, starting with a letter".into(),
            );
        }
        if self.spec.selector.is_empty() {
            return err(
                "spec.selector",
                "must name at least one label (an empty selector would pick every workload)".into(),
            );
        }
        if self.spec.ports.is_empty() {
            return err("spec.ports", "must list at least one port".into());
        }
        let mut names = std::collections::BTreeSet::new();
        let mut numbers = std::collections::BTreeSet::new();
        for (i, p) in self.spec.ports.iter().enumerate() {
            let path = |f: &str| format!("spec.ports[{i}].{f}");
            if p.port == 0 {
                return err(&path("port"), "port must be between 1 and 65535".into());
            }
            if !numbers.insert((p.port, p.protocol)) {
                return err(&path("port"), format!("{}/{} is listed twice", p.port, p.protocol));
            }
            if let Some(n) = &p.name
                && !names.insert(n.clone())
            {
                return err(&path("name"), format!("{n:?} names two ports"));
            }
            if self.spec.ports.len() > 1 && p.name.is_none() {
                return err(&path("name"), "a service with several ports names each of them".into());
            }
            match &p.target_port {
                Some(TargetPort::Number(0)) => {
                    return err(&path("targetPort"), "port must be between 1 and 65535".into());
                }
                Some(TargetPort::Name(n)) if validate_name(n).is_err() || n.len() > 15 => {
                    return err(
                        &path("targetPort"),
                        format!("{n:?} is not a port name (at most 15 lowercase letters, digits and '-')"),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads one `kind: Service` document.
pub fn parse_service(document: usize, value: serde_json::Value) -> Result<ServiceManifest, ManifestError> {
    crate::manifest::parse_checked(document, value, ServiceManifest::validate)
}

// ---------------------------------------------------------------------------------------------
// What a node gets

/// The services a node's workloads may reach, with the backends in each one's scope as seen
/// from this node. Carried in the node's assignment set (persisted by the agent), so names
/// resolve and traffic flows while the hub is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTable {
    /// The cluster domain: `NAME.svc.<domain>` resolves as `NAME` does.
    pub domain: String,
    pub services: Vec<ServiceEntry>,
    /// The other nodes of this node's site with a container subnet: their subnets are routed
    /// straight to them over the site's LAN (as flannel's host-gw does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<NodePeer>,
    /// The routes of the node's HTTP gateway (every route, everywhere), in name order. Absent
    /// from tables written before routes existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::route::RouteEntry>,
}

impl ServiceTable {
    /// Nothing to tell the node.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.peers.is_empty() && self.routes.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePeer {
    pub node: String,
    pub subnet: ipnet::Ipv4Net,
    pub address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    /// The service's virtual address (from the hub's `--service-cidr`).
    pub address: Ipv4Addr,
    pub ports: Vec<ServiceEntryPort>,
    /// Backends in scope, nearest first (this node's, then its site's, then the rest).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// One backend replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub replica: String,
    pub node: String,
    pub address: IpAddr,
    /// The backend's port for each of the service's ports, in the same order (`None`: the
    /// backend has no port of that name).
    pub ports: Vec<Option<u16>>,
    /// Ready as the hub last heard it (the agent of `node` knows better for its own).
    pub ready: bool,
    /// Where it is from this node: 0 this node, 1 the same site, 2 elsewhere.
    pub distance: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<ServiceManifest, ManifestError> {
        let text = format!("apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: api}}\nspec:\n{extra}");
        let v = crate::yaml::documents(&text, &crate::yaml::Limits::default()).unwrap().remove(0);
        parse_service(1, v)
    }

    #[test]
    fn services_parse_with_defaults_and_bad_ones_say_where() {
        let s = parse("  selector: {app: api}\n  ports: [{port: 80, targetPort: http}]\n").unwrap();
        assert_eq!(s.spec.scope, Scope::Site);
        assert_eq!(s.spec.ports[0].target_port, Some(TargetPort::Name("http".into())));
        let s =
            parse("  selector: {app: api}\n  scope: node\n  ports: [{port: 53, targetPort: 5353, protocol: udp}]\n")
                .unwrap();
        assert_eq!((s.spec.scope, s.spec.ports[0].target_port.clone()), (Scope::Node, Some(TargetPort::Number(5353))));
        for (extra, path) in [
            ("  selector: {}\n  ports: [{port: 80}]\n", "spec.selector"),
            ("  selector: {app: a}\n  ports: []\n", "spec.ports"),
            ("  selector: {app: a}\n  ports: [{port: 0}]\n", "spec.ports[0].port"),
            ("  selector: {app: a}\n  ports: [{name: a, port: 80}, {name: b, port: 80}]\n", "spec.ports[1].port"),
            ("  selector: {app: a}\n  ports: [{name: a, port: 80}, {port: 81}]\n", "spec.ports[1].name"),
            ("  selector: {app: a}\n  ports: [{port: 80, targetPort: Web}]\n", "spec.ports[0].targetPort"),
            ("  selector: {app: a}\n  ports: [{port: 80}]\n  scope: region\n", "spec.scope"),
            ("  selector: {app: a}\n  ports: [{port: 80}]\n  type: ClusterIP\n", "spec"),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(e.path.starts_with(path), "{extra}: {e}");
        }
    }
}
