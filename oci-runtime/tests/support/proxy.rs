//! A loopback HTTP proxy in front of a test registry, to see and disturb blob downloads: it
//! asks for `Connection: close`, records every `Range` header, counts the downloads (GETs)
//! of one blob, can cut the first of them after a number of bytes (an interrupted pull) and
//! can hold each of them back for a while (so concurrent pulls overlap).
//!
//! Self-contained (std only) so other test crates can include it with `#[path]`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running proxy; its listener thread lives as long as the test process.
pub struct CuttingProxy {
    /// `127.0.0.1:PORT`: use it as the registry host of references.
    pub addr: String,
    /// Whether any request carried a `Range` header.
    pub saw_range: Arc<AtomicBool>,
    /// GETs of the watched blob so far.
    pub blob_requests: Arc<AtomicUsize>,
    /// Every `Range` header seen, in order.
    pub ranges: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct Plan {
    upstream: String,
    digest: String,
    cut_first_after: Option<usize>,
    delay: Duration,
}

impl CuttingProxy {
    /// A proxy to `upstream` that forwards only `cut_after` bytes of the first download of
    /// the blob `cut_digest` before closing the connection.
    pub fn start(upstream: String, cut_digest: String, cut_after: usize) -> CuttingProxy {
        Self::start_with(upstream, cut_digest, Some(cut_after), Duration::ZERO)
    }

    /// A proxy to `upstream` that counts the downloads of `digest`, holds each back for
    /// `delay` before forwarding it, and cuts the first after `cut_first_after` bytes if set.
    pub fn start_with(
        upstream: String,
        digest: String,
        cut_first_after: Option<usize>,
        delay: Duration,
    ) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy = CuttingProxy {
            addr,
            saw_range: Arc::new(AtomicBool::new(false)),
            blob_requests: Arc::new(AtomicUsize::new(0)),
            ranges: Arc::new(Mutex::new(Vec::new())),
        };
        let plan = Plan { upstream, digest, cut_first_after, delay };
        let (sr, br, rs) = (proxy.saw_range.clone(), proxy.blob_requests.clone(), proxy.ranges.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { break };
                let (plan, sr, br, rs) = (plan.clone(), sr.clone(), br.clone(), rs.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(client, &plan, &sr, &br, &rs);
                });
            }
        });
        proxy
    }
}

fn proxy_one(
    mut client: TcpStream,
    plan: &Plan,
    saw_range: &AtomicBool,
    blob_requests: &AtomicUsize,
    ranges: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    lines.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
    for l in &lines {
        if l.to_ascii_lowercase().starts_with("range:") {
            saw_range.store(true, Ordering::SeqCst);
            ranges.lock().unwrap().push(l.to_string());
        }
    }
    let watched = lines[0].starts_with("GET ") && lines[0].contains(&format!("/blobs/{}", plan.digest));
    let first = watched && blob_requests.fetch_add(1, Ordering::SeqCst) == 0;
    let cut = if first { plan.cut_first_after } else { None };
    if watched {
        std::thread::sleep(plan.delay);
    }
    let request = format!("{}\r\nConnection: close\r\n\r\n", lines.join("\r\n"));
    let mut up = TcpStream::connect(&plan.upstream)?;
    up.write_all(request.as_bytes())?;
    let mut forwarded = 0usize;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let n = match cut {
            Some(limit) => n.min(limit - forwarded),
            None => n,
        };
        client.write_all(&buf[..n])?;
        forwarded += n;
        if cut.is_some_and(|limit| forwarded >= limit) {
            break;
        }
    }
    client.shutdown(std::net::Shutdown::Both)
}
