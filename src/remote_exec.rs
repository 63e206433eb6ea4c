//! `flotilla exec`, the CLI's side: the request goes to the hub, which joins it to a stream on
//! the node's own link; then stdin (and, with a terminal, its window size) goes out as
//! [`proto::exec`] chunks and the command's output comes back until its exit code. With `-t`
//! the local terminal is put in raw mode for the session (restored however it ends), so
//! every key, ^C included, reaches the remote command.

use std::io::Write;
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use oci_runtime::container::tty;
use proto::exec::{Input, Output};
use proto::messages::{ExecSpec, StreamStart};
use tokio::io::AsyncReadExt;
use transport::frame;

/// Exit code for failures of `flotilla exec` itself (as `oci exec` and docker use it); the
/// command's own codes pass through.
pub const EXEC_FAILED: u8 = 125;

/// The terminal size to start the remote terminal with, from stdout (or stdin).
pub fn local_window_size() -> Option<(u16, u16)> {
    tty::window_size(std::io::stdout().as_fd()).or_else(|_| tty::window_size(std::io::stdin().as_fd())).ok()
}

/// Whether stdin is a terminal (`-t` needs one).
pub fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Runs the session on an opened exec stream and returns the command's exit code.
pub async fn run(send: quinn::SendStream, mut recv: quinn::RecvStream, spec: &ExecSpec) -> Result<i32> {
    match frame::read::<StreamStart>(&mut recv).await? {
        Some(StreamStart::Ok) => {}
        Some(StreamStart::Error { message }) => bail!("{message}"),
        None => bail!("the hub closed the exec stream without answering"),
    }
    let _raw = match spec.tty {
        true => Some(tty::raw_mode(std::io::stdin().as_fd()).context("putting the terminal in raw mode")?),
        false => None,
    };
    // Dropped with the session: a running input task would otherwise keep reading stdin.
    let input = tokio::spawn(feed(send, spec.stdin, spec.tty));
    let result = print_output(&mut recv).await;
    input.abort();
    result
}

/// Sends stdin (when asked) and, with a terminal, window size changes, until the session
/// ends (the caller aborts this task).
async fn feed(mut send: quinn::SendStream, stdin: bool, tty: bool) -> Result<()> {
    let mut winch = match tty {
        true => Some(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?),
        false => None,
    };
    let mut input = stdin.then(tokio::io::stdin);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = async { input.as_mut()?.read(&mut buf).await.ok() }, if input.is_some() => match r {
                Some(n) if n > 0 => send.write_all(&Input::Stdin(buf[..n].to_vec()).encode()).await?,
                _ => {
                    input = None;
                    send.write_all(&Input::StdinEnd.encode()).await?;
                    if !tty {
                        // Nothing more to send: the command reads end-of-file.
                        let _ = send.finish();
                        return Ok(());
                    }
                }
            },
            Some(()) = async { winch.as_mut()?.recv().await }, if winch.is_some() => {
                if let Some((rows, cols)) = local_window_size() {
                    send.write_all(&Input::Resize { rows, cols }.encode()).await?;
                }
            }
            else => {
                // No stdin and no terminal: only the output matters.
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}

/// Writes the command's output where it belongs until its exit code arrives.
async fn print_output(recv: &mut quinn::RecvStream) -> Result<i32> {
    loop {
        let Some((kind, body)) = frame::read_chunk(recv).await.context("reading the command's output")? else {
            bail!("the stream ended before the command's exit code (the node or the hub went away)");
        };
        match Output::decode(kind, body)? {
            Output::Stdout(data) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)?;
                out.flush()?;
            }
            Output::Stderr(data) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&data)?;
                err.flush()?;
            }
            Output::Exit { code } => return Ok(code),
        }
    }
}
