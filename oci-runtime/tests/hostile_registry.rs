//! A hostile registry: manifests of 512 MiB, declared or streamed without a length. A node
//! must refuse them having read no more than the 4 MiB a manifest may have, never hold the
//! whole body. The registry here is a few lines of HTTP over loopback, not a mock of a
//! component: no real registry serves such a manifest, which is the point.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_oci_runtime::{BlobStore, ImageError, ImageStore, Platform, Registry, RegistryConfig};

const HUGE: u64 = 512 << 20;
const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy)]
enum Body {
    /// `Content-Length: 512 MiB`, then zeros.
    Declared,
    /// `Transfer-Encoding: chunked`, 512 MiB of zeros in 64 KiB chunks.
    Chunked,
}

/// Serves `/v2/` (no auth) and, for any manifest, a 512 MiB body; counts what it wrote.
struct HostileRegistry {
    addr: String,
    sent: Arc<AtomicU64>,
}

impl HostileRegistry {
    fn start(body: Body) -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            // Bounded: a test makes a handful of connections.
            for conn in listener.incoming().take(16) {
                let Ok(conn) = conn else { return };
                let counter = counter.clone();
                std::thread::spawn(move || serve(conn, body, &counter));
            }
        });
        HostileRegistry { addr, sent }
    }
}

fn serve(conn: TcpStream, body: Body, sent: &AtomicU64) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(20)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
        if !path.contains("/manifests/") {
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            continue;
        }
        let media = "application/vnd.oci.image.manifest.v1+json";
        let zeros = vec![b' '; CHUNK];
        let head = match body {
            Body::Declared => format!("HTTP/1.1 200 OK\r\nContent-Type: {media}\r\nContent-Length: {HUGE}\r\n\r\n"),
            Body::Chunked => format!("HTTP/1.1 200 OK\r\nContent-Type: {media}\r\nTransfer-Encoding: chunked\r\n\r\n"),
        };
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut written = 0u64;
        while written < HUGE {
            let ok = match body {
                Body::Declared => out.write_all(&zeros).is_ok(),
                Body::Chunked => {
                    out.write_all(format!("{CHUNK:x}\r\n").as_bytes()).is_ok()
                        && out.write_all(&zeros).is_ok()
                        && out.write_all(b"\r\n").is_ok()
                }
            };
            if !ok {
                return;
            }
            written += CHUNK as u64;
            sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
        return;
    }
}

async fn refused(body: Body, wasm: bool) {
    let hostile = HostileRegistry::start(body);
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let registry = Registry::new(RegistryConfig::default());
    let reference = format!("{}/evil/app:v1", hostile.addr);
    let started = Instant::now();
    let err = if wasm {
        store.pull_wasm(&registry, &reference).await.map(|_| ()).unwrap_err()
    } else {
        store.pull(&registry, &reference, &Platform::new("linux", "amd64", None)).await.map(|_| ()).unwrap_err()
    };
    let took = started.elapsed();
    assert!(matches!(err, ImageError::BadImage { .. }), "{err:?}");
    assert!(err.to_string().contains("limit"), "{err}");
    // Give the server a moment to notice the closed connection, then look at what it got out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = hostile.sent.load(Ordering::SeqCst);
    // What the client read is at most the 4 MiB limit plus a chunk; what the server wrote on
    // top of that sat in the two sockets' buffers. Reading the whole body would be 512 MiB.
    assert!(sent < 24 << 20, "the server wrote {} MiB before the client gave up", sent >> 20);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(store.images().unwrap().is_empty(), "nothing recorded");
}

#[tokio::test]
async fn a_declared_512_mib_manifest_is_refused_unread() {
    refused(Body::Declared, true).await;
}

#[tokio::test]
async fn a_streamed_512_mib_manifest_is_abandoned_at_the_limit() {
    refused(Body::Chunked, true).await;
}

#[tokio::test]
async fn a_container_image_pull_has_the_same_bound() {
    refused(Body::Chunked, false).await;
}
