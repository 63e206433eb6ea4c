//! Listening sockets handed from one agent process to the next, so an agent restart (or a
//! re-exec of a new binary) refuses no connection to a Wasm HTTP component.
//!
//! A Wasm component lives in the agent's process and restarts with it; its listening socket
//! need not. When the agent exits it takes each HTTP server's listener out of the server
//! (without closing it) and passes them all, over a `SOCK_SEQPACKET` unix socket with
//! `SCM_RIGHTS`, to a small holder process (`flotilla agent-handoff`, in a session of its own).
//! The holder serves them on `<data dir>/run/handoff.sock` until the next agent process
//! connects, hands them over the same way and exits (or gives up after its timeout, closing
//! them). Meanwhile the kernel keeps completing handshakes into each socket's backlog, so a
//! client connecting mid-restart waits for the new process instead of being refused.
//!
//! Why a holder and not `SO_REUSEPORT` overlap: `systemctl restart` stops the old process
//! before it starts the new one, so there is no overlap to exploit; and when one listener of
//! a reuseport group closes, the connections queued on it are reset, not moved. Why not
//! systemd's file descriptor store: it exists only under systemd, and gateways also run
//! agents under other supervisors (or re-exec them on upgrade, which is this same path).
//!
//! The received sockets are checked (listening TCP sockets) and keyed by the address each is
//! bound to, read from the socket itself.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use tracing::{debug, info, warn};

/// Most descriptors in one message (the kernel's limit, `SCM_MAX_FD`, is 253).
const FDS_PER_MESSAGE: usize = 200;
/// The payload of a message carrying listeners, and of the receiver's acknowledgement.
const LISTENERS: &[u8] = b"flotilla-listeners/1";
const READY: &[u8] = b"ready";
const ACK: &[u8] = b"ack";
/// How long one side waits for the other during a transfer.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("handoff protocol: {0}")]
    Protocol(String),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HandoffError + use<> {
    let path = path.to_path_buf();
    move |source| HandoffError::Io { action, path, source }
}

fn errno(action: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> HandoffError + use<> {
    let f = io(action, path);
    move |e| f(e.into())
}

/// Where the holder waits for the next agent process.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("handoff.sock")
}

/// The listening sockets one agent process received from the previous one (to be taken by
/// the runs that serve on them) and those it gives up when it exits.
#[derive(Debug, Default)]
pub struct Sockets {
    // std Mutex: held only to move a socket in or out.
    inherited: Mutex<HashMap<SocketAddr, TcpListener>>,
    outgoing: Mutex<Vec<TcpListener>>,
}

impl Sockets {
    pub fn new(inherited: Vec<TcpListener>) -> Sockets {
        let map = inherited.into_iter().filter_map(|l| Some((l.local_addr().ok()?, l))).collect();
        Sockets { inherited: Mutex::new(map), outgoing: Mutex::default() }
    }

    /// The inherited listener bound to `addr`, if any (once).
    pub fn take(&self, addr: SocketAddr) -> Option<TcpListener> {
        lock(&self.inherited).remove(&addr)
    }

    /// Closes inherited listeners that no replica of the current set will serve on.
    pub fn keep_only(&self, addrs: &[SocketAddr]) {
        lock(&self.inherited).retain(|addr, _| {
            let keep = addrs.contains(addr);
            if !keep {
                info!(%addr, "closing a handed-over listening socket no replica serves on any more");
            }
            keep
        });
    }

    /// A listener to hand on to the next agent process.
    pub fn give(&self, listener: TcpListener) {
        lock(&self.outgoing).push(listener);
    }

    /// Everything to hand on: what runs gave up, and what was inherited but not yet used.
    pub fn take_outgoing(&self) -> Vec<TcpListener> {
        let mut out = std::mem::take(&mut *lock(&self.outgoing));
        out.extend(lock(&self.inherited).drain().map(|(_, l)| l));
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave a map of sockets inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the listeners a previous agent process left with a holder at `socket`, if there is
/// one. A stale socket file (no holder behind it) is removed. Blocking, bounded.
pub fn receive(socket: &Path) -> Result<Vec<TcpListener>, HandoffError> {
    if !socket.exists() {
        return Ok(Vec::new());
    }
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .map_err(errno("create a socket for", socket))?;
    let addr = SocketAddrUnix::new(socket).map_err(errno("address", socket))?;
    if let Err(e) = rustix::net::connect(&fd, &addr) {
        debug!(path = %socket.display(), error = %e, "no socket holder; removing its stale socket");
        let _ = std::fs::remove_file(socket);
        return Ok(Vec::new());
    }
    set_timeouts(fd.as_fd(), STEP_TIMEOUT).map_err(errno("configure", socket))?;
    let fds = recv_all(fd.as_fd(), socket)?;
    let listeners = fds.into_iter().filter_map(|fd| listener(fd, socket)).collect::<Vec<_>>();
    // The holder exits once it knows the descriptors arrived.
    let _ = rustix::net::send(&fd, ACK, SendFlags::NOSIGNAL);
    Ok(listeners)
}

/// A received descriptor as a listener, if it is a listening TCP socket.
fn listener(fd: OwnedFd, from: &Path) -> Option<TcpListener> {
    let tcp = matches!(rustix::net::sockopt::socket_domain(&fd), Ok(AddressFamily::INET | AddressFamily::INET6))
        && rustix::net::sockopt::socket_type(&fd) == Ok(SocketType::STREAM)
        && rustix::net::sockopt::socket_acceptconn(&fd) == Ok(true);
    if !tcp {
        warn!(path = %from.display(), "ignoring a handed-over descriptor that is not a listening TCP socket");
        return None;
    }
    Some(TcpListener::from(fd))
}

/// Hands `listeners` to a new holder process (`exe agent-handoff`), which keeps them for the
/// next agent process for up to `timeout`. Returns once the holder has them and listens on
/// `socket`. Blocking.
pub fn pass_on(exe: &Path, socket: &Path, listeners: Vec<TcpListener>, timeout: Duration) -> Result<(), HandoffError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let (mine, theirs) =
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .map_err(errno("create a socket pair for", socket))?;
    // The holder gets its end as stdin (dup2'd by the standard library, which clears
    // close-on-exec on the copy only) and a process group of its own, so a terminal's ^C or
    // a signal to the agent's group does not reach it; it also starts a new session itself.
    let child = Command::new(exe)
        .arg("agent-handoff")
        .arg("--socket")
        .arg(socket)
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io("run", exe))?;
    set_timeouts(mine.as_fd(), STEP_TIMEOUT).map_err(errno("configure", socket))?;
    let fds: Vec<OwnedFd> = listeners.into_iter().map(OwnedFd::from).collect();
    send_all(mine.as_fd(), &fds, socket)?;
    let mut buf = [0u8; 16];
    let n = rustix::net::recv(&mine, &mut buf, RecvFlags::empty()).map_err(errno("wait for the holder at", socket))?.0;
    if &buf[..n] != READY {
        return Err(HandoffError::Protocol(format!("the socket holder (pid {}) did not get ready", child.id())));
    }
    info!(holder = child.id(), sockets = fds.len(), path = %socket.display(), "listening sockets handed to a holder for the next agent process");
    Ok(())
}

/// Body of the holder process, `flotilla agent-handoff`: takes listeners from stdin, serves
/// them on `socket` to the first agent process that connects, and exits; exits anyway after
/// `timeout`, closing them. Blocking; runs before any async runtime.
pub fn hold(socket: &Path, timeout: Duration) -> Result<(), HandoffError> {
    // Fails only if already a session leader.
    let _ = nix::unistd::setsid();
    let deadline = Instant::now() + timeout;
    let stdin = std::io::stdin();
    set_timeouts(stdin.as_fd(), STEP_TIMEOUT).map_err(errno("configure stdin of", socket))?;
    let fds = recv_all(stdin.as_fd(), socket)?;

    let _ = std::fs::remove_file(socket);
    let listener = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .map_err(errno("create", socket))?;
    let addr = SocketAddrUnix::new(socket).map_err(errno("address", socket))?;
    rustix::net::bind(&listener, &addr).map_err(errno("bind", socket))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io("protect", socket))?;
    }
    rustix::net::listen(&listener, 4).map_err(errno("listen on", socket))?;
    rustix::net::send(stdin.as_fd(), READY, SendFlags::NOSIGNAL)
        .map_err(errno("report to the agent through", socket))?;
    info!(sockets = fds.len(), path = %socket.display(), "holding listening sockets for the next agent process");

    // `accept` honours the receive timeout on Linux: wake up now and then to check the deadline.
    set_timeouts(listener.as_fd(), Duration::from_millis(200)).map_err(errno("configure", socket))?;
    let result = loop {
        if Instant::now() >= deadline {
            warn!(path = %socket.display(), ?timeout, "no agent process came for the listening sockets; closing them");
            break Ok(());
        }
        let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => break Err(errno("accept on", socket)(e)),
        };
        if let Err(e) = set_timeouts(conn.as_fd(), STEP_TIMEOUT) {
            warn!(error = %e, "cannot configure a handoff connection");
            continue;
        }
        match send_all(conn.as_fd(), &fds, socket) {
            Ok(()) => {
                // Wait for the acknowledgement (or the agent's end) before closing our copies:
                // descriptors in flight are the receiver's once the message is read.
                let mut buf = [0u8; 8];
                let _ = rustix::net::recv(&conn, &mut buf, RecvFlags::empty());
                info!(sockets = fds.len(), "listening sockets handed to the new agent process");
                break Ok(());
            }
            Err(e) => warn!(error = %e, "handing the sockets over failed; waiting for another agent process"),
        }
    };
    let _ = std::fs::remove_file(socket);
    result
}

/// Sends `fds` in messages of at most [`FDS_PER_MESSAGE`], then ends the sending direction.
fn send_all(fd: BorrowedFd<'_>, fds: &[OwnedFd], path: &Path) -> Result<(), HandoffError> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    for chunk in borrowed.chunks(FDS_PER_MESSAGE) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(chunk)) {
            return Err(HandoffError::Protocol("descriptor batch does not fit its control buffer".into()));
        }
        rustix::net::sendmsg(fd, &[IoSlice::new(LISTENERS)], &mut control, SendFlags::NOSIGNAL)
            .map_err(errno("send sockets through", path))?;
    }
    rustix::net::shutdown(fd, rustix::net::Shutdown::Write).map_err(errno("finish sending through", path))?;
    Ok(())
}

/// Receives descriptors until the sender ends its direction.
fn recv_all(fd: BorrowedFd<'_>, path: &Path) -> Result<Vec<OwnedFd>, HandoffError> {
    let mut out = Vec::new();
    loop {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut payload = [0u8; 64];
        let msg = rustix::net::recvmsg(fd, &mut [IoSliceMut::new(&mut payload)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(errno("receive sockets through", path))?;
        if msg.bytes == 0 {
            return Ok(out);
        }
        if &payload[..msg.bytes] != LISTENERS {
            return Err(HandoffError::Protocol("unexpected message from the other agent process".into()));
        }
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                out.extend(fds);
            }
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(HandoffError::Protocol("descriptors were truncated in transit".into()));
        }
    }
}

fn set_timeouts(fd: BorrowedFd<'_>, t: Duration) -> rustix::io::Result<()> {
    rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Recv, Some(t))?;
    rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Send, Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_pass_through_a_holder_with_their_queued_connections() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_path(dir.path());
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // The holder's side runs on a thread here (the agent runs it as a process).
        let (mine, theirs) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        send_all(mine.as_fd(), &[OwnedFd::from(a), OwnedFd::from(b)], &socket).unwrap();
        let received = recv_all(theirs.as_fd(), &socket).unwrap();
        assert_eq!(received.len(), 2);
        // A client connecting while nobody accepts is queued, not refused.
        let client = std::net::TcpStream::connect(addr_a).unwrap();
        let holder = std::thread::spawn({
            let socket = socket.clone();
            move || {
                // What `hold` does after reading stdin.
                let listener =
                    rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                        .unwrap();
                rustix::net::bind(&listener, &SocketAddrUnix::new(&socket).unwrap()).unwrap();
                rustix::net::listen(&listener, 1).unwrap();
                let conn = rustix::net::accept(&listener).unwrap();
                send_all(conn.as_fd(), &received, &socket).unwrap();
                let mut buf = [0u8; 8];
                rustix::net::recv(&conn, &mut buf, RecvFlags::empty()).unwrap();
            }
        });
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let listeners = receive(&socket).unwrap();
        holder.join().unwrap();
        let sockets = Sockets::new(listeners);
        let a = sockets.take(addr_a).expect("listener a handed over");
        assert!(sockets.take(addr_a).is_none(), "taken once");
        let (_, peer) = a.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap(), "the queued connection survived the handoff");
        sockets.keep_only(&[]);
        assert!(sockets.take(addr_b).is_none(), "unused listeners are closed");
        assert!(std::net::TcpStream::connect(addr_b).is_err(), "a closed listener refuses");
    }

    #[test]
    fn a_stale_holder_socket_is_removed_and_yields_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_path(dir.path());
        assert!(receive(&socket).unwrap().is_empty());
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        std::fs::write(&socket, b"").unwrap();
        assert!(receive(&socket).unwrap().is_empty());
        assert!(!socket.exists());
    }

    #[test]
    fn descriptors_that_are_not_listeners_are_refused() {
        let (a, _b) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        assert!(listener(a, Path::new("x")).is_none());
        let connected = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(connected.local_addr().unwrap()).unwrap();
        assert!(listener(OwnedFd::from(stream), Path::new("x")).is_none());
    }
}
