//! Running a command to completion ([`WasmHost::run`]): a module's `_start` or a component's
//! `wasi:cli/run`, and turning how it ended into an [`Exit`] (exit code, or trap reason with the
//! innermost frames).

use std::sync::Arc;

use wasmtime::{InstancePre, Store, Trap, WasmBacktrace};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::limits::CpuTimeExceeded;
use crate::program::Pre;
use crate::usage::{GuestUsage, Metered};
use crate::wasi::{ComponentState, GuestEnv, GuestStdio, StoreState};
use crate::{Error, Exit, Limits, Program, ProgramKind, RunOptions, Stdio, WasmHost, one_line};

impl WasmHost {
    /// Runs a program to completion: a module's `_start`, or a component's `wasi:cli/run`.
    /// Cancel by dropping the future: the guest yields to the executor every epoch tick, even
    /// inside an infinite loop. HTTP components are refused ([`Error::ServesHttp`]). With
    /// [`RunOptions::usage`], instantiation and the run are metered into it.
    pub async fn run(&self, program: &Program, opts: RunOptions) -> Result<Exit, Error> {
        self.check_program(program)?;
        self.check_limits(&opts.limits)?;
        let digest = program.digest();
        let env = GuestEnv {
            program_name: &opts.program_name,
            args: &opts.args,
            env: &opts.env,
            stdio: match &opts.stdio {
                Stdio::Sinks { stdout, stderr } => GuestStdio::Sinks { stdout, stderr },
                Stdio::Inherit => GuestStdio::Inherit,
            },
            preopens: &opts.preopens,
            network: opts.network,
        };
        let usage = opts.usage.clone();
        let run = async {
            match &program.inner.pre {
                Pre::Module(pre) => self.run_module(digest, pre, &env, &opts.limits, usage.clone()).await,
                Pre::Command(pre) => self.run_command(digest, pre, &env, &opts.limits, usage.clone()).await,
                Pre::Http(_) => Err(Error::ServesHttp { digest: digest.to_string() }),
            }
        };
        // The guest runs inside this future's polls (see `usage`), so metering it meters the guest.
        Metered::new(run, opts.usage.clone()).await
    }

    async fn run_module(
        &self,
        digest: &str,
        pre: &InstancePre<StoreState>,
        env: &GuestEnv<'_>,
        limits: &Limits,
        usage: Option<Arc<GuestUsage>>,
    ) -> Result<Exit, Error> {
        let state = StoreState { wasi: env.wasi_builder()?.build_p1(), limiter: self.memory_limiter(limits, usage) };
        let mut store = Store::new(&self.inner.engine, state);
        self.configure_store(&mut store, limits)?;

        let instance = match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            // A trap in the module's start section is the guest's doing.
            Err(e) if e.downcast_ref::<Trap>().is_some() => {
                return Ok(Exit::Trap(describe_guest_failure(&e)));
            }
            Err(e) => {
                return Err(Error::Instantiate {
                    kind: ProgramKind::Module,
                    digest: digest.to_string(),
                    reason: one_line(&e),
                });
            }
        };
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| Error::MissingStart { digest: digest.to_string() })?;
        Ok(guest_exit(digest, start.call_async(&mut store, ()).await.map(|()| 0)))
    }

    async fn run_command(
        &self,
        digest: &str,
        pre: &CommandPre<ComponentState>,
        env: &GuestEnv<'_>,
        limits: &Limits,
        usage: Option<Arc<GuestUsage>>,
    ) -> Result<Exit, Error> {
        let mut store = Store::new(&self.inner.engine, env.component_state(self.memory_limiter(limits, usage))?);
        self.configure_store(&mut store, limits)?;
        let command = match pre.instantiate_async(&mut store).await {
            Ok(command) => command,
            Err(e) if is_guest_failure(&e) => return Ok(Exit::Trap(describe_guest_failure(&e))),
            Err(e) => {
                return Err(Error::Instantiate {
                    kind: ProgramKind::Component,
                    digest: digest.to_string(),
                    reason: one_line(&e),
                });
            }
        };
        let result = command.wasi_cli_run().call_run(&mut store).await;
        Ok(guest_exit(digest, result.map(|r| if r.is_ok() { 0 } else { 1 })))
    }
}

/// What a preview 1 `proc_exit(status)` raises: an exit with that code when it fits a process's
/// exit status (0..=255), else a trap naming it (a code above 255 would be truncated by the OS).
pub(crate) fn proc_exit(status: u32) -> wasmtime::Error {
    match u8::try_from(status) {
        Ok(code) => wasmtime_wasi::I32Exit(i32::from(code)).into(),
        Err(_) => wasmtime::Error::msg(format!("exit with invalid exit status {status} outside of [0..256)")),
    }
}

/// Maps the outcome of a guest's entry point to an [`Exit`].
fn guest_exit(digest: &str, result: wasmtime::Result<i32>) -> Exit {
    match result {
        Ok(code) => Exit::Code(code),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Exit::Code(exit.0),
            None => {
                let reason = describe_guest_failure(&e);
                tracing::debug!(digest, %reason, "wasm guest trapped");
                Exit::Trap(reason)
            }
        },
    }
}

/// Whether an instantiation error is the guest's doing (a trap in a start function or a limit
/// hit while running it) rather than the host's.
fn is_guest_failure(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<Trap>().is_some() || e.downcast_ref::<CpuTimeExceeded>().is_some()
}

/// Human-readable reason for an abnormal guest exit: the wasm trap code (or host-side reason,
/// e.g. the memory limit) followed by the innermost few wasm frames.
pub(crate) fn describe_guest_failure(err: &wasmtime::Error) -> String {
    let mut reason = match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => "fuel exhausted".to_string(),
        Some(trap) => trap.to_string(),
        None => err
            .chain()
            .map(|cause| cause.to_string())
            // The backtrace is attached as a context layer; it is summarised below instead.
            .filter(|cause| !cause.starts_with("error while executing at wasm backtrace"))
            .collect::<Vec<_>>()
            .join(": "),
    };
    if let Some(bt) = err.downcast_ref::<WasmBacktrace>() {
        const MAX_FRAMES: usize = 5;
        let frames: Vec<String> = bt
            .frames()
            .iter()
            .take(MAX_FRAMES)
            .map(|frame| match frame.func_name() {
                Some(name) => name.to_string(),
                None => format!("func[{}]", frame.func_index()),
            })
            .collect();
        if !frames.is_empty() {
            reason.push_str(" (in ");
            reason.push_str(&frames.join(" <- "));
            if bt.frames().len() > MAX_FRAMES {
                reason.push_str(" <- ...");
            }
            reason.push(')');
        }
    }
    reason
}
