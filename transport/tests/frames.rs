//! Frames over real QUIC streams, including hostile and broken input.
//!
//! This binary counts heap allocations so it can prove an oversized length prefix is refused
//! before a body buffer is allocated.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Hub, STEP, connect_ok};
use flotilla_transport::ALPN_AGENT;
use flotilla_transport::frame::{self, FrameError};
use proto::codec::{CodecError, MAX_FRAME, MAX_UNAUTHENTICATED_FRAME};
use serde::{Deserialize, Serialize};

/// The largest single allocation seen since the last reset.
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The largest single allocation on this thread since the last reset (a current-thread
    /// runtime runs a test's reads on its own thread, so other tests do not add noise).
    static LARGEST_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note(size: usize) {
    LARGEST_ALLOC.fetch_max(size, Ordering::Relaxed);
    let _ = LARGEST_HERE.try_with(|l| l.set(l.get().max(size)));
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Msg {
    id: u32,
    text: String,
    tags: Vec<String>,
}

/// A connected stream pair: client send side, server receive side.
async fn stream_pair(hub: &Hub) -> (quinn::Connection, quinn::SendStream, quinn::Connection, quinn::RecvStream) {
    let (client, server) = connect_ok(hub, hub.mtls("node:frames", ALPN_AGENT)).await;
    // An authenticated agent's connection, widened as the hub widens it.
    flotilla_transport::limits::open_for(&server, flotilla_transport::limits::Session::Agent);
    let (mut send, _) = client.open_bi().await.unwrap();
    // The server only learns of a stream once data arrives: send a valid first frame.
    frame::write(&mut send, &"hello".to_string()).await.unwrap();
    let (_, mut recv) = tokio::time::timeout(STEP, server.accept_bi()).await.unwrap().unwrap();
    let first: Option<String> = frame::read(&mut recv).await.unwrap();
    assert_eq!(first.as_deref(), Some("hello"));
    (client, send, server, recv)
}

#[tokio::test]
async fn frames_round_trip_and_clean_end_is_none() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    let msgs = vec![
        Msg { id: 1, text: "one".into(), tags: vec![] },
        Msg { id: 2, text: "two \u{1f680}".into(), tags: vec!["a".into(), "b".into()] },
        Msg { id: 3, text: "x".repeat(200_000), tags: vec![] },
    ];
    for m in &msgs {
        frame::write(&mut send, m).await.unwrap();
    }
    send.finish().unwrap();
    for m in &msgs {
        let got: Msg = tokio::time::timeout(STEP, frame::read(&mut recv)).await.unwrap().unwrap().unwrap();
        assert_eq!(&got, m);
    }
    let end: Option<Msg> = tokio::time::timeout(STEP, frame::read(&mut recv)).await.unwrap().unwrap();
    assert!(end.is_none(), "clean end of stream reads as None");
}

#[tokio::test]
async fn oversized_length_is_refused_without_allocating_or_waiting_for_the_body() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    // Announce a 4 GiB body and send nothing more; keep the stream open.
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    LARGEST_ALLOC.store(0, Ordering::SeqCst);
    let result = tokio::time::timeout(STEP, frame::read::<Msg>(&mut recv))
        .await
        .expect("read must fail on the header, not wait for the body");
    let largest = LARGEST_ALLOC.load(Ordering::SeqCst);
    match result {
        Err(FrameError::Codec(CodecError::TooLarge { len, limit })) => {
            assert_eq!((len, limit), (u32::MAX as usize, MAX_FRAME))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(largest < MAX_FRAME, "an allocation of {largest} bytes happened while refusing the frame");

    // Just over the limit is refused too.
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    send.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).await.unwrap();
    let err = tokio::time::timeout(STEP, frame::read::<Msg>(&mut recv)).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[tokio::test]
async fn truncated_body_is_an_error() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(b"{\"id\":1,").await.unwrap();
    send.finish().unwrap();
    let err = tokio::time::timeout(STEP, frame::read::<Msg>(&mut recv)).await.unwrap().unwrap_err();
    match err {
        FrameError::Truncated { part: "body", got: 8, expected: 100 } => {}
        other => panic!("expected a truncated body, got {other:?}"),
    }
}

#[tokio::test]
async fn truncated_header_is_an_error() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    send.write_all(&[0, 0]).await.unwrap();
    send.finish().unwrap();
    let err = tokio::time::timeout(STEP, frame::read::<Msg>(&mut recv)).await.unwrap().unwrap_err();
    assert!(matches!(err, FrameError::Truncated { part: "header", got: 2, expected: 4 }), "{err:?}");
    assert!(err.to_string().contains("stream ended inside a frame"), "{err}");
}

#[tokio::test]
async fn malformed_json_is_an_error() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    send.write_all(&5u32.to_be_bytes()).await.unwrap();
    send.write_all(b"nope!").await.unwrap();
    send.finish().unwrap();
    let err = tokio::time::timeout(STEP, frame::read::<Msg>(&mut recv)).await.unwrap().unwrap_err();
    assert!(matches!(err, FrameError::Codec(CodecError::Malformed(_))), "{err:?}");
}

#[tokio::test]
async fn an_announced_body_is_not_allocated_before_it_arrives() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    // Announce the largest allowed body, send 100 KB of it, then stall.
    send.write_all(&(MAX_FRAME as u32).to_be_bytes()).await.unwrap();
    send.write_all(&vec![b' '; 100_000]).await.unwrap();
    LARGEST_HERE.with(|l| l.set(0));
    let stalled = tokio::time::timeout(std::time::Duration::from_millis(500), frame::read::<Msg>(&mut recv)).await;
    assert!(stalled.is_err(), "the read waits for the rest of the body");
    let largest = LARGEST_HERE.with(|l| l.get());
    assert!(largest < 1024 * 1024, "{largest} bytes allocated for 100 KB received of a 16 MiB frame");
}

#[tokio::test]
async fn a_smaller_limit_refuses_what_the_default_would_take() {
    let hub = Hub::start();
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    let big = Msg { id: 1, text: "x".repeat(MAX_UNAUTHENTICATED_FRAME), tags: vec![] };
    frame::write(&mut send, &big).await.unwrap();
    let err = tokio::time::timeout(STEP, frame::read_within::<Msg>(&mut recv, MAX_UNAUTHENTICATED_FRAME))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, FrameError::Codec(CodecError::TooLarge { limit: MAX_UNAUTHENTICATED_FRAME, .. })), "{err:?}");
    // A frame within the limit reads as usual.
    let (_c, mut send, _s, mut recv) = stream_pair(&hub).await;
    let small = Msg { id: 2, text: "y".repeat(1000), tags: vec![] };
    frame::write(&mut send, &small).await.unwrap();
    let got: Msg = frame::read_within(&mut recv, MAX_UNAUTHENTICATED_FRAME).await.unwrap().unwrap();
    assert_eq!(got, small);
}
