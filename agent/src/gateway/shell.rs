//! The gateway's I/O: an HTTP/1.1 server (hyper) on `agent --gateway-port`, which asks
//! [`super::core::decide`] where each request goes, then hands it to a Wasm HTTP component
//! of this node in-process ([`Handlers`]) or proxies it to the endpoint over a keep-alive
//! pool (hyper-util's client, one pool of idle connections per endpoint address).
//!
//! Bounded, since the port may face untrusted clients ([`Limits`]): at most
//! `max_connections` connections at once (a connection over the limit is closed at once,
//! after a best-effort `503`), `header_read_timeout` to send a request's head (which also
//! ends an idle keep-alive connection), and `upstream_timeout` for an endpoint to answer with
//! its response head. Whatever a client sends becomes a response or a closed connection; a
//! request never reaches code that can panic on its content (hyper parses, the core decides
//! on strings).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};
use wasm_runtime::{HandlerBody, HttpHandler};

use super::core::{self, Outcome, Refusal, Target, View};
use crate::metrics::GatewayCounts;

/// The gateway's bounds. [`Limits::default`] is what the agent serves with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most client connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// How long a client has to send a request's head, and how long an idle keep-alive
    /// connection stays open.
    pub header_read_timeout: Duration,
    /// How long an endpoint (or an in-process component) has to answer with its response
    /// head: then 504.
    pub upstream_timeout: Duration,
    /// How long a connection to an endpoint may take: then 502.
    pub connect_timeout: Duration,
    /// When the gateway stops: how long the requests it is in the middle of have to finish
    /// (idle keep-alive connections close at once).
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            drain: Duration::from_secs(10),
        }
    }
}

/// Idle connections to endpoints are kept this long for the next request.
const POOL_IDLE: Duration = Duration::from_secs(60);
const POOL_PER_ENDPOINT: usize = 32;
/// What a connection over the limit is told before it is closed.
const OVER_LIMIT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 37\r\nconnection: close\r\n\r\nthe gateway has too many connections\n";

/// The body of every gateway response.
pub type Body = HandlerBody;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The in-process handlers of this node's Wasm HTTP components, by replica: registered by a
/// run once its server is up, removed when the run lets go of it ([`Registered`]).
#[derive(Clone, Default)]
pub struct Handlers {
    map: Arc<Mutex<HashMap<String, (u64, HttpHandler)>>>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_struct("Handlers").field("replicas", &names).finish()
    }
}

impl Handlers {
    // A std Mutex, not a tokio one: held only to clone or swap an entry, never across an await.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, HttpHandler)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `handler` the replica's until the returned guard is dropped.
    pub fn register(&self, replica: &str, handler: HttpHandler) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(replica.to_string(), (id, handler));
        Registered { handlers: self.clone(), replica: replica.to_string(), id }
    }

    pub fn get(&self, replica: &str) -> Option<HttpHandler> {
        self.lock().get(replica).map(|(_, h)| h.clone())
    }
}

/// Removes its handler when dropped, unless a newer run of the replica replaced it.
pub struct Registered {
    handlers: Handlers,
    replica: String,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.handlers.lock();
        if map.get(&self.replica).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.replica);
        }
    }
}

struct Gateway {
    view: watch::Receiver<View>,
    handlers: Handlers,
    client: Client<HttpConnector, Incoming>,
    counts: GatewayCounts,
    limits: Limits,
    /// Advances per routed request: round-robin among equally near endpoints.
    turn: AtomicUsize,
}

/// Serves on `listener` until `view`'s sender is dropped (the agent stopped), counting into
/// `counts`. Then it stops accepting, lets each connection finish the request it is in
/// (`Limits::drain` at most; idle ones close), and yields the listener, still open, so the
/// agent can hand it to its next process: connections arriving meanwhile wait in its backlog,
/// as for Wasm HTTP servers.
pub fn spawn(
    listener: TcpListener,
    view: watch::Receiver<View>,
    handlers: Handlers,
    counts: GatewayCounts,
    limits: Limits,
) -> tokio::task::JoinHandle<Option<std::net::TcpListener>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(limits.connect_timeout));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_PER_ENDPOINT)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let mut stopped = view.clone();
    let gw = Arc::new(Gateway { view, handlers, client, counts, limits, turn: AtomicUsize::new(0) });
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    // Tells every connection to finish its request and close (`closed` once it flips).
    let (draining_tx, draining) = watch::channel(false);
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "HTTP gateway listening");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "gateway: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = closed(&mut stopped) => {
                    draining_tx.send_replace(true);
                    // Every connection holds a slot: all of them back means all are done.
                    let all = u32::try_from(max).unwrap_or(u32::MAX);
                    if tokio::time::timeout(limits.drain, slots.acquire_many(all)).await.is_err() {
                        warn!(addr = ?addr, "gateway: requests still running at the end of the drain are cut");
                    }
                    return listener.into_std().ok();
                }
            };
            // Refused, not queued: a client that holds its slots should not make others wait
            // in the backlog unanswered.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                gw.counts.refused();
                debug!(%peer, "gateway: over its connection limit; connection refused");
                // Never waiting on this client: whatever its socket takes now.
                let _ = stream.try_write(OVER_LIMIT);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = gw.clone();
            let mut draining = draining.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let header_read_timeout = gw.limits.header_read_timeout;
                let service = service_fn(move |req| {
                    let gw = gw.clone();
                    async move { Ok::<_, Infallible>(gw.serve(req, peer).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = draining.changed() => {
                        // As the Wasm HTTP servers drain: a request that has just arrived
                        // unread is not taken for idleness (see `DRAIN_LINGER`); then the
                        // request under way (if any) is answered and the connection closes.
                        tokio::select! {
                            r = conn.as_mut() => r,
                            () = tokio::time::sleep(wasm_runtime::DRAIN_LINGER) => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        }
                    }
                };
                if let Err(e) = ended {
                    debug!(%peer, error = %e, "gateway connection ended with an error");
                }
            });
        }
    })
}

/// Completes once the agent dropped the view's sender.
async fn closed(view: &mut watch::Receiver<View>) {
    while view.changed().await.is_ok() {}
}

impl Gateway {
    async fn serve(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let host_value = req
            .headers()
            .get(HOST)
            .cloned()
            .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        let host = host_value.as_ref().and_then(|v| v.to_str().ok()).map(core::host_of).unwrap_or_default();
        let path = req.uri().path().to_string();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let decision = core::decide(&self.view.borrow(), &host, &path, turn);
        let target = match decision.into_target(&host, &path) {
            Ok(t) => t,
            Err(refusal) => return self.refuse(refusal),
        };
        core::strip_hop_by_hop(req.headers_mut());
        core::add_forwarded(req.headers_mut(), peer.ip(), host_value.as_ref());
        let in_process =
            if target.local { self.handlers.get(&target.replica).filter(|h| h.is_serving()) } else { None };
        let upstream = self.limits.upstream_timeout;
        match in_process {
            // A Wasm HTTP component of this node: its own handler, no socket in between.
            Some(h) => match tokio::time::timeout(upstream, h.handle(req)).await {
                Ok(response) => {
                    self.counts.request(&target.route, Outcome::InProcess);
                    response
                }
                Err(_) => self.refuse(Refusal::TimedOut { target: Box::new(target), after: upstream }),
            },
            None => self.proxy(req, target).await,
        }
    }

    async fn proxy(&self, mut req: Request<Incoming>, target: Target) -> Response<Body> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // The target is made of an address and a path hyper already parsed: this parses.
        let Ok(uri) = format!("http://{}{path}", target.addr).parse() else {
            let why = "the request's path cannot be forwarded".to_string();
            return self.refuse(Refusal::Unreachable { target: Box::new(target), why });
        };
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        let upstream = self.limits.upstream_timeout;
        match tokio::time::timeout(upstream, self.client.request(req)).await {
            Err(_) => self.refuse(Refusal::TimedOut { target: Box::new(target), after: upstream }),
            Ok(Err(e)) => self.refuse(Refusal::Unreachable { target: Box::new(target), why: chain(&e) }),
            Ok(Ok(response)) => {
                self.counts.request(&target.route, Outcome::Proxied);
                let (mut parts, body) = response.into_parts();
                core::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync())
            }
        }
    }

    /// Answers with the refusal's status and plain-text body.
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        let outcome = refusal.outcome();
        self.counts.request(refusal.route(), outcome);
        if matches!(outcome, Outcome::Unreachable | Outcome::TimedOut) {
            debug!(route = refusal.route(), reason = %refusal.body().trim_end(), "gateway: endpoint failed");
        }
        let body = Full::new(Bytes::from(refusal.body())).map_err(|never: Infallible| match never {}).boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = refusal.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        // The body echoes the request's host and path: never to be read as anything but text.
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        response
    }
}

/// An error and its sources, `: `-separated (hyper's own message alone says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    //! The shell against real loopback sockets: a hyper backend, raw clients.

    use std::sync::atomic::AtomicUsize;

    use proto::route::RouteEntry;
    use proto::service::{Endpoint, ServiceEntry, ServiceEntryPort, ServiceTable};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A backend that answers every request with the forwarding headers it got, and counts the
    /// connections it accepted.
    async fn echo_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                        let text = format!(
                            "path={} host={} xff={} xfh={} xfp={} connection={}\n",
                            req.uri(),
                            h("host"),
                            h("x-forwarded-for"),
                            h("x-forwarded-host"),
                            h("x-forwarded-proto"),
                            h("x-private"),
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        (addr, accepted)
    }

    fn table(endpoint: Option<SocketAddr>) -> View {
        let endpoints = endpoint
            .map(|a| Endpoint {
                replica: "shop-0".into(),
                node: "other".into(),
                address: a.ip(),
                ports: vec![Some(a.port())],
                ready: true,
                distance: 1,
            })
            .into_iter()
            .collect();
        let route = |name: &str, host: &str, service: &str| RouteEntry {
            name: name.into(),
            host: Some(host.into()),
            path_prefix: "/".into(),
            service: service.into(),
            port: 80,
        };
        View {
            table: Arc::new(ServiceTable {
                domain: "flotilla.local".into(),
                services: vec![ServiceEntry {
                    name: "shop".into(),
                    address: [10, 43, 0, 2].into(),
                    ports: vec![ServiceEntryPort { name: None, port: 80, protocol: Default::default() }],
                    endpoints,
                }],
                peers: vec![],
                routes: vec![route("shop", "shop.example", "shop"), route("down", "down.example", "nothing")],
            }),
            local_ready: Default::default(),
        }
    }

    struct Running {
        addr: SocketAddr,
        counts: GatewayCounts,
        _view: watch::Sender<View>,
    }

    async fn gateway(view: View, limits: Limits) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(view);
        let counts = GatewayCounts::default();
        spawn(listener, rx, Handlers::default(), counts.clone(), limits);
        Running { addr, counts, _view: tx }
    }

    /// Sends `raw` on a new connection and reads until the gateway closes it.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("the gateway answers and closes");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(addr: SocketAddr, host: &str, path: &str, extra: &str) -> (u16, String) {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
        let text = exchange(addr, raw.as_bytes()).await;
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn requests_are_proxied_with_forwarding_headers_over_kept_alive_connections() {
        let (backend, accepted) = echo_backend().await;
        let gw = gateway(table(Some(backend)), Limits::default()).await;
        let extra = "X-Forwarded-For: 203.0.113.7\r\nConnection: x-private\r\nX-Private: secret\r\n";
        let (status, body) = get(gw.addr, "Shop.Example:8080", "/cart?id=1", extra).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            "path=/cart?id=1 host=Shop.Example:8080 xff=203.0.113.7, 127.0.0.1 xfh=Shop.Example:8080 xfp=http connection=-\n"
        );
        for _ in 0..5 {
            assert_eq!(get(gw.addr, "shop.example", "/", "").await.0, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection to the endpoint serves them all");
        assert_eq!(gw.counts.count("shop", Outcome::Proxied), 6);
    }

    /// Stopping the gateway answers the request under way and one that had only just arrived,
    /// closes the idle keep-alive connections, and yields the listener still open: a client
    /// connecting afterwards waits in its backlog for whoever serves it next.
    #[tokio::test]
    async fn a_stopped_gateway_finishes_its_requests_and_yields_its_listener_open() {
        // An endpoint that answers 300 ms late.
        let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slow_addr = slow.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = slow.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(|_req: Request<Incoming>| async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"late\n"))))
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(table(Some(slow_addr)));
        let task = spawn(listener, rx, Handlers::default(), GatewayCounts::default(), Limits::default());
        // An idle keep-alive connection, a request under way, and one sent as the stop comes.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 404");
        let under_way = tokio::spawn(get(addr, "shop.example", "/", ""));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut late = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(tx);
        late.write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, late.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("late\n"), "{answer}");
        assert_eq!(under_way.await.unwrap(), (200, "late\n".to_string()));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, idle.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the idle keep-alive connection is closed by the drain");
        let kept = tokio::time::timeout(WAIT, task).await.unwrap().unwrap().expect("the listener, still open");
        assert_eq!(kept.local_addr().unwrap(), addr);
        // Still listening: a new client's connection completes and waits in the backlog.
        let queued = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.unwrap();
        assert!(queued.is_ok(), "{queued:?}");
    }

    #[tokio::test]
    async fn each_failure_gets_its_status_and_a_body_that_names_it() {
        // Nothing listens at `closed`; `silent` accepts and never answers.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let gw = gateway(table(Some(closed)), Limits::default()).await;
        let (status, body) = get(gw.addr, "shop.example", "/", "").await;
        assert_eq!(status, 502, "{body}");
        assert!(body.starts_with(&format!("cannot reach endpoint shop-0 of service shop at {closed}: ")), "{body}");
        assert_eq!(
            get(gw.addr, "nowhere.example", "/x", "").await,
            (404, "no route for host nowhere.example path /x\n".into())
        );
        let (status, body) = get(gw.addr, "down.example", "/", "").await;
        assert_eq!((status, body.as_str()), (503, "no ready endpoint for service nothing (route down)\n"));
        let gone = gateway(table(None), Limits::default()).await;
        assert_eq!(get(gone.addr, "shop.example", "/", "").await.0, 503, "a service with no endpoint");

        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let limits = Limits { upstream_timeout: Duration::from_millis(300), ..Limits::default() };
        let slow = gateway(table(Some(silent_addr)), limits).await;
        let (status, body) = get(slow.addr, "shop.example", "/", "").await;
        assert_eq!(status, 504, "{body}");
        assert_eq!(body, format!("endpoint shop-0 of service shop at {silent_addr} did not answer within 0.3s\n"));
        assert_eq!(slow.counts.count("shop", Outcome::TimedOut), 1);
        assert_eq!((gw.counts.count("shop", Outcome::Unreachable), gw.counts.count("", Outcome::NoRoute)), (1, 1));
    }

    #[tokio::test]
    async fn hostile_clients_are_bounded_and_the_gateway_keeps_serving() {
        let (backend, _) = echo_backend().await;
        let limits =
            Limits { max_connections: 2, header_read_timeout: Duration::from_millis(300), ..Limits::default() };
        let gw = gateway(table(Some(backend)), limits).await;
        // Garbage, an absurd header, a request line without a host: answers, not a crash.
        let text = exchange(gw.addr, b"\x00\x01\xffnot http at all\r\n\r\n").await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 400"), "{text:?}");
        let long = format!("GET / HTTP/1.1\r\nHost: shop.example\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20));
        let text = exchange(gw.addr, long.as_bytes()).await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{}", &text[..text.len().min(80)]);
        let text = exchange(gw.addr, b"GET /x HTTP/1.0\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.0 404") || text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(text.ends_with("no route for host (none) path /x\n"), "{text}");
        // A client that never finishes its request head is let go.
        let mut slow = TcpStream::connect(gw.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: shop").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the connection is closed after the header read timeout");
        // Over the limit: two idle connections hold the slots, a third is refused at once.
        let held = [TcpStream::connect(gw.addr).await.unwrap(), TcpStream::connect(gw.addr).await.unwrap()];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = exchange(gw.addr, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n").await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(gw.counts.refused_count() >= 1);
        drop(held);
        // The idle ones time out, or are dropped: slots free again.
        let mut served = false;
        for _ in 0..50 {
            if get(gw.addr, "shop.example", "/", "").await.0 == 200 {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served, "the gateway serves again once connections are gone");
    }

    #[test]
    fn the_over_limit_answer_is_well_formed() {
        let text = std::str::from_utf8(OVER_LIMIT).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(length, body.len());
    }
}
