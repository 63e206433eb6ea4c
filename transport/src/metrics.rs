//! The `/metrics` endpoint of hubs and agents: plain HTTP/1.1 (hyper) on an address the
//! operator chose (`--metrics-listen`), answering `GET /metrics` with what `render` makes
//! (OpenMetrics text) and 404 to anything else. It is meant for a Prometheus on the same
//! network, not for the internet: it serves at most [`MAX_CONNECTIONS`] connections at once,
//! each for at most [`CONNECTION_TIME`], and reads nothing but request heads.
//!
//! [`LinkTraffic`] is the pure part of the hub's and agents' link byte counters: quinn counts
//! each connection's bytes from zero, a counter per link must add its sessions up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one connection may last (a scrape takes milliseconds).
pub const CONNECTION_TIME: Duration = Duration::from_secs(30);

/// The OpenMetrics text format's content type (what `prometheus_client::encoding::text`
/// writes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Makes the exposition text at each scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(req, &render).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIME, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => debug!(%peer, "metrics connection closed after its time"),
                Ok(Ok(())) => {}
            }
        });
    }
}

async fn answer(req: Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "only GET /metrics is served here\n".into(), "text/plain");
    }
    text(StatusCode::OK, render().await, CONTENT_TYPE)
}

/// Bytes one QUIC connection carried so far (UDP payloads, as quinn counts them: handshakes,
/// retransmissions and acknowledgements included, which is what the link costs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

impl Traffic {
    /// The connection's id (unique while it lives) and its totals so far.
    pub fn of(conn: &quinn::Connection) -> (usize, Traffic) {
        let stats = conn.stats();
        (conn.stable_id(), Traffic { sent: stats.udp_tx.bytes, received: stats.udp_rx.bytes })
    }

    fn since(self, before: Traffic) -> Traffic {
        // Saturating: quinn's totals only grow, but a miscount must not show as 16 EiB.
        Traffic { sent: self.sent.saturating_sub(before.sent), received: self.received.saturating_sub(before.received) }
    }
}

/// Turns the byte totals of connections (each counted from zero by quinn) into how much a
/// link's counters grow, so a counter per link (a node, the hub) adds up its sessions one
/// after the other. Sans-IO: the caller reads [`Traffic::of`] and feeds the totals in.
///
/// [`LinkTraffic::tally`] takes the live connections' totals; [`LinkTraffic::end`] counts the
/// last bytes of a connection that closed and forgets it. A connection that leaves the live
/// set is remembered for one more tally, so an `end` called just after it left (the session
/// is unlisted first, then ended) still counts only what is new. One that is never ended is
/// forgotten at the tally after that, so the state never outgrows the connections alive.
///
/// Callers take the live set and tally it under one lock, and end a connection only after
/// it left the live set: then no byte counts twice.
#[derive(Debug)]
pub struct LinkTraffic<K> {
    last: HashMap<(K, usize), Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    total: Traffic,
    /// Missing from the last tally.
    gone: bool,
}

impl<K> Default for LinkTraffic<K> {
    fn default() -> Self {
        LinkTraffic { last: HashMap::new() }
    }
}

impl<K: Eq + Hash + Clone> LinkTraffic<K> {
    /// The totals so far of every live connection (`key`, connection id, totals): by how much
    /// each key's counters grow.
    pub fn tally(&mut self, live: impl IntoIterator<Item = (K, usize, Traffic)>) -> HashMap<K, Traffic> {
        let mut grown: HashMap<K, Traffic> = HashMap::new();
        let mut now = HashMap::new();
        for (key, id, total) in live {
            let before = self.last.remove(&(key.clone(), id)).map(|s| s.total).unwrap_or_default();
            let add = total.since(before);
            let sum = grown.entry(key.clone()).or_default();
            sum.sent += add.sent;
            sum.received += add.received;
            now.insert((key, id), Seen { total: total.max_each(before), gone: false });
        }
        // Left since the last tally: kept once, for its `end`.
        now.extend(self.last.drain().filter(|(_, s)| !s.gone).map(|(k, s)| (k, Seen { gone: true, ..s })));
        self.last = now;
        grown
    }

    /// The final totals of a connection that closed: by how much its key's counters grow.
    pub fn end(&mut self, key: K, id: usize, total: Traffic) -> Traffic {
        let before = self.last.remove(&(key, id)).map(|s| s.total).unwrap_or_default();
        total.since(before)
    }
}

impl Traffic {
    /// What was counted already stays counted if a total ever went down.
    fn max_each(self, other: Traffic) -> Traffic {
        Traffic { sent: self.sent.max(other.sent), received: self.received.max(other.received) }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { "flotilla_up 1\n# EOF\n".to_string() }));
        let server = tokio::spawn(serve(listener, render));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text") && ok.ends_with("flotilla_up 1\n# EOF\n"), "{ok}");
        let other = get(addr, "GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post =
            get(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        let garbage = get(addr, "\x00\x01 not http\r\n\r\n").await;
        assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        server.abort();
    }

    #[test]
    fn link_traffic_adds_up_sessions_and_forgets_closed_ones() {
        let t = |sent, received| Traffic { sent, received };
        let mut links = LinkTraffic::default();
        // First sight of a connection: all its bytes so far.
        let grown = links.tally([("n1", 1, t(100, 50)), ("n2", 7, t(10, 20))]);
        assert_eq!(grown, HashMap::from([("n1", t(100, 50)), ("n2", t(10, 20))]));
        // Then only the difference.
        assert_eq!(links.tally([("n1", 1, t(130, 60)), ("n2", 7, t(10, 20))])["n1"], t(30, 10));
        // n1's session ends: its last bytes count once; a new session counts from zero and
        // adds to the same key.
        assert_eq!(links.end("n1", 1, t(150, 70)), t(20, 10));
        assert_eq!(links.end("n1", 1, t(150, 70)), t(150, 70), "an ended connection is forgotten");
        let grown = links.tally([("n1", 2, t(5, 5)), ("n2", 7, t(10, 20))]);
        assert_eq!(grown, HashMap::from([("n1", t(5, 5)), ("n2", t(0, 0))]));
        // Two connections of one key at once (a new session before the old one is ended).
        let grown = links.tally([("n1", 2, t(8, 9)), ("n1", 3, t(1, 1)), ("n2", 7, t(11, 20))]);
        assert_eq!(grown["n1"], t(4, 5));
        // n2's session is unlisted, a tally runs, then it is ended: only the new bytes count.
        assert!(!links.tally([("n1", 2, t(8, 9))]).contains_key("n2"));
        assert_eq!(links.end("n2", 7, t(15, 21)), t(4, 1));
        // A connection never ended is forgotten at the second tally without it.
        links.tally([("n1", 2, t(8, 9))]);
        links.tally([("n1", 2, t(8, 9))]);
        assert_eq!(links.last.len(), 1, "only live connections are remembered: {:?}", links.last);
        // A total that went down adds nothing and does not count twice afterwards.
        assert_eq!(links.tally([("n1", 2, t(6, 9))])["n1"], t(0, 0));
        assert_eq!(links.tally([("n1", 2, t(9, 9))])["n1"], t(1, 0));
    }
}
