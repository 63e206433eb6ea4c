//! Serving `wasi:http/proxy` components over HTTP/1.1 ([`WasmHost::serve_http`]).
//!
//! Every request gets a fresh [`Store`] and instance of the pre-instantiated component, under
//! the per-request [`Limits`]. At most [`HttpOptions::max_concurrency`] instances exist at once;
//! up to [`HttpOptions::max_queued`] further requests wait for one, and requests beyond that get
//! `503`. A handler that traps, exceeds a limit or returns without a response yields `500`
//! (never a crash of the server), and the reason is written to the stderr sink.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot, watch};
use wasmtime::Store;
use wasmtime::component::Resource;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

use crate::program::Pre;
use crate::run::describe_guest_failure;
use crate::usage::{GuestUsage, Metered};
use crate::wasi::{ComponentState, GuestEnv, GuestStdio};
use crate::{Error, Limits, OutputSink, Preopen, Program, WasmHost};

/// How long [`HttpServer::run`] waits, after cancelling the requests still running at the end of
/// the grace period, for them to wind down (they stop at their next epoch tick).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How to serve a `wasi:http/proxy` component. Build with [`HttpOptions::new`] and set the
/// public fields.
pub struct HttpOptions {
    /// Address to listen on; port 0 picks a free port (see [`HttpServer::local_addr`]).
    pub addr: SocketAddr,
    /// A socket already listening on `addr` to serve on instead of binding one: handed over by
    /// a previous process (see [`HttpServer::serve`] and [`Shutdown::HandOff`]), with the
    /// connections that queued while nobody accepted. Default `None`.
    pub listener: Option<std::net::TcpListener>,
    /// Most component instances (requests being handled) at once. Default 16. With a pooling
    /// host keep it at or below [`crate::PoolingConfig::total_instances`] (minus other guests),
    /// or excess requests fail to instantiate and get `500`.
    pub max_concurrency: usize,
    /// Most requests waiting for an instance; more get `503 Service Unavailable`. Default 1024.
    pub max_queued: usize,
    /// Most open client connections; further connections wait in the listen backlog.
    /// Default 1024.
    pub max_connections: usize,
    /// Wall-clock limit for one request's handler (including streaming its response body), on
    /// top of the CPU-time limit in `limits`. Default `None`.
    pub request_timeout: Option<Duration>,
    /// How long [`HttpServer::run`] lets in-flight requests finish after shutdown is requested
    /// before cancelling them. Default 10 s.
    pub shutdown_grace: Duration,
    /// The guest's `argv[0]`. Default `"wasi-http"`.
    pub program_name: String,
    /// The guest's `argv[1..]`.
    pub args: Vec<String>,
    /// The guest's entire environment (nothing is inherited from the host).
    pub env: Vec<(String, String)>,
    /// Host directories visible to the guest.
    pub preopens: Vec<Preopen>,
    /// Sockets, name lookup and outgoing `wasi:http` requests. Default `false`.
    pub network: bool,
    /// Limits of each request's instance.
    pub limits: Limits,
    pub stdout: Arc<dyn OutputSink>,
    /// Receives the guest's stderr and one line per failed request.
    pub stderr: Arc<dyn OutputSink>,
    /// Counts the CPU time of every request's handler and the linear memory of the instances
    /// alive at any moment, summed (see [`GuestUsage`]). Default `None`.
    pub usage: Option<Arc<GuestUsage>>,
}

impl HttpOptions {
    pub fn new(addr: SocketAddr, stdout: Arc<dyn OutputSink>, stderr: Arc<dyn OutputSink>) -> Self {
        HttpOptions {
            addr,
            listener: None,
            max_concurrency: 16,
            max_queued: 1024,
            max_connections: 1024,
            request_timeout: None,
            shutdown_grace: Duration::from_secs(10),
            program_name: "wasi-http".into(),
            args: Vec::new(),
            env: Vec::new(),
            preopens: Vec::new(),
            network: false,
            limits: Limits::default(),
            stdout,
            stderr,
            usage: None,
        }
    }
}

/// A bound HTTP listener for one component. Nothing is accepted until [`HttpServer::run`];
/// dropping the server (or the `run` future) closes the listener and cancels every connection
/// and request at once.
pub struct HttpServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    max_connections: usize,
    shutdown_grace: Duration,
    shared: Arc<Shared>,
    /// Made with the server so [`HttpServer::handler`]s follow its shutdown too.
    phase: watch::Sender<Phase>,
}

/// The body of a response from [`HttpHandler::handle`].
pub type HandlerBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A cloneable handle on a server's request handling, for requests that reached the host
/// some other way (a gateway in the same process): each request is handled exactly as one
/// arriving on the server's own socket (same instance limit, queue, limits, stderr reports),
/// with no TCP hop. Once the server shuts down, requests get `503`.
#[derive(Clone)]
pub struct HttpHandler {
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler").field("digest", &self.shared.digest).finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// Handles one request (the caller adds whatever headers it must, e.g. `X-Forwarded-For`).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<HandlerBody> {
        let response = if *self.phase.borrow() != Phase::Serving {
            plain(StatusCode::SERVICE_UNAVAILABLE, "the component is shutting down\n")
        } else {
            // Shutdown waits for this request as for one of the server's own connections.
            let _guard = self.shared.tasks.enter();
            self.shared.clone().handle(request, self.phase.clone()).await
        };
        response.map(|body| {
            body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { format!("{e:?}").into() }).boxed_unsync()
        })
    }

    /// Whether the server still takes requests.
    pub fn is_serving(&self) -> bool {
        *self.phase.borrow() == Phase::Serving
    }
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("local_addr", &self.local_addr)
            .field("digest", &self.shared.digest)
            .finish_non_exhaustive()
    }
}

/// Lifecycle of a running server, broadcast to connections and request tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown requested: finish in-flight requests, accept no new ones.
    Draining,
    /// The grace period is over: cancel everything.
    Killing,
}

/// Everything a connection or request needs, shared by all of them.
struct Shared {
    host: WasmHost,
    digest: String,
    pre: ProxyPre<ComponentState>,
    program_name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    preopens: Vec<Preopen>,
    network: bool,
    limits: Limits,
    stdout: Arc<dyn OutputSink>,
    stderr: Arc<dyn OutputSink>,
    usage: Option<Arc<GuestUsage>>,
    request_timeout: Option<Duration>,
    /// One permit per concurrent instance.
    instances: Arc<Semaphore>,
    max_queued: usize,
    queued: AtomicUsize,
    /// Connections and request tasks still running.
    tasks: Tasks,
}

impl WasmHost {
    /// Binds `opts.addr` and prepares to serve the `wasi:http/proxy` component `program`; call
    /// [`HttpServer::run`] to accept connections. Fails if the program does not export
    /// `wasi:http/incoming-handler`, if a preopen cannot be opened, if the limits need fuel the
    /// host lacks, or if the address cannot be bound. Must be called within a tokio runtime.
    pub async fn serve_http(&self, program: &Program, opts: HttpOptions) -> Result<HttpServer, Error> {
        self.check_program(program)?;
        let Pre::Http(pre) = &program.inner.pre else {
            return Err(Error::NotHttp { kind: program.kind(), digest: program.digest().to_string() });
        };
        self.check_limits(&opts.limits)?;
        if opts.max_concurrency == 0 || opts.max_connections == 0 {
            return Err(Error::Config { reason: "http max_concurrency and max_connections must be at least 1".into() });
        }
        let shared = Shared {
            host: self.clone(),
            digest: program.digest().to_string(),
            pre: pre.clone(),
            program_name: opts.program_name,
            args: opts.args,
            env: opts.env,
            preopens: opts.preopens,
            network: opts.network,
            limits: opts.limits,
            stdout: opts.stdout,
            stderr: opts.stderr,
            usage: opts.usage,
            request_timeout: opts.request_timeout,
            instances: Arc::new(Semaphore::new(opts.max_concurrency.min(Semaphore::MAX_PERMITS))),
            max_queued: opts.max_queued,
            queued: AtomicUsize::new(0),
            tasks: Tasks::default(),
        };
        // Report a bad preopen now rather than as a 500 on every request.
        shared.guest_env().wasi_builder()?;

        let listener = match opts.listener {
            Some(l) => adopt(l, opts.addr),
            None => bind(opts.addr),
        }
        .map_err(|error| Error::Bind { addr: opts.addr, error })?;
        let local_addr = listener.local_addr().map_err(|error| Error::Bind { addr: opts.addr, error })?;
        tracing::info!(digest = %shared.digest, addr = %local_addr, "serving wasi:http component");
        Ok(HttpServer {
            listener,
            local_addr,
            max_connections: opts.max_connections.min(Semaphore::MAX_PERMITS),
            shutdown_grace: opts.shutdown_grace,
            shared: Arc::new(shared),
            phase: watch::Sender::new(Phase::Serving),
        })
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Allows rebinding an address with connections in TIME_WAIT after a restart.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A listener handed over by another process, checked to be the one asked for.
fn adopt(listener: std::net::TcpListener, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bound = listener.local_addr()?;
    if bound != addr && addr.port() != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the handed-over socket listens on {bound}, not {addr}"),
        ));
    }
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// How [`HttpServer::serve`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Close the listening socket: new connections are refused.
    Close,
    /// Stop accepting but keep the listening socket open and return it, for another process
    /// to serve on: connections arriving meanwhile wait in its backlog instead of being
    /// refused.
    HandOff,
}

impl HttpServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that serves requests in-process, for as long as this server serves.
    pub fn handler(&self) -> HttpHandler {
        HttpHandler { shared: self.shared.clone(), phase: self.phase.subscribe() }
    }

    /// Accepts connections until `shutdown` completes, then stops accepting, lets in-flight
    /// requests finish for up to [`HttpOptions::shutdown_grace`] (idle keep-alive connections are
    /// closed at once), cancels whatever is still running and returns. Accept errors (e.g. out of
    /// file descriptors) are logged and retried, so this currently always returns `Ok`.
    /// Dropping the future instead cancels every connection and request at once.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.serve(async {
            shutdown.await;
            Shutdown::Close
        })
        .await
        .map(|_| ())
    }

    /// Like [`HttpServer::run`], but `shutdown` says what becomes of the listening socket:
    /// with [`Shutdown::HandOff`] it is returned, still listening, once in-flight requests are
    /// done (connections not yet accepted stay queued in it for whoever serves it next).
    pub async fn serve(self, shutdown: impl Future<Output = Shutdown>) -> Result<Option<std::net::TcpListener>, Error> {
        let HttpServer { listener, local_addr, max_connections, shutdown_grace, shared, phase: phase_tx } = self;
        let phase_rx = phase_tx.subscribe();
        let connections = Arc::new(Semaphore::new(max_connections));
        let mut shutdown = std::pin::pin!(shutdown);
        let how = loop {
            let permit = tokio::select! {
                biased;
                how = &mut shutdown => break how,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Shutdown::Close, // never closed
                },
            };
            let (stream, peer) = tokio::select! {
                biased;
                how = &mut shutdown => break how,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(addr = %local_addr, error = %e, "cannot accept http connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Guests often write small body chunks; do not let Nagle delay them.
            let _ = stream.set_nodelay(true);
            let guard = shared.tasks.enter();
            tokio::spawn(serve_connection(shared.clone(), stream, peer, phase_rx.clone(), permit, guard));
        };
        let kept = match how {
            Shutdown::Close => None,
            Shutdown::HandOff => match listener.into_std() {
                Ok(l) => {
                    tracing::info!(addr = %local_addr, "http listener kept open for the next process");
                    Some(l)
                }
                Err(e) => {
                    tracing::warn!(addr = %local_addr, error = %e, "cannot keep the http listener; closing it");
                    None
                }
            },
        };

        tracing::info!(addr = %local_addr, "http server shutting down; draining in-flight requests");
        phase_tx.send_replace(Phase::Draining);
        if tokio::time::timeout(shutdown_grace, shared.tasks.idle()).await.is_err() {
            tracing::warn!(addr = %local_addr, grace = ?shutdown_grace, "http requests still running after the grace period; cancelling them");
            phase_tx.send_replace(Phase::Killing);
            if tokio::time::timeout(KILL_WAIT, shared.tasks.idle()).await.is_err() {
                tracing::warn!(addr = %local_addr, "cancelled http requests did not wind down in time");
            }
        }
        Ok(kept)
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut phase: watch::Receiver<Phase>,
    _permit: OwnedSemaphorePermit,
    _guard: TaskGuard,
) {
    let service = {
        let phase = phase.clone();
        service_fn(move |request| {
            let shared = shared.clone();
            let phase = phase.clone();
            async move { Ok::<_, Infallible>(shared.handle(request, phase).await) }
        })
    };
    let connection = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    // Set once draining: when this connection closes after its request under way.
    let mut close_at: Option<tokio::time::Instant> = None;
    if *phase.borrow_and_update() != Phase::Serving {
        close_at = Some(tokio::time::Instant::now() + DRAIN_LINGER);
    }
    loop {
        let linger = async {
            match close_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            () = linger => {
                connection.as_mut().graceful_shutdown();
                close_at = None;
            }
            changed = phase.changed() => {
                // A dropped sender means `run` itself was dropped: stop at once.
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Killing };
                match now {
                    Phase::Serving => {}
                    Phase::Draining => close_at = Some(tokio::time::Instant::now() + DRAIN_LINGER),
                    Phase::Killing => return,
                }
            }
        }
    }
}

/// How long a connection lives on once its server drains before it is closed after the
/// request under way (at once if it is idle). hyper's graceful shutdown treats a connection
/// whose request it has not read yet as idle and closes it unanswered; a client that has just
/// connected gets this long for its request to arrive and be served. Keep-alive connections
/// idle for that long are closed as idle.
pub const DRAIN_LINGER: Duration = Duration::from_millis(250);

impl Shared {
    fn guest_env(&self) -> GuestEnv<'_> {
        GuestEnv {
            program_name: &self.program_name,
            args: &self.args,
            env: &self.env,
            stdio: GuestStdio::Sinks { stdout: &self.stdout, stderr: &self.stderr },
            preopens: &self.preopens,
            network: self.network,
        }
    }

    fn new_store(&self) -> Result<Store<ComponentState>, Error> {
        let limiter = self.host.memory_limiter(&self.limits, self.usage.clone());
        let mut store = Store::new(&self.host.inner.engine, self.guest_env().component_state(limiter)?);
        self.host.configure_store(&mut store, &self.limits)?;
        Ok(store)
    }

    /// Logs a failed request and writes it to the guest's stderr sink.
    fn report(&self, what: &str, reason: &str) {
        tracing::warn!(digest = %self.digest, request = what, reason, "wasi:http request failed");
        self.stderr.write(format!("wasi:http request {what} failed: {reason}\n").as_bytes());
    }

    /// Waits for an instance permit, or returns `None` when the queue is full.
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.instances.clone().try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        let _slot = QueueSlot::enter(&self.queued, self.max_queued)?;
        self.instances.clone().acquire_owned().await.ok()
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        phase: watch::Receiver<Phase>,
    ) -> Response<HyperOutgoingBody> {
        let what = format!("{} {}", request.method(), request.uri().path());
        let Some(permit) = self.admit().await else {
            // Load shedding is not a guest failure: keep it out of the guest's stderr.
            tracing::debug!(digest = %self.digest, request = %what, "too many queued wasi:http requests; answered 503");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "service unavailable\n");
        };
        let mut store = match self.new_store() {
            Ok(store) => store,
            Err(e) => {
                self.report(&what, &e.to_string());
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
            }
        };
        let (sender, receiver) = oneshot::channel();
        let mut http = store.data_mut().http();
        let incoming = match http.new_incoming_request(Scheme::Http, request) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::debug!(request = %what, error = %format!("{e:#}"), "rejected malformed http request");
                return plain(StatusCode::BAD_REQUEST, "bad request\n");
            }
        };
        let outparam = match http.new_response_outparam(sender) {
            Ok(outparam) => outparam,
            Err(e) => {
                self.report(&what, &format!("{e:#}"));
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
            }
        };
        // The handler runs in its own task because it keeps streaming the response body after
        // handing over the response head.
        let job =
            GuestJob { store, incoming, outparam, what: what.clone(), _permit: permit, _guard: self.tasks.enter() };
        let guest = tokio::spawn(self.clone().run_guest(job, phase));
        match receiver.await {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => {
                self.report(&what, &format!("handler responded with error {code:?}"));
                plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
            }
            Err(_) => {
                // The store is gone without a response; failures were reported by the task.
                if let Ok(true) = guest.await {
                    self.report(&what, "handler returned without setting a response");
                }
                plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
            }
        }
    }

    /// Instantiates the component and calls its handler. Returns whether the handler returned
    /// normally; failures are reported here.
    async fn run_guest(self: Arc<Self>, job: GuestJob, mut phase: watch::Receiver<Phase>) -> bool {
        let GuestJob { mut store, incoming: request, outparam, what, _permit, _guard } = job;
        // Only the instance's own work is metered, not the timers and shutdown watch around it.
        let work = Metered::new(
            async {
                let proxy = self.pre.instantiate_async(&mut store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, request, outparam).await
            },
            self.usage.clone(),
        );
        let bounded = async {
            match self.request_timeout {
                None => work.await,
                Some(limit) => tokio::time::timeout(limit, work)
                    .await
                    .unwrap_or_else(|_| Err(wasmtime::format_err!("request timeout of {limit:?} exceeded"))),
            }
        };
        let result = tokio::select! {
            result = bounded => result,
            _ = phase.wait_for(|p| *p == Phase::Killing) => {
                Err(wasmtime::format_err!("server shut down before the handler finished"))
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                self.report(&what, &describe_guest_failure(&e));
                false
            }
        }
    }
}

/// One request's instance-to-be and what it holds while it runs.
struct GuestJob {
    store: Store<ComponentState>,
    incoming: Resource<HostIncomingRequest>,
    outparam: Resource<HostResponseOutparam>,
    /// `METHOD /path`, for reports.
    what: String,
    /// The instance slot; released when the handler is done.
    _permit: OwnedSemaphorePermit,
    /// Keeps graceful shutdown waiting for this handler.
    _guard: TaskGuard,
}

fn plain(status: StatusCode, text: &'static str) -> Response<HyperOutgoingBody> {
    let body =
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|never: Infallible| match never {}).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A place in the bounded queue of requests waiting for an instance.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn enter(queued: &'a AtomicUsize, max: usize) -> Option<Self> {
        queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(QueueSlot(queued))
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts running connection and request tasks so that shutdown can wait for them.
#[derive(Default)]
struct Tasks(Arc<watch::Sender<usize>>);

struct TaskGuard(Arc<watch::Sender<usize>>);

impl Tasks {
    fn enter(&self) -> TaskGuard {
        self.0.send_modify(|n| *n += 1);
        TaskGuard(self.0.clone())
    }

    async fn idle(&self) {
        let mut rx = self.0.subscribe();
        // Cannot fail: `self` holds the sender.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}
