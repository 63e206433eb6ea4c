//! The node's name server for its workloads: answers `A` queries for service names from the
//! node's own service table and forwards everything else to the node's resolvers, so a
//! container (its `/etc/resolv.conf` points at the bridge's address) resolves `api`,
//! `api.svc.<domain>` and `example.com` alike, with or without the hub.
//!
//! [`answer`] is the pure core: a query's bytes and the [`Records`] in, a [`Decision`] out.
//! The shell ([`DnsServer`]) owns the sockets: one UDP socket and one TCP listener on the same
//! address (the bridge's gateway address, port 53), the forwards to upstream resolvers, and
//! the bounds:
//!
//! - a UDP datagram is read into a 4 KiB buffer (longer ones are cut and fail to parse); a
//!   TCP message is at most 64 KiB by its length prefix;
//! - anything that does not parse as a query is dropped without a reply (no amplification,
//!   no reply to a reply);
//! - at most [`DnsConfig::max_forwards`] forwards are in flight (more get SERVFAIL at once),
//!   each bounded by [`DnsConfig::timeout`] over all upstreams; at most
//!   [`DnsConfig::max_tcp`] TCP connections, each closed after an idle
//!   [`DnsConfig::tcp_idle`] or 100 queries.
//!
//! Names: `NAME` (one label) and `NAME.svc.<domain>` (with or without the trailing dot, any
//! case) are a service's. Other names inside `<domain>` do not exist (NXDOMAIN, answered
//! here, never leaked upstream); `<domain>` and `svc.<domain>` exist with no address. A single
//! label that is not a service is forwarded (a site's own resolver may know it). Service
//! answers have a short TTL ([`TTL`]): a service's address is stable, but the table may drop
//! it.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use proto::service::ServiceTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

/// Seconds a client may cache a service's address.
pub const TTL: u32 = 5;
/// The largest UDP query read; longer datagrams are cut (and then fail to parse).
const UDP_BUFFER: usize = 4096;
/// What we say we accept over UDP, as EDNS suggests for avoiding fragmentation.
const EDNS_PAYLOAD: u16 = 1232;

/// The service names a node answers for: what [`answer`] reads. Built from the node's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// The cluster domain, lowercase, without a trailing dot (empty: none).
    domain: String,
    /// Service name (lowercase) → its address.
    names: BTreeMap<String, Ipv4Addr>,
}

/// What a name is to this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Service(Ipv4Addr),
    /// In the cluster domain, exists, has no address (`<domain>`, `svc.<domain>`).
    Empty,
    /// In the cluster domain and not a service.
    NoSuchName,
    /// Not ours: forwarded.
    Foreign,
}

impl Records {
    pub fn from_table(table: &ServiceTable) -> Records {
        let domain = table.domain.trim_end_matches('.').to_ascii_lowercase();
        let names = table.services.iter().map(|s| (s.name.to_ascii_lowercase(), s.address)).collect();
        Records { domain, names }
    }

    /// What `name` (as asked: any case, with or without the trailing dot) is.
    pub fn lookup(&self, name: &str) -> Lookup {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name.is_empty() {
            return Lookup::Foreign;
        }
        if !name.contains('.') {
            return match self.names.get(&name) {
                Some(a) => Lookup::Service(*a),
                None => Lookup::Foreign,
            };
        }
        if self.domain.is_empty() {
            return Lookup::Foreign;
        }
        let svc = format!("svc.{}", self.domain);
        if name == self.domain || name == svc {
            return Lookup::Empty;
        }
        if let Some(label) = name.strip_suffix(&format!(".{svc}")) {
            return match self.names.get(label) {
                Some(a) if !label.contains('.') => Lookup::Service(*a),
                _ => Lookup::NoSuchName,
            };
        }
        if name.ends_with(&format!(".{}", self.domain)) { Lookup::NoSuchName } else { Lookup::Foreign }
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: ask the upstream resolvers, and relay their answer.
    Forward,
    /// Not a query we can answer at all (garbage, a response): no reply.
    Drop,
}

fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
    }
    m
}

fn encode(m: &Message) -> Decision {
    match m.to_vec() {
        Ok(bytes) => Decision::Reply(bytes),
        Err(e) => {
            debug!(error = %e, "cannot encode a DNS reply");
            Decision::Drop
        }
    }
}

/// The pure core: what to do with `packet`, a DNS message from a client.
pub fn answer(records: &Records, packet: &[u8]) -> Decision {
    let Ok(request) = Message::from_vec(packet) else { return Decision::Drop };
    if request.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    if request.metadata.op_code != OpCode::Query {
        return encode(&reply_to(&request, ResponseCode::NotImp));
    }
    let query = match request.queries.as_slice() {
        [query] => query,
        // A header and nothing else (a buffer of zeros parses as one): not worth a reply.
        [] => return Decision::Drop,
        _ => return encode(&reply_to(&request, ResponseCode::FormErr)),
    };
    let lookup = records.lookup(&query.name().to_ascii());
    if lookup == Lookup::Foreign || query.query_class() != DNSClass::IN {
        return Decision::Forward;
    }
    let mut reply = reply_to(&request, ResponseCode::NoError);
    reply.metadata.authoritative = true;
    match lookup {
        Lookup::Service(address) if matches!(query.query_type(), RecordType::A | RecordType::ANY) => {
            reply.add_answer(Record::from_rdata(query.name().clone(), TTL, RData::A(A(address))));
        }
        // The name exists; it has no record of the type asked (AAAA from a dual-stack
        // resolver, say): NOERROR with no answer, so the client keeps the A answer.
        Lookup::Service(_) | Lookup::Empty => {}
        Lookup::NoSuchName => reply.metadata.response_code = ResponseCode::NXDomain,
        Lookup::Foreign => unreachable!("forwarded above"),
    }
    encode(&reply)
}

/// An error reply to `packet` (when forwarding failed or is impossible); `None` when `packet`
/// is not a query.
pub fn error_reply(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    reply_to(&request, code).to_vec().ok()
}

/// The resolvers named in a `resolv.conf`, loopback and unspecified ones left out (the
/// server's clients are containers, for whom the node's 127.0.0.53 is not the node's), at
/// most three as the C library reads, port 53.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else { continue };
        let a = SocketAddr::new(ip, 53);
        if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&a) && out.len() < 3 {
            out.push(a);
        }
    }
    out
}

/// The node's resolvers: `/etc/resolv.conf`'s, or systemd-resolved's own upstreams when that
/// names only its loopback stub.
pub fn system_upstreams() -> Vec<SocketAddr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let found = std::fs::read_to_string(path).map(|t| upstreams(&t)).unwrap_or_default();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// The shell's settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where other names are forwarded; none: they get REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// For one forward, over all upstreams; SERVFAIL after it.
    pub timeout: Duration,
    pub max_forwards: usize,
    pub max_tcp: usize,
    pub tcp_idle: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(3),
            max_forwards: 256,
            max_tcp: 64,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Binds a server on `bind` (UDP and TCP) forwarding to the node's resolvers, and runs it;
/// aborting the handle stops it and everything it started. Call from within a Tokio runtime.
pub fn spawn(bind: SocketAddr, records: watch::Receiver<Arc<Records>>) -> io::Result<JoinHandle<()>> {
    let config = DnsConfig { upstreams: system_upstreams(), ..DnsConfig::default() };
    Ok(DnsServer::bind(bind, config)?.spawn(records))
}

/// A bound server, not yet serving.
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
}

impl DnsServer {
    /// Binds UDP and TCP on `bind`; with port 0, on one port free for both.
    pub fn bind(bind: SocketAddr, config: DnsConfig) -> io::Result<DnsServer> {
        let mut last = None;
        for _ in 0..8 {
            let udp = std::net::UdpSocket::bind(bind)?;
            let at = udp.local_addr()?;
            match std::net::TcpListener::bind(at) {
                Ok(tcp) => {
                    udp.set_nonblocking(true)?;
                    tcp.set_nonblocking(true)?;
                    return Ok(DnsServer { udp: UdpSocket::from_std(udp)?, tcp: TcpListener::from_std(tcp)?, config });
                }
                // A port chosen for UDP may be taken for TCP: choose again.
                Err(e) if bind.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    pub fn spawn(self, records: watch::Receiver<Arc<Records>>) -> JoinHandle<()> {
        tokio::spawn(self.run(records))
    }

    async fn run(self, records: watch::Receiver<Arc<Records>>) {
        let udp = Arc::new(self.udp);
        let config = Arc::new(self.config);
        let forwards = Arc::new(Semaphore::new(config.max_forwards));
        let connections = Arc::new(Semaphore::new(config.max_tcp));
        // Every task this server starts is in here: dropped (the server aborted), they end too.
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; UDP_BUFFER];
        loop {
            tokio::select! {
                got = udp.recv_from(&mut buf) => {
                    let (n, peer) = match got {
                        Ok(x) => x,
                        // ICMP errors from earlier sends surface here on some systems.
                        Err(e) => { debug!(error = %e, "dns: udp receive"); continue; }
                    };
                    let packet = &buf[..n];
                    let records = records.borrow().clone();
                    match answer(&records, packet) {
                        Decision::Reply(bytes) => { let _ = udp.send_to(&bytes, peer).await; }
                        Decision::Drop => {}
                        Decision::Forward => {
                            let packet = packet.to_vec();
                            let Ok(permit) = forwards.clone().try_acquire_owned() else {
                                if let Some(r) = error_reply(&packet, ResponseCode::ServFail) {
                                    let _ = udp.send_to(&r, peer).await;
                                }
                                continue;
                            };
                            let (udp, config) = (udp.clone(), config.clone());
                            tasks.spawn(async move {
                                let reply = forward(&config, &packet, false).await;
                                drop(permit);
                                if let Some(r) = reply {
                                    let _ = udp.send_to(&r, peer).await;
                                }
                            });
                        }
                    }
                }
                accepted = self.tcp.accept() => {
                    let Ok((stream, peer)) = accepted else { continue };
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        debug!(%peer, "dns: too many TCP connections; closing one");
                        continue;
                    };
                    let (records, config, forwards) = (records.clone(), config.clone(), forwards.clone());
                    tasks.spawn(async move {
                        serve_tcp(stream, records, &config, &forwards).await;
                        drop(permit);
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }
}

/// The upstream's answer to `packet`, or an error reply: SERVFAIL after the timeout, REFUSED
/// with no upstream. `None` only for a packet that is not a query.
async fn forward(config: &DnsConfig, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
    if config.upstreams.is_empty() {
        return error_reply(packet, ResponseCode::Refused);
    }
    let id = [*packet.first()?, *packet.get(1)?];
    let each = config.timeout / config.upstreams.len() as u32;
    for upstream in &config.upstreams {
        let asked: Asked<'_> = if tcp { ask_tcp(*upstream, packet) } else { Box::pin(ask_udp(*upstream, packet, id)) };
        match tokio::time::timeout(each, asked).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(e)) => debug!(%upstream, error = %e, "dns: upstream failed"),
            Err(_) => debug!(%upstream, "dns: upstream timed out"),
        }
    }
    warn!(upstreams = ?config.upstreams, "dns: no upstream answered");
    error_reply(packet, ResponseCode::ServFail)
}

type Asked<'a> = std::pin::Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + Send + 'a>>;

async fn ask_udp(upstream: SocketAddr, packet: &[u8], id: [u8; 2]) -> io::Result<Vec<u8>> {
    let local: SocketAddr =
        if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (IpAddr::from([0u16; 8]), 0).into() };
    // A socket of its own per forward: a random source port, and only the upstream's packets.
    let s = UdpSocket::bind(local).await?;
    s.connect(upstream).await?;
    s.send(packet).await?;
    let mut buf = vec![0u8; UDP_BUFFER];
    // Ends by the caller's timeout; stray datagrams with another ID are skipped.
    loop {
        let n = s.recv(&mut buf).await?;
        // A response (QR set) to this ID.
        if n >= 12 && buf[..2] == id && buf[2] & 0x80 != 0 {
            return Ok(buf[..n].to_vec());
        }
    }
}

fn ask_tcp(upstream: SocketAddr, packet: &[u8]) -> Asked<'_> {
    Box::pin(async move {
        let mut s = TcpStream::connect(upstream).await?;
        let len = u16::try_from(packet.len()).map_err(|_| io::Error::other("query too long"))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(packet);
        s.write_all(&framed).await?;
        let n = s.read_u16().await? as usize;
        let mut reply = vec![0u8; n];
        s.read_exact(&mut reply).await?;
        Ok(reply)
    })
}

/// One client's TCP connection: length-prefixed queries, answered in order.
async fn serve_tcp(
    mut stream: TcpStream,
    records: watch::Receiver<Arc<Records>>,
    config: &DnsConfig,
    forwards: &Arc<Semaphore>,
) {
    for _ in 0..100 {
        let read = async {
            let n = stream.read_u16().await? as usize;
            let mut packet = vec![0u8; n];
            stream.read_exact(&mut packet).await?;
            io::Result::Ok(packet)
        };
        let Ok(Ok(packet)) = tokio::time::timeout(config.tcp_idle, read).await else { return };
        let current = records.borrow().clone();
        let reply = match answer(&current, &packet) {
            Decision::Reply(r) => Some(r),
            Decision::Drop => return,
            Decision::Forward => match forwards.clone().try_acquire_owned() {
                Ok(_permit) => forward(config, &packet, true).await,
                Err(_) => error_reply(&packet, ResponseCode::ServFail),
            },
        };
        let Some(reply) = reply else { return };
        let Ok(len) = u16::try_from(reply.len()) else { return };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if tokio::time::timeout(config.tcp_idle, stream.write_all(&framed)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use proto::service::ServiceEntry;

    fn records() -> Records {
        let s = |name: &str, a: [u8; 4]| ServiceEntry {
            name: name.into(),
            address: a.into(),
            ports: vec![],
            endpoints: vec![],
        };
        Records::from_table(&ServiceTable {
            peers: vec![],
            routes: vec![],
            domain: "Flotilla.Local.".into(),
            services: vec![s("api", [10, 96, 0, 10]), s("db", [10, 96, 0, 11])],
        })
    }

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn reply(d: Decision) -> Message {
        match d {
            Decision::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_are_looked_up_the_way_clients_write_them() {
        let r = records();
        let api = Lookup::Service([10, 96, 0, 10].into());
        for n in ["api", "API.", "api.svc.flotilla.local", "api.svc.flotilla.local.", "Api.SVC.Flotilla.Local"] {
            assert_eq!(r.lookup(n), api, "{n}");
        }
        assert_eq!(r.lookup("web"), Lookup::Foreign, "a single label may be the site's");
        assert_eq!(r.lookup("web.svc.flotilla.local"), Lookup::NoSuchName);
        assert_eq!(r.lookup("x.api.svc.flotilla.local"), Lookup::NoSuchName);
        assert_eq!(r.lookup("api.flotilla.local"), Lookup::NoSuchName);
        assert_eq!(r.lookup("flotilla.local."), Lookup::Empty);
        assert_eq!(r.lookup("svc.flotilla.local"), Lookup::Empty);
        assert_eq!(r.lookup("example.com"), Lookup::Foreign);
        assert_eq!(r.lookup("notflotilla.local"), Lookup::Foreign);
        assert_eq!(r.lookup("."), Lookup::Foreign);
        assert_eq!(Records::default().lookup("api.svc.flotilla.local"), Lookup::Foreign);
    }

    #[test]
    fn the_core_answers_refuses_and_forwards() {
        let r = records();
        let m = reply(answer(&r, &query("api.svc.flotilla.local.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(m.answers[0].ttl, TTL);
        // AAAA for a service: no data, not NXDOMAIN.
        let m = reply(answer(&r, &query("db.", RecordType::AAAA)));
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        let m = reply(answer(&r, &query("nope.svc.flotilla.local.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(answer(&r, &query("example.com.", RecordType::A)), Decision::Forward);
        assert_eq!(answer(&r, &query("web.", RecordType::A)), Decision::Forward);
        // Garbage, truncation and responses get nothing.
        let good = query("api.", RecordType::A);
        for bad in [vec![], vec![0u8; 3], good[..good.len() - 2].to_vec(), vec![0xff; 600]] {
            assert_eq!(answer(&r, &bad), Decision::Drop);
        }
        let mut response = Message::from_vec(&good).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert_eq!(answer(&r, &response.to_vec().unwrap()), Decision::Drop);
        // Two questions, or another opcode: an error reply.
        let mut two = Message::from_vec(&good).unwrap();
        two.add_query(Query::query(Name::from_ascii("db.").unwrap(), RecordType::A));
        assert_eq!(reply(answer(&r, &two.to_vec().unwrap())).metadata.response_code, ResponseCode::FormErr);
        let mut notify = Message::from_vec(&good).unwrap();
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(reply(answer(&r, &notify.to_vec().unwrap())).metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn random_bytes_never_panic_the_core() {
        use rand::{Rng, SeedableRng};
        let r = records();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let good = query("api.svc.flotilla.local.", RecordType::A);
        for i in 0..20_000 {
            let packet: Vec<u8> = if i % 2 == 0 {
                (0..rng.random_range(0..600)).map(|_| rng.random()).collect()
            } else {
                // A valid query with a few bytes flipped.
                let mut p = good.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                p
            };
            let _ = answer(&r, &packet);
            let _ = error_reply(&packet, ResponseCode::ServFail);
        }
    }

    #[test]
    fn upstreams_come_from_resolv_conf_without_loopback() {
        let conf = "# generated\nsearch lan\nnameserver 127.0.0.53\nnameserver 192.168.1.1\nnameserver ::1\n\
                    nameserver fd00::1\nnameserver 192.168.1.1\nnameserver bogus\nnameserver 0.0.0.0\n\
                    nameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        let got: Vec<String> = upstreams(conf).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["192.168.1.1:53", "[fd00::1]:53", "10.0.0.2:53"]);
    }

    // --- with real sockets on 127.0.0.1 ---

    async fn ask(server: SocketAddr, packet: &[u8]) -> Option<Message> {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(packet, server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await.ok()?.unwrap();
        Some(Message::from_vec(&buf[..n]).unwrap())
    }

    fn start(config: DnsConfig) -> (SocketAddr, watch::Sender<Arc<Records>>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(Arc::new(records()));
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let at = server.local_addr().unwrap();
        (at, tx, server.spawn(rx))
    }

    /// A resolver that answers every A query with 192.0.2.7, or stays silent.
    async fn fake_upstream(silent: bool) -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..100 {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else { return };
                if silent {
                    continue;
                }
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = reply_to(&q, ResponseCode::NoError);
                m.add_answer(Record::from_rdata(q.queries[0].name().clone(), 60, RData::A(A([192, 0, 2, 7].into()))));
                s.send_to(&m.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        (at, task)
    }

    #[tokio::test]
    async fn a_server_on_a_udp_socket_answers_and_follows_the_table() {
        let (at, tx, server) = start(DnsConfig::default());
        let m = ask(at, &query("api.svc.flotilla.local.", RecordType::A)).await.unwrap();
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 10)]);
        let m = ask(at, &query("gone.svc.flotilla.local.", RecordType::A)).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Garbage first, then a query on the same socket: only the query is answered.
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&[0xde, 0xad, 0xbe, 0xef], at).await.unwrap();
        s.send_to(&[0u8; 4000], at).await.unwrap();
        let q = query("db.", RecordType::A);
        s.send_to(&q, at).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await.unwrap().unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, Message::from_vec(&q).unwrap().metadata.id);
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 11)]);
        assert!(tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await.is_err(), "no more replies");
        // The table changes: so do the answers.
        let mut t = ServiceTable { peers: vec![], routes: vec![], domain: "flotilla.local".into(), services: vec![] };
        t.services.push(ServiceEntry {
            name: "gone".into(),
            address: [10, 96, 0, 99].into(),
            ports: vec![],
            endpoints: vec![],
        });
        tx.send(Arc::new(Records::from_table(&t))).unwrap();
        let m = ask(at, &query("gone.svc.flotilla.local.", RecordType::A)).await.unwrap();
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 99)]);
        let m = ask(at, &query("api.svc.flotilla.local.", RecordType::A)).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // No upstream: other names are refused at once.
        let m = ask(at, &query("example.com.", RecordType::A)).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        server.abort();
    }

    #[tokio::test]
    async fn other_names_are_forwarded_and_a_silent_upstream_gives_servfail() {
        let (silent, silent_task) = fake_upstream(true).await;
        let (good, good_task) = fake_upstream(false).await;
        // The silent one first: its share of the timeout passes, then the good one answers.
        let config =
            DnsConfig { upstreams: vec![silent, good], timeout: Duration::from_millis(600), ..Default::default() };
        let (at, _tx, server) = start(config);
        let q = query("example.com.", RecordType::A);
        let m = ask(at, &q).await.unwrap();
        assert_eq!(m.metadata.id, Message::from_vec(&q).unwrap().metadata.id);
        assert_eq!(addresses(&m), [Ipv4Addr::new(192, 0, 2, 7)]);
        // Service names are never forwarded.
        let m = ask(at, &query("api.", RecordType::A)).await.unwrap();
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 10)]);
        server.abort();

        let config = DnsConfig { upstreams: vec![silent], timeout: Duration::from_millis(300), ..Default::default() };
        let (at, _tx, server) = start(config);
        let started = std::time::Instant::now();
        let m = ask(at, &query("example.com.", RecordType::A)).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(started.elapsed() < Duration::from_secs(3));
        server.abort();
        silent_task.abort();
        good_task.abort();
    }

    #[tokio::test]
    async fn tcp_queries_are_answered_too() {
        let (at, _tx, server) = start(DnsConfig::default());
        let mut s = TcpStream::connect(at).await.unwrap();
        for name in ["api.svc.flotilla.local.", "db."] {
            let q = query(name, RecordType::A);
            s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&q).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), s.read_u16()).await.unwrap().unwrap();
            let mut b = vec![0u8; n as usize];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(Message::from_vec(&b).unwrap().answers.len(), 1, "{name}");
        }
        server.abort();

        // Over TCP, other names are forwarded over TCP: here to a second server of ours that
        // knows `web.svc.example`.
        let upstream_records = Records::from_table(&ServiceTable {
            peers: vec![],
            routes: vec![],
            domain: "example".into(),
            services: vec![ServiceEntry {
                name: "web".into(),
                address: [10, 1, 2, 3].into(),
                ports: vec![],
                endpoints: vec![],
            }],
        });
        let (_up_tx, up_rx) = watch::channel(Arc::new(upstream_records));
        let upstream = DnsServer::bind("127.0.0.1:0".parse().unwrap(), DnsConfig::default()).unwrap();
        let upstream_at = upstream.local_addr().unwrap();
        let upstream = upstream.spawn(up_rx);
        let (at, _tx, server) = start(DnsConfig { upstreams: vec![upstream_at], ..Default::default() });
        let mut s = TcpStream::connect(at).await.unwrap();
        let q = query("web.svc.example.", RecordType::A);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_u16()).await.unwrap().unwrap();
        let mut b = vec![0u8; n as usize];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(addresses(&Message::from_vec(&b).unwrap()), [Ipv4Addr::new(10, 1, 2, 3)]);
        // And over UDP, to the same upstream over UDP.
        let m = ask(at, &query("WEB.svc.example", RecordType::A)).await.unwrap();
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 1, 2, 3)]);
        upstream.abort();

        // Garbage closes the connection.
        s.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(n, 0);
        server.abort();
    }
}
