//! What a guest sees: the store data of a run or request (WASI preview 1 or 0.2 context,
//! resource table, wasi:http context), its args, env, preopens and network access built from
//! [`RunOptions`](crate::RunOptions) or [`HttpOptions`](crate::HttpOptions), the gate on outgoing
//! `wasi:http` requests, and stdout/stderr sent to an [`OutputSink`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::limits::MemoryLimiter;
use crate::{Error, OutputSink, Preopen, one_line};

/// Store data of one core-module run.
pub(crate) struct StoreState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
}

/// Store data of one component run or one HTTP request.
pub(crate) struct ComponentState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    pub(crate) limiter: MemoryLimiter,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Outgoing `wasi:http` requests are only allowed with network access.
struct HttpHooks {
    network: bool,
}

type SendRequestFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                hyper::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendRequestFuture {
        if !self.network {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}

/// What a guest gets to see, shared by [`RunOptions`](crate::RunOptions) and [`HttpOptions`](crate::HttpOptions).
pub(crate) struct GuestEnv<'a> {
    pub(crate) program_name: &'a str,
    pub(crate) args: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) stdio: GuestStdio<'a>,
    pub(crate) preopens: &'a [Preopen],
    pub(crate) network: bool,
}

/// [`Stdio`](crate::Stdio) as a [`GuestEnv`] borrows it (HTTP servers keep their sinks apart).
pub(crate) enum GuestStdio<'a> {
    Sinks { stdout: &'a Arc<dyn OutputSink>, stderr: &'a Arc<dyn OutputSink> },
    Inherit,
}

impl GuestEnv<'_> {
    pub(crate) fn wasi_builder(&self) -> Result<WasiCtxBuilder, Error> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg(self.program_name)
            .args(self.args)
            .envs(self.env)
            .allow_tcp(self.network)
            .allow_udp(self.network)
            .allow_ip_name_lookup(self.network);
        match &self.stdio {
            // No stdin: the builder's default is a closed stream, so a read sees end-of-file.
            GuestStdio::Sinks { stdout, stderr } => {
                wasi.stdout(SinkStream((*stdout).clone())).stderr(SinkStream((*stderr).clone()));
            }
            // wasmtime-wasi's own stdio, not a sink: only it reports write errors to the guest
            // and answers isatty from the real descriptor.
            GuestStdio::Inherit => {
                wasi.inherit_stdio();
            }
        }
        if self.network {
            wasi.inherit_network();
        }
        for preopen in self.preopens {
            let perms = if preopen.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            wasi.preopened_dir(&preopen.host, &preopen.guest, perms).map_err(|e| Error::Preopen {
                host: preopen.host.clone(),
                guest: preopen.guest.clone(),
                reason: one_line(&e),
            })?;
        }
        Ok(wasi)
    }

    pub(crate) fn component_state(&self, limiter: MemoryLimiter) -> Result<ComponentState, Error> {
        Ok(ComponentState {
            wasi: self.wasi_builder()?.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: HttpHooks { network: self.network },
            limiter,
        })
    }
}

/// Adapts an [`OutputSink`] to wasmtime-wasi's stdout/stderr stream traits. Writes go straight
/// to the sink, so the stream is always ready and never buffers.
#[derive(Clone)]
struct SinkStream(Arc<dyn OutputSink>);

/// Largest single write the guest is permitted; fd_write loops over larger buffers.
const SINK_WRITE_PERMIT: usize = 64 * 1024;

impl IsTerminal for SinkStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for SinkStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SinkStream {
    async fn ready(&mut self) {}
}

impl OutputStream for SinkStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        if !bytes.is_empty() {
            self.0.write(&bytes);
        }
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(SINK_WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for SinkStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if !buf.is_empty() {
            self.0.write(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
