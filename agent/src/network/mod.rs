//! Container networks on the node: each replica with `network: bridge` or `{cni: NAME}` gets
//! a network namespace of its own ([`oci_runtime::container::netns`]), plumbed by the CNI
//! plugins ([`cni`]) before its container starts and joined by it.
//!
//! The namespace, and with it the replica's address and published ports, lasts as long as the
//! replica is on the node: across the container's restarts and the agent's (an adopted
//! container keeps its address), and is taken down (CNI DEL, namespace unbound, record
//! removed) when the replica leaves. What each attachment did is recorded before the plugins
//! run (`<dir>/attachments/<replica>.json`), so a janitor at agent start, or the next attach,
//! undoes a half-made one after a crash.
//!
//! `bridge` is the node's network: a Linux bridge (`--bridge`, default `flotilla0`) holding
//! the first address of the node's subnet (given by the hub, persisted with the assignment
//! set, so it holds offline), addresses from host-local IPAM, published ports by the portmap
//! plugin, and one masquerade rule for the whole subnet for traffic leaving the cluster CIDR
//! (traffic between nodes' subnets keeps its source address).

pub mod cni;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::Ipv4Net;
use oci_runtime::container::netns;
use proto::manifest::{NetworkMode, PortSpec};
use proto::messages::NodeNetwork;
use proto::service::NodePeer;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use cni::{AddResult, CniError, Invoker, NetworkList, Target};

/// The cluster domain until the hub names one (the hub's default).
pub const DEFAULT_DOMAIN: &str = "flotilla.local";
/// The interface name containers see.
pub const IFNAME: &str = "eth0";
/// The CNI network name of the node's bridge.
pub const BRIDGE_NETWORK: &str = "flotilla";

/// `agent --bridge`, `--cni-bin-dir`, `--cni-conf-dir`.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// `<data dir>/network`: `netns/`, `attachments/`, `ipam/`.
    pub dir: PathBuf,
    pub bridge: String,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_conf_dir: PathBuf,
}

impl NetworkConfig {
    pub fn new(dir: PathBuf) -> Self {
        NetworkConfig {
            dir,
            bridge: "flotilla0".into(),
            cni_bin_dirs: vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
            cni_conf_dir: "/etc/cni/net.d".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("this node has no container subnet yet: the hub gives one when the node connects with containers enabled")]
    NoSubnet,
    #[error("CNI network {name:?} is not configured on this node (no {dir}/{name}.conflist or .conf)")]
    UnknownCni { name: String, dir: String },
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error("network namespace {}: {source}", path.display())]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("cannot record the attachment at {}: {source}", path.display())]
    Record { path: PathBuf, source: std::io::Error },
    #[error("cannot set up masquerading for {subnet}: {message}")]
    Masquerade { subnet: Ipv4Net, message: String },
}

/// A replica's attachment, as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    mode: NetworkMode,
    /// The network list the plugins were run with (DEL needs the same).
    list: Value,
    runtime: Value,
    netns: PathBuf,
    /// The ADD's result; `None` while the ADD has not finished.
    result: Option<Value>,
}

/// A replica's network namespace and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub netns: PathBuf,
    pub address: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
    /// On the node's bridge (whose address serves names), not a CNI network of another kind.
    pub bridged: bool,
}

pub struct Networks {
    cfg: NetworkConfig,
    invoker: Invoker,
    /// The node's network from the hub (the persisted assignment set).
    node: Mutex<Option<NodeNetwork>>,
    /// The cluster domain containers search (from the node's service table).
    domain: Mutex<String>,
    /// The subnet whose masquerade rule is in place.
    masquerading: Mutex<Option<Ipv4Net>>,
    /// Attachments are made and undone one at a time (the plugins serialize on their own
    /// locks anyway; this keeps a record and its namespace consistent).
    turn: Mutex<()>,
}

impl Networks {
    pub fn new(cfg: NetworkConfig) -> std::io::Result<Networks> {
        for d in ["netns", "attachments", "ipam"] {
            std::fs::create_dir_all(cfg.dir.join(d))?;
        }
        let invoker = Invoker { bin_dirs: cfg.cni_bin_dirs.clone() };
        Ok(Networks {
            cfg,
            invoker,
            node: Mutex::new(None),
            domain: Mutex::new(DEFAULT_DOMAIN.into()),
            masquerading: Mutex::new(None),
            turn: Mutex::new(()),
        })
    }

    /// Takes the node's network from an assignment set (applied or loaded at start).
    pub fn set_node(&self, n: Option<&NodeNetwork>) {
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(old), Some(new)) = (node.as_ref(), n)
            && old.subnet != new.subnet
        {
            warn!(old = %old.subnet, new = %new.subnet, "the node's container subnet changed; new containers get addresses from the new one");
        }
        if let Some(n) = n {
            *node = Some(n.clone());
        }
    }

    /// Takes the cluster domain from the node's service table.
    pub fn set_domain(&self, domain: &str) {
        if !domain.is_empty() {
            *self.domain.lock().unwrap_or_else(|e| e.into_inner()) = domain.to_string();
        }
    }

    pub fn domain(&self) -> String {
        self.domain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record_path(&self, replica: &str) -> PathBuf {
        self.cfg.dir.join("attachments").join(format!("{replica}.json"))
    }

    fn netns_path(&self, replica: &str) -> PathBuf {
        self.cfg.dir.join("netns").join(replica)
    }

    fn load(&self, replica: &str) -> Option<Record> {
        let bytes = std::fs::read(self.record_path(replica)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(replica, error = %e, "ignoring an unreadable network attachment record");
                None
            }
        }
    }

    fn save(&self, replica: &str, r: &Record) -> Result<(), NetworkError> {
        let path = self.record_path(replica);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(r).expect("records serialize");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| NetworkError::Record { path, source })
    }

    /// The replica's address, from its attachment record.
    pub fn address(&self, replica: &str) -> Option<IpAddr> {
        self.load(replica)?.result.as_ref().map(AddResult::parse)?.address
    }

    /// The network list for `mode`: the node's bridge, or a CNI config from the conf dir.
    fn list_for(&self, mode: &NetworkMode) -> Result<NetworkList, NetworkError> {
        match mode {
            NetworkMode::Cni(name) => {
                for ext in ["conflist", "conf"] {
                    let path = self.cfg.cni_conf_dir.join(format!("{name}.{ext}"));
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        return Ok(NetworkList::parse(name, &text)?);
                    }
                }
                Err(NetworkError::UnknownCni { name: name.clone(), dir: self.cfg.cni_conf_dir.display().to_string() })
            }
            _ => {
                let node = self.node.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let node = node.ok_or(NetworkError::NoSubnet)?;
                self.masquerade(&node)?;
                Ok(bridge_list(&self.cfg.bridge, &node.subnet, &self.cfg.dir.join("ipam")))
            }
        }
    }

    /// One rule for the subnet: traffic leaving the cluster CIDR leaves with the node's
    /// address. Idempotent (checked before it is added).
    fn masquerade(&self, node: &NodeNetwork) -> Result<(), NetworkError> {
        let mut done = self.masquerading.lock().unwrap_or_else(|e| e.into_inner());
        if *done == Some(node.subnet) {
            return Ok(());
        }
        let rule = masquerade_rule(&node.subnet, &node.cluster_cidr, &self.cfg.bridge);
        let iptables = |op: &str| {
            std::process::Command::new("iptables").args(["-w", "-t", "nat", op, "POSTROUTING"]).args(&rule).output()
        };
        let bad = |message: String| NetworkError::Masquerade { subnet: node.subnet, message };
        let present = iptables("-C").map_err(|e| bad(format!("cannot run iptables: {e}")))?.status.success();
        if !present {
            let out = iptables("-A").map_err(|e| bad(format!("cannot run iptables: {e}")))?;
            if !out.status.success() {
                return Err(bad(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
        }
        *done = Some(node.subnet);
        Ok(())
    }

    /// Gives the replica its namespace and address (kept from before when the record and
    /// namespace are there and the network is the same).
    pub fn attach(&self, replica: &str, mode: &NetworkMode, ports: &[PortSpec]) -> Result<Attachment, NetworkError> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let list = self.list_for(mode)?;
        let runtime = runtime_config(ports);
        if let Some(r) = self.load(replica) {
            if r.mode == *mode
                && r.list == list.to_json()
                && r.runtime == runtime
                && netns::is_bound(&r.netns)
                && let Some(result) = &r.result
            {
                let a = AddResult::parse(result);
                let bridged = *mode == NetworkMode::Bridge;
                return Ok(Attachment { netns: r.netns.clone(), address: a.address, gateway: a.gateway, bridged });
            }
            self.undo(replica, r);
        }
        let started = std::time::Instant::now();
        let path = self.netns_path(replica);
        netns::create(&path).map_err(|source| NetworkError::Netns { path: path.clone(), source })?;
        let mut record =
            Record { mode: mode.clone(), list: list.to_json(), runtime, netns: path.clone(), result: None };
        self.save(replica, &record)?;
        let target = Target { container_id: replica, netns: &path, ifname: IFNAME };
        let plugins_started = std::time::Instant::now();
        let added = self.invoker.add(&list, &target, &record.runtime);
        let plugins = plugins_started.elapsed();
        match added {
            Ok(result) => {
                let a = AddResult::parse(&result);
                record.result = Some(result);
                self.save(replica, &record)?;
                // What a start spends on its network, in the log (benches/networks.rs reads it):
                // the whole attach, and of it the CNI plugin chain.
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                info!(
                    replica,
                    network = %mode,
                    address = ?a.address,
                    took_ms = ms(started.elapsed()),
                    plugins_ms = ms(plugins),
                    "network attached"
                );
                Ok(Attachment {
                    netns: path,
                    address: a.address,
                    gateway: a.gateway,
                    bridged: *mode == NetworkMode::Bridge,
                })
            }
            Err(e) => {
                self.undo(replica, record);
                Err(e.into())
            }
        }
    }

    /// Takes the replica's attachment down, if it has one.
    pub fn detach(&self, replica: &str) {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        match self.load(replica) {
            Some(r) => self.undo(replica, r),
            None => {
                let path = self.netns_path(replica);
                if let Err(e) = netns::remove(&path) {
                    warn!(replica, error = %e, "cannot remove the network namespace");
                }
                let _ = std::fs::remove_file(self.record_path(replica));
            }
        }
    }

    fn undo(&self, replica: &str, r: Record) {
        if let Ok(list) = NetworkList::parse(replica, &r.list.to_string()) {
            let target = Target { container_id: replica, netns: &r.netns, ifname: IFNAME };
            if let Err(e) = self.invoker.del(&list, &target, &r.runtime, r.result.as_ref()) {
                warn!(replica, error = %e, "CNI DEL failed; continuing the cleanup");
            }
        }
        if let Err(e) = netns::remove(&r.netns) {
            warn!(replica, error = %e, "cannot remove the network namespace");
        }
        let _ = std::fs::remove_file(self.record_path(replica));
        info!(replica, "network detached");
    }

    /// Takes down every attachment and namespace of a replica not in `keep`: those left when
    /// the agent stopped between a replica's removal and its cleanup, or crashed mid-attach.
    pub fn keep_only(&self, keep: &HashSet<String>) {
        let mut names: HashSet<String> = netns::list(&self.cfg.dir.join("netns")).into_iter().map(|(n, _)| n).collect();
        names.extend(
            netns::list(&self.cfg.dir.join("attachments"))
                .into_iter()
                .filter_map(|(n, _)| n.strip_suffix(".json").map(str::to_string)),
        );
        for name in names.difference(keep) {
            info!(replica = %name, "removing the network of a replica that left this node");
            self.detach(name);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Routes each site peer's container subnet to the peer over the LAN (host-gw), replacing
    /// the routes of peers that left or moved. The routes made are recorded
    /// (`<dir>/routes.json`), so a restarted agent removes those of peers gone meanwhile.
    pub fn set_peers(&self, peers: &[NodePeer]) {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.cfg.dir.join("routes.json");
        let before: Vec<NodePeer> =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let (add, remove) = route_changes(&before, peers);
        if add.is_empty() && remove.is_empty() {
            return;
        }
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).output();
        for p in &remove {
            let _ = ip(&["route", "del", &p.subnet.to_string()]);
        }
        let mut made: Vec<NodePeer> = peers.iter().filter(|p| !add.contains(p)).cloned().collect();
        for p in add {
            match ip(&["route", "replace", &p.subnet.to_string(), "via", &p.address.to_string()]) {
                Ok(out) if out.status.success() => {
                    info!(peer = %p.node, subnet = %p.subnet, via = %p.address, "routing a site peer's containers");
                    made.push(p.clone());
                }
                Ok(out) => warn!(
                    peer = %p.node,
                    subnet = %p.subnet,
                    via = %p.address,
                    error = %String::from_utf8_lossy(&out.stderr).trim(),
                    "cannot route a site peer's containers"
                ),
                Err(e) => warn!(error = %e, "cannot run ip"),
            }
        }
        made.sort();
        if let Err(e) = std::fs::write(&path, serde_json::to_vec(&made).expect("routes serialize")) {
            warn!(error = %e, "cannot record the site routes");
        }
    }
}

/// Routes to add (new or moved peers) and to remove (peers gone or moved), pure.
pub fn route_changes<'a>(before: &'a [NodePeer], now: &'a [NodePeer]) -> (Vec<&'a NodePeer>, Vec<&'a NodePeer>) {
    let add = now.iter().filter(|p| !before.contains(p)).collect();
    let remove = before.iter().filter(|b| !now.iter().any(|p| p.subnet == b.subnet)).collect();
    (add, remove)
}

/// The node bridge's network list: bridge with host-local addresses, then portmap.
pub fn bridge_list(bridge: &str, subnet: &Ipv4Net, ipam_dir: &Path) -> NetworkList {
    NetworkList {
        name: BRIDGE_NETWORK.into(),
        version: cni::CNI_VERSION.into(),
        plugins: vec![
            json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                // One rule for the subnet instead (see `masquerade_rule`).
                "ipMasq": false,
                // A container reaching a service that picks itself goes out and back in.
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                },
            }),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    }
}

/// The runtime config the plugins' capabilities read: published ports.
pub fn runtime_config(ports: &[PortSpec]) -> Value {
    let mappings: Vec<Value> = ports
        .iter()
        .filter_map(|p| {
            let host = p.host_port?;
            Some(json!({"hostPort": host, "containerPort": p.container_port, "protocol": p.protocol.to_string()}))
        })
        .collect();
    if mappings.is_empty() { json!({}) } else { json!({"portMappings": mappings}) }
}

/// `iptables -t nat POSTROUTING` arguments: the subnet's traffic to outside the cluster
/// CIDR is masqueraded.
pub fn masquerade_rule(subnet: &Ipv4Net, cluster: &Ipv4Net, bridge: &str) -> Vec<String> {
    let comment = format!("flotilla: masquerade {subnet} from {bridge}");
    [
        "-s",
        &subnet.to_string(),
        "!",
        "-d",
        &cluster.to_string(),
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::Protocol;

    #[test]
    fn the_bridge_list_names_the_subnet_bridge_and_ipam_dir() {
        let l = bridge_list("br-x", &"10.42.3.0/24".parse().unwrap(), Path::new("/var/lib/f/ipam"));
        assert_eq!(l.plugins[0]["bridge"], "br-x");
        assert_eq!(l.plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.42.3.0/24");
        assert_eq!(l.plugins[0]["ipam"]["dataDir"], "/var/lib/f/ipam");
        assert_eq!(l.plugins[1]["type"], "portmap");
        // It parses back as the list it is (records hold it as JSON).
        assert_eq!(NetworkList::parse("flotilla", &l.to_json().to_string()).unwrap(), l);
    }

    #[test]
    fn only_published_ports_are_mapped() {
        let p = |c, h: Option<u16>, protocol| PortSpec { name: None, container_port: c, host_port: h, protocol };
        assert_eq!(runtime_config(&[p(80, None, Protocol::Tcp)]), json!({}));
        assert_eq!(
            runtime_config(&[p(80, Some(8080), Protocol::Tcp), p(53, Some(5353), Protocol::Udp)]),
            json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
            ]})
        );
    }

    #[test]
    fn routes_follow_the_peers() {
        let peer = |n: &str, subnet: &str, via: &str| NodePeer {
            node: n.into(),
            subnet: subnet.parse().unwrap(),
            address: via.parse().unwrap(),
        };
        let before = [peer("a", "10.42.1.0/24", "192.168.1.2"), peer("b", "10.42.2.0/24", "192.168.1.3")];
        // b moved to another address, c came, a left.
        let now = [peer("b", "10.42.2.0/24", "192.168.1.9"), peer("c", "10.42.3.0/24", "192.168.1.4")];
        let (add, remove) = route_changes(&before, &now);
        assert_eq!(add.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        // A moved peer's route is replaced in place, not removed.
        assert_eq!(remove.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(route_changes(&now, &now), (vec![], vec![]));
    }

    #[test]
    fn the_masquerade_rule_spares_the_cluster() {
        let r = masquerade_rule(&"10.42.3.0/24".parse().unwrap(), &"10.42.0.0/16".parse().unwrap(), "flotilla0");
        let joined = r.join(" ");
        assert!(joined.starts_with("-s 10.42.3.0/24 ! -d 10.42.0.0/16 "), "{joined}");
        assert!(joined.ends_with("-j MASQUERADE"), "{joined}");
    }
}
