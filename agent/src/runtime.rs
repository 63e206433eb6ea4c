//! One trait over the agent's runtimes. The supervisor decides *that* a replica runs; a
//! [`Runtime`] makes one run happen: fetch the artifact, start it, wait for its end. Wasm is
//! adapted here from `wasm-runtime` and `oci-runtime`; containers will sit behind the same
//! trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use oci_runtime::{BlobStore, Registry};
use proto::manifest::{ReplicaTemplate, Runtime as RuntimeKind};
use proto::messages::Termination;
use tokio::sync::{mpsc, watch};
use wasm_runtime::{Exit, Limits, RunOptions, WasmHost};

use crate::logs::LogSink;

/// What the shell learns about a run.
#[derive(Debug)]
pub enum RunEvent {
    Started { replica: String, run_id: u64 },
    Exited { replica: String, run_id: u64, how: Termination },
}

/// Everything one run needs.
pub struct RunContext {
    pub replica: String,
    pub run_id: u64,
    pub template: ReplicaTemplate,
    pub log: Arc<LogSink>,
    /// Becomes `true` when the supervisor wants the run stopped.
    pub stop: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<RunEvent>,
}

impl RunContext {
    pub fn new(
        replica: String,
        run_id: u64,
        template: ReplicaTemplate,
        log: Arc<LogSink>,
        stop: watch::Receiver<bool>,
        events: mpsc::UnboundedSender<RunEvent>,
    ) -> Self {
        RunContext { replica, run_id, template, log, stop, events }
    }

    /// Tells the supervisor the workload is now running.
    pub fn started(&self) {
        let _ = self.events.send(RunEvent::Started { replica: self.replica.clone(), run_id: self.run_id });
    }
}

pub type RunFuture = Pin<Box<dyn Future<Output = Termination> + Send>>;

pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Runs one run of a replica to its end. Calls `ctx.started()` once the workload runs;
    /// returns how it ended. When `ctx.stop` turns true it stops the workload and returns.
    fn run(&self, ctx: RunContext) -> RunFuture;
}

/// Wasm modules from OCI registries under wasmtime.
pub struct WasmRuntime {
    pub host: WasmHost,
    pub registry: Arc<Registry>,
    pub blobs: Arc<BlobStore>,
}

impl Runtime for WasmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }

    fn run(&self, mut ctx: RunContext) -> RunFuture {
        let host = self.host.clone();
        let registry = self.registry.clone();
        let blobs = self.blobs.clone();
        Box::pin(async move {
            let failed = |message: String| Termination::StartFailed { message };
            let pulled = match registry.pull_wasm(&ctx.template.image, &blobs).await {
                Ok(p) => p,
                Err(e) => return failed(e.to_string()),
            };
            let (h, digest, path) = (host.clone(), pulled.wasm_digest.clone(), pulled.path.clone());
            let program = match tokio::task::spawn_blocking(move || h.load(&digest, &path)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return failed(e.to_string()),
                Err(e) => return failed(format!("module compilation did not finish: {e}")),
            };
            let opts = RunOptions {
                program_name: ctx.replica.clone(),
                args: ctx.template.args.clone(),
                env: ctx.template.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                stdout: ctx.log.clone(),
                stderr: ctx.log.clone(),
                limits: Limits { memory_bytes: ctx.template.memory_bytes },
            };
            ctx.started();
            tokio::select! {
                exit = host.run(&program, opts) => match exit {
                    Ok(Exit::Code(code)) => Termination::Exited { code },
                    Ok(Exit::Trap(message)) => Termination::Trapped { message },
                    Err(e) => failed(e.to_string()),
                },
                // Dropping the run future stops the guest at its next epoch tick.
                _ = ctx.stop.wait_for(|s| *s) => Termination::Exited { code: 0 },
            }
        })
    }
}
