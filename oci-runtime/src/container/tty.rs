//! Terminals for `exec -t`: a pseudo-terminal pair whose slave side becomes a command's
//! stdin, stdout and stderr, window sizes, and raw mode for the terminal a user types in.
//! The system calls behind the window sizes live in `sys.rs` with the executor's others.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use nix::fcntl::OFlag;
use nix::sys::termios::{self, SetArg, Termios};

/// The two ends of a pseudo-terminal, both close-on-exec (a child gets the slave only as
/// the descriptors it is given explicitly).
pub struct Pty {
    /// Read: what the command writes. Write: what the command reads as typed.
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` × `cols`. Neither end becomes the caller's controlling
/// terminal.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    // posix_openpt + open with O_CLOEXEC rather than openpty(3): no moment in which another
    // thread's fork could inherit the descriptors.
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::pty::posix_openpt(flags)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(name.as_str(), flags, nix::sys::stat::Mode::empty())?;
    let master: OwnedFd = master.into();
    if rows > 0 && cols > 0 {
        super::sys::set_window_size(&master, rows, cols)?;
    }
    Ok(Pty { master, slave })
}

/// The window size (rows, columns) of the terminal open on `fd`.
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    super::sys::window_size(&fd.as_raw_fd())
}

/// Sets the window size of the terminal open on `fd`; its foreground process group gets
/// SIGWINCH.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    super::sys::set_window_size(&fd.as_raw_fd(), rows, cols)
}

/// A terminal in raw mode (no echo, no line editing, no signals from keys: every byte goes
/// to the remote command); its settings are restored when dropped.
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

/// Puts the terminal on `fd` in raw mode until the returned guard is dropped.
pub fn raw_mode(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
    let saved = termios::tcgetattr(fd)?;
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
    Ok(RawMode { fd: fd.try_clone_to_owned()?, saved })
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// A pseudo-terminal master as tokio I/O (in a tokio runtime). A read of EIO (every slave
/// closed: the command on the terminal has ended) is end-of-file.
pub struct PtyIo(AsyncFd<OwnedFd>);

impl PtyIo {
    pub fn new(master: OwnedFd) -> io::Result<PtyIo> {
        Ok(PtyIo(super::sys::async_fd(master)?))
    }
}

impl AsyncRead for PtyIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_carries_bytes_and_its_window_size() {
        let pty = open_pty(24, 80).unwrap();
        assert_eq!(window_size(pty.slave.as_fd()).unwrap(), (24, 80));
        set_window_size(pty.master.as_fd(), 50, 132).unwrap();
        assert_eq!(window_size(pty.slave.as_fd()).unwrap(), (50, 132));
        // Raw on the slave side: bytes pass unchanged, no echo back to the master.
        let _raw = raw_mode(pty.slave.as_fd()).unwrap();
        nix::unistd::write(&pty.master, b"hi\n").unwrap();
        let mut buf = [0u8; 16];
        let n = nix::unistd::read(&pty.slave, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi\n");
        for (end, fd) in [("master", pty.master.as_fd()), ("slave", pty.slave.as_fd())] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "the {end} must be close-on-exec");
        }
    }

    #[test]
    fn window_size_of_a_non_terminal_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(window_size(f.as_fd()).is_err());
    }

    #[tokio::test]
    async fn a_pty_master_reads_what_the_slave_writes_and_eof_when_it_closes() {
        let pty = open_pty(24, 80).unwrap();
        use tokio::io::AsyncReadExt;
        let mut master = PtyIo::new(pty.master).unwrap();
        nix::unistd::write(&pty.slave, b"out").unwrap();
        let mut buf = [0u8; 8];
        let n = master.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"out");
        drop(pty.slave);
        assert_eq!(master.read(&mut buf).await.unwrap(), 0, "EIO after the slave closed reads as end-of-file");
    }
}
