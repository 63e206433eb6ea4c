//! End-to-end tests of the node's HTTP gateway (`agent --gateway-port`, `kind: Route`): a real
//! hub, and an agent in its own network namespace running a busybox httpd container and the
//! `hello-http` Wasm component, with requests sent from outside the namespace to the
//! gateway's port, as a client on the site's LAN would. They need root, cgroup controllers,
//! iproute2, the registry and the examples (`scripts/test.sh` builds them); without them they
//! say why and skip, unless `CI` is set.

#[path = "../oci-runtime/tests/support/busybox_image.rs"]
mod busybox_image;
#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/containers.rs"]
mod containers;
#[path = "support/janitor.rs"]
mod janitor;
#[path = "support/netns.rs"]
mod netns;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::Cluster;
use containers::push_busybox;
use janitor::Janitor;
use proto::messages::Phase;
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(90);
/// The gateway's port inside the agent's namespace (its own, so no other test holds it).
const GATEWAY_PORT: u16 = 8480;
const METRICS_PORT: u16 = 9464;

fn containers_possible() -> bool {
    containers::containers_possible("gateway")
}

fn apply(c: &Cluster, doc: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn running(c: &Cluster, name: &str) -> bool {
    c.replicas().iter().any(|r| r.name == name && r.status.phase == Phase::Running && r.status.ready)
}

/// One HTTP/1.1 request on a new connection; (status, body), or `None` if the connection
/// failed. `extra` holds further header lines, each ending in CRLF.
fn request(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(40))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let resp = String::from_utf8_lossy(&resp);
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Some((status, if chunked { dechunk(body)? } else { body.to_string() }))
}

/// A chunked body's content (a backend that sends no length, such as a CGI script's output,
/// reaches the client in chunks).
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The value of one series in the agent's metrics.
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, text) = request(addr, "metrics", "/metrics", "")?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An httpd with a page and a CGI script that prints the `X-Forwarded-For` it was sent.
const HTTPD: &str = r#"mkdir -p /tmp/www/cgi-bin && echo ok > /tmp/www/index.html && printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\nxff=%%s\\n" "$HTTP_X_FORWARDED_FOR"\n' > /tmp/www/cgi-bin/xff && chmod +x /tmp/www/cgi-bin/xff && exec httpd -f -p 8080 -h /tmp/www"#;

fn example(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    assert!(p.exists(), "{} is missing: build the examples first (scripts/test.sh does)", p.display());
    p
}

/// The gateway of a node serves a Wasm HTTP component of the node in-process and a container
/// service through a proxy, each by host name, passing the client's address on in
/// `X-Forwarded-For`; a route whose service has no ready endpoint answers 503 naming the
/// service, and a host no route takes answers 404.
#[test]
fn the_gateway_serves_a_wasm_component_and_a_container_by_host_name_and_says_why_when_it_cannot() {
    let Some(reg) = TestRegistry::start() else { return };
    if !containers_possible() || !netns::netns_possible() {
        return;
    }
    let ns = netns::Netns::create();
    let fwd = netns::TcpForward::start(ns.host_ip(), reg.addr.parse().unwrap());
    let port = cluster::free_udp_port();
    let mut c = Cluster::start_listening(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    let _janitor = Janitor::new(c.dir.path(), &["gw-1"]);
    let (registry, hub) = (fwd.addr.to_string(), format!("{}:{port}", ns.host_ip()));
    let (gateway_port, metrics_listen) = (GATEWAY_PORT.to_string(), format!("0.0.0.0:{METRICS_PORT}"));
    c.add_agent_via(
        &ns.exec_prefix(),
        &hub,
        "gw-1",
        &[
            "--containers",
            "on",
            "--insecure-registry",
            &registry,
            "--gateway-port",
            &gateway_port,
            "--metrics-listen",
            &metrics_listen,
        ],
    );
    let shop = push_busybox(&reg, c.dir.path(), "busybox:gateway", &["sh", "-c", HTTPD]);
    let shop = shop.replacen(&reg.addr, &registry, 1);
    let wasm = example("examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm");
    let hello = reg.reference("hello-http:gateway");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), hello.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    let hello = hello.replacen(&reg.addr, &registry, 1);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(
        &c,
        &format!(
            "apiVersion: flotilla.dev/v1
kind: Workload
metadata: {{name: shop, labels: {{app: shop}}}}
spec:
  runtime: container
  image: {shop}
  ports: [{{name: http, containerPort: 8080}}]
  readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, period: 500ms}}
---
apiVersion: flotilla.dev/v1
kind: Service
metadata: {{name: shop}}
spec: {{selector: {{app: shop}}, ports: [{{port: 80, targetPort: http}}]}}
---
apiVersion: flotilla.dev/v1
kind: Route
metadata: {{name: shop}}
spec: {{host: shop.example, service: shop}}
---
apiVersion: flotilla.dev/v1
kind: Workload
metadata: {{name: hello, labels: {{app: hello}}}}
spec:
  runtime: wasm
  image: {hello}
  http: {{port: 8081}}
  env: {{GREETING: from-the-gateway}}
---
apiVersion: flotilla.dev/v1
kind: Service
metadata: {{name: hello}}
spec: {{selector: {{app: hello}}, ports: [{{port: 80}}]}}
---
apiVersion: flotilla.dev/v1
kind: Route
metadata: {{name: hello}}
spec: {{host: hello.example, service: hello}}
---
apiVersion: flotilla.dev/v1
kind: Service
metadata: {{name: nothing}}
spec: {{selector: {{app: nothing}}, ports: [{{port: 80}}]}}
---
apiVersion: flotilla.dev/v1
kind: Route
metadata: {{name: down}}
spec: {{host: down.example, pathPrefix: /, service: nothing}}
"
        ),
    );
    let routes = c.ok(&["get", "routes"]);
    assert!(routes.contains("shop.example") && routes.contains("down.example"), "{routes}");
    c.wait_for("shop-0 and hello-0 running and ready", WAIT, || running(&c, "shop-0") && running(&c, "hello-0"));

    let gateway = SocketAddr::from((ns.agent_ip(), GATEWAY_PORT));
    c.wait_for("the gateway serves shop.example", WAIT, || {
        request(gateway, "Shop.Example:8480", "/index.html", "").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(request(gateway, "shop.example", "/index.html", ""), Some((200, "ok\n".to_string())));
    // The client's address (the host side of the namespace's link) is appended to the list.
    let xff = request(gateway, "shop.example", "/cgi-bin/xff", "X-Forwarded-For: 203.0.113.7\r\n");
    assert_eq!(xff, Some((200, format!("xff=203.0.113.7, {}\n", ns.host_ip()))));

    // The Wasm component, by its own handler in the agent: no proxy hop.
    c.wait_for("the gateway serves hello.example", WAIT, || {
        request(gateway, "hello.example", "/", "").is_some_and(|(s, _)| s == 200)
    });
    let hello = request(gateway, "HELLO.example", "/", "");
    assert_eq!(hello, Some((200, "hello from flotilla over wasi:http\n".to_string())));
    let env = request(gateway, "hello.example", "/env/GREETING", "");
    assert_eq!(env, Some((200, "from-the-gateway".to_string())));

    let (status, body) = request(gateway, "down.example", "/", "").expect("an answer");
    assert_eq!((status, body.as_str()), (503, "no ready endpoint for service nothing (route down)\n"));
    let (status, body) = request(gateway, "nowhere.example", "/a/b", "").expect("an answer");
    assert_eq!((status, body.as_str()), (404, "no route for host nowhere.example path /a/b\n"));

    let metrics = SocketAddr::from((ns.agent_ip(), METRICS_PORT));
    let proxied = metric(metrics, "flotilla_agent_gateway_requests_total{route=\"shop\",outcome=\"proxied\"}");
    assert!(proxied.is_some_and(|n| n >= 2.0), "{proxied:?}");
    let in_process = metric(metrics, "flotilla_agent_gateway_requests_total{route=\"hello\",outcome=\"in_process\"}");
    assert!(in_process.is_some_and(|n| n >= 3.0), "{in_process:?}");
    let hop = metric(metrics, "flotilla_agent_gateway_requests_total{route=\"hello\",outcome=\"proxied\"}");
    assert_eq!(hop, None, "no request for the component went through a socket");
    let refused = metric(metrics, "flotilla_agent_gateway_requests_total{route=\"down\",outcome=\"no_endpoint\"}");
    assert_eq!(refused, Some(1.0));

    // The route goes away with its deletion; the service's last replica, with its workload.
    c.ok(&["delete", "workload", "shop"]);
    c.wait_for("shop.example has no endpoint", WAIT, || {
        request(gateway, "shop.example", "/", "").is_some_and(|(s, b)| s == 503 && b.contains("service shop"))
    });
    c.ok(&["delete", "route", "shop"]);
    c.wait_for("shop.example has no route", WAIT, || {
        request(gateway, "shop.example", "/", "").is_some_and(|(s, _)| s == 404)
    });
}
