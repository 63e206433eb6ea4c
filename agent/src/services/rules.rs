//! The service data path as rules: a pure function from the node's [`ServiceTable`] (and what
//! the agent knows of its own replicas' readiness) to `iptables-restore` input, kube-proxy's
//! iptables mode in miniature. No process is run here; [`super::apply`] does that.
//!
//! Chains, all named from one prefix `P` (at most 10 characters, so every name fits the
//! kernel's 28):
//!
//! - `nat P-SERVICES`, jumped to from `PREROUTING` (containers' traffic) and `OUTPUT` (the
//!   node's own): one rule per service port, `-d VIP/32 -p PROTO --dport PORT -j P-SVC-…`.
//! - `nat P-SVC-<hash>`, one per service port: picks one endpoint uniformly at random. Rule
//!   `i` of `n` jumps with probability `1/(n-i)` (the last one always), so each endpoint is
//!   picked with probability `1/n`. Only the first packet of a connection reaches the `nat`
//!   table, so the choice is per connection, and conntrack keeps it.
//! - `nat P-SEP-<hash>`, one per (service port, endpoint): DNAT to `address:backend port`.
//! - `nat P-POSTROUTING`, jumped to from `POSTROUTING`: masquerades connections to a service's
//!   address that were sent to an endpoint on this node. That covers the hairpin (a backend
//!   reaching itself through its service) and a neighbour on the same bridge, whose replies
//!   would otherwise go back over the bridge without being un-NATed (no `br_netfilter` is
//!   required). Clients on this node therefore see the bridge's address as the peer; endpoints
//!   on other nodes see the client's own address. With `br_netfilter` loaded, the hairpin
//!   also needs the bridge port's hairpin mode, which the CNI bridge config sets
//!   (`hairpinMode: true` in `network/`).
//! - `filter P-SERVICES`, jumped to from `FORWARD` and `OUTPUT` for new connections: a service
//!   port with no ready endpoint is rejected (`tcp-reset`, `icmp-port-unreachable`), so clients
//!   fail at once instead of waiting for a timeout. (`REJECT` exists only in `filter`.)
//!
//! Which endpoints, for each service port:
//!
//! - those that serve it (`Endpoint::ports[i]` is `Some`; a named target port a backend does
//!   not have leaves it out of that port only) and have an IPv4 address;
//! - that are ready: for an endpoint on this node (distance 0) the agent's own word
//!   (`local_ready[replica]`, a replica it does not know being not ready), since it hears of
//!   an exit or a failed probe before the hub does and withdraws it at once; for the others the
//!   hub's `ready`;
//! - of the nearest group only: the same node if any is ready there, else the same site, else
//!   elsewhere. Nearer endpoints are not merely preferred by weight: a site keeps its traffic
//!   while it has a ready endpoint.
//!
//! The output is a function of its inputs alone: services sorted by name, endpoints by replica
//! and address, chain names hashed from what they stand for (not from positions), so the same
//! table always gives the same text and the shell can skip a no-op apply.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use proto::manifest::Protocol;
use proto::service::{Endpoint, ServiceEntry, ServiceTable};
use sha2::{Digest, Sha256};

/// The longest chain prefix: `P-POSTROUTING` and `P-SVC-<12 hex>` then fit the kernel's 28
/// characters.
pub const MAX_PREFIX: usize = 10;

/// The chains [`ruleset`] owns in the `nat` and `filter` tables always, whatever the table.
pub fn base_chains(prefix: &str) -> (String, String) {
    (format!("{prefix}-SERVICES"), format!("{prefix}-POSTROUTING"))
}

/// One service port's choice, as computed before it is written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub service: String,
    pub port_name: Option<String>,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// `(replica, address, backend port, local)`, sorted; empty means reject.
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub replica: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// On this node (distance 0).
    pub local: bool,
}

/// Whether an endpoint may take traffic, as this node sees it.
fn is_ready(e: &Endpoint, local_ready: &BTreeMap<String, bool>) -> bool {
    if e.distance == 0 { local_ready.get(&e.replica).copied().unwrap_or(false) } else { e.ready }
}

/// The endpoints chosen for each port of each service, services by name.
pub fn plan(table: &ServiceTable, local_ready: &BTreeMap<String, bool>) -> Vec<PortPlan> {
    let mut services: Vec<&ServiceEntry> = table.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
    let mut out = Vec::new();
    for s in services {
        for (i, p) in s.ports.iter().enumerate() {
            // (distance, target) of every ready endpoint serving this port.
            let ready: Vec<(u8, Target)> = s
                .endpoints
                .iter()
                .filter(|e| is_ready(e, local_ready))
                .filter_map(|e| {
                    let port = e.ports.get(i).copied().flatten()?;
                    let IpAddr::V4(address) = e.address else { return None };
                    Some((e.distance, Target { replica: e.replica.clone(), address, port, local: e.distance == 0 }))
                })
                .collect();
            let nearest = ready.iter().map(|(d, _)| *d).min();
            let mut targets: Vec<Target> =
                ready.into_iter().filter(|(d, _)| Some(*d) == nearest).map(|(_, t)| t).collect();
            targets.sort();
            targets.dedup();
            out.push(PortPlan {
                service: s.name.clone(),
                port_name: p.name.clone(),
                vip: s.address,
                port: p.port,
                protocol: p.protocol,
                targets,
            });
        }
    }
    out
}

/// A UDP flow's DNAT that must be forgotten: conntrack keeps sending a UDP "connection" (a
/// client reusing its source port, as resolvers do) to the endpoint it first picked, even
/// after the rules no longer name it, until the entry times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleFlow {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoint: Ipv4Addr,
}

/// The UDP endpoints `before` sent a service port's traffic to and `after` does not. (TCP
/// needs nothing: a connection to a withdrawn endpoint ends with it, and new ones follow the
/// rules.)
pub fn withdrawn_udp(before: &[PortPlan], after: &[PortPlan]) -> Vec<StaleFlow> {
    let flows = |plans: &[PortPlan]| -> BTreeSet<StaleFlow> {
        plans
            .iter()
            .filter(|p| p.protocol == Protocol::Udp)
            .flat_map(|p| p.targets.iter().map(|t| StaleFlow { vip: p.vip, port: p.port, endpoint: t.address }))
            .collect()
    };
    flows(before).difference(&flows(after)).copied().collect()
}

/// 12 hex characters of the SHA-256 of `parts`: a chain name's tail that depends only on what
/// the chain stands for.
fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6]).to_uppercase()
}

/// A comment safe to put in double quotes (service names are DNS labels already; this keeps a
/// bad table from breaking the restore input).
fn comment(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '/' | '_')).take(200).collect()
}

/// `iptables-restore --noflush` input for the node's services (see the module docs). Every
/// chain it uses is declared (`:CHAIN - [0:0]`), which in `--noflush` mode empties it first,
/// so the whole set is replaced in one transaction and nothing else in the tables is touched.
pub fn ruleset(table: &ServiceTable, local_ready: &BTreeMap<String, bool>, chain_prefix: &str) -> String {
    debug_assert!(chain_prefix.len() <= MAX_PREFIX, "chain prefix {chain_prefix:?} is too long");
    let (services_chain, post_chain) = base_chains(chain_prefix);
    let plans = plan(table, local_ready);

    let mut nat_chains: Vec<String> = vec![services_chain.clone(), post_chain.clone()];
    let mut nat_rules = String::new();
    let mut filter_rules = String::new();
    let mut masquerade: BTreeSet<(Ipv4Addr, Ipv4Addr)> = BTreeSet::new();

    for p in &plans {
        let proto = p.protocol.to_string();
        let port_label = p.port_name.clone().unwrap_or_else(|| p.port.to_string());
        let what = comment(&format!("{}:{port_label}", p.service));
        let matcher = format!("-d {}/32 -p {proto} -m {proto} --dport {}", p.vip, p.port);
        if p.targets.is_empty() {
            let with = match p.protocol {
                Protocol::Tcp => "tcp-reset",
                Protocol::Udp => "icmp-port-unreachable",
            };
            let _ = writeln!(
                filter_rules,
                "-A {services_chain} {matcher} -m comment --comment \"{what} has no ready endpoint\" -j REJECT --reject-with {with}"
            );
            continue;
        }
        let port_key = p.port.to_string();
        let svc_chain =
            format!("{chain_prefix}-SVC-{}", short_hash(&[&p.service, &p.vip.to_string(), &port_key, &proto]));
        nat_chains.push(svc_chain.clone());
        let _ = writeln!(nat_rules, "-A {services_chain} {matcher} -m comment --comment \"{what}\" -j {svc_chain}");
        let n = p.targets.len();
        for (i, t) in p.targets.iter().enumerate() {
            let sep_chain = format!(
                "{chain_prefix}-SEP-{}",
                short_hash(&[
                    &p.service,
                    &p.vip.to_string(),
                    &port_key,
                    &proto,
                    &t.replica,
                    &t.address.to_string(),
                    &t.port.to_string()
                ])
            );
            nat_chains.push(sep_chain.clone());
            let pick = if i + 1 < n {
                format!("-m statistic --mode random --probability {:.10} ", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            let _ = writeln!(nat_rules, "-A {svc_chain} -m comment --comment \"{what}\" {pick}-j {sep_chain}");
            let _ = writeln!(
                nat_rules,
                "-A {sep_chain} -p {proto} -m comment --comment \"{what} {}\" -m {proto} -j DNAT --to-destination {}:{}",
                comment(&t.replica),
                t.address,
                t.port
            );
            if t.local {
                masquerade.insert((p.vip, t.address));
            }
        }
    }
    for (vip, address) in &masquerade {
        let _ = writeln!(
            nat_rules,
            "-A {post_chain} -d {address}/32 -m conntrack --ctstate DNAT --ctorigdst {vip}/32 -m comment --comment \"service to a local endpoint\" -j MASQUERADE"
        );
    }

    let mut out = String::from("*nat\n");
    for c in &nat_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n*filter\n");
    let _ = writeln!(out, ":{services_chain} - [0:0]");
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n");
    out
}

/// The chains a ruleset declares, per table: `{"nat": {...}, "filter": {...}}`. Reads
/// `iptables-save` output as well as [`ruleset`]'s.
pub fn declared_chains(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t.trim().to_string());
        } else if let (Some(c), Some(t)) = (line.strip_prefix(':'), &table)
            && let Some(name) = c.split_whitespace().next()
        {
            out.entry(t.clone()).or_default().insert(name.to_string());
        }
    }
    out
}

/// `ruleset` plus the deletion of our chains that `saved` (what `iptables-save` shows now)
/// has and `ruleset` no longer uses: a service or endpoint that left takes its chains with it.
/// A stale chain is declared (so emptied, dropping its references to other stale chains) and
/// deleted after every rule referring to it is gone, all in the same transaction.
pub fn with_stale_removed(ruleset: &str, saved: &str, chain_prefix: &str) -> String {
    let ours = format!("{chain_prefix}-");
    let wanted = declared_chains(ruleset);
    let now = declared_chains(saved);
    let mut out = String::new();
    let mut table: Option<String> = None;
    let mut stale: Vec<String> = Vec::new();
    for line in ruleset.lines() {
        if let Some(t) = line.strip_prefix('*') {
            let t = t.trim().to_string();
            let keep = wanted.get(&t).cloned().unwrap_or_default();
            stale = now
                .get(&t)
                .map(|cs| cs.iter().filter(|c| c.starts_with(&ours) && !keep.contains(*c)).cloned().collect())
                .unwrap_or_default();
            out.push_str(line);
            out.push('\n');
            for c in &stale {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            table = Some(t);
            continue;
        }
        if line == "COMMIT" && table.is_some() {
            for c in &stale {
                let _ = writeln!(out, "-X {c}");
            }
            stale.clear();
            table = None;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Input that empties and deletes every chain of ours `saved` shows (the jumps to them must be
/// gone first).
pub fn removal(saved: &str, chain_prefix: &str) -> String {
    let ours = format!("{chain_prefix}-");
    let mut out = String::new();
    for (table, chains) in declared_chains(saved) {
        let chains: Vec<&String> = chains.iter().filter(|c| c.starts_with(&ours)).collect();
        if chains.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for c in &chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The jumps into our chains from the built-in ones: `(table, built-in chain, rule)`.
pub fn jumps(chain_prefix: &str) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let (services, post) = base_chains(chain_prefix);
    let c = |s: &str| s.to_string();
    let portals = vec![c("-m"), c("comment"), c("--comment"), c("flotilla service portals"), c("-j"), services.clone()];
    let rejects = vec![
        c("-m"),
        c("conntrack"),
        c("--ctstate"),
        c("NEW"),
        c("-m"),
        c("comment"),
        c("--comment"),
        c("flotilla services without endpoints"),
        c("-j"),
        services,
    ];
    let masq = vec![c("-m"), c("comment"), c("--comment"), c("flotilla service hairpin"), c("-j"), post];
    vec![
        ("nat", "PREROUTING", portals.clone()),
        ("nat", "OUTPUT", portals),
        ("nat", "POSTROUTING", masq),
        ("filter", "FORWARD", rejects.clone()),
        ("filter", "OUTPUT", rejects),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::service::{Endpoint, ServiceEntryPort};

    fn ep(replica: &str, addr: &str, ports: &[Option<u16>], ready: bool, distance: u8) -> Endpoint {
        Endpoint {
            replica: replica.into(),
            node: format!("n{distance}"),
            address: addr.parse().unwrap(),
            ports: ports.to_vec(),
            ready,
            distance,
        }
    }

    fn svc(name: &str, vip: &str, ports: &[(Option<&str>, u16, Protocol)], endpoints: Vec<Endpoint>) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            address: vip.parse().unwrap(),
            ports: ports
                .iter()
                .map(|(n, port, protocol)| ServiceEntryPort {
                    name: n.map(String::from),
                    port: *port,
                    protocol: *protocol,
                })
                .collect(),
            endpoints,
        }
    }

    fn table(services: Vec<ServiceEntry>) -> ServiceTable {
        ServiceTable { peers: vec![], routes: vec![], domain: "flotilla.local".into(), services }
    }

    fn ready(names: &[&str]) -> BTreeMap<String, bool> {
        names.iter().map(|n| (n.to_string(), true)).collect()
    }

    fn dnats(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split("--to-destination ").nth(1))
            .map(|s| s.split_whitespace().next().unwrap().to_string())
            .collect()
    }

    fn probabilities(text: &str, svc_chain: &str) -> Vec<Option<f64>> {
        text.lines()
            .filter(|l| l.starts_with(&format!("-A {svc_chain} ")))
            .map(|l| l.split("--probability ").nth(1).map(|p| p.split_whitespace().next().unwrap().parse().unwrap()))
            .collect()
    }

    fn svc_chains(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(":FLOTILLA-SVC-"))
            .map(|l| l[1..].split_whitespace().next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn endpoints_are_picked_uniformly() {
        for n in 1..=7usize {
            let eps =
                (0..n).map(|i| ep(&format!("r{i}"), &format!("10.42.1.{}", i + 2), &[Some(8080)], true, 1)).collect();
            let t = table(vec![svc("api", "10.96.0.10", &[(None, 80, Protocol::Tcp)], eps)]);
            let text = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
            let chains = svc_chains(&text);
            assert_eq!(chains.len(), 1);
            let probs = probabilities(&text, &chains[0]);
            assert_eq!(probs.len(), n);
            assert_eq!(probs[n - 1], None, "the last rule takes what is left");
            // The chance of reaching rule i and taking it is 1/n for every i.
            let mut left = 1.0;
            for p in probs {
                let p = p.unwrap_or(1.0);
                assert!((left * p - 1.0 / n as f64).abs() < 1e-9, "n={n}: {text}");
                left *= 1.0 - p;
            }
            assert!(left.abs() < 1e-9);
            assert_eq!(dnats(&text).len(), n);
        }
    }

    #[test]
    fn the_output_is_complete_and_deterministic() {
        let a = svc(
            "api",
            "10.96.0.10",
            &[(Some("http"), 80, Protocol::Tcp)],
            vec![ep("api-1", "10.42.1.3", &[Some(8080)], true, 0), ep("api-0", "10.42.1.2", &[Some(8080)], true, 0)],
        );
        let b = svc(
            "db",
            "10.96.0.11",
            &[(None, 5432, Protocol::Tcp)],
            vec![ep("db-0", "10.42.2.2", &[Some(5432)], true, 1)],
        );
        let local = ready(&["api-0", "api-1"]);
        let one = ruleset(&table(vec![a.clone(), b.clone()]), &local, "FLOTILLA");
        let mut reversed = b.clone();
        reversed.endpoints.reverse();
        let two = ruleset(&table(vec![b, a]), &local, "FLOTILLA");
        assert_eq!(one, two, "order of the table does not matter");
        assert!(one.starts_with("*nat\n:FLOTILLA-SERVICES - [0:0]\n:FLOTILLA-POSTROUTING - [0:0]\n"), "{one}");
        assert!(one.ends_with("COMMIT\n*filter\n:FLOTILLA-SERVICES - [0:0]\nCOMMIT\n"), "{one}");
        assert!(one.contains(
            "-A FLOTILLA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"api:http\" -j FLOTILLA-SVC-"
        ));
        assert_eq!(dnats(&one), ["10.42.1.2:8080", "10.42.1.3:8080", "10.42.2.2:5432"]);
        // Local endpoints are masqueraded when reached through the service; remote ones not.
        let masq: Vec<&str> = one.lines().filter(|l| l.contains("MASQUERADE")).collect();
        assert_eq!(masq.len(), 2, "{one}");
        assert!(masq[0].contains("-d 10.42.1.2/32 -m conntrack --ctstate DNAT --ctorigdst 10.96.0.10/32"));
        // Every chain used is declared, and every name fits the kernel's limit.
        let declared = declared_chains(&one);
        for l in one.lines().filter(|l| l.starts_with("-A ")) {
            let chain = l.split_whitespace().nth(1).unwrap();
            assert!(declared.values().any(|cs| cs.contains(chain)), "{chain} is not declared");
            if let Some(j) = l.split(" -j ").nth(1)
                && j.starts_with("FLOTILLA")
            {
                assert!(declared["nat"].contains(j), "{j} is not declared");
            }
        }
        assert!(declared.values().flatten().all(|c| c.len() <= 28));
        assert_eq!(declared["nat"].len(), 2 + 2 + 3, "base, two service ports, three endpoints");
    }

    #[test]
    fn the_nearest_ready_group_takes_all_the_traffic() {
        let eps = vec![
            ep("a-node", "10.42.1.2", &[Some(80)], true, 0),
            ep("a-site", "10.42.2.2", &[Some(80)], true, 1),
            ep("a-site2", "10.42.3.2", &[Some(80)], true, 1),
            ep("a-far", "10.43.1.2", &[Some(80)], true, 2),
        ];
        let t = table(vec![svc("a", "10.96.0.1", &[(None, 80, Protocol::Tcp)], eps)]);
        // This node's replica is ready: only it.
        assert_eq!(dnats(&ruleset(&t, &ready(&["a-node"]), "FLOTILLA")), ["10.42.1.2:80"]);
        // It is not: the site's, both of them, never the far one.
        assert_eq!(dnats(&ruleset(&t, &BTreeMap::new(), "FLOTILLA")), ["10.42.2.2:80", "10.42.3.2:80"]);
        // The site has none ready: elsewhere.
        let mut t2 = t.clone();
        for e in &mut t2.services[0].endpoints {
            if e.distance == 1 {
                e.ready = false;
            }
        }
        assert_eq!(dnats(&ruleset(&t2, &BTreeMap::new(), "FLOTILLA")), ["10.43.1.2:80"]);
    }

    #[test]
    fn this_node_decides_for_its_own_replicas() {
        // The hub thinks a-0 is ready and a-1 is not; the agent knows the opposite.
        let eps = vec![ep("a-0", "10.42.1.2", &[Some(80)], true, 0), ep("a-1", "10.42.1.3", &[Some(80)], false, 0)];
        let t = table(vec![svc("a", "10.96.0.1", &[(None, 80, Protocol::Tcp)], eps)]);
        let local: BTreeMap<String, bool> = [("a-0".to_string(), false), ("a-1".to_string(), true)].into();
        assert_eq!(dnats(&ruleset(&t, &local, "FLOTILLA")), ["10.42.1.3:80"]);
        // A local replica the agent does not know of is not ready.
        assert_eq!(dnats(&ruleset(&t, &ready(&["a-1"]), "FLOTILLA")), ["10.42.1.3:80"]);
        let text = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
        assert!(dnats(&text).is_empty());
        // The hub's word does not count for other nodes' replicas' local readiness map either.
        let remote = vec![ep("b-0", "10.42.2.2", &[Some(80)], false, 1)];
        let t = table(vec![svc("b", "10.96.0.2", &[(None, 80, Protocol::Tcp)], remote)]);
        assert!(dnats(&ruleset(&t, &ready(&["b-0"]), "FLOTILLA")).is_empty());
    }

    #[test]
    fn a_service_without_ready_endpoints_is_rejected() {
        let t = table(vec![
            svc("none", "10.96.0.5", &[(Some("web"), 80, Protocol::Tcp), (Some("dns"), 53, Protocol::Udp)], vec![]),
            svc("down", "10.96.0.6", &[(None, 80, Protocol::Tcp)], vec![ep("d-0", "10.42.2.2", &[Some(80)], false, 1)]),
        ]);
        let text = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
        let filter = text.split("*filter\n").nth(1).unwrap();
        let rejects: Vec<&str> = filter.lines().filter(|l| l.contains("-j REJECT")).collect();
        assert_eq!(rejects.len(), 3, "{text}");
        assert!(rejects[0].starts_with("-A FLOTILLA-SERVICES -d 10.96.0.6/32 -p tcp -m tcp --dport 80 "));
        assert!(rejects[0].ends_with("--reject-with tcp-reset"));
        assert!(rejects[1].contains("-d 10.96.0.5/32 -p tcp -m tcp --dport 80 "));
        assert!(rejects[2].contains("-d 10.96.0.5/32 -p udp -m udp --dport 53 "));
        assert!(rejects[2].ends_with("--reject-with icmp-port-unreachable"));
        assert!(!text.contains("DNAT"));
        assert!(!text.split("*filter").next().unwrap().contains("REJECT"), "REJECT only exists in filter");
    }

    #[test]
    fn udp_ports_and_named_ports_a_backend_lacks() {
        // Port "metrics" is a named target port that only e-0 has.
        let eps = vec![
            ep("e-0", "10.42.2.2", &[Some(5353), Some(9100)], true, 1),
            ep("e-1", "10.42.2.3", &[Some(5353), None], true, 1),
            ep("e-2", "10.42.2.4", &[Some(5353)], true, 1), // an old table with fewer ports
        ];
        let t = table(vec![svc(
            "dns",
            "10.96.0.53",
            &[(Some("dns"), 53, Protocol::Udp), (Some("metrics"), 9100, Protocol::Tcp)],
            eps,
        )]);
        let text = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
        assert!(text.contains("-d 10.96.0.53/32 -p udp -m udp --dport 53 "), "{text}");
        assert!(
            text.contains("-p udp -m comment --comment \"dns:dns e-0\" -m udp -j DNAT --to-destination 10.42.2.2:5353")
        );
        assert_eq!(dnats(&text), ["10.42.2.2:5353", "10.42.2.3:5353", "10.42.2.4:5353", "10.42.2.2:9100"]);
        let plans = plan(&t, &BTreeMap::new());
        assert_eq!(plans[1].targets.len(), 1);
        assert!(!text.contains("REJECT"));
    }

    #[test]
    fn ipv6_endpoints_and_odd_names_do_not_break_the_rules() {
        let eps = vec![ep("x-0", "fd00::2", &[Some(80)], true, 1)];
        let t = table(vec![svc("x\"; -F", "10.96.0.9", &[(None, 80, Protocol::Tcp)], eps)]);
        let text = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
        assert!(text.matches('"').count().is_multiple_of(2));
        assert!(!text.contains("; -F"));
        assert!(text.contains("REJECT"), "an IPv6-only service has no usable endpoint here");
    }

    #[test]
    fn udp_flows_to_withdrawn_endpoints_are_named() {
        let eps = vec![
            ep("d-0", "10.42.2.2", &[Some(53), Some(80)], true, 1),
            ep("d-1", "10.42.2.3", &[Some(53), Some(80)], true, 1),
        ];
        let t = table(vec![svc(
            "dns",
            "10.96.0.53",
            &[(Some("dns"), 53, Protocol::Udp), (Some("web"), 80, Protocol::Tcp)],
            eps,
        )]);
        let before = plan(&t, &BTreeMap::new());
        let mut t2 = t.clone();
        t2.services[0].endpoints[1].ready = false;
        let after = plan(&t2, &BTreeMap::new());
        let flow = StaleFlow { vip: [10, 96, 0, 53].into(), port: 53, endpoint: [10, 42, 2, 3].into() };
        assert_eq!(withdrawn_udp(&before, &after), [flow], "the UDP port only");
        assert!(withdrawn_udp(&after, &before).is_empty(), "an endpoint coming back needs nothing");
        assert_eq!(withdrawn_udp(&before, &[]).len(), 2, "a service gone takes its flows");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// (distance, hub's ready, agent's ready, serves port 0, serves port 1)
        type Spec = (u8, bool, Option<bool>, bool, bool);

        fn build(services: &[Vec<Spec>]) -> (ServiceTable, BTreeMap<String, bool>) {
            let mut local = BTreeMap::new();
            let services = services
                .iter()
                .enumerate()
                .map(|(s, eps)| {
                    let eps = eps
                        .iter()
                        .enumerate()
                        .map(|(e, &(distance, ready, local_ready, p0, p1))| {
                            let replica = format!("s{s}-{e}");
                            if let Some(r) = local_ready {
                                local.insert(replica.clone(), r);
                            }
                            let ports = [p0.then_some(8000 + e as u16), p1.then_some(9000)];
                            ep(&replica, &format!("10.42.{s}.{}", e + 2), &ports, ready, distance)
                        })
                        .collect();
                    svc(
                        &format!("svc{s}"),
                        &format!("10.96.0.{}", s + 1),
                        &[(Some("a"), 80, Protocol::Tcp), (Some("b"), 53, Protocol::Udp)],
                        eps,
                    )
                })
                .collect();
            (table(services), local)
        }

        proptest! {
            #[test]
            fn targets_are_the_nearest_ready_and_picked_uniformly(
                services in prop::collection::vec(
                    prop::collection::vec((0u8..3, any::<bool>(), prop::option::of(any::<bool>()), any::<bool>(), any::<bool>()), 0..7),
                    1..4,
                ),
            ) {
                let (t, local) = build(&services);
                let plans = plan(&t, &local);
                prop_assert_eq!(plans.len(), services.len() * 2);
                for (p, (s, port)) in plans.iter().zip((0..services.len()).flat_map(|s| [(s, 0), (s, 1)])) {
                    let eligible: Vec<(u8, String)> = services[s]
                        .iter()
                        .enumerate()
                        .filter(|(_, (d, ready, lr, p0, p1))| {
                            let ok = if *d == 0 { lr.unwrap_or(false) } else { *ready };
                            ok && if port == 0 { *p0 } else { *p1 }
                        })
                        .map(|(e, (d, ..))| (*d, format!("s{s}-{e}")))
                        .collect();
                    let nearest = eligible.iter().map(|(d, _)| *d).min();
                    let mut want: Vec<String> =
                        eligible.iter().filter(|(d, _)| Some(*d) == nearest).map(|(_, r)| r.clone()).collect();
                    want.sort();
                    let got: Vec<String> = p.targets.iter().map(|t| t.replica.clone()).collect();
                    prop_assert_eq!(got, want);
                }
                let text = ruleset(&t, &local, "FLOTILLA");
                let total: usize = plans.iter().map(|p| p.targets.len()).sum();
                prop_assert_eq!(dnats(&text).len(), total);
                let rejects = text.lines().filter(|l| l.contains("-j REJECT")).count();
                prop_assert_eq!(rejects, plans.iter().filter(|p| p.targets.is_empty()).count());
                for chain in svc_chains(&text) {
                    let probs = probabilities(&text, &chain);
                    let n = probs.len() as f64;
                    let mut left = 1.0;
                    for p in probs {
                        let p = p.unwrap_or(1.0);
                        prop_assert!((left * p - 1.0 / n).abs() < 1e-9);
                        left *= 1.0 - p;
                    }
                }
                // The same table in another order gives the same text.
                let mut shuffled = t.clone();
                shuffled.services.reverse();
                for s in &mut shuffled.services {
                    s.endpoints.reverse();
                }
                prop_assert_eq!(ruleset(&shuffled, &local, "FLOTILLA"), text);
            }
        }
    }

    #[test]
    fn stale_chains_are_emptied_and_deleted_in_the_same_transaction() {
        let t = table(vec![svc(
            "a",
            "10.96.0.1",
            &[(None, 80, Protocol::Tcp)],
            vec![ep("a-0", "10.42.2.2", &[Some(80)], true, 1)],
        )]);
        let before = ruleset(&t, &BTreeMap::new(), "FLOTILLA");
        let saved = format!(
            "# Generated by iptables-save\n{before}*nat\n:OTHER-CHAIN - [0:0]\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
        );
        let empty = ruleset(&table(vec![]), &BTreeMap::new(), "FLOTILLA");
        let text = with_stale_removed(&empty, &saved, "FLOTILLA");
        let old: Vec<String> = declared_chains(&before)["nat"]
            .iter()
            .filter(|c| c.contains("-SVC-") || c.contains("-SEP-"))
            .cloned()
            .collect();
        assert_eq!(old.len(), 2);
        for c in &old {
            assert!(text.contains(&format!(":{c} - [0:0]\n")));
            assert!(text.contains(&format!("-X {c}\nCOMMIT")) || text.contains(&format!("-X {c}\n-X")));
        }
        assert!(!text.contains("OTHER-CHAIN") && !text.contains("-X FLOTILLA-SERVICES"));
        // Nothing stale: unchanged.
        assert_eq!(with_stale_removed(&before, &before, "FLOTILLA"), before);
        let gone = removal(&saved, "FLOTILLA");
        assert!(gone.contains("-X FLOTILLA-SERVICES") && gone.contains("*filter") && !gone.contains("OTHER"));
    }
}
