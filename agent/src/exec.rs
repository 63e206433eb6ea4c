//! `flotilla exec` on the node. The hub opens a stream on the agent's own link (the node needs
//! no inbound connection) with an [`ExecSpec`]; the agent checks it ([`check`], pure), runs
//! `flotilla oci exec --interactive` in the replica's container with pipes or a
//! pseudo-terminal as its stdio, and pumps [`proto::exec`] chunks: the CLI's stdin and window
//! sizes in, the command's stdout, stderr and finally its exit code out.
//!
//! Ending: the command's exit (after its output is drained) sends the exit code and finishes
//! the stream. The hub resetting the stream (the CLI went away) or the link dropping kills the
//! `oci exec` process, whose lifeline then makes its supervisor kill the command and all it
//! started (see `oci_runtime::container::exec`). At most [`MAX_SESSIONS`] run at once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use oci_runtime::container::tty::{self, PtyIo};
use proto::exec::{Input, Output};
use proto::manifest::Runtime;
use proto::messages::{ExecSpec, StreamStart};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info};
use transport::frame;

/// Exec sessions one agent runs at once; more are refused (each holds a process, pipes and
/// buffers).
pub const MAX_SESSIONS: usize = 16;

/// How this node runs exec: the `flotilla oci` command line of its container runtime (state
/// and cgroup roots), and the session limit.
pub struct Target {
    pub oci_argv: Vec<OsString>,
    sessions: Semaphore,
}

impl Target {
    pub fn new(oci_argv: Vec<OsString>) -> Target {
        Target { oci_argv, sessions: Semaphore::new(MAX_SESSIONS) }
    }
}

/// Why this node will not run an exec; sent to the CLI as the stream's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Invalid(#[from] proto::messages::ExecSpecError),
    #[error("{0:?} is not a replica name")]
    BadName(String),
    #[error("replica {replica:?} does not run on node {node:?}")]
    NotHere { replica: String, node: String },
    #[error(
        "replica {0:?} runs on Wasm: exec runs commands in containers only (a Wasm module has no processes to start)"
    )]
    Wasm(String),
    #[error("node {0:?} runs no containers (the agent was started without them)")]
    NoContainers(String),
    #[error("node {node:?} already runs {MAX_SESSIONS} exec sessions; try again when one ends")]
    Busy { node: String },
}

/// Whether node `node` runs `spec`: a valid request for a container replica it runs.
pub fn check(spec: &ExecSpec, node: &str, runtime: Option<Runtime>, containers: bool) -> Result<(), Refusal> {
    spec.check()?;
    // The name becomes a path in the container runtime's state root.
    if proto::manifest::validate_name(&spec.replica).is_err() {
        return Err(Refusal::BadName(spec.replica.clone()));
    }
    match runtime {
        None => Err(Refusal::NotHere { replica: spec.replica.clone(), node: node.to_string() }),
        Some(Runtime::Container) if containers => Ok(()),
        Some(Runtime::Container) => Err(Refusal::NoContainers(node.to_string())),
        Some(_) => Err(Refusal::Wasm(spec.replica.clone())),
    }
}

/// Serves one exec stream the hub opened: checks, starts, pumps until the command ends or the
/// stream goes away.
pub async fn serve(
    target: Option<Arc<Target>>,
    node: &str,
    runtimes: &HashMap<String, Runtime>,
    spec: ExecSpec,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let refuse = |why: Refusal| StreamStart::Error { message: why.to_string() };
    let runtime = runtimes.get(&spec.replica).copied();
    let checked = check(&spec, node, runtime, target.is_some());
    let (target, _permit) = match (checked, target) {
        (Err(why), _) => return answer(&mut send, refuse(why)).await,
        (Ok(()), None) => return answer(&mut send, refuse(Refusal::NoContainers(node.to_string()))).await,
        (Ok(()), Some(t)) => {
            let Ok(permit) = t.sessions.try_acquire() else {
                return answer(&mut send, refuse(Refusal::Busy { node: node.to_string() })).await;
            };
            permit.forget();
            (t.clone(), Permit(t))
        }
    };
    let program = spec.command[0].clone();
    let session = match Session::start(&target.oci_argv, &spec) {
        Ok(s) => s,
        Err(e) => {
            let message = format!("cannot start exec in replica {:?}: {e}", spec.replica);
            return answer(&mut send, StreamStart::Error { message }).await;
        }
    };
    if frame::write(&mut send, &StreamStart::Ok).await.is_err() {
        return;
    }
    info!(replica = %spec.replica, program = %program, tty = spec.tty, "exec started");
    match session.pump(send, recv).await {
        Ok(code) => info!(replica = %spec.replica, program = %program, code, "exec ended"),
        Err(why) => info!(replica = %spec.replica, program = %program, why = %why, "exec ended early; command killed"),
    }
}

async fn answer(send: &mut quinn::SendStream, start: StreamStart) {
    if frame::write(send, &start).await.is_ok() {
        let _ = send.finish();
    }
}

/// A session slot, given back when the session ends however it ends.
struct Permit(Arc<Target>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.sessions.add_permits(1);
    }
}

/// Where the command's input goes.
enum Stdin {
    None,
    Pipe(tokio::process::ChildStdin),
    Pty(PtyIo),
}

/// The command's output: two pipes, or one terminal.
enum Outputs {
    Pipes { stdout: tokio::process::ChildStdout, stderr: tokio::process::ChildStderr },
    Pty(PtyIo),
}

struct Session {
    child: tokio::process::Child,
    stdin: Stdin,
    outputs: Outputs,
    /// With a terminal: its master, for window size changes.
    resize: Option<OwnedFd>,
}

impl Session {
    fn start(oci_argv: &[OsString], spec: &ExecSpec) -> io::Result<Session> {
        let (program, base) = oci_argv.split_first().ok_or_else(|| io::Error::other("no oci command"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(base).arg("exec").arg("--interactive");
        if spec.tty {
            cmd.arg("--tty");
        }
        cmd.arg(&spec.replica).arg("--").args(&spec.command).kill_on_drop(true);
        if spec.tty {
            let pty = tty::open_pty(spec.rows, spec.cols)?;
            cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave));
            let child = cmd.spawn()?;
            // The command holds the only slave descriptors now (the Command's were dropped
            // with it), so the master reads end-of-file (EIO) once the command has ended.
            drop(cmd);
            let stdin = if spec.stdin { Stdin::Pty(PtyIo::new(pty.master.try_clone()?)?) } else { Stdin::None };
            let resize = Some(pty.master.try_clone()?);
            return Ok(Session { child, stdin, outputs: Outputs::Pty(PtyIo::new(pty.master)?), resize });
        }
        cmd.stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().map_or(Stdin::None, Stdin::Pipe);
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(io::Error::other("the command's output pipes are missing"));
        };
        Ok(Session { child, stdin, outputs: Outputs::Pipes { stdout, stderr }, resize: None })
    }

    /// Pumps until the command has ended and its output is sent (its exit code), or until
    /// the stream fails (the command is then killed, by dropping the child).
    async fn pump(mut self, mut send: quinn::SendStream, recv: quinn::RecvStream) -> Result<i32, EndedEarly> {
        let mut input = tokio::spawn(feed(recv, std::mem::replace(&mut self.stdin, Stdin::None), self.resize.take()));
        // Aborts the input task however this returns.
        let _abort = AbortOnDrop(input.abort_handle());
        let mut out = vec![0u8; 32 * 1024];
        let mut err = vec![0u8; 32 * 1024];
        let (mut out_open, mut err_open) = (true, matches!(self.outputs, Outputs::Pipes { .. }));
        let mut input_done = false;
        while out_open || err_open {
            let (stdout, stderr): (&mut (dyn AsyncRead + Unpin + Send), Option<&mut tokio::process::ChildStderr>) =
                match &mut self.outputs {
                    Outputs::Pipes { stdout, stderr } => (stdout, Some(stderr)),
                    Outputs::Pty(p) => (p, None),
                };
            tokio::select! {
                r = stdout.read(&mut out), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => write(&mut send, Output::Stdout(out[..n].to_vec())).await?,
                },
                r = async { stderr?.read(&mut err).await.ok() }, if err_open => match r {
                    Some(0) | None => err_open = false,
                    Some(n) => write(&mut send, Output::Stderr(err[..n].to_vec())).await?,
                },
                ended = &mut input, if !input_done => match ended {
                    Ok(Fed::Finished) => input_done = true,
                    Ok(Fed::Gone(why)) => return Err(why),
                    Err(e) => return Err(EndedEarly::InputTask(e)),
                },
                _ = send.stopped() => return Err(EndedEarly::HubStopped),
            }
        }
        let status = tokio::select! {
            s = self.child.wait() => s.map_err(EndedEarly::Wait)?,
            _ = send.stopped() => return Err(EndedEarly::HubStopped),
        };
        let code = exit_code(status);
        write(&mut send, Output::Exit { code }).await?;
        let _ = send.finish();
        // Delivered before the stream is dropped, within reason.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
        Ok(code)
    }
}

/// A shell's view of how a process ended: its code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn write(send: &mut quinn::SendStream, output: Output) -> Result<(), EndedEarly> {
    Ok(send.write_all(&output.encode()).await?)
}

/// Why a session ended before the command did (the command is then killed).
#[derive(Debug, thiserror::Error)]
enum EndedEarly {
    #[error("the hub stopped reading")]
    HubStopped,
    #[error("sending output: {0}")]
    Send(#[from] quinn::WriteError),
    #[error("reading input: {0}")]
    Read(#[from] frame::FrameError),
    #[error("bad input: {0}")]
    BadInput(#[from] proto::exec::ChunkError),
    #[error("the input task failed: {0}")]
    InputTask(tokio::task::JoinError),
    #[error("waiting for the command: {0}")]
    Wait(io::Error),
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the input side ended.
enum Fed {
    /// The CLI sent all it had (its stream finished cleanly).
    Finished,
    /// The stream failed or carried garbage: the session ends.
    Gone(EndedEarly),
}

/// Reads the CLI's chunks: stdin bytes to the command, window sizes to the terminal.
async fn feed(mut recv: quinn::RecvStream, mut stdin: Stdin, resize: Option<OwnedFd>) -> Fed {
    loop {
        let (kind, body) = match frame::read_chunk(&mut recv).await {
            Ok(Some(c)) => c,
            Ok(None) => return Fed::Finished,
            Err(e) => return Fed::Gone(e.into()),
        };
        let input = match Input::decode(kind, body) {
            Ok(i) => i,
            Err(e) => return Fed::Gone(e.into()),
        };
        match input {
            Input::Stdin(data) => {
                let wrote = match &mut stdin {
                    Stdin::None => Ok(()),
                    Stdin::Pipe(p) => p.write_all(&data).await,
                    Stdin::Pty(p) => p.write_all(&data).await,
                };
                if let Err(e) = wrote {
                    // The command closed its stdin; what it writes still matters.
                    debug!(error = %e, "exec stdin closed by the command");
                    stdin = Stdin::None;
                }
            }
            // A terminal has no end-of-file to give; the user types ^D instead.
            Input::StdinEnd => {
                if let Stdin::Pipe(_) = stdin {
                    stdin = Stdin::None;
                }
            }
            Input::Resize { rows, cols } => {
                if let Some(master) = &resize {
                    let _ = tty::set_window_size(master.as_fd(), rows, cols);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::messages::ExecSpecError;

    fn spec(replica: &str, command: &[&str]) -> ExecSpec {
        ExecSpec {
            replica: replica.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            stdin: false,
            tty: false,
            rows: 0,
            cols: 0,
        }
    }

    #[test]
    fn only_container_replicas_of_this_node_are_run() {
        let s = spec("web-0", &["sh"]);
        assert_eq!(check(&s, "n1", Some(Runtime::Container), true), Ok(()));
        assert_eq!(check(&s, "n1", None, true), Err(Refusal::NotHere { replica: "web-0".into(), node: "n1".into() }));
        let wasm = check(&s, "n1", Some(Runtime::Wasm), true).unwrap_err();
        assert_eq!(wasm, Refusal::Wasm("web-0".into()));
        assert!(wasm.to_string().contains("containers only"), "{wasm}");
        assert_eq!(check(&s, "n1", Some(Runtime::Container), false), Err(Refusal::NoContainers("n1".into())));
    }

    #[test]
    fn bad_requests_are_refused_before_anything_runs() {
        assert_eq!(
            check(&spec("web-0", &[]), "n", Some(Runtime::Container), true),
            Err(Refusal::Invalid(ExecSpecError::NoCommand))
        );
        assert_eq!(
            check(&spec("web-0", &["a\0b"]), "n", Some(Runtime::Container), true),
            Err(Refusal::Invalid(ExecSpecError::Nul))
        );
        let long = "x".repeat(proto::messages::MAX_EXEC_COMMAND_BYTES);
        assert_eq!(
            check(&spec("web-0", &[&long]), "n", Some(Runtime::Container), true),
            Err(Refusal::Invalid(ExecSpecError::TooLong(long.len() + 1)))
        );
        for name in ["../etc", "a/b", "", "Web-0"] {
            assert_eq!(
                check(&spec(name, &["sh"]), "n", Some(Runtime::Container), true),
                Err(Refusal::BadName(name.into())),
                "{name:?}"
            );
        }
    }

    #[test]
    fn exit_codes_read_as_a_shell_reports_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(9)), 137, "SIGKILL");
    }
}
