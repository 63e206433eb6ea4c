//! The container executor's raw system calls: the few operations neither `std` nor `nix`
//! offers safely (a fork-like `clone` with namespace flags, capability sets, ambient and
//! bounding capabilities, seccomp filter installation, signal disposition reset, bringing up
//! loopback, marking descriptors close-on-exec, recursive read-only mounts, a terminal's
//! controlling session and window size). This is the only
//! file of the executor with `unsafe`; every block says why it is sound. It owns no state and
//! must never be called from a process with more than one thread where it says so.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Result of [`clone_process`]: which side of the clone we are on.
pub(crate) enum Forked {
    Parent(i32),
    Child,
}

/// A `fork` that also creates the namespaces in `flags` (`CLONE_NEW*`). The child runs on a
/// copy of the parent's stack, exactly as after `fork`. Callers must be single-threaded: in a
/// multi-threaded process the child could inherit locks held by threads that no longer exist.
pub(crate) fn clone_process(flags: libc::c_int) -> io::Result<Forked> {
    // SAFETY: the raw clone syscall with a null stack behaves like fork(2): the child gets a
    // copy-on-write copy of the address space and continues here. The caller checked that the
    // process has a single thread, so no lock is held by a thread that would be missing in the
    // child. x86_64 and aarch64 take (flags, stack, parent_tid, child_tid, tls).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// Leaves the process immediately with `code`, without running atexit handlers or flushing
/// stdio buffers that belong to the parent's copy of the address space.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every caller passes integer arguments only (no pointers), for which prctl reads
    // nothing from our memory.
    let ret = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

pub(crate) fn set_keep_caps(keep: bool) -> io::Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, keep as libc::c_ulong, 0)
}

pub(crate) fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0)
}

pub(crate) fn set_child_subreaper() -> io::Result<()> {
    prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0)
}

/// Marks the process (not) dumpable: a non-dumpable process's /proc files (exe, fd, root,
/// mem) are closed to other processes of the same user without CAP_SYS_PTRACE, and it
/// cannot be ptraced by them. execve restores dumpability for the new program.
pub(crate) fn set_dumpable(dumpable: bool) -> io::Result<()> {
    prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong, 0)
}

pub(crate) fn drop_bounding_cap(cap: u32) -> io::Result<()> {
    match prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0) {
        // A capability the kernel does not know is not in the bounding set anyway.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

pub(crate) fn raise_ambient_cap(cap: u32) -> io::Result<()> {
    // SAFETY: integer arguments only, as in `prctl`.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            cap as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets this thread's effective, permitted and inheritable capability sets (bit masks).
pub(crate) fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [
        CapData { effective: effective as u32, permitted: permitted as u32, inheritable: inheritable as u32 },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: header and data are valid repr(C) values laid out as the kernel's
    // __user_cap_header_struct and two __user_cap_data_struct (version 3 takes two), and they
    // outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// One classic BPF instruction, as `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const SockFilter,
}

/// Installs a seccomp filter program on this process (needs no_new_privs or CAP_SYS_ADMIN).
pub(crate) fn install_seccomp(program: &[SockFilter], flags: libc::c_ulong) -> io::Result<()> {
    let len = libc::c_ushort::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seccomp program too long"))?;
    let prog = SockFprog { len, filter: program.as_ptr() };
    // SAFETY: prog points at `program`, which outlives the call; the kernel copies the filter.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            flags,
            &prog as *const SockFprog,
        )
    };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Restores the default disposition of every catchable signal (the Rust runtime ignores
/// SIGPIPE, and ignored signals survive exec) and unblocks all signals.
pub(crate) fn reset_signals() {
    for signal in 1..libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code; errors (for signal numbers the
        // C library reserves) are harmless and ignored.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// Marks every descriptor from `first` up close-on-exec, so nothing the runtime inherited or
/// opened leaks into the container's process.
pub(crate) fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors; it takes
    // no pointers.
    let ret =
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_uint) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// This process's capability bounding set (`CapBnd` of /proc/self/status), if readable.
pub(crate) fn own_bounding_set() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Makes the terminal open on `fd` the calling process's controlling terminal. The caller
/// must lead a session without one (just after `setsid`).
pub(crate) fn set_controlling_terminal(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal the terminal from another
    // session), no pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0 as libc::c_int) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The window size (rows, columns) of the terminal open on `fd`.
pub(crate) fn window_size(fd: &impl AsRawFd) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at a live,
    // properly aligned `winsize` on this stack frame.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok((ws.ws_row, ws.ws_col)) }
}

/// Sets the window size of the terminal open on `fd` (its foreground process group gets
/// SIGWINCH).
pub(crate) fn set_window_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live,
    // properly aligned `winsize` on this stack frame.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Registers `fd` with tokio's reactor (made non-blocking first), for async I/O on
/// descriptors tokio has no type for (a pseudo-terminal master).
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and names the same
    // file description until the AsyncFd drops it; OwnedFd::as_raw_fd always returns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Sets IFF_UP on the loopback interface of the current network namespace.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes integer arguments; the returned descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a valid, live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ifr_ifru union holds the flags after SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid, live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat) and its
/// state letter, or None when no such process exists. The pair identifies a process across
/// pid reuse.
pub(crate) fn proc_start_time(pid: i32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

/// Number of threads of the calling process.
pub(crate) fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Makes the mount at `path` and every mount below it read-only (`mount_setattr` with
/// `AT_RECURSIVE`, Linux 5.12): a remount with `MS_RDONLY` changes only the top mount of an
/// `rbind`, leaving a bound host `/`'s `/proc`, `/sys` and cgroups writable.
pub(crate) fn set_readonly_recursive(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let attr = libc::mount_attr { attr_set: libc::MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: `c_path` is a NUL-terminated string and `attr` a fully initialised mount_attr,
    // both alive for the call; the kernel reads `size_of::<mount_attr>()` bytes of `attr` and
    // writes nothing to our memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            (libc::AT_RECURSIVE | libc::AT_NO_AUTOMOUNT) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
