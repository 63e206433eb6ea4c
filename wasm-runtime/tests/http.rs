//! Serving `wasi:http/proxy` components built from `tests/guests` (see `common::guest`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Capture, Client, get, load_guest, shared_host};
use flotilla_wasm_runtime::{Error, GuestUsage, HttpOptions, Limits, Program, WasmHost};
use hyper::StatusCode;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    addr: SocketAddr,
    stderr: Arc<Capture>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Requests shutdown and waits (bounded) for `run` to return.
    async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.server)
            .await
            .expect("server did not shut down")
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

fn options(configure: impl FnOnce(&mut HttpOptions)) -> (HttpOptions, Arc<Capture>) {
    let out = Arc::new(Capture::default());
    let err = Arc::new(Capture::default());
    let mut opts = HttpOptions::new("127.0.0.1:0".parse().unwrap(), out, err.clone());
    configure(&mut opts);
    (opts, err)
}

async fn serve(host: &WasmHost, program: &Program, configure: impl FnOnce(&mut HttpOptions)) -> Running {
    let (opts, stderr) = options(configure);
    let server = host.serve_http(program, opts).await.unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running { addr, stderr, stop: Some(stop), server }
}

#[tokio::test]
async fn hello_component_answers_get() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_hello");
    let running = serve(&host, &program, |o| o.env = vec![("GREETING".into(), "hi there".into())]).await;

    let (status, body) = get(running.addr, "/greet?x=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from wasm: GET /greet?x=1\nhi there\n");

    // Keep-alive: several requests on one connection, each with a fresh instance.
    let mut client = Client::connect(running.addr).await;
    for i in 0..5 {
        let (status, body) = client.get(&format!("/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("hello from wasm: GET /{i}\nhi there\n"));
    }
    assert_eq!(running.stderr.text(), "");
    running.shutdown().await;
}

#[tokio::test]
async fn fifty_concurrent_requests_with_max_concurrency_4() {
    let dir = tempfile::tempdir().unwrap();
    // A pool of exactly 4 instances: if the server ever ran a 5th instance concurrently, its
    // instantiation would fail and the request would get a 500.
    let host = common::pooled_host(dir.path(), 4);
    let program = load_guest(&host, "guest_http_hello");
    let running = serve(&host, &program, |o| o.max_concurrency = 4).await;

    let requests: Vec<_> = (0..50)
        .map(|i| {
            let addr = running.addr;
            tokio::spawn(async move { get(addr, &format!("/req/{i}")).await })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), request).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert_eq!(body, format!("hello from wasm: GET /req/{i}\n"));
    }
    assert_eq!(running.stderr.text(), "");
    running.shutdown().await;
}

#[tokio::test]
async fn spinning_handler_hits_cpu_limit_while_others_are_served() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let running = serve(&host, &program, |o| {
        o.max_concurrency = 4;
        o.limits = Limits { cpu_time: Some(Duration::from_millis(500)), ..Limits::default() };
    })
    .await;

    let started = Instant::now();
    let addr = running.addr;
    let spin = tokio::spawn(async move { get(addr, "/spin").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Other requests are answered promptly while the spinner burns its budget.
    let mut client = Client::connect(running.addr).await;
    for _ in 0..5 {
        let one = Instant::now();
        let (status, body) = client.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
        assert!(one.elapsed() < Duration::from_secs(2), "request took {:?}", one.elapsed());
    }
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), spin).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let stderr = running.stderr.text();
    assert!(stderr.contains("wasi:http request GET /spin failed: cpu time limit of 500ms exceeded"), "{stderr}");

    // Still serving afterwards.
    assert_eq!(get(running.addr, "/").await, (StatusCode::OK, "ok\n".to_string()));
    running.shutdown().await;
}

#[tokio::test]
async fn trapping_handler_yields_500_and_server_keeps_serving() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let running = serve(&host, &program, |o| {
        o.limits = Limits { memory_bytes: Some(32 << 20), ..Limits::default() };
    })
    .await;

    let mut client = Client::connect(running.addr).await;
    let (status, body) = client.get("/trap").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, "internal server error\n");
    assert!(
        running.stderr.text().contains("GET /trap failed: wasm trap: wasm `unreachable` instruction executed"),
        "{}",
        running.stderr.text()
    );
    // The same keep-alive connection still works.
    assert_eq!(client.get("/").await, (StatusCode::OK, "ok\n".to_string()));

    let (status, _) = client.get("/noresponse").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        running.stderr.text().contains("GET /noresponse failed: handler returned without setting a response"),
        "{}",
        running.stderr.text()
    );

    let (status, _) = client.get("/grow").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(running.stderr.text().contains("GET /grow failed: memory limit exceeded"), "{}", running.stderr.text());

    for _ in 0..3 {
        assert_eq!(get(running.addr, "/").await, (StatusCode::OK, "ok\n".to_string()));
    }
    running.shutdown().await;
}

#[tokio::test]
async fn full_queue_answers_503() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let running = serve(&host, &program, |o| {
        o.max_concurrency = 1;
        o.max_queued = 1;
        // Generous: epoch ticks are wall-clock ticks observed while wasm runs, so a loaded test
        // machine charges the spinner faster than real CPU time.
        o.limits = Limits { cpu_time: Some(Duration::from_secs(3)), ..Limits::default() };
    })
    .await;
    let addr = running.addr;
    let busy = tokio::spawn(async move { get(addr, "/spin").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = get(addr, "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "service unavailable\n"));
    assert_eq!(busy.await.unwrap().0, StatusCode::INTERNAL_SERVER_ERROR);
    // The queued request ran once the spinner was stopped.
    assert_eq!(queued.await.unwrap(), (StatusCode::OK, "ok\n".to_string()));
    running.shutdown().await;
}

#[tokio::test]
async fn request_timeout_yields_500() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let running = serve(&host, &program, |o| o.request_timeout = Some(Duration::from_millis(200))).await;
    let started = Instant::now();
    let (status, _) = get(running.addr, "/sleep").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    assert!(
        running.stderr.text().contains("GET /sleep failed: request timeout of 200ms exceeded"),
        "{}",
        running.stderr.text()
    );
    running.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let running = serve(&host, &program, |_| {}).await;
    let addr = running.addr;

    // An idle keep-alive connection must not hold up shutdown.
    let mut idle = Client::connect(addr).await;
    assert_eq!(idle.get("/").await.0, StatusCode::OK);

    let sleeping = tokio::spawn(async move { get(addr, "/sleep").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = running.shutdown().await;
    // The in-flight request (1 s of sleep) completed normally before `run` returned.
    assert_eq!(sleeping.await.unwrap(), (StatusCode::OK, "slept\n".to_string()));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(idle.try_get("/").await.is_err());
}

#[tokio::test]
async fn shutdown_grace_period_is_bounded() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    // No CPU limit: the spinner would run forever.
    let running = serve(&host, &program, |o| o.shutdown_grace = Duration::from_millis(300)).await;
    let addr = running.addr;
    let spin = tokio::spawn(async move { Client::connect(addr).await.try_get("/spin").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = running.shutdown().await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The spinning request was cancelled: the client sees the connection close.
    let result = tokio::time::timeout(Duration::from_secs(5), spin).await.unwrap().unwrap();
    assert!(result.is_err() || result.unwrap().0 == StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_hello");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (mut opts, _) = options(|_| {});
    opts.addr = addr;
    let err = host.serve_http(&program, opts).await.unwrap_err();
    assert!(matches!(err, Error::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn dropping_the_server_closes_the_listener() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_hello");
    let (opts, _) = options(|_| {});
    let server = host.serve_http(&program, opts).await.unwrap();
    let addr = server.local_addr();
    drop(server);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_handed_off_listener_queues_connections_for_the_next_server() {
    use flotilla_wasm_runtime::Shutdown;
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let (opts, _) = options(|_| {});
    let server = host.serve_http(&program, opts).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let first = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
        Shutdown::HandOff
    }));
    // A request in flight when the hand-off starts completes on the old server.
    let sleeping = tokio::spawn(async move { get(addr, "/sleep").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    let listener = tokio::time::timeout(Duration::from_secs(30), first).await.unwrap().unwrap().unwrap();
    let listener = listener.expect("the listener is handed back");
    assert_eq!(sleeping.await.unwrap(), (StatusCode::OK, "slept\n".to_string()));

    // Nobody accepts now, yet a client connects (into the backlog) and is answered once a
    // new server takes the listener over.
    let waiting = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let running = serve(&host, &program, |o| {
        o.addr = addr;
        o.listener = Some(listener);
    })
    .await;
    assert_eq!(running.addr, addr);
    assert_eq!(waiting.await.unwrap().0, StatusCode::OK);
    running.shutdown().await;
    // A listener for another address is refused by name.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut opts, _) = options(|_| {});
    opts.addr = addr;
    opts.listener = Some(other);
    let err = host.serve_http(&program, opts).await.unwrap_err();
    assert!(err.to_string().contains("not 127.0.0.1"), "{err}");
}

// Two workers: on one thread, a guest that yields every epoch tick keeps the run queue busy,
// and tokio looks at its timers only every few dozen polls, so the checks below would run late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_each_handlers_cpu_and_the_memory_of_live_instances_only() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_misbehave");
    let usage = GuestUsage::new();
    let running = serve(&host, &program, |o| {
        o.limits = Limits { cpu_time: Some(Duration::from_millis(500)), ..Limits::default() };
        o.usage = Some(usage.clone());
    })
    .await;
    assert_eq!(usage.memory_bytes(), 0, "no request, no instance");

    let addr = running.addr;
    let started = Instant::now();
    let spin = tokio::spawn(async move { get(addr, "/spin").await });
    // While the spinner runs, its instance's linear memory is held.
    let deadline = Instant::now() + Duration::from_secs(5);
    while usage.memory_bytes() == 0 {
        assert!(Instant::now() < deadline, "the running handler's memory was never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(usage.memory_bytes() % flotilla_wasm_runtime::WASM_PAGE_SIZE, 0);
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), spin).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let wall = started.elapsed();
    // It spun until its 500 ms budget ran out. The budget counts epoch ticks while it runs,
    // wall time on its thread, so on a machine busy with other tests the guest got less CPU
    // than that; it cannot have had more than the request's wall time.
    let cpu = usage.cpu_time();
    assert!(cpu >= Duration::from_millis(100) && cpu <= wall, "{cpu:?} of CPU in {wall:?}");
    // Quick requests add a little; a finished request's instance holds nothing.
    assert_eq!(get(running.addr, "/").await, (StatusCode::OK, "ok\n".to_string()));
    assert!(usage.cpu_time() > cpu);
    let deadline = Instant::now() + Duration::from_secs(5);
    while usage.memory_bytes() != 0 {
        assert!(Instant::now() < deadline, "{} bytes still counted after the requests", usage.memory_bytes());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await;
}

/// A server's handler serves requests that came in on another socket (an in-process gateway)
/// as the server's own, and answers 503 once the server has shut down.
#[tokio::test]
async fn a_handler_serves_requests_in_process_until_its_server_stops() {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    let host = shared_host();
    let program = load_guest(&host, "guest_http_hello");
    let (opts, _stderr) = options(|o| o.env = vec![("GREETING".into(), "in process".into())]);
    let server = host.serve_http(&program, opts).await.unwrap();
    let handler = server.handler();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    // A front of our own: every request goes to the handler, none to the server's socket.
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let h = handler.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = front.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, std::convert::Infallible>(h.handle(req).await) }
                });
                let io = wasmtime_wasi_http::io::TokioIo::new(stream);
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    let (status, body) = get(addr, "/front").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from wasm: GET /front\nin process\n"));
    assert!(handler.is_serving());
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    assert!(!handler.is_serving());
    let (status, body) = get(addr, "/late").await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "the component is shutting down\n"));
}
