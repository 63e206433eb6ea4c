//! The service data path in real network namespaces: a "node" namespace holding a bridge, two
//! "endpoint" namespaces on it running a TCP responder that says who it is, and a "client"
//! namespace on the same bridge, as a container would be. The rules go into the node
//! namespace's own tables, so nothing on the machine running the test is touched, and all
//! traffic goes to addresses the test made. The node's name server is bound on the bridge's
//! address there too and asked by the client.
//!
//! Needs root, iproute2, iptables (1.8, either backend) and conntrack; skips with the reason
//! when they are missing, except under CI, where it must run.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_agent::services::{DataPath, DnsConfig, DnsServer, Iptables, Records};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use proto::manifest::Protocol;
use proto::service::{Endpoint, ServiceEntry, ServiceEntryPort, ServiceTable};

const VIP: &str = "10.250.0.10";

/// What this machine lacks for the test, if anything (a reason to skip, not an error).
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces and iptables)".into());
    }
    [["ip", "-V"], ["iptables-restore", "--version"], ["conntrack", "--version"]]
        .into_iter()
        .find(|tool| !Command::new(tool[0]).arg(tool[1]).output().is_ok_and(|o| o.status.success()))
        .map(|tool| format!("needs {}", tool[0]))
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Named network namespaces, deleted on drop (a panic included); their veths go with them.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a thread of its own inside namespace `name`: sockets made there stay there.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Answers every connection on `listener` with `name`, until `stop` or a minute has passed.
fn respond(listener: TcpListener, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            match listener.accept() {
                Ok((mut s, _)) => {
                    use std::io::Write;
                    let _ = s.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

/// Answers every datagram on `socket` with `name`, until `stop` or a minute has passed.
fn udp_respond(socket: std::net::UdpSocket, name: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), peer);
            }
        }
    })
}

/// `count` connections to VIP:80 from namespace `ns`: how many each responder answered, and
/// the errors.
fn spread(ns: &str, count: usize) -> (BTreeMap<String, usize>, Vec<std::io::ErrorKind>) {
    in_netns(ns, move || {
        let to: SocketAddr = format!("{VIP}:80").parse().unwrap();
        let mut seen = BTreeMap::new();
        let mut errors = Vec::new();
        for _ in 0..count {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut who = String::new();
                    match s.read_to_string(&mut who) {
                        Ok(_) => *seen.entry(who).or_insert(0) += 1,
                        Err(e) => errors.push(e.kind()),
                    }
                }
                Err(e) => errors.push(e.kind()),
            }
        }
        (seen, errors)
    })
}

fn endpoint(replica: &str, address: &str, ready: bool, distance: u8) -> Endpoint {
    Endpoint {
        replica: replica.into(),
        node: "node".into(),
        address: address.parse().unwrap(),
        ports: vec![Some(8080)],
        ready,
        distance,
    }
}

fn service(name: &str, vip: &str, endpoints: Vec<Endpoint>) -> ServiceEntry {
    ServiceEntry {
        name: name.into(),
        address: vip.parse().unwrap(),
        ports: vec![ServiceEntryPort { name: None, port: 80, protocol: Protocol::Tcp }],
        endpoints,
    }
}

fn our_chains(node: &str) -> usize {
    let saved = run(&["ip", "netns", "exec", node, "iptables-save"]);
    saved.lines().filter(|l| l.starts_with(":FLOTILLA-")).count()
}

#[test]
fn a_service_address_spreads_over_ready_endpoints_in_a_namespace() {
    if let Some(why) = missing() {
        assert!(std::env::var_os("CI").is_none(), "{why}, and CI must run this test");
        eprintln!("skipping: {why}");
        return;
    }
    let id = std::process::id();
    let [node, a, b, client] = ["n", "a", "b", "c"].map(|s| format!("flsvc{id}{s}"));
    let _cleanup = Namespaces(vec![node.clone(), a.clone(), b.clone(), client.clone()]);
    for ns in [&node, &a, &b, &client] {
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // The node: a bridge with the subnet's first address, a route for service addresses (a
    // real node has its default route), forwarding for its containers.
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &node, "addr", "add", "10.249.0.1/24", "dev", "br0"]);
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    run(&["ip", "-n", &node, "route", "add", "10.250.0.0/24", "dev", "br0"]);
    run(&["ip", "netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (i, ns) in [&a, &b, &client].into_iter().enumerate() {
        let host = format!("vh{i}");
        let addr = format!("10.249.0.{}/24", i + 2);
        run(&["ip", "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        run(&["ip", "-n", &node, "link", "set", &host, "master", "br0", "up"]);
        // As the CNI bridge plugin sets it (`hairpinMode: true` in network/): with
        // br_netfilter loaded, a hairpin connection is DNATed at the bridge and sent back out
        // of the port it came in by.
        run(&["ip", "-n", &node, "link", "set", &host, "type", "bridge_slave", "hairpin", "on"]);
        run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"]);
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", ns, "route", "add", "default", "via", "10.249.0.1"]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let la = in_netns(&a, || TcpListener::bind("10.249.0.2:8080").unwrap());
    let lb = in_netns(&b, || TcpListener::bind("10.249.0.3:8080").unwrap());
    let responders = [respond(la, "a", stop.clone()), respond(lb, "b", stop.clone())];

    let mut path = DataPath::new(Iptables::new().in_netns(&node));
    let both = ServiceTable {
        peers: vec![],
        routes: vec![],
        domain: "flotilla.local".into(),
        services: vec![service(
            "api",
            VIP,
            vec![endpoint("api-a", "10.249.0.2", true, 0), endpoint("api-b", "10.249.0.3", true, 0)],
        )],
    };
    let ready: BTreeMap<String, bool> = [("api-a".to_string(), true), ("api-b".to_string(), true)].into();
    assert!(path.update(&both, &ready).unwrap());
    assert!(!path.update(&both, &ready).unwrap(), "an unchanged table is not applied again");

    // From the node itself (OUTPUT), from a container beside the endpoints (PREROUTING, the
    // reply un-NATed because the connection is masqueraded), and from an endpoint to itself
    // through the service (the hairpin).
    for (from, count) in [(&node, 100), (&client, 100), (&a, 40)] {
        let (seen, errors) = spread(from, count);
        assert!(errors.is_empty(), "from {from}: {errors:?}");
        assert_eq!(seen.values().sum::<usize>(), count);
        for who in ["a", "b"] {
            // Binomial(100, 1/2) below 20 has a chance of about 1e-9; 40 tries below 5, 1e-7.
            let least = count / 8;
            assert!(seen.get(who).copied().unwrap_or(0) >= least, "from {from}: {seen:?}");
        }
        eprintln!("from {from}: {seen:?}");
    }

    // The agent sees api-a fail (the hub still says ready): it gets no more connections.
    let a_down: BTreeMap<String, bool> = [("api-a".to_string(), false), ("api-b".to_string(), true)].into();
    assert!(path.update(&both, &a_down).unwrap());
    let (seen, errors) = spread(&node, 50);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(seen, [("b".to_string(), 50)].into());

    // No ready endpoint: refused at once, not a timeout.
    let none = ServiceTable {
        peers: vec![],
        routes: vec![],
        domain: "flotilla.local".into(),
        services: vec![service("api", VIP, vec![])],
    };
    assert!(path.update(&none, &ready).unwrap());
    let started = Instant::now();
    let (seen, errors) = spread(&node, 5);
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(errors, vec![std::io::ErrorKind::ConnectionRefused; 5]);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    let (_, errors) = spread(&client, 2);
    assert_eq!(errors, vec![std::io::ErrorKind::ConnectionRefused; 2], "from a container too");

    // UDP: a client keeping its source port stays with the endpoint conntrack picked first;
    // when the agent withdraws that endpoint, the flow is forgotten and it moves on.
    let ua = in_netns(&a, || std::net::UdpSocket::bind("10.249.0.2:5353").unwrap());
    let ub = in_netns(&b, || std::net::UdpSocket::bind("10.249.0.3:5353").unwrap());
    let udp_responders = [udp_respond(ua, "a", stop.clone()), udp_respond(ub, "b", stop.clone())];
    let mut dns_svc = service("dns", "10.250.0.53", vec![]);
    dns_svc.ports = vec![ServiceEntryPort { name: None, port: 53, protocol: Protocol::Udp }];
    dns_svc.endpoints = ["10.249.0.2", "10.249.0.3"]
        .iter()
        .zip(["api-a", "api-b"])
        .map(|(addr, r)| Endpoint { ports: vec![Some(5353)], ..endpoint(r, addr, true, 0) })
        .collect();
    let mut with_udp = both.clone();
    with_udp.services.push(dns_svc);
    assert!(path.update(&with_udp, &ready).unwrap());
    let client_socket = in_netns(&node, || {
        let s = std::net::UdpSocket::bind("10.249.0.1:40053").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let ask = |s: &std::net::UdpSocket| -> String {
        s.send_to(b"who", "10.250.0.53:53").unwrap();
        let mut buf = [0u8; 16];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask(&client_socket);
    for _ in 0..10 {
        assert_eq!(ask(&client_socket), first, "one flow, one endpoint");
    }
    let replica = if first == "a" { "api-a" } else { "api-b" };
    let mut withdrawn = ready.clone();
    withdrawn.insert(replica.into(), false);
    assert!(path.update(&with_udp, &withdrawn).unwrap());
    for _ in 0..5 {
        assert_ne!(ask(&client_socket), first, "the flow to the withdrawn endpoint was forgotten");
    }
    assert!(path.update(&both, &ready).unwrap());

    // The name server on the bridge's address, asked by a container.
    let (stop_dns, stopped) = std::sync::mpsc::channel::<()>();
    let dns = {
        let (path, records) = (format!("/run/netns/{node}"), Records::from_table(&both));
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (_tx, rx) = tokio::sync::watch::channel(Arc::new(records));
                let server = DnsServer::bind("10.249.0.1:53".parse().unwrap(), DnsConfig::default()).unwrap();
                let serving = server.spawn(rx);
                let _ = tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(60))).await;
                serving.abort();
            });
        })
    };
    let answer = in_netns(&client, || {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("api.svc.flotilla.local.").unwrap(), RecordType::A));
        let q = q.to_vec().unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 512];
        // The server may still be starting: a few tries, 200 ms each.
        for _ in 0..25 {
            s.send_to(&q, "10.249.0.1:53").unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return Some(Message::from_vec(&buf[..n]).unwrap());
            }
        }
        None
    });
    let _ = stop_dns.send(());
    dns.join().unwrap();
    let answer = answer.expect("the name server on the bridge answers");
    let got: Vec<String> = answer.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(got, [VIP]);

    // 50 services × 4 endpoints: how long an apply takes (through `ip netns exec`, which adds
    // a few milliseconds per command).
    let big = ServiceTable {
        peers: vec![],
        routes: vec![],
        domain: "flotilla.local".into(),
        services: (0..50)
            .map(|s| {
                let eps =
                    (0..4).map(|e| endpoint(&format!("s{s}-{e}"), &format!("10.249.{}.{}", 10 + s, 2 + e), true, 1));
                service(&format!("svc{s}"), &format!("10.250.1.{}", s + 1), eps.collect())
            })
            .collect(),
    };
    let started = Instant::now();
    assert!(path.update(&big, &BTreeMap::new()).unwrap());
    let first = started.elapsed();
    let mut changed = big.clone();
    changed.services[7].endpoints[2].ready = false;
    let started = Instant::now();
    assert!(path.update(&changed, &BTreeMap::new()).unwrap());
    let again = started.elapsed();
    let chains = our_chains(&node);
    assert_eq!(chains, 2 + 1 + 50 + 200 - 1, "base (nat and filter), 50 services, 199 endpoints");
    eprintln!("50 services × 4 endpoints: first apply {first:?}, a one-endpoint change {again:?}, {chains} chains");

    // Back to one service: the others' chains are gone; then everything of ours is.
    assert!(path.update(&both, &ready).unwrap());
    assert_eq!(our_chains(&node), 3 + 1 + 2);
    let (seen, errors) = spread(&node, 20);
    assert!(errors.is_empty() && seen.values().sum::<usize>() == 20, "{seen:?} {errors:?}");
    path.remove_all().unwrap();
    assert_eq!(our_chains(&node), 0);
    let saved = run(&["ip", "netns", "exec", &node, "iptables-save"]);
    assert!(!saved.contains("FLOTILLA"), "{saved}");
    path.remove_all().unwrap();

    stop.store(true, Ordering::Relaxed);
    for r in responders.into_iter().chain(udp_responders) {
        r.join().unwrap();
    }
}
