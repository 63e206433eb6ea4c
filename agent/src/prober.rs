//! Runs a run's health probes: the I/O half of [`crate::probe`]. One task per run with probes,
//! started when the run starts and aborted when it ends; it sleeps until the next probe is
//! due, runs the check under its timeout and reports the verdicts.
//!
//! Where checks go:
//! - HTTP and TCP probes connect to 127.0.0.1:port in the workload's network namespace. A
//!   container with its own network (`network: none`) is reached by creating the socket on a
//!   short-lived thread that first enters the container's namespace (a socket stays in the
//!   namespace it was created in). The thread ends right after, so no thread of the agent's
//!   pools ever changes namespace. Wasm components and host-network containers listen in the
//!   agent's own namespace.
//! - Exec probes run `flotilla oci exec` inside the container, as a child process with its own
//!   timeout, so a hung command cannot hold the agent.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::manifest::{ProbeAction, Probes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::probe::{ProbeKind, ProbeSet, Verdict};

/// How to reach one run's workload.
#[derive(Debug, Clone, Default)]
pub struct ProbeTarget {
    /// The network namespace the workload listens in; `None`: the agent's own.
    pub netns: Option<Arc<File>>,
    /// How exec probes enter the workload; `None`: exec probes are not possible.
    pub exec: Option<ExecTarget>,
    /// The workload's own address on the node's container network, if it has one (reported
    /// in its status, for services).
    pub address: Option<std::net::IpAddr>,
}

/// The `flotilla oci ... exec ID` command line that runs a command in a container, without
/// the command.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// Program and arguments up to and excluding `exec`.
    pub oci_argv: Vec<OsString>,
    pub container_id: String,
}

/// Why one check failed. The text is what users read in the replica's events ("GET /healthz:
/// HTTP 500").
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect to port {port} timed out after {}", humantime(*timeout))]
    ConnectTimeout { port: u16, timeout: Duration },
    #[error("connect to port {port}: {error}")]
    Connect { port: u16, error: std::io::Error },
    #[error("cannot enter the container's network namespace: {0}")]
    EnterNetns(nix::Error),
    #[error("cannot start a probe thread: {0}")]
    SpawnThread(std::io::Error),
    #[error("the probe thread ended without an answer")]
    ThreadGone,
    #[error("GET {path} timed out after {}", humantime(*timeout))]
    HttpTimeout { path: String, timeout: Duration },
    #[error("GET {path}: {error}")]
    HttpIo { path: String, error: std::io::Error },
    #[error("GET {path}: not an HTTP response ({line:?})")]
    NotHttp { path: String, line: String },
    #[error("GET {path}: HTTP {code}")]
    HttpStatus { path: String, code: u16 },
    #[error("exec probes need a container")]
    ExecNeedsContainer,
    #[error("no exec command configured")]
    NoExecCommand,
    #[error("cannot run {program}: {error}")]
    ExecSpawn { program: String, error: std::io::Error },
    #[error("exec {command}: {error}")]
    ExecWait { command: String, error: std::io::Error },
    #[error("exec {command} did not finish")]
    ExecHung { command: String },
    #[error("exec {command} timed out after {}", humantime(*timeout))]
    ExecTimeout { command: String, timeout: Duration },
    /// The executor's own failures (codes 125 to 127): the probe could not run at all.
    #[error("exec {command} could not run (code {code}): {stderr}")]
    ExecCouldNotRun { command: String, code: i32, stderr: String },
    /// The command ran and failed: `code` is `None` when it was killed by a signal.
    #[error("exec {command} {}{}", exec_how(*code), exec_detail(stderr))]
    ExecFailed { command: String, code: Option<i32>, stderr: String },
}

fn exec_how(code: Option<i32>) -> String {
    code.map_or_else(|| "was killed".to_string(), |c| format!("exited with code {c}"))
}

fn exec_detail(stderr: &str) -> String {
    if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
}

/// Probes one run until its probes are done (a kill was decided) or the task is aborted.
/// `failed` hears of every failed check (for metrics: a verdict comes only when a threshold
/// is crossed).
pub async fn run(
    probes: Probes,
    started: Instant,
    target: ProbeTarget,
    report: impl Fn(Verdict),
    failed: impl Fn(ProbeKind),
) {
    let mut set = ProbeSet::new(&probes, started);
    while let Some((kind, at)) = set.next_due() {
        tokio::time::sleep_until(at.into()).await;
        let Some(probe) = set.probe(kind).cloned() else { return };
        let result = check(&probe.action, Duration::from_millis(probe.timeout_ms), &target).await;
        if result.is_err() {
            failed(kind);
        }
        if let Some(verdict) = set.record(kind, result, Instant::now()) {
            report(verdict);
        }
    }
}

/// One check; `Err` says why it failed.
pub async fn check(action: &ProbeAction, timeout: Duration, target: &ProbeTarget) -> Result<(), CheckError> {
    match action {
        ProbeAction::Tcp { port } => {
            connect(*port, target, timeout).await?;
            Ok(())
        }
        ProbeAction::Http { path, port } => {
            let deadline = tokio::time::Instant::now() + timeout;
            let stream = connect(*port, target, timeout).await?;
            match tokio::time::timeout_at(deadline, http_get(stream, path, *port)).await {
                Ok(r) => r,
                Err(_) => Err(CheckError::HttpTimeout { path: path.clone(), timeout }),
            }
        }
        ProbeAction::Exec { command } => {
            let Some(exec) = &target.exec else {
                return Err(CheckError::ExecNeedsContainer);
            };
            exec_check(exec, command, timeout).await
        }
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

async fn connect(port: u16, target: &ProbeTarget, timeout: Duration) -> Result<TcpStream, CheckError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let failed = move |error: std::io::Error| CheckError::Connect { port, error };
    let Some(netns) = target.netns.clone() else {
        return match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(r) => r.map_err(failed),
            Err(_) => Err(CheckError::ConnectTimeout { port, timeout }),
        };
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("probe-netns".into()).spawn(move || {
        let r = nix::sched::setns(&*netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(CheckError::EnterNetns)
            .and_then(|()| std::net::TcpStream::connect_timeout(&addr, timeout).map_err(failed));
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        return Err(CheckError::SpawnThread(e));
    }
    let stream = rx.await.map_err(|_| CheckError::ThreadGone)??;
    stream.set_nonblocking(true).map_err(failed)?;
    TcpStream::from_std(stream).map_err(failed)
}

/// A minimal HTTP/1.1 GET: passes on a status from 200 to 399.
async fn http_get(mut stream: TcpStream, path: &str, port: u16) -> Result<(), CheckError> {
    let io = |error: std::io::Error| CheckError::HttpIo { path: path.to_string(), error };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: flotilla-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    let code =
        status_code(line).ok_or_else(|| CheckError::NotHttp { path: path.to_string(), line: line.to_string() })?;
    if (200..400).contains(&code) { Ok(()) } else { Err(CheckError::HttpStatus { path: path.to_string(), code }) }
}

fn status_code(status_line: &str) -> Option<u16> {
    let mut parts = status_line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn exec_check(exec: &ExecTarget, command: &[String], timeout: Duration) -> Result<(), CheckError> {
    let Some((program, args)) = exec.oci_argv.split_first() else {
        return Err(CheckError::NoExecCommand);
    };
    let secs = timeout.as_secs_f64().max(0.1);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .arg("exec")
        .arg("--timeout")
        .arg(format!("{secs:.3}"))
        .arg(&exec.container_id)
        .arg("--")
        .args(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|error| CheckError::ExecSpawn { program: program.to_string_lossy().into_owned(), error })?;
    let command = command.join(" ");
    // The exec command enforces the timeout itself; this outer bound only guards against a
    // stuck executor.
    let out = match tokio::time::timeout(timeout + Duration::from_secs(5), child.wait_with_output()).await {
        Ok(r) => r.map_err(|error| CheckError::ExecWait { command: command.clone(), error })?,
        Err(_) => return Err(CheckError::ExecHung { command }),
    };
    match out.status.code() {
        Some(0) => Ok(()),
        Some(124) => Err(CheckError::ExecTimeout { command, timeout }),
        // The executor's own failures: the probe could not run at all.
        Some(code @ 125..=127) => Err(CheckError::ExecCouldNotRun { command, code, stderr: last_line(&out.stderr) }),
        code => Err(CheckError::ExecFailed { command, code, stderr: last_line(&out.stderr) }),
    }
}

/// The last non-empty line of `stderr`, trimmed and cut at 200 characters.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    last.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(""), None);
        assert_eq!(status_code("HTTP/1.1 abc"), None);
    }

    async fn serve_once(listener: TcpListener, response: &'static [u8]) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(response).await;
    }

    #[tokio::test]
    async fn http_and_tcp_checks_pass_and_fail_for_the_right_reasons() {
        let none = ProbeTarget::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(serve_once(l, b"HTTP/1.1 204 No Content\r\n\r\n"));
        let action = ProbeAction::Http { path: "/healthz".into(), port };
        let ok = check(&action, Duration::from_secs(2), &none).await;
        assert!(ok.is_ok(), "{ok:?}");
        server.await.unwrap();

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(serve_once(l, b"HTTP/1.1 500 Internal Server Error\r\n\r\n"));
        let action = ProbeAction::Http { path: "/healthz".into(), port };
        let err = check(&action, Duration::from_secs(2), &none).await.unwrap_err();
        assert!(matches!(&err, CheckError::HttpStatus { path, code: 500 } if path == "/healthz"), "{err:?}");
        assert_eq!(err.to_string(), "GET /healthz: HTTP 500");
        server.await.unwrap();

        // A server that accepts but never answers fails by the timeout.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let action = ProbeAction::Http { path: "/".into(), port };
        let err = check(&action, Duration::from_millis(200), &none).await.unwrap_err().to_string();
        assert_eq!(err, "GET / timed out after 200ms");
        assert!(check(&ProbeAction::Tcp { port }, Duration::from_secs(1), &none).await.is_ok());
        drop(l);
        let err = check(&ProbeAction::Tcp { port }, Duration::from_secs(1), &none).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("connect to port {port}:")), "{err}");
    }

    #[tokio::test]
    async fn exec_needs_a_container() {
        let err =
            check(&ProbeAction::Exec { command: vec!["true".into()] }, Duration::from_secs(1), &Default::default())
                .await
                .unwrap_err()
                .to_string();
        assert_eq!(err, "exec probes need a container");
    }

    #[tokio::test]
    async fn exec_reports_the_exit_code_and_last_stderr_line() {
        // Any program standing in for the executor: `sh -c SCRIPT exec --timeout N ID -- CMD`
        // sees the probe's arguments as $0.. and answers like `flotilla oci exec` would.
        let target = |script: &str| ProbeTarget {
            netns: None,
            exec: Some(ExecTarget {
                oci_argv: vec!["sh".into(), "-c".into(), script.into()],
                container_id: "c1".into(),
            }),
            address: None,
        };
        let probe = |cmd: &str| ProbeAction::Exec { command: vec![cmd.into()] };
        let t = target("echo \"unhealthy: $5 ($2)\" >&2; exit 3");
        let err = check(&probe("/bin/check"), Duration::from_millis(1500), &t).await.unwrap_err().to_string();
        assert_eq!(err, "exec /bin/check exited with code 3: unhealthy: /bin/check (1.500)");
        let t = target("echo \"no such file: $5\" >&2; exit 127");
        let err = check(&probe("/bin/missing"), Duration::from_secs(1), &t).await.unwrap_err().to_string();
        assert_eq!(err, "exec /bin/missing could not run (code 127): no such file: /bin/missing");
        let t = target("exit 124");
        let err = check(&probe("/bin/slow"), Duration::from_millis(300), &t).await.unwrap_err().to_string();
        assert_eq!(err, "exec /bin/slow timed out after 300ms");
        let ok = check(&probe("/bin/ok"), Duration::from_secs(1), &target("exit 0")).await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[tokio::test]
    async fn network_namespace_sockets_are_made_on_a_throwaway_thread() {
        // Our own namespace, opened as a file, stands in for a container's: the path through
        // setns works and no pool thread is touched.
        let Ok(ns) = File::open("/proc/self/ns/net") else { return };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let target = ProbeTarget { netns: Some(Arc::new(ns)), exec: None, address: None };
        match check(&ProbeAction::Tcp { port }, Duration::from_secs(1), &target).await {
            Ok(()) => {}
            // Entering a namespace needs CAP_SYS_ADMIN; unprivileged runs see that error.
            Err(CheckError::EnterNetns(_)) if !nix::unistd::geteuid().is_root() => {}
            Err(e) => panic!("{e}"),
        }
    }
}
